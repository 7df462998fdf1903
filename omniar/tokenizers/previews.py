"""Preview codes: side codes that only coarse-to-fine previews read.

A residual VQ's coarse scales average big cells, where a small object is a few per cent of the pixels: their
latents (even unquantized) do not show its colour through the decoder, and k-means in the latent space groups
cells by the object's place, not its colour (BENCHMARKS.md, "Can side codes read only by previews ..."). A
preview code is instead a colour sketch of each coarse cell, taken in pixel space where distance is colour: the
cell's dominant colour (its most common), its accent colour (the most common of the pixels far from it), the
accent's share and its place (where it starts and ends in the latent frame), quantized to the nearest entry of a
small k-means table per scale. Each code owns a learned latent patch (the cell's part of the latent grid) that a
preview adds to the scales' partial sum, and the preview decoder learns to paint it. The residual codes, full
decodes and every AR input stay as they are.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from .._checks import require
from .quantizer import kmeans, nearest_code

PALETTE_DIM = 11  # dominant RGB, accent RGB, sqrt of the accent's share, its place (y, x) in the first and last frame
ACCENT_DISTANCE = 0.3  # L1 over RGB in [-1, 1]: how far from the dominant colour a pixel counts as accent
COLOUR_BINS = 4  # per channel: a cell's colours are the means of its most populated bins of 4 x 4 x 4


def mode_colour(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean colour of the most populated RGB bin among the pixels ``mask`` (..., n) picks of ``x`` (..., 3, n)
    -> (..., 3). Not a per-channel median or mean: a cell that an object covers in half of its folded frames,
    or only at anti-aliased edges, would get a colour that is in neither the object nor the background."""
    b = ((x + 1) * COLOUR_BINS / 2).long().clamp(0, COLOUR_BINS - 1)
    idx = (b[..., 0, :] * COLOUR_BINS + b[..., 1, :]) * COLOUR_BINS + b[..., 2, :]
    idx = torch.where(mask, idx, COLOUR_BINS ** 3)  # an extra bin for the pixels not picked
    counts = torch.zeros(*idx.shape[:-1], COLOUR_BINS ** 3 + 1, device=x.device).scatter_add_(
        -1, idx, torch.ones_like(idx, dtype=torch.float))
    picked = (idx == counts[..., :-1].argmax(-1, keepdim=True)).to(x.dtype)
    return (x * picked[..., None, :]).sum(-1) / picked.sum(-1, keepdim=True).clamp_min(1)


def cell_palettes(video: torch.Tensor, shape: tuple[int, int], temporal_compression: int) -> torch.Tensor:
    """Colour sketch of each cell of an (h, w) grid over each latent frame's pixel frames (frame 0, then runs of
    ``temporal_compression``): ``video`` (B, 3, 1 + tau k, H, W) in [-1, 1] -> (B, T_lat, 11, h, w). The accent's
    place (its mean offset from the cell's centre, cell half-widths) in the first and the last of those frames is
    weighted by ``1 / (h w)``: at coarse scales it tells a preview where to paint, and which way the object moves
    within a folded latent frame; a small cell is placed by its index already, so its table splits on colour."""
    h, w = shape
    first, rest = video[:, :, :1], video[:, :, 1:]
    groups = [first[:, :, None]]  # (B, C, T_lat part, frames, H, W)
    if rest.shape[2]:
        groups.append(rest.unflatten(2, (-1, temporal_compression)))
    p, q = video.shape[-2] // h, video.shape[-1] // w
    ys = torch.linspace(-1, 1, p, device=video.device)[:, None].expand(p, q)
    xs = torch.linspace(-1, 1, q, device=video.device)[None, :].expand(p, q)
    place = torch.stack([ys, xs]).flatten(1).T  # (p q, 2): each pixel's offset from its cell's centre
    out = []
    for g in groups:
        x = rearrange(g, "b c g f (h p) (w q) -> b g h w c (f p q)", h=h, w=w)
        dominant = mode_colour(x, torch.ones_like(x[..., 0, :], dtype=torch.bool))
        accent = (x - dominant[..., None]).abs().sum(-2) > ACCENT_DISTANCE  # (b g h w n)
        share = accent.to(x.dtype).mean(-1)
        colour = torch.where(share[..., None] > 0, mode_colour(x, accent), dominant)
        ends = accent.unflatten(-1, (g.shape[3], -1))[..., [0, -1], :].to(x.dtype)  # (b g h w 2 pq): first, last
        weights = ends / ends.sum(-1, keepdim=True).clamp_min(1)
        offset = weights @ place / (h * w)  # (b g h w 2 2); zero without an accent
        out.append(torch.cat([dominant, colour, share.sqrt()[..., None], offset.flatten(-2)], -1))
    return rearrange(torch.cat(out, 1), "b g h w d -> b g d h w")


