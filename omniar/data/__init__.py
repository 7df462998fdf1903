"""omniar.data."""
