"""CUDA bf16 paths against their fp32 CPU references (skipped without a GPU; run by tools/gpu_checks.sh)."""

import pytest
import torch

from omniar.backbone import dropless_moe, grouped_mm_supported
from omniar.generation import TextToVideoPipeline

from test_backbone import blocks, tiny
from test_backbone import batch as model_batch
from test_moe import D, E, layer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def close(got: torch.Tensor, ref: torch.Tensor, rel: float = 2e-2) -> bool:
    """bf16 keeps ~3 significant digits: compare against the reference's scale."""
    return bool((got.float().cpu() - ref.float().cpu()).abs().max() <= rel * ref.abs().max().clamp(min=1e-6))


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_moe_bf16_matches_fp32_cpu_with_gradients(impl):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, D, generator=g)
    first = torch.randint(0, E, (300,), generator=g)
    idx = torch.stack([first, (first + 1) % E], 1)
    w = torch.rand(300, 2, generator=g)
    results = []
    for device, dtype, how in (("cpu", torch.float32, "loop"), (CUDA, torch.bfloat16, impl)):
        m = layer().to(device)
        xi = x.to(device, dtype).detach().requires_grad_()
        if how == "grouped_mm" and not grouped_mm_supported(xi, m.w_in.to(dtype), m.w_out.to(dtype)):
            pytest.skip("grouped_mm does not run on this GPU / torch")
        y = dropless_moe(xi, idx.to(device), w.to(device, dtype), m.w_in, m.w_out, how)
        y.float().square().sum().backward()
        results.append((y, xi.grad, m.w_in.grad, m.w_out.grad))
    for ref, got in zip(*results):
        assert close(got, ref)


@torch.no_grad()
def test_kv_cache_equals_full_forward_bf16():
    model = tiny().to(CUDA, torch.bfloat16)
    ids, mask, vis = model_batch()
    ids, mask, vis = ids.to(CUDA), mask.to(CUDA), [v.to(CUDA, torch.bfloat16) for v in vis]
    full = model(ids, mask, vis)
    cache = model.new_cache()
    model.forward_text(ids, mask, cache)
    got = torch.cat([model.forward_scale(vis[s][:, f], f, s, cache) for f, s, _, _ in blocks()], dim=1)
    assert close(got.view_as(full.visual_logits), full.visual_logits, rel=5e-2)
    ref = tiny()(*model_batch())  # the fp32 CPU model with the same weights
    assert close(full.visual_logits, ref.visual_logits, rel=5e-2)


@torch.no_grad()
def test_pipeline_on_cuda_bf16_is_seeded():
    pipe = TextToVideoPipeline.from_pretrained().to("cuda", torch.bfloat16)
    a, b = (pipe("a red circle moves right on a black background", num_frames=5, seed=3).frames for _ in range(2))
    assert a.shape == (1, 5, 64, 64, 3) and (a == b).all()
