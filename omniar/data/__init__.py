"""Datasets: Moving Shapes text-video world, video folders, digits domains for UDA."""

from .shapes import HELDOUT, MovingShapes

__all__ = ["HELDOUT", "MovingShapes"]
