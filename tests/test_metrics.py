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
