"""``MultiScaleCodes``: the token maps of a video, per latent frame and per scale, and (re-exported from
:mod:`omniar._scales`, shared with the backbone) the scale schedule helpers every caller uses instead of
assuming square ``n x n`` maps."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import require
from .._scales import Scales, ScaleSchedule, check_scales, scale_names, scale_shapes, tokens_per_frame

__all__ = ["MultiScaleCodes", "Scales", "check_scales", "scale_names", "scale_shapes", "tokens_per_frame"]


@dataclass
class MultiScaleCodes(ScaleSchedule):
    """Residual multi-scale code maps of a batch of videos.

    ``codes[s]`` is a ``LongTensor`` of shape ``(B, T_lat, h_s, w_s)`` with
    ``(h_s, w_s) = scale_shapes(scales)[s]``; scale ``s`` quantizes what scales ``< s`` left
    unexplained. ``num_frames`` is the pixel frame count ``T = 1 + tau * (T_lat - 1)``. ``previews``: a
    tokenizer with preview codes (:mod:`omniar.tokenizers.previews`) adds one map per scale but the last, of
    the same shapes, that only coarse-to-fine previews read; None without them.
    """

    codes: list[torch.Tensor]
    scales: Scales
    num_frames: int
    previews: list[torch.Tensor] | None = None

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
        if self.previews is not None:
            require(isinstance(self.previews, (list, tuple)) and len(self.previews) == len(self.scales) - 1,
                    "previews", f"needs one map per scale but the last ({len(self.scales) - 1})")
            for s, (c, (h, w)) in enumerate(zip(self.previews, self.scale_shapes)):
                require(isinstance(c, torch.Tensor) and tuple(c.shape) == (b, t, h, w), "previews",
                        f"scale {s} must have shape {(b, t, h, w)}, got {tuple(getattr(c, 'shape', ()))}")

    @property
    def batch_size(self) -> int:
        return self.codes[0].shape[0]

    @property
    def num_latent_frames(self) -> int:
        return self.codes[0].shape[1]

    def _each(self, fn, num_frames: int | None = None) -> "MultiScaleCodes":
        """``fn`` applied to every map, the preview codes' too."""
        return MultiScaleCodes([fn(c) for c in self.codes], self.scales, num_frames or self.num_frames,
                               None if self.previews is None else [fn(c) for c in self.previews])

    def to(self, device: torch.device | str) -> "MultiScaleCodes":
        return self._each(lambda c: c.to(device))

    def split(self) -> list["MultiScaleCodes"]:
        """One ``MultiScaleCodes`` per clip of the batch."""
        return [self._each(lambda c, i=i: c[i:i + 1]) for i in range(self.batch_size)]

    def first_frame(self) -> "MultiScaleCodes":
        """The codes of latent frame 0 alone (one pixel frame: the causal decoder decodes it as in the clip)."""
        return self._each(lambda c: c[:, :1], num_frames=1)

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
