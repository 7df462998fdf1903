"""Multi-scale Temporal RoPE: rotary phases over (t, h, w, scale).

The ``head_dim / 2`` rotary frequency pairs are split between the four axes
(scale gets 1/8, the rest goes t : h : w = 1 : 1.5 : 1.5); each axis has its
own geometric frequency ladder. Positions come from :mod:`layout`; because a
token's (h, w) is its centre on the finest grid (each axis stretched on its
own, so non-square maps too), every scale of a frame shares one spatial frame
of reference.
"""

from __future__ import annotations

import torch
from torch import nn


def axis_pairs(head_dim: int) -> tuple[int, int, int, int]:
    """Number of rotary pairs per axis (t, h, w, scale)."""
    pairs = head_dim // 2
    s = max(1, pairs // 8)
    rest = pairs - s
    t = max(1, rest // 4)
    h = (rest - t) // 2
    return t, h, rest - t - h, s


class MultiScaleRoPE(nn.Module):
    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        freqs = [theta ** (-torch.arange(n, dtype=torch.float64) / n) for n in axis_pairs(head_dim)]
        self.register_buffer("inv_freq", torch.cat(freqs).float(), persistent=False)
        self.register_buffer("axis", torch.cat([torch.full((n,), a) for a, n in enumerate(axis_pairs(head_dim))]),
                             persistent=False)

    def phases(self, pos: torch.Tensor) -> torch.Tensor:
        """Rotation angles ``(L, head_dim / 2)`` for positions ``(L, 4)``."""
        return pos.float()[:, self.axis] * self.inv_freq

    def cos_sin(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        ang = self.phases(pos)
        return ang.cos().to(dtype), ang.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, H, L, D)``: pair k is (x[k], x[k + D/2])."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
