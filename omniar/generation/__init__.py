"""omniar.generation."""
