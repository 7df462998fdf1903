"""``MultiScaleCodes``: the token maps of a video, per latent frame and per scale."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import require


@dataclass
class MultiScaleCodes:
    """Residual multi-scale code maps of a batch of videos.

    ``codes[s]`` is a ``LongTensor`` of shape ``(B, T_lat, n_s, n_s)`` with
    ``n_s = scales[s]``; scale ``s`` quantizes what scales ``< s`` left
    unexplained. ``num_frames`` is the pixel frame count ``T = 1 + tau * (T_lat - 1)``.
    """

    codes: list[torch.Tensor]
    scales: tuple[int, ...]
    num_frames: int

    def __post_init__(self) -> None:
        self.scales = tuple(int(s) for s in self.scales)
        require(len(self.scales) >= 1 and len(self.codes) == len(self.scales), "codes",
                f"needs one map per scale (at least one), got {len(self.codes)} for scales {self.scales}")
        require(isinstance(self.codes[0], torch.Tensor) and self.codes[0].dim() == 4
                and min(self.codes[0].shape[:2]) >= 1, "codes",
                f"scale 0 must be a (B >= 1, T_lat >= 1, n, n) tensor, got {getattr(self.codes[0], 'shape', None)}")
        b, t = self.codes[0].shape[:2]
        for s, (c, n) in enumerate(zip(self.codes, self.scales)):
            require(isinstance(c, torch.Tensor) and tuple(c.shape) == (b, t, n, n), "codes",
                    f"scale {s} must have shape {(b, t, n, n)}, got {tuple(getattr(c, 'shape', ()))}")

    @property
    def batch_size(self) -> int:
        return self.codes[0].shape[0]

    @property
    def num_latent_frames(self) -> int:
        return self.codes[0].shape[1]

    @property
    def tokens_per_frame(self) -> int:
        return sum(n * n for n in self.scales)

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
    def unflatten(cls, tokens: torch.Tensor, scales: tuple[int, ...], num_frames: int) -> "MultiScaleCodes":
        """Inverse of :meth:`flatten`."""
        per_frame = sum(n * n for n in scales)
        require(tokens.dim() == 3 and tokens.shape[2] == per_frame, "tokens",
                f"must have shape (B, T_lat, {per_frame}), got {tuple(tokens.shape)}")
        maps, start = [], 0
        for n in scales:
            maps.append(tokens[:, :, start:start + n * n].reshape(*tokens.shape[:2], n, n))
            start += n * n
        return cls(maps, tuple(scales), num_frames)
