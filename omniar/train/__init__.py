"""omniar.train."""
