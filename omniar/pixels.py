"""Pixel helpers: the one conversion between 8-bit pixels and the models' float range [-1, 1], and upscaling."""

from __future__ import annotations

import numpy as np
import torch


def from_uint8(pixels: torch.Tensor) -> torch.Tensor:
    """Pixel values 0..255 (uint8, or floats such as a resized image) -> float32 in [-1, 1]; layout kept."""
    return pixels.float().div(127.5).sub(1)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Floats in [-1, 1] -> uint8 0..255, rounded to nearest (values outside are clamped); layout kept."""
    return x.float().add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8)


def upscale(frames: np.ndarray, factor: int) -> np.ndarray:
    """Nearest-neighbour enlargement of (..., H, W, C) frames by an integer ``factor``: every pixel becomes a
    factor x factor block, so small clips stay sharp instead of being blurred by a player."""
    return frames.repeat(factor, axis=-3).repeat(factor, axis=-2) if factor > 1 else frames
