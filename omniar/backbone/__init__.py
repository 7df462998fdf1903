"""omniar.backbone."""
