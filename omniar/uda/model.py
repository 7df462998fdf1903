"""BiPC heads on timm backbones: keep the pre-trained classifier beside a new task head.

``BiPCModel`` returns task logits, pre-trained-head logits and pooled features.
``relationship_matrix`` learns, once from labelled source data, how the
pre-trained classes relate to the task classes (a calibrated multinomial
logistic model over the pre-trained head's probabilities, as in Co-Tuning).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_int, require


def create_backbone(name: str, weights: str | os.PathLike | None = None, num_classes: int | None = None,
                    **kwargs) -> nn.Module:
    """A timm model with its classifier head; ``weights`` is a local file (safetensors or timm
    checkpoint) loaded through ``pretrained_cfg_overlay`` — nothing is downloaded."""
    require(isinstance(name, str) and timm.is_model(name), "backbone",
            f"unknown timm model {name!r} (e.g. resnet50, vit_base_patch16_224, swin_tiny_patch4_window7_224, "
            "convnext_tiny; see timm.list_models())")
    overlay = {}
    if num_classes is not None:
        kwargs["num_classes"] = overlay["num_classes"] = num_classes  # the file's head matches: keep it
    if weights is not None:
        require(Path(weights).is_file(), "weights", f"file not found: {weights}")
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(weights), **overlay))
    return timm.create_model(name, **kwargs)


class BiPCModel(nn.Module):
    """A timm backbone with its pre-trained head kept and a task head (BatchNorm -> LayerNorm -> Linear).

    ``forward(x) -> (task_logits, pretrained_logits, features)``. Pooling and the pre-trained logits are
    timm's own ``forward_head`` (it knows each family's layout, e.g. Swin's NHWC features, and a distilled
    DeiT's two heads, whose logits it averages), so any timm classifier works.
    """

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        check_int(num_classes, "num_classes", 2)
        require(backbone.num_classes > 0, "backbone", "must keep its pre-trained classifier head")
        self.backbone = backbone
        dim = backbone.num_features
        self.task_head = nn.Sequential(nn.BatchNorm1d(dim), nn.LayerNorm(dim, eps=1e-6),
                                       nn.Linear(dim, num_classes, bias=False))
        self.task_head[0].bias.requires_grad_(False)  # the LayerNorm after it re-centres anyway
        nn.init.normal_(self.task_head[-1].weight, std=0.001)  # start near uniform task predictions

    @property
    def num_pretrained_classes(self) -> int:
        return self.backbone.num_classes

    def forward(self, x: torch.Tensor, detach_task_input: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``detach_task_input``: the task head reads detached features, so losses on its output train
        the task head only (BiPC's target branch)."""
        tokens = self.backbone.forward_features(x)
        feats = self.backbone.forward_head(tokens, pre_logits=True)
        task = self.task_head(feats.detach() if detach_task_input else feats)
        return task, self.backbone.forward_head(tokens), feats


def _fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The scale s minimising the NLL of softmax(s * logits) (temperature scaling)."""
    z, y = torch.as_tensor(logits, dtype=torch.float64), torch.as_tensor(labels)
    log_s = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_s], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z * log_s.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_s.detach().exp())


# Inverse regularisation strengths tried for the relationship's logistic regression: the reference's
# half-decade grid from 1e4 down to 1e-4.
C_GRID = (1e4, 3e3, 1e3, 3e2, 1e2, 3e1, 1e1, 3.0, 1.0, 3e-1, 1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)


def check_c_grid(c_grid, name: str = "c_grid") -> tuple[float, ...]:
    """``c_grid`` as a tuple, checked: a non-empty sequence of positive numbers."""
    require(isinstance(c_grid, (list, tuple)) and len(c_grid) > 0
            and all(isinstance(c, (int, float)) and not isinstance(c, bool) and c > 0 for c in c_grid),
            name, f"must be a non-empty list of positive numbers, got {c_grid!r}")
    return tuple(c_grid)


def relationship_matrix(pretrained_probs: np.ndarray, labels: np.ndarray, num_classes: int, seed: int = 0,
                        c_grid: tuple[float, ...] = C_GRID) -> np.ndarray:
    """E (num_classes x K): row c is p(pre-trained class | task class c), a distribution.

    Split the source 50/50 per class; fit a multinomial logistic regression without intercept from the
    pre-trained probabilities to task labels for each C in ``c_grid``, keep the best on validation and
    calibrate it by temperature scaling on validation; p(task | pre-trained k) is its softmax on the
    one-hot input k. Bayes with the mean pre-trained probability as prior of k gives E.
    """
    from sklearn.linear_model import LogisticRegression

    probs, labels = np.asarray(pretrained_probs, np.float64), np.asarray(labels)
    require(probs.ndim == 2 and len(probs) == len(labels), "pretrained_probs", "must be (N, K) with N labels")
    check_int(num_classes, "num_classes", 2)
    c_grid = check_c_grid(c_grid)
    present = np.unique(labels)
    require(present.tolist() == list(range(num_classes)), "labels",
            f"every task class 0..{num_classes - 1} needs source samples; got {present.tolist()}")
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in range(num_classes):
        idx = rng.permutation(np.flatnonzero(labels == c))
        half = max(1, len(idx) // 2)
        train_idx += idx[:half].tolist()
        val_idx += (idx[half:] if len(idx) > 1 else idx).tolist()
    best, best_acc = None, -1.0
    for c_value in c_grid:
        model = LogisticRegression(C=c_value, fit_intercept=False, max_iter=500)
        model.fit(probs[train_idx], labels[train_idx])
        acc = model.score(probs[val_idx], labels[val_idx])
        if acc > best_acc:
            best, best_acc = model, acc
    coef = best.coef_ if num_classes > 2 else np.vstack([np.zeros_like(best.coef_), best.coef_])  # binary: (1, K)
    scale = _fit_temperature(probs[val_idx] @ coef.T, labels[val_idx])
    p_task_given_k = torch.softmax(torch.from_numpy(coef.T * scale), 1).numpy()  # (K, C)
    joint = p_task_given_k.T * probs.mean(0)[None]  # (C, K)
    return joint / joint.sum(1, keepdims=True)


def calibrated_class_probs(relation: torch.Tensor, pretrained_probs: torch.Tensor) -> torch.Tensor:
    """q_j[c] = softmax_c(-KL(E_c || pi_j)): the pre-trained head's view of the task classes (N, C)."""
    e = relation.clamp_min(1e-12)
    kl = (e * e.log()).sum(1)[None] - pretrained_probs.clamp_min(1e-12).log() @ e.t()  # (N, C)
    return F.softmax(-kl, dim=1)