class PreviewCodes(nn.Module):
    """Per preview scale s (every scale but the last) a table of ``sizes[s]`` palette centroids (buffers, fitted by
    :meth:`fit`) and as many learned latent patches (zero at initialisation: previews unchanged)."""

    def __init__(self, sizes: tuple[int, ...], shapes: list[tuple[int, int]], grid: tuple[int, int], channels: int,
                 temporal_compression: int):
        super().__init__()
        self.shapes, self.temporal_compression = list(shapes), temporal_compression
        for h, w in self.shapes:
            require(grid[0] % h == 0 and grid[1] % w == 0, "preview_codes",
                    f"needs preview scales whose shapes divide the latent grid {grid}, got {(h, w)}")
        for s, k in enumerate(sizes):
            self.register_buffer(f"centroids_{s}", torch.zeros(k, PALETTE_DIM))
        self.patches = nn.ParameterList(nn.Parameter(torch.zeros(k, channels, grid[0] // h, grid[1] // w))
                                        for k, (h, w) in zip(sizes, self.shapes))

    def centroids(self, s: int) -> torch.Tensor:
        return getattr(self, f"centroids_{s}")

    @torch.no_grad()
    def fit(self, video: torch.Tensor, generator: torch.Generator) -> None:
        """Fit every scale's centroids to the cells of ``video`` (N, 3, T, H, W) by k-means."""
        for s, shape in enumerate(self.shapes):
            cells = cell_palettes(video.float(), shape, self.temporal_compression).transpose(2, -1)
            # distinct sketches only: plain background cells outnumber the rest, and would take most centroids
            distinct = torch.unique((cells.reshape(-1, PALETTE_DIM).cpu() * 50).round() / 50, dim=0)
            table = self.centroids(s)
            table.copy_(kmeans(distinct, table.shape[0], generator).to(table))

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> list[torch.Tensor]:
        """``video`` (B, 3, T, H, W) -> per preview scale the nearest centroid of each cell, (B, T_lat, h, w)."""
        codes = []
        for s, shape in enumerate(self.shapes):
            cells = cell_palettes(video.float(), shape, self.temporal_compression)  # (B, T_lat, PALETTE_DIM, h, w)
            codes.append(nearest_code(cells.flatten(0, 1), self.centroids(s)).view(*cells.shape[:2], *shape))
        return codes

    def latent(self, idx: torch.Tensor, s: int) -> torch.Tensor:
        """The patches of preview scale ``s``'s codes ``idx`` (B, T_lat, h, w) tiled onto the latent grid:
        (B, C, T_lat, H, W)."""
        return rearrange(self.patches[s][idx], "b t h w c p q -> b c t (h p) (w q)")

    def latents(self, video: torch.Tensor, upto_scale: torch.Tensor) -> torch.Tensor:
        """Training: what clip b's preview of scales ``0..upto_scale[b]`` adds, (B, C, T_lat, H, W); zero for clips
        decoded from every scale."""
        parts = [self.latent(c, s) for s, c in enumerate(self.encode(video))]
        stacked = torch.stack(parts + [torch.zeros_like(parts[0])], 1)  # (B, S, C, T_lat, H, W)
        return stacked[torch.arange(len(stacked)), upto_scale.to(stacked.device)]
