"""CPA, CGI and the ramp on small cases computed by hand."""

import math

import pytest
import torch

from omniar.uda.losses import (GradientReversal, agreement, cgi_loss, cpa_loss, cpa_weights, focal_loss,
                               gini_impurity, probability_distance, ramp, relation_regulariser)
from omniar.uda.model import calibrated_class_probs


def test_ramp_values_and_validation():
    assert ramp(0.0) == 0.0
    assert ramp(1.0) == pytest.approx(2 / (1 + math.exp(-1)) - 1)  # BiPC: 0.4621 at the end
    assert ramp(0.5, gamma=10.0) == pytest.approx(0.986614, abs=1e-6)  # DANN's schedule
    assert ramp(0.2) < ramp(0.4) < ramp(0.8)
    with pytest.raises(ValueError, match="progress"):
        ramp(1.5)
    with pytest.raises(ValueError, match="gamma"):
        ramp(0.5, gamma=0.0)


def test_probability_distance_is_mixture_entropy():
    ps = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    pt = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    d = probability_distance(ps, pt)
    assert d.shape == (2, 2)
    ln2 = math.log(2)
    h = lambda a: -(a * math.log(a) + (1 - a) * math.log(1 - a))  # noqa: E731
    expected = torch.tensor([[ln2, 0.0], [h(0.25), h(0.75)]])  # disjoint -> ln 2, identical one-hot -> 0
    assert torch.allclose(d, expected, atol=1e-6)


def test_cpa_weights_by_hand():
    labels = torch.tensor([0, 0, 1])
    p = torch.tensor([[0.8, 0.2], [0.4, 0.6], [0.9, 0.1]])  # pseudo-labels 0, 1, 0; column masses 2.1, 0.9
    w = cpa_weights(labels, p)
    # W_ij = [y_i = yhat_j] p_j[y_i] / (n_{y_i} * mass_{y_i}) / |shared classes| (= 2)
    expected = torch.tensor([[0.8 / 8.4, 0.0, 0.9 / 8.4],
                             [0.8 / 8.4, 0.0, 0.9 / 8.4],
                             [0.0, 0.6 / 1.8, 0.0]])
    assert torch.allclose(w, expected, atol=1e-6)
    # no shared class: nothing is aligned
    assert cpa_weights(torch.tensor([1, 1]), torch.tensor([[0.9, 0.1]])).abs().sum() == 0


def test_relation_regulariser_divides_by_batch_size_as_the_reference_or_by_classes():
    logits = torch.log(torch.tensor([[0.75, 0.25]] * 3))
    relation = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    labels = torch.tensor([0, 0, 1])
    ce0 = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))
    ce1 = -(0.9 * math.log(0.75) + 0.1 * math.log(0.25))
    # per-class means summed over the classes, over the batch size (3): a per-sample mean would give 0.6905
    assert relation_regulariser(logits, labels, relation).item() == pytest.approx((ce0 + ce1) / 3, abs=1e-6)
    balanced = relation_regulariser(logits, labels, relation, mean_over="classes")
    assert balanced.item() == pytest.approx((ce0 + ce1) / 2, abs=1e-6)  # over the 2 classes present
    with pytest.raises(ValueError, match="mean_over"):
        relation_regulariser(logits, labels, relation, mean_over="samples")
    pre_t, task_t = torch.zeros(2, 2), torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    assert (cpa_loss(logits, pre_t, labels, task_t, relation, "classes")
            - cpa_loss(logits, pre_t, labels, task_t, relation)).item() == pytest.approx((ce0 + ce1) / 6, abs=1e-6)


def test_focal_loss_by_hand_and_against_torchvision():
    from torchvision.ops import sigmoid_focal_loss

    torch.manual_seed(0)
    logits, labels = torch.randn(5, 4), torch.tensor([0, 3, 1, 1, 2])
    hard = torch.nn.functional.one_hot(labels, 4).float()
    assert focal_loss(logits, labels).item() == pytest.approx(sigmoid_focal_loss(logits, hard, reduction="mean").item())
    # smoothing moves the targets (0.8 on the label, 0.2 / 3 elsewhere); the focusing factor keeps the hard labels
    z, p = 0.5, 1 / (1 + math.exp(-0.5))
    pos = (1 - p) ** 2 * -(0.25 * 0.8 * math.log(p) + 0.75 * 0.2 * math.log(1 - p))
    neg = p ** 2 * -(0.25 * (0.2 / 3) * math.log(p) + 0.75 * (1 - 0.2 / 3) * math.log(1 - p))
    smoothed = focal_loss(torch.full((1, 4), z), torch.tensor([2]), label_smoothing=0.2)
    assert smoothed.item() == pytest.approx((pos + 3 * neg) / 4, rel=1e-5)
    with pytest.raises(ValueError, match="label_smoothing"):
        focal_loss(logits, labels, label_smoothing=1.0)


def test_cpa_gradient_reaches_pretrained_head_not_task_head():
    torch.manual_seed(0)
    pre_s = torch.randn(4, 3, requires_grad=True)
    pre_t = torch.randn(5, 3, requires_grad=True)
    task_t = torch.randn(5, 2, requires_grad=True)
    relation = torch.softmax(torch.randn(2, 3), 1)
    labels = torch.tensor([0, 1, 0, 1])
    loss = cpa_loss(pre_s, pre_t, labels, task_t.softmax(1), relation)
    loss.backward()
    assert pre_s.grad.abs().sum() > 0 and pre_t.grad.abs().sum() > 0
    assert task_t.grad is None  # the task head only picks the pairs
    with pytest.raises(ValueError, match="relation"):
        cpa_loss(pre_s, pre_t, labels, task_t.softmax(1), relation[:, :2])


def test_gini_and_agreement_by_hand():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]])  # column sums 1.5, 0.5 -> each row's impurity is 1/3
    assert gini_impurity(torch.tensor([1.0, 2.0]), probs).item() == pytest.approx(1.0, abs=1e-6)
    q = torch.tensor([[1.0, 0.0], [0.3, 0.7]])
    p = torch.tensor([[0.5, 0.5], [0.3, 0.7]])
    assert torch.allclose(agreement(q, p), torch.tensor([0.5, 1.0]), atol=1e-6)


def test_cgi_loss_by_hand():
    p = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    q = torch.tensor([[1.0, 0.0], [0.5, 0.5]])  # agreement: exp(-ln(1/0.75)) = 0.75, and 1
    g_p = 1 - (0.75 ** 2 / 1.25 + 0.25 ** 2 / 0.75)  # both rows of p have this impurity
    g_mix = 1 - (0.875 ** 2 / 1.375 + 0.125 ** 2 / 0.625)  # both rows of (p + q) / 2 too
    expected = (0.75 + 1.0) * g_p + (0.25 + 0.0) * g_mix
    assert cgi_loss(p.log(), q).item() == pytest.approx(expected, abs=1e-5)


def test_calibrated_class_probs():
    pi = torch.tensor([[0.8, 0.2], [0.1, 0.9]])
    # identity relation: the pre-trained head's view of the task classes is pi itself
    assert torch.allclose(calibrated_class_probs(torch.eye(2), pi), pi, atol=1e-5)
    q = calibrated_class_probs(torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.1, 0.8]]), torch.softmax(torch.randn(4, 3), 1))
    assert torch.allclose(q.sum(1), torch.ones(4))


def test_gradient_reversal():
    x = torch.ones(3, requires_grad=True)
    GradientReversal.apply(x, 0.5).sum().backward()
    assert torch.allclose(x.grad, torch.full((3,), -0.5))
