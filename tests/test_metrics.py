"""PSNR, SSIM and Frechet distance on cases with known answers."""

import math

import numpy as np
import pytest
import torch

from omniar.eval.metrics import frechet_distance, psnr, ssim


def test_psnr_constant_offset_is_exact():
    x = torch.rand(2, 3, 5, 16, 16) * 2 - 1
    y = x + 0.1
    expected = 10 * math.log10(4 / 0.01)
    torch.testing.assert_close(psnr(x, y), torch.full((2,), expected), rtol=0, atol=1e-4)
    assert torch.isinf(psnr(x, x)).all()


def test_ssim_identity_and_degradation():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(ssim(x, x), torch.ones(2), rtol=0, atol=1e-6)
    noisy = ssim(x, x + 0.3 * torch.randn_like(x))
    assert (noisy < 0.9).all() and (noisy > -1).all()
    # more noise, lower SSIM
    assert (ssim(x, x + 0.6 * torch.randn_like(x)) < noisy).all()


def test_ssim_of_constant_images_matches_formula():
    # For constant images a, b: SSIM = (2ab + c1) / (a^2 + b^2 + c1) (variances are zero).
    a, b = 0.2, -0.3
    x, y = torch.full((1, 3, 16, 16), a), torch.full((1, 3, 16, 16), b)
    c1 = (0.01 * 2) ** 2
    torch.testing.assert_close(ssim(x, y), torch.tensor([(2 * a * b + c1) / (a * a + b * b + c1)]),
                               rtol=0, atol=1e-6)


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, 2.0, 0.0])
    assert frechet_distance(a, a + shift) == pytest.approx(5.0, abs=1e-6)
    b = rng.normal(size=(4000, 3)) * 2.0  # same mean, std 2: trace term = 3 * (1 + 4 - 2*2) = 3
    assert frechet_distance(rng.normal(size=(4000, 3)), b) == pytest.approx(3.0, rel=0.1)


def test_errors_name_arguments():
    with pytest.raises(ValueError, match="y"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))
    with pytest.raises(ValueError, match="feats"):
        frechet_distance(np.zeros((5, 2)), np.zeros((5, 3)))


def naive_ssim(x: np.ndarray, y: np.ndarray, data_range: float = 2.0) -> float:
    """SSIM of two (H, W) images window by window, straight from the definition."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    values = []
    for i in range(x.shape[0] - 10):
        for j in range(x.shape[1] - 10):
            px, py = x[i:i + 11, j:j + 11], y[i:i + 11, j:j + 11]
            mx, my = (w * px).sum(), (w * py).sum()
            vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
            cov = (w * (px - mx) * (py - my)).sum()
            values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_definition_on_random_images():
    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, size=(3, 14, 13))
    y = np.clip(x + rng.normal(0, 0.2, size=x.shape), -1, 1)
    expected = np.mean([naive_ssim(x[c], y[c]) for c in range(3)])
    got = ssim(torch.tensor(x), torch.tensor(y))  # a single (C, H, W) image: one value
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, abs=1e-6)
    scaled = ssim(torch.tensor(x * 127.5), torch.tensor(y * 127.5), data_range=255.0)
    assert scaled.item() == pytest.approx(expected, abs=1e-6)  # c1, c2 scale with data_range


def test_image_batches_give_one_value_per_sample():
    x = torch.zeros(3, 3, 16, 16)
    y = x.clone()
    y[1] += 0.2
    y[2] -= 0.02
    p = psnr(x, y)
    assert p.shape == (3,) and torch.isinf(p[0]) and p[1] < p[2]
    torch.testing.assert_close(p[1:], torch.tensor([10 * math.log10(4 / 0.04), 10 * math.log10(4 / 0.0004)]))
    assert ssim(x, y).shape == (3,)


def test_frechet_distance_singular_covariances():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(8, 20)), rng.normal(size=(8, 20)) + 1.0  # rank 7 covariances in 20 dims
    d = frechet_distance(a, b)
    assert np.isfinite(d) and d > 20 * 0.5  # the mean shift alone contributes 20
    assert frechet_distance(torch.tensor(a), torch.tensor(a)) == pytest.approx(0.0, abs=1e-6)
    # symmetric in its arguments
    assert frechet_distance(b, a) == pytest.approx(d, rel=1e-9)


def test_more_argument_errors():
    x = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, x, data_range=0)
    with pytest.raises(ValueError, match="data_range"):
        ssim(x, x, data_range=-1.0)
    with pytest.raises(ValueError, match="x"):
        ssim(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8))  # smaller than the window
    with pytest.raises(ValueError, match="y"):
        psnr(x, np.zeros((1, 3, 16, 16)))
    with pytest.raises(ValueError, match="feats_a"):
        frechet_distance(np.zeros((1, 2)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="feats_a"):
        frechet_distance(np.full((3, 2), np.nan), np.zeros((5, 2)))
    # each argument's own fault names that argument
    with pytest.raises(ValueError, match="^feats_a"):
        frechet_distance(np.zeros(5), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="^feats_b"):
        frechet_distance(np.zeros((5, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="^feats_b"):
        frechet_distance(np.zeros((5, 2)), np.full((3, 2), np.inf))


def test_frechet_distance_takes_bf16_features():
    a = torch.randn(50, 4, generator=torch.Generator().manual_seed(0)).bfloat16()
    b = a + 1
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(a.float(), b.float()), rel=1e-9)
