"""``MultiScaleCodes``: the token maps of a video, per latent frame and per scale, and the scale schedule
helpers every caller uses instead of assuming square ``n x n`` maps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_int, require
from ..limits import MAX_SCALE

Scales = tuple[int, ...] | tuple[tuple[int, int], ...]


def check_scales(scales, name: str = "scales") -> Scales:
    """A scale schedule, coarse to fine, in canonical form: a tuple of ints (square ``n x n`` maps) when
    every entry is an int, else a tuple of ``(h, w)`` pairs (an int entry ``n`` meaning ``(n, n)``).
    Each side grows or stays and each map has more tokens than the one before; the last is the latent grid."""
    require(isinstance(scales, (list, tuple)) and len(scales) >= 1, name,
            f"must be a non-empty list of ints or (h, w) pairs, got {scales!r}")
    shapes = []
    for entry in scales:
        if isinstance(entry, (list, tuple)):
            require(len(entry) == 2, name, f"a pair must be (h, w), got {entry!r}")
            shapes.append(tuple(check_int(side, name, 1, MAX_SCALE) for side in entry))
        else:
            n = check_int(entry, name, 1, MAX_SCALE)
            shapes.append((n, n))
    for (h0, w0), (h1, w1) in zip(shapes, shapes[1:]):
        require(h0 <= h1 and w0 <= w1 and h0 * w0 < h1 * w1, name,
                f"must grow coarse to fine (no side shrinking, more tokens each scale), got {list(scales)}")
    if all(not isinstance(entry, (list, tuple)) for entry in scales):
        return tuple(h for h, _ in shapes)
    return tuple(shapes)


def scale_shapes(scales: Scales) -> tuple[tuple[int, int], ...]:
    """``(h, w)`` of every code map of a (canonical) schedule."""
    return tuple((s, s) if isinstance(s, int) else tuple(s) for s in scales)


def tokens_per_frame(scales: Scales) -> int:
    """Tokens of one latent frame: the sum of ``h * w`` over the scales."""
    return sum(h * w for h, w in scale_shapes(scales))


@dataclass
class MultiScaleCodes:
    """Residual multi-scale code maps of a batch of videos.

    ``codes[s]`` is a ``LongTensor`` of shape ``(B, T_lat, h_s, w_s)`` with
    ``(h_s, w_s) = scale_shapes(scales)[s]``; scale ``s`` quantizes what scales ``< s`` left
    unexplained. ``num_frames`` is the pixel frame count ``T = 1 + tau * (T_lat - 1)``.
    """

    codes: list[torch.Tensor]
    scales: Scales
    num_frames: int

    def __post_init__(self) -> None:
        self.scales = check_scales(self.scales)
        require(len(self.codes) == len(self.scales), "codes",
                f"needs one map per scale (at least one), got {len(self.codes)} for scales {self.scales}")
        require(isinstance(self.codes[0], torch.Tensor) and self.codes[0].dim() == 4
                and min(self.codes[0].shape[:2]) >= 1, "codes",
                f"scale 0 must be a (B >= 1, T_lat >= 1, h, w) tensor, got {getattr(self.codes[0], 'shape', None)}")
        b, t = self.codes[0].shape[:2]
        for s, (c, (h, w)) in enumerate(zip(self.codes, self.scale_shapes)):
            require(isinstance(c, torch.Tensor) and tuple(c.shape) == (b, t, h, w), "codes",
                    f"scale {s} must have shape {(b, t, h, w)}, got {tuple(getattr(c, 'shape', ()))}")

    @property
    def batch_size(self) -> int:
        return self.codes[0].shape[0]

    @property
    def num_latent_frames(self) -> int:
        return self.codes[0].shape[1]

    @property
    def scale_shapes(self) -> tuple[tuple[int, int], ...]:
        return scale_shapes(self.scales)

    @property
    def tokens_per_frame(self) -> int:
        return tokens_per_frame(self.scales)

    def to(self, device: torch.device | str) -> "MultiScaleCodes":
        return MultiScaleCodes([c.to(device) for c in self.codes], self.scales, self.num_frames)

    def split(self) -> list["MultiScaleCodes"]:
        """One ``MultiScaleCodes`` per clip of the batch."""
        return [MultiScaleCodes([c[i:i + 1] for c in self.codes], self.scales, self.num_frames)
                for i in range(self.batch_size)]

    def flatten(self) -> torch.Tensor:
        """Tokens in sequence order, ``(B, T_lat, tokens_per_frame)``: per frame, coarse to fine, row-major."""
        return torch.cat([c.flatten(2) for c in self.codes], dim=2)

    @classmethod
    def unflatten(cls, tokens: torch.Tensor, scales: Scales, num_frames: int) -> "MultiScaleCodes":
        """Inverse of :meth:`flatten`."""
        scales = check_scales(scales)
        per_frame = tokens_per_frame(scales)
        require(tokens.dim() == 3 and tokens.shape[2] == per_frame, "tokens",
                f"must have shape (B, T_lat, {per_frame}), got {tuple(tokens.shape)}")
        maps, start = [], 0
        for h, w in scale_shapes(scales):
            maps.append(tokens[:, :, start:start + h * w].reshape(*tokens.shape[:2], h, w))
            start += h * w
        return cls(maps, scales, num_frames)
