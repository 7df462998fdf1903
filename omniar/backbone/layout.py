"""Sequence layout: per-token metadata, the attention mask and the RoPE positions.

Every token carries a ``block`` id; a query sees a key iff
``block_key <= block_query`` (and the key is not padding, and the key is not
hidden from the query's frame by the model's ``frame_visibility``). Text tokens and raster-order vision
tokens are their own block (plain causal); a next-scale (frame, scale) block
uses the sequence index of its first token, so its tokens see each other and
everything before. The full forward and the KV-cache steps build their masks
from the same metadata, so both paths attend identically.

Positions are ``(t, h, w, scale)``: text token i sits at ``(i, i, i, 0)``;
vision token (i, j) of an h x w scale s of latent frame f sits at
``(L + f, L + (i + 0.5) H / h, L + (j + 0.5) W / w, s)`` with L the padded
text length of the batch (so positions never depend on per-sample padding)
and H x W the finest scale: each axis is stretched on its own, so every scale
of any schedule, square or not, spans the same finest grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._scales import Scales, scale_shapes, tokens_per_frame


@dataclass
class TokenMeta:
    """Metadata of a run of consecutive tokens: ``block``/``frame`` ``(L,)`` long
    (frame -1 for text), ``valid`` ``(B, L)`` bool, ``pos`` ``(L, 4)`` float."""

    block: torch.Tensor
    frame: torch.Tensor
    valid: torch.Tensor
    pos: torch.Tensor

    @property
    def is_text(self) -> torch.Tensor:
        return self.frame < 0

    def cat(self, other: "TokenMeta") -> "TokenMeta":
        return TokenMeta(torch.cat([self.block, other.block]), torch.cat([self.frame, other.frame]),
                         torch.cat([self.valid, other.valid], dim=1), torch.cat([self.pos, other.pos]))


def text_meta(valid: torch.Tensor) -> TokenMeta:
    """Metadata of the text prefix, ``valid`` ``(B, L)`` bool (True = real token)."""
    length = valid.shape[1]
    idx = torch.arange(length, device=valid.device)
    pos = torch.zeros(length, 4, device=valid.device)
    pos[:, :3] = idx[:, None].float()
    return TokenMeta(idx, torch.full_like(idx, -1), valid, pos)


def scale_offsets(scales: Scales) -> list[int]:
    """Index of each scale's first token inside a frame."""
    offsets, total = [], 0
    for h, w in scale_shapes(scales):
        offsets.append(total)
        total += h * w
    return offsets


def frame_scale_ids(scales: Scales) -> torch.Tensor:
    """Scale index of every token of a frame, ``(tokens_per_frame,)`` long."""
    return torch.cat([torch.full((h * w,), s) for s, (h, w) in enumerate(scale_shapes(scales))])


def vision_meta(batch: int, text_len: int, scales: Scales, frame: int, scale: int,
                start: int, stop: int, raster: bool, device: torch.device) -> TokenMeta:
    """Metadata of tokens ``[start, stop)`` (row-major) of block (``frame``, ``scale``)."""
    shapes = scale_shapes(scales)
    (h, w), (fine_h, fine_w) = shapes[scale], shapes[-1]
    first = text_len + frame * tokens_per_frame(scales) + scale_offsets(scales)[scale]
    idx = torch.arange(start, stop, device=device)
    block = first + idx if raster else torch.full_like(idx, first)
    pos = torch.stack([torch.full((stop - start,), float(text_len + frame), device=device),
                       text_len + (torch.div(idx, w, rounding_mode="floor") + 0.5) * (fine_h / h),
                       text_len + (idx % w + 0.5) * (fine_w / w),
                       torch.full((stop - start,), float(scale), device=device)], dim=1)
    return TokenMeta(block, torch.full_like(idx, frame), torch.ones(batch, stop - start, dtype=torch.bool,
                                                                      device=device), pos)


def video_meta(batch: int, text_len: int, scales: Scales, num_frames: int, raster: bool,
               device: torch.device) -> TokenMeta:
    """Metadata of ``num_frames`` whole frames, frame-major then coarse to fine."""
    metas = [vision_meta(batch, text_len, scales, f, s, 0, h * w, raster, device)
             for f in range(num_frames) for s, (h, w) in enumerate(scale_shapes(scales))]
    return TokenMeta(*(torch.cat([getattr(m, key) for m in metas], dim=1 if key == "valid" else 0)
                       for key in ("block", "frame", "valid", "pos")))


def attention_mask(query: TokenMeta, key: TokenMeta,
                   visibility: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean mask ``(B, 1, Lq, Lk)`` (True = attend) and ``empty`` ``(B, 1, Lq, 1)``.

    ``visibility`` ``(B, T_lat, V)`` bool [query frame, visual key token] (``key``'s vision tokens in order,
    frame-major, V of them) hides keys of earlier frames from a frame's queries; the frame's own tokens and
    the text stay visible. A query without any visible key (a padding query before any real token)
    gets an all-True row so SDPA stays finite; ``empty`` marks those rows so
    the caller zeroes their output, keeping padded keys invisible everywhere.
    """
    mask = (key.block[None, :] <= query.block[:, None])[None] & key.valid[:, None, :]
    if visibility is not None:
        qf, kf = query.frame, key.frame
        earlier = (qf[:, None] >= 0) & (kf[None, :] >= 0) & (kf[None, :] < qf[:, None])
        visual_index = (kf >= 0).cumsum(0) - 1
        seen = visibility[:, qf.clamp(min=0)][:, :, visual_index.clamp(min=0)]
        mask = mask & (~earlier[None] | seen)
    empty = ~mask.any(dim=-1, keepdim=True)
    return (mask | empty)[:, None], empty[:, None]
