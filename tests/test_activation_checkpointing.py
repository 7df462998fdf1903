"""``train.activation_checkpointing``: every transformer block recomputed in backward gives the same loss and
gradients, the same MoE load count (the recomputation does not count again), the same state_dict keys, and
keeps fewer bytes for backward (counted with autograd's saved-tensor hooks)."""

import copy

import torch
import torch.nn.functional as F

from omniar.backbone import OmniARConfig, OmniARModel
from omniar.backbone.moe import MoELayer
from omniar.train.common import checkpoint_blocks

MODEL = dict(text_vocab_size=40, codebook_size=16, code_dim=4, scales=(1, 2, 4), hidden_size=32, num_layers=3,
             num_heads=2, num_kv_heads=1, num_experts=4, top_k=2, expert_hidden_size=16, router_z_loss_coef=1e-3)


def step(model: OmniARModel, spec=None):
    """Loss, gradients, MoE load counts and the bytes autograd saved for backward, of one training step."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, MODEL["text_vocab_size"], (2, 6), generator=g)
    visual = [torch.randn(2, 2, MODEL["code_dim"], n, n, generator=g) for n in MODEL["scales"]]
    targets = torch.randint(0, MODEL["codebook_size"], (2, 2, 21), generator=g)
    saved = 0

    def pack(t):
        nonlocal saved
        saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with model.elastic(*spec) if spec else torch.enable_grad():
            out = model(ids, None, visual)
    loss = F.cross_entropy(out.visual_logits.flatten(0, 2), targets.flatten()) + out.aux_loss
    loss.backward()
    loads = [m.load_error.clone() for m in model.modules() if isinstance(m, MoELayer)]
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, loads, saved


def test_same_gradients_and_load_counts_with_fewer_saved_bytes():
    torch.manual_seed(0)
    plain = OmniARModel.from_config_obj(OmniARConfig(**MODEL)).train()
    checkpointed = copy.deepcopy(plain)
    checkpoint_blocks(checkpointed.layers)
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()
    for spec in (None, (2, 2, 1)):  # a sub-model: backward runs after its `with` block ended
        loss, grads, loads, plain_bytes = step(plain, spec)
        loss_c, grads_c, loads_c, checkpointed_bytes = step(checkpointed, spec)
        assert torch.allclose(loss, loss_c)
        assert grads.keys() == grads_c.keys()
        for name in grads:
            assert torch.allclose(grads[name], grads_c[name], atol=1e-6, rtol=1e-5), name
        assert all(torch.equal(a, b) for a, b in zip(loads, loads_c))  # counted once, not again in backward
        assert checkpointed_bytes < 0.5 * plain_bytes, (checkpointed_bytes, plain_bytes)
        plain.zero_grad(), checkpointed.zero_grad()


def test_generation_and_eval_are_not_checkpointed():
    model = OmniARModel.from_config_obj(OmniARConfig(**MODEL)).eval()
    checkpoint_blocks(model.layers)
    ids = torch.randint(0, MODEL["text_vocab_size"], (1, 6))
    visual = [torch.randn(1, 2, MODEL["code_dim"], n, n) for n in MODEL["scales"]]
    with torch.no_grad():
        model(ids, None, visual)  # runs the blocks directly (a checkpoint would warn or fail without grad)
