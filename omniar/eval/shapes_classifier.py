"""Moving Shapes attribute classifier: the judge for prompt adherence and the feature space of the
Frechet distance (FVD-style) of generated clips.

A small 2D conv net over three key frames with four heads (colour, shape,
direction, background), trained on real Moving Shapes clips only
(:func:`omniar.train.classifier.train_classifier`, ``omniar train classifier``).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from scipy.stats import binomtest
from torch import nn

from .._checks import check_int, require
from .._pretrained import PretrainedModel
from ..data.shapes import BACKGROUNDS, COLORS, DIRECTIONS, SHAPES
from ..pixels import from_uint8

ATTRIBUTES: dict[str, tuple[str, ...]] = {"color": tuple(COLORS), "shape": SHAPES, "direction": DIRECTIONS,
                                          "background": tuple(BACKGROUNDS)}


class ShapesClassifier(PretrainedModel, ConfigMixin):
    """videos (B, 3, T, H, W) in [-1, 1] -> one logit vector per attribute.

    A 2D CNN over the first, middle and last frames stacked as channels: colour,
    shape and background are in every frame, direction in where the object went.
    Any frame count and a 64x64 canvas.
    """

    @register_to_config
    def __init__(self, width: int = 32, feature_dim: int = 128):
        super().__init__()
        w = width
        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            # BatchNorm: trains in a few hundred steps on a CPU instead of thousands
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.GELU()]

        self.net = nn.Sequential(
            *block(9, w, 1), *block(w, w, 2), *block(w, 2 * w, 2), *block(2 * w, 3 * w, 2), *block(3 * w, 3 * w, 2),
            nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(3 * w, feature_dim), nn.GELU())  # max: wherever it is
        self.heads = nn.ModuleDict({k: nn.Linear(feature_dim, len(v)) for k, v in ATTRIBUTES.items()})

    def features(self, videos: torch.Tensor) -> torch.Tensor:
        """Penultimate activations (B, feature_dim): a feature space for Frechet distances."""
        require(isinstance(videos, torch.Tensor) and videos.dim() == 5 and videos.shape[1] == 3, "videos",
                f"must be (B, 3, T, H, W), got {getattr(videos, 'shape', videos)}")
        t = videos.shape[2]
        keys = videos[:, :, [0, t // 2, t - 1]].flatten(1, 2)  # (B, 9, H, W)
        return self.net(keys.to(self.device, self.dtype))

    def forward(self, videos: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(videos)
        return {k: head(h) for k, head in self.heads.items()}

    @torch.no_grad()
    def classify(self, videos: torch.Tensor, batch_size: int = 32) -> list[dict[str, str]]:
        """Predicted attribute names per clip: ``[{"color": ..., "shape": ..., ...}, ...]``."""
        check_int(batch_size, "batch_size", 1)
        out = []
        for i in range(0, videos.shape[0], batch_size):
            logits = self(videos[i:i + batch_size])
            idx = {k: v.argmax(-1).tolist() for k, v in logits.items()}
            out += [{k: ATTRIBUTES[k][idx[k][j]] for k in ATTRIBUTES} for j in range(len(idx["color"]))]
        return out


def frames_to_videos(frames) -> torch.Tensor:
    """uint8 numpy (B, T, H, W, 3) (a pipeline's output) -> float (B, 3, T, H, W) in [-1, 1]."""
    frames = torch.as_tensor(frames)
    require(frames.dtype == torch.uint8 and frames.dim() == 5 and frames.shape[-1] == 3, "frames",
            f"must be uint8 (B, T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    return from_uint8(frames.permute(0, 4, 1, 2, 3))


def prompt_adherence(classifier: ShapesClassifier, videos: torch.Tensor, attributes: list[dict[str, str]]
                     ) -> dict:
    """Share of clips whose four attributes all match (``"all"``), its 95 % Wilson interval
    (``"all_ci95"``: at 64 clips about +-10 points, so smaller differences are noise), and the
    per-attribute accuracy."""
    require(isinstance(videos, torch.Tensor) and videos.dim() == 5 and videos.shape[0] > 0, "videos",
            f"must be a non-empty (B, 3, T, H, W) tensor, got {getattr(videos, 'shape', videos)}")
    require(isinstance(attributes, (list, tuple)) and len(attributes) == videos.shape[0], "attributes",
            f"needs one dict per video ({videos.shape[0]})")
    for a in attributes:
        require(isinstance(a, dict) and all(a.get(k) in names for k, names in ATTRIBUTES.items()), "attributes",
                f"each needs the keys {tuple(ATTRIBUTES)} with known values, got {a!r}")
    pred = classifier.eval().classify(videos)
    matches = sum(all(p[k] == a[k] for k in ATTRIBUTES) for p, a in zip(pred, attributes))
    interval = binomtest(matches, len(pred)).proportion_ci(method="wilson")
    result = {"all": matches / len(pred), "all_ci95": [interval.low, interval.high]}
    for k in ATTRIBUTES:
        result[k] = sum(p[k] == a[k] for p, a in zip(pred, attributes)) / len(pred)
    return result
