"""drivers/vmu."""
