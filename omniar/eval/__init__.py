"""Evaluation: PSNR/SSIM, Frechet distance, the Moving Shapes attribute classifier and prompt adherence."""

from .metrics import frechet_distance, psnr, ssim
from .shapes_classifier import ShapesClassifier, prompt_adherence

__all__ = ["ShapesClassifier", "frechet_distance", "prompt_adherence", "psnr", "ssim"]
