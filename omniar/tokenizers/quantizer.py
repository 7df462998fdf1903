"""Multi-scale residual vector quantizer (VAR-style), applied to each latent frame on its own.

For scale s of size h x w: area-downsample what the coarser scales left unexplained
to h x w, take the nearest code of one shared codebook, upsample the code map to
the latent grid (the last scale), refine it with a small conv mixed with identity, and add it to
the running reconstruction ``f_hat``. The codebook is a k-means style EMA of the
residual vectors assigned to each code, and codes unused for a while are
restarted on random residuals, which keeps codebook usage high.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .._checks import require
from .codes import Scales, scale_shapes


def resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area-downsample (or identity) a (M, C, H, W) map to ``size`` (h, w)."""
    return x if tuple(x.shape[-2:]) == size else F.interpolate(x, size=size, mode="area")


def nearest_code(r: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest (L2) row of ``table`` (K, C) to each vector of a (M, C, h, w) map -> (M, h, w)."""
    flat = r.permute(0, 2, 3, 1).reshape(-1, r.shape[1])
    cb = table.to(flat.dtype)  # a bf16 model still quantizes its fp32 latents in fp32
    d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ cb.t() + cb.pow(2).sum(1)[None]
    return d.argmin(1).view(r.shape[0], r.shape[2], r.shape[3])


def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iters: int = 50) -> torch.Tensor:
    """``k`` centroids of the rows of ``x`` (N, D) (Lloyd's iterations from ``k`` distinct random rows; an
    empty cluster keeps its centroid)."""
    require(len(x) >= k, "x", f"needs at least {k} rows to fit {k} centroids, got {len(x)}")
    centroids = x[torch.randperm(len(x), generator=generator)[:k]].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(1)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)[:, None]
        centroids = torch.where(counts > 0, sums / counts.clamp_min(1), centroids)
    return centroids


def refine_index(s: int, num_scales: int, num_refine: int) -> int:
    """The refinement conv (phi) of scale ``s``. With a conv per scale or more, scales spread over the convs
    by relative position (the rule saved tokenizers were trained with). With more scales than convs, VAR's
    partial sharing: the conv whose tick, of ``num_refine`` evenly spaced in (0, 1), is nearest to
    ``s / (num_scales - 1)`` (VAR's ticks, with its narrower spread for 4 convs)."""
    if num_scales == 1:
        return 0
    at = s / (num_scales - 1)
    if num_scales <= num_refine:
        return round(at * (num_refine - 1))
    k = num_refine
    margin = 1 / 3 / k if k == 4 else 1 / 2 / k
    ticks = np.linspace(margin, 1 - margin, k)
    return int(np.argmin(np.abs(ticks - at)))


class MultiScaleResidualVQ(nn.Module):
    def __init__(self, dim: int, codebook_size: int, scales: Scales, beta: float = 0.25,
                 ema_decay: float = 0.99, num_refine: int = 4, refine_ratio: float = 0.5,
                 dead_code_threshold: float = 0.05, coarse_codes: int = 0):
        super().__init__()
        self.shapes, self.beta, self.decay = scale_shapes(scales), beta, ema_decay
        self.refine_ratio, self.dead_code_threshold = refine_ratio, dead_code_threshold
        self.refine = nn.ModuleList(nn.Conv2d(dim, dim, 3, padding=1) for _ in range(num_refine))
        # repeats of the latent grid share its conv: the convs spread over the distinct map sizes
        sizes = list(dict.fromkeys(self.shapes))
        self.refine_of = [refine_index(sizes.index(shape), len(sizes), num_refine) for shape in self.shapes]
        # the first scale's own codes (``coarse_codes`` > 0): indices 0..coarse_codes - 1 of another table
        self.coarse = coarse_codes > 0
        for prefix, size in [("", codebook_size)] + ([("coarse_", coarse_codes)] if self.coarse else []):
            self.register_buffer(f"{prefix}codebook", torch.randn(size, dim) * 0.1)
            self.register_buffer(f"{prefix}ema_count", torch.ones(size))
            self.register_buffer(f"{prefix}ema_sum", getattr(self, f"{prefix}codebook").clone())
            self.register_buffer(f"{prefix}initialized", torch.tensor(False))
        # Counts EMA updates; seeds the random code restarts so a resumed run repeats them exactly.
        self.register_buffer("updates", torch.tensor(0, dtype=torch.long))

    @property
    def codebook_size(self) -> int:
        return self.codebook.shape[0]

    def upsample(self, z: torch.Tensor) -> torch.Tensor:
        """A (M, C, h, w) map bicubic-upsampled to the latent grid (the last scale)."""
        full = self.shapes[-1]
        return z if tuple(z.shape[-2:]) == full else F.interpolate(z, size=full, mode="bicubic", align_corners=False)

    def table(self, s: int) -> torch.Tensor:
        """The codebook of scale ``s``: the first scale's own with ``coarse_codes``, else the shared one."""
        return self.coarse_codebook if s == 0 and self.coarse else self.codebook

    def embed_scale(self, idx: torch.Tensor, s: int) -> torch.Tensor:
        """Contribution of scale ``s`` codes ``idx`` (M, h, w) to f_hat: (M, C, H, W)."""
        return self.embed_vectors(F.embedding(idx, self.table(s)).permute(0, 3, 1, 2), s)

    def embed_vectors(self, z: torch.Tensor, s: int) -> torch.Tensor:
        """Contribution of a (M, C, h, w) map of code vectors to f_hat as scale ``s``'s: upsampled to the latent
        grid, then mixed with scale ``s``'s refinement conv."""
        z = self.upsample(z)
        conv = self.refine[self.refine_of[s]]
        return (1 - self.refine_ratio) * z + self.refine_ratio * conv(z)

    def lookup(self, r: torch.Tensor, s: int) -> torch.Tensor:
        """Nearest code (L2) of scale ``s``'s table to each vector of a (M, C, h, w) map -> (M, h, w)."""
        return nearest_code(r, self.table(s))

    def forward(self, f: torch.Tensor, upto_scale: torch.Tensor | None = None, preview_grad: bool = False,
                soft: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Quantize latents f (M, C, H, W).

        Returns (f_hat with a straight-through gradient to f, codes per scale, VQ loss). With
        ``upto_scale`` (M,) ints, map m returns only the accumulation of scales ``0..upto_scale[m]``
        instead: the partial sums a coarse-to-fine preview decodes. Their gradient reaches the refinement
        convs only, unless ``preview_grad``: then it also reaches f straight through the unquantized partial
        sums (each scale's residual upsampled), so the encoder learns what the coarse codes should hold.
        ``soft`` (M,) bool, with ``preview_grad``: map m's preview is that unquantized partial sum itself, in
        value too, so the decoder learns to read what the encoder could put there before the codes hold it.
        """
        with torch.autocast(f.device.type, enabled=False):
            f = f.float()
            f_hat = torch.zeros_like(f)
            codes, residuals, partial = [], [], []
            # the unquantized partial sum: a path for the previews' gradient to f (None: no such path)
            through = torch.zeros_like(f) if preview_grad and upto_scale is not None else None
            soft = None if soft is None else soft.to(f.device)[:, None, None, None]
            for s, size in enumerate(self.shapes):
                r = resize(f - f_hat.detach(), size)  # its gradient reaches f only, and only through `through`
                idx = self.lookup(r.detach(), s)
                f_hat = f_hat + self.embed_scale(idx, s)
                codes.append(idx)
                residuals.append(r.detach())
                if through is None:
                    partial.append(f_hat)
                else:
                    through = through + self.upsample(r)
                    straight = f_hat + (through - through.detach())
                    partial.append(straight if soft is None else torch.where(soft, through, straight))
            loss = self.beta * F.mse_loss(f, f_hat.detach()) + F.mse_loss(f_hat, f.detach())
            if self.training:
                self._ema_update(residuals, codes)
        # Value f_hat; gradient reaches the encoder straight through and the refinement convs directly.
        out = f_hat + (f - f.detach())
        if upto_scale is not None:
            pick = torch.stack(partial[:-1] + [out], 1)  # (M, S, C, H, W)
            out = pick[torch.arange(f.shape[0], device=f.device), upto_scale.to(f.device)]
        return out, codes, loss

    @torch.no_grad()
    def _ema_update(self, residuals: list[torch.Tensor], codes: list[torch.Tensor]) -> None:
        gen = torch.Generator().manual_seed(int(self.updates))
        self.updates += 1
        # with the first scale's own table, it learns from the first scale's residuals only, the shared one from
        # the others' (restarts too: a dead code of either table restarts near the vectors it could serve)
        parts = [("coarse_", slice(0, 1)), ("", slice(1, None))] if self.coarse else [("", slice(None))]
        for prefix, part in parts:
            vecs = torch.cat([r.permute(0, 2, 3, 1).reshape(-1, r.shape[1]) for r in residuals[part]])
            idx = torch.cat([c.reshape(-1) for c in codes[part]])
            self._ema_table(prefix, vecs, idx, gen)

    def _ema_table(self, prefix: str, vecs: torch.Tensor, idx: torch.Tensor, gen: torch.Generator) -> None:
        codebook, ema_count, ema_sum, initialized = (getattr(self, f"{prefix}{name}") for name in
                                                     ("codebook", "ema_count", "ema_sum", "initialized"))
        size = codebook.shape[0]

        def random_rows(k: int) -> torch.Tensor:
            return vecs[torch.randint(0, vecs.shape[0], (k,), generator=gen).to(vecs.device)]

        if not initialized:  # start the codebook on data rather than on noise
            ema_sum.copy_(random_rows(size))
            initialized.fill_(True)
        count = torch.bincount(idx, minlength=size).float()
        total = torch.zeros_like(ema_sum).index_add_(0, idx, vecs)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if distributed:  # every rank must hold the same codebook
            dist.all_reduce(count)
            dist.all_reduce(total)
        ema_count.mul_(self.decay).add_(count, alpha=1 - self.decay)
        ema_sum.mul_(self.decay).add_(total, alpha=1 - self.decay)
        dead = ema_count < self.dead_code_threshold
        if dead.any():  # restart unused codes on random residuals of this batch
            ema_sum[dead] = random_rows(int(dead.sum()))
            ema_count[dead] = 1.0
        codebook.copy_(ema_sum / ema_count.clamp_min(1e-5)[:, None])
        if distributed:
            for buf in (codebook, ema_count, ema_sum, self.updates):
                dist.broadcast(buf, 0)

    @torch.no_grad()
    def quantize_corrupted(self, f: torch.Tensor, rate: torch.Tensor,
                           generator: torch.Generator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Self-correcting re-quantization of latents f (M, C, H, W) (Infinity's idea for a codebook).

        At each scale a share ``rate[m]`` of sample m's codes is replaced by random codes, and the
        next scale quantizes what the *corrupted* accumulation leaves unexplained. Returns
        (targets, inputs): the clean codes the model should predict and the corrupted codes its
        inputs are built from.
        """
        f_hat = torch.zeros_like(f)
        targets, noisy_codes = [], []
        for s, size in enumerate(self.shapes):
            idx = self.lookup(resize(f - f_hat, size), s)
            flip = torch.rand(idx.shape, generator=generator).to(idx.device) < rate.to(idx.device)[:, None, None]
            noise = torch.randint(0, self.table(s).shape[0], idx.shape, generator=generator).to(idx.device)
            noisy = torch.where(flip, noise, idx)
            f_hat = f_hat + self.embed_scale(noisy, s)
            targets.append(idx)
            noisy_codes.append(noisy)
        return targets, noisy_codes

    def usage(self) -> float:
        """Share of codes in recent use (EMA assignment count above the restart threshold)."""
        return float((self.ema_count >= self.dead_code_threshold).float().mean())

    def codes_to_latent(self, codes: list[torch.Tensor], upto_scale: int | None = None) -> torch.Tensor:
        """Sum of the refined code maps of scales ``0..upto_scale`` (inclusive; default all)."""
        last = len(self.shapes) - 1 if upto_scale is None else upto_scale
        f_hat = 0
        for s in range(last + 1):
            f_hat = f_hat + self.embed_scale(codes[s], s)
        return f_hat
