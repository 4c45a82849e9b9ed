"""syscalls."""
