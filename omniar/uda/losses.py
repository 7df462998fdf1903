"""UDA losses: BiPC's CPA and CGI, the trade-off ramp, the focal loss, and DANN's gradient reversal.

Shapes: ``n_s`` source and ``n_t`` target samples, ``K`` pre-trained-head classes, ``C`` task classes;
``relation`` is the (C, K) class-relationship matrix of :func:`omniar.uda.model.relationship_matrix`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._checks import check_choice, check_float, require

_EPS = 1e-12
REGULARISER_MEANS = ("batch", "classes")


def ramp(progress: float, gamma: float = 1.0) -> float:
    """Trade-off 2 / (1 + exp(-gamma p)) - 1 at training progress p in [0, 1]: 0 at the start, rising
    smoothly. BiPC uses gamma = 1 (ends at 0.46); DANN's reversal weight uses gamma = 10 (ends near 1)."""
    check_float(progress, "progress", 0.0, 1.0)
    check_float(gamma, "gamma", 0.0, low_inclusive=False)
    return 2.0 / (1.0 + math.exp(-gamma * progress)) - 1.0


def probability_distance(ps: torch.Tensor, pt: torch.Tensor) -> torch.Tensor:
    """D_ij = H(M_ij) with M_ij = (ps_i + pt_j) / 2, for all source i and target j: (n_s, n_t).

    H(M) = JSD(ps_i, pt_j) + (H(ps_i) + H(pt_j)) / 2, so it aligns the pair and keeps both confident."""
    m = (ps[:, None] + pt[None]) / 2
    return -(m * m.clamp_min(_EPS).log()).sum(-1)


def cpa_weights(source_labels: torch.Tensor, target_task_probs: torch.Tensor) -> torch.Tensor:
    """W_ij = [y_i = yhat_j] p_j[y_i] / (n_{y_i} sum_j' p_j'[y_i]) / |Y_s & Yhat_t|  (no gradient).

    yhat_j is the task head's pseudo-label of target j; the sum over j' runs over all targets, so a class
    whose probability mass mostly lands on other pseudo-labels is aligned less."""
    p = target_task_probs.detach()
    num_classes = p.shape[1]
    pseudo = p.argmax(1)
    counts = torch.bincount(source_labels, minlength=num_classes).clamp_min(1).to(p.dtype)
    mass = p.sum(0).clamp_min(_EPS)
    same = source_labels[:, None] == pseudo[None]
    w = same * p[:, source_labels].t() / (counts[source_labels] * mass[source_labels])[:, None]
    num_shared = int(torch.isin(source_labels.unique(), pseudo).sum())
    return w / max(num_shared, 1)


def relation_regulariser(pre_source_logits: torch.Tensor, source_labels: torch.Tensor, relation: torch.Tensor,
                         mean_over: str = "batch") -> torch.Tensor:
    """Pulls the source pre-trained head toward row E_{y_i}: cross-entropy CE(E_{y_i}, softmax(z_i)),
    averaged per class, then summed over the classes and divided by the batch size (``mean_over="batch"``,
    the reference's scale) or by the number of classes in the batch (``"classes"``: a class-balanced
    mean, larger by batch size / classes present)."""
    check_choice(mean_over, "mean_over", REGULARISER_MEANS)
    ce = -(relation[source_labels] * F.log_softmax(pre_source_logits, 1)).sum(1)
    counts = torch.bincount(source_labels, minlength=relation.shape[0]).to(ce.dtype)
    per_class_sum = (ce / counts[source_labels]).sum()
    return per_class_sum / (len(ce) if mean_over == "batch" else (counts > 0).sum())


def cpa_loss(pre_source_logits: torch.Tensor, pre_target_logits: torch.Tensor, source_labels: torch.Tensor,
             target_task_probs: torch.Tensor, relation: torch.Tensor, regulariser_mean: str = "batch"
             ) -> torch.Tensor:
    """Calibrated Probability Alignment: sum_ij W_ij D_ij over pre-trained-head probabilities plus the
    relationship regulariser (``regulariser_mean``: its ``mean_over``). The task head only chooses the
    pairs (W); it gets no gradient here."""
    require(pre_source_logits.shape[1] == pre_target_logits.shape[1] == relation.shape[1], "relation",
            f"needs {pre_source_logits.shape[1]} pre-trained classes, got shape {tuple(relation.shape)}")
    d = probability_distance(pre_source_logits.softmax(1), pre_target_logits.softmax(1))
    align = (cpa_weights(source_labels, target_task_probs) * d).sum()
    return align + relation_regulariser(pre_source_logits, source_labels, relation, regulariser_mean)


def gini_impurity(weights: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """G(w, P) = sum_j w_j (1 - sum_c P_jc^2 / sum_j' P_j'c); the column sums are constants, so a
    class cannot lower the loss by swallowing the whole batch."""
    col = probs.sum(0).detach().clamp_min(_EPS)
    return (weights * (1 - (probs.pow(2) / col).sum(1))).sum()


def agreement(q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """exp(-KL(q_j || p_j)) per sample, in (0, 1]: 1 where the two heads agree."""
    return torch.exp(-(q * (q.clamp_min(_EPS).log() - p.clamp_min(_EPS).log())).sum(1))


def cgi_loss(task_logits: torch.Tensor, calibrated: torch.Tensor) -> torch.Tensor:
    """Calibrated Gini Impurity on the target: G(a, p) + G(1 - a, (p + q) / 2), a = agreement(q, p).

    ``task_logits`` must come from the task head on *detached* target features (CGI trains the task head
    only); ``calibrated`` is q, the pre-trained head's view of the task classes (treated as constant).
    Where the heads agree, p is sharpened; where they disagree, p is sharpened toward the mixture."""
    p = task_logits.softmax(1)
    q = calibrated.detach()
    a = agreement(q, p).detach()
    return gini_impurity(a, p) + gini_impurity(1 - a, (p + q) / 2)


def focal_loss(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0, alpha: float = 0.25,
               gamma: float = 2.0) -> torch.Tensor:
    """Sigmoid focal loss over one-vs-rest classes, the classifier loss BiPC's reference uses on VisDA.

    Per sample and class: |y - sigmoid(z)|^gamma x alpha-weighted binary cross-entropy against the
    label-smoothed targets (1 - s on the label, s / (C - 1) elsewhere); y is the hard one-hot label, so
    smoothing changes the targets but not which samples count as easy. Mean over samples and classes."""
    check_float(label_smoothing, "label_smoothing", 0.0, 1.0, high_inclusive=False)
    num_classes = logits.shape[1]
    hard = F.one_hot(labels, num_classes).to(logits.dtype)
    soft = hard * (1 - label_smoothing) + (1 - hard) * label_smoothing / (num_classes - 1)
    focus = (hard - logits.sigmoid()).abs().pow(gamma)
    bce = -(alpha * soft * F.logsigmoid(logits) + (1 - alpha) * (1 - soft) * F.logsigmoid(-logits))
    return (focus * bce).mean()


class GradientReversal(torch.autograd.Function):
    """Identity forward; multiplies the gradient by -weight (DANN)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: float) -> torch.Tensor:
        ctx.weight = weight
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return -ctx.weight * grad, None
