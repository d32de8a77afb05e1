"""Floor 6, the application."""
