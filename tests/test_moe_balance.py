"""The balancer's measurements: sigmoid gating as DeepSeek-V3 defines it, and MoELayer.rerouted (the tokens whose
chosen experts the selection bias changes), on routers whose scores are set by hand."""

import torch

from omniar.backbone.moe import MoELayer

D, E = 4, 4


def layer(gating: str) -> MoELayer:
    m = MoELayer(D, 8, E, 0, gating, 0.0, 0.0, "loop")
    with torch.no_grad():
        m.router.weight.copy_(torch.eye(E, D))  # logit e of a token = its feature e
    return m


def test_sigmoid_gate_is_the_sigmoid_score_normalised_over_the_chosen_k():
    m = layer("sigmoid")
    x = torch.tensor([[2.0, -1.0, 0.5, -3.0]])
    m.selection_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 5.0]))  # the bias picks expert 3, not the weights
    _, scores, idx, weights = m.route(x, E, 2)
    assert torch.allclose(scores, x.sigmoid())
    assert sorted(idx[0].tolist()) == [0, 3]
    s = x.sigmoid()[0]
    expected = torch.stack([s[i] for i in idx[0].tolist()])
    assert torch.allclose(weights[0], expected / expected.sum())  # the scores, renormalised; no bias
    softmax = layer("softmax")
    assert torch.allclose(softmax.route(x, E, 2)[1], x.softmax(-1))


def test_rerouted_marks_exactly_the_tokens_whose_top_k_set_the_bias_changes():
    for gating in ("softmax", "sigmoid"):
        m = layer(gating)
        x = torch.tensor([[3.0, 2.0, 0.0, -1.0],    # top-2 {0, 1}; the small bias cannot lift expert 2 past 1
                          [3.0, 0.1, 0.0, -1.0],    # {0, 1} -> {0, 2} with the bias
                          [0.0, 3.0, 2.95, -1.0],   # {1, 2} -> {2, 1}: reordering is not rerouting
                          [0.2, 0.1, 0.0, -0.5]])  # near-even: the bias tips expert 2 in
        assert not m.rerouted(x, E, 2).any()  # zero bias reroutes nothing
        m.selection_bias.copy_(torch.tensor([0.0, 0.0, 0.05 if gating == "softmax" else 0.1, 0.0]))
        got = m.rerouted(x, E, 2)
        assert got.tolist() == [False, True, False, True], gating
        assert m.rerouted(x.view(2, 2, D), E, 2).shape == (2, 2)


def test_rerouted_over_a_narrower_width_uses_its_experts_only():
    m = layer("softmax")
    m.selection_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))  # expert 3 is outside a 3-expert width
    x = torch.tensor([[3.0, 2.0, 0.0, -1.0]])
    assert m.rerouted(x, E, 2).tolist() == [True]
    assert m.rerouted(x, 3, 2).tolist() == [False]
