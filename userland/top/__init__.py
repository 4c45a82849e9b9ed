"""userland/top."""
