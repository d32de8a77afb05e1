"""Floor 2, the adapter core."""
