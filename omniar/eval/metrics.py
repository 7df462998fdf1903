"""Image/video quality and distribution metrics: PSNR, SSIM, Frechet distance."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .._checks import check_float, require


def _frames(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, T, H, W) videos or (..., C, H, W) images -> (B, N, C, H, W) float64."""
    x = x.detach().double()
    if x.dim() == 5:
        return x.transpose(1, 2)
    return x.reshape(x.shape[0] if x.dim() > 3 else 1, -1, *x.shape[-3:])


def _check_pair(x: torch.Tensor, y: torch.Tensor, data_range: float) -> None:
    require(isinstance(x, torch.Tensor), "x", f"must be a tensor, got {type(x).__name__}")
    require(isinstance(y, torch.Tensor), "y", f"must be a tensor, got {type(y).__name__}")
    require(x.shape == y.shape, "y", f"shape {tuple(y.shape)} differs from x {tuple(x.shape)}")
    require(x.dim() >= 3, "x", f"must be (..., C, H, W) or (B, C, T, H, W), got {tuple(x.shape)}")
    check_float(data_range, "data_range", 0.0, low_inclusive=False)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-sample PSNR in dB over all pixels (inf for identical samples); default range [-1, 1].

    Shapes: (B, C, T, H, W) videos or (..., C, H, W) images; one value per entry of the first
    dimension (a (C, H, W) image gives one value).
    """
    _check_pair(x, y, data_range)
    fx, fy = _frames(x), _frames(y)
    mse = (fx - fy).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(data_range**2 / mse)).float()


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - size // 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-sample SSIM (11x11 Gaussian window, sigma 1.5, valid region), averaged over frames and channels.

    Same shapes and per-sample convention as :func:`psnr`; frames must be at least 11x11.
    """
    _check_pair(x, y, data_range)
    fx, fy = _frames(x), _frames(y)
    b, n, c, h, w = fx.shape
    require(h >= 11 and w >= 11, "x", f"frames must be at least 11x11 for SSIM, got {h}x{w}")
    win = _gaussian_window().to(fx)[None, None].expand(c, 1, 11, 11)
    fx, fy = fx.reshape(b * n, c, h, w), fy.reshape(b * n, c, h, w)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, win, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(fx), blur(fy)
    vx, vy, cov = blur(fx * fx) - mx**2, blur(fy * fy) - my**2, blur(fx * fy) - mx * my
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.reshape(b, -1).mean(1).float()


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, D): the FID/FVD formula
    ``|mu_a - mu_b|^2 + tr(C_a) + tr(C_b) - 2 tr((C_a C_b)^1/2)``.

    The trace of the matrix square root is computed from the eigenvalues of the symmetric PSD matrix
    ``C_a^1/2 C_b C_a^1/2`` (same spectrum as ``C_a C_b``): real and stable also for singular
    covariances (fewer samples than dimensions), where ``scipy.linalg.sqrtm`` can return complex junk.
    """
    a, b = (np.asarray(f.detach().double().cpu() if isinstance(f, torch.Tensor) else f, np.float64)
            for f in (feats_a, feats_b))
    for name, f in (("feats_a", a), ("feats_b", b)):
        require(f.ndim == 2 and f.shape[0] >= 2, name, f"must be an (N, D) array with N >= 2, got shape {f.shape}")
        require(bool(np.isfinite(f).all()), name, "features must be finite")
    require(a.shape[1] == b.shape[1], "feats_b", f"must have the D of feats_a ({a.shape[1]}), got {b.shape[1]}")
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _psd_sqrt(cov_a)
    m = root_a @ cov_b @ root_a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    mean_term = ((a.mean(0) - b.mean(0)) ** 2).sum()
    return float(mean_term + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_covmean)
