"""drivers/model."""
