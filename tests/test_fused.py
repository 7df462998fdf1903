"""Fused small generation steps (omniar.backbone.fused): the C block step against the eager blocks."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from omniar.backbone import KVBudget, MoELayer, OmniARConfig, OmniARModel, fused
from omniar.backbone.attention import KVCache
from omniar.generation import TextToVideoPipeline

pytestmark = pytest.mark.skipif(fused.library() is None, reason="no C compiler: steps stay eager")
block_step = fused.block_step  # the real one, under the tests' counting wrappers

SCALES = (1, 2, 4)


def model_of(**kw) -> OmniARModel:
    # moe_impl "loop": the eager steps' MoE layers in torch (with "auto" they take the kernel's MoE call too)
    base = dict(hidden_size=64, num_layers=3, num_heads=4, num_kv_heads=2, num_experts=4, top_k=2,
                expert_hidden_size=32, codebook_size=32, code_dim=4, scales=SCALES, moe_impl="loop")
    base.update(kw)
    torch.manual_seed(0)
    model = OmniARModel.from_config_obj(OmniARConfig(**base)).eval()
    with torch.no_grad():
        for layer in model.layers:  # a trained model's biases: routing differs from the plain top-k
            if hasattr(layer.ffn, "selection_bias"):
                layer.ffn.selection_bias.normal_(0, 0.05)
        for module in model.modules():  # and norms of their own (they start at ones, all alike)
            if isinstance(module, torch.nn.RMSNorm):
                module.weight.normal_(1.0, 0.2)
    return model


@torch.no_grad()
def steps(model, fuse: bool, rows: int = 2, frames: int = 3, budget=None, elastic=None) -> list[torch.Tensor]:
    """The prompt pass's and every step's logits over ``frames`` latent frames, with the C kernel or all in torch
    (``fused_steps``), same inputs (in the model's dtype)."""
    model.fused_steps = fuse
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (rows, 6), generator=g)
    mask = torch.ones(rows, 6, dtype=torch.bool)
    mask[-1, 4:] = False  # a padded row: its padding slots must stay masked
    mask[0, 0] = False  # and a padding query before any real token
    with model.elastic(**elastic) if elastic else torch.no_grad():
        cache = model.new_cache(frames if budget is None else 1, budget)
        out = [model.forward_text(ids, mask, cache)]
        for f in range(frames):
            for s, n in enumerate(SCALES):
                inputs = torch.randn(rows, 4, n, n, generator=g).to(model.dtype)
                out.append(model.forward_scale(inputs, f, s, cache).float())
    model.fused_steps = True
    return out


def close(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max() / y.abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("kw", [{}, dict(gating="sigmoid"), dict(first_dense_layers=1), dict(num_kv_heads=4),
                                dict(num_shared_experts=0)])
def test_fused_steps_equal_eager(kw, monkeypatch):
    """Every step, across frames (the cache grows, padding stays masked), within fp32 rounding of eager."""
    model = model_of(**kw)
    calls = []
    monkeypatch.setattr(fused, "block_step", lambda *a, **k: calls.append(a[5]) or block_step(*a, **k))
    got = steps(model, True)
    assert calls, "no step ran fused"
    assert close(got, steps(model, False)) < 1e-5


@pytest.mark.parametrize("rows", [3, 5, 7])
@pytest.mark.parametrize("kw", [{}, dict(hidden_size=40, num_heads=4, num_kv_heads=2, expert_hidden_size=24)])
def test_fused_steps_of_every_size_equal_eager(rows, kw, monkeypatch):
    """The row limit lifted: steps of 3 to 112 rows and the prompt pass (causal, padding before the first token of
    a row and after the last of another) run fused, through each form of the kernel's products (per
    output, tiles of 4 x 4 in dot form, the transposed outer-product form from 16 rows, tiles cut by rows not a
    multiple of 4, columns not a multiple of 16, a shared dimension not a multiple of 16 (d 40, head dim 10)) and
    both forms of the attention scores (fewer than 8 queries per kv head, or the keys transposed)."""
    model = model_of(**kw)
    monkeypatch.setattr(fused, "MAX_ROWS", 1 << 30)
    sizes = []
    monkeypatch.setattr(fused, "block_step", lambda t, x, *a: sizes.append(x.shape[0] * x.shape[1]) or
                        block_step(t, x, *a))
    got = steps(model, True, rows=rows)
    assert sorted(set(sizes)) == [rows, 4 * rows, 6 * rows, 16 * rows]  # 6: the prompt's tokens
    assert close(got, steps(model, False, rows=rows)) < 1e-5


@pytest.mark.parametrize("threads", [2, 3])
def test_fused_steps_split_across_threads_equal_one_thread(threads, monkeypatch):
    """A step's batch split into parts run on OpenMP threads (5 rows into 2 or 3 uneven parts) gives the logits of
    one part, within fp32 rounding (a part's row count picks the form of its products, so the summation order can
    differ)."""
    model = model_of()
    monkeypatch.setattr(fused, "MAX_ROWS", 1 << 30)
    monkeypatch.setattr(fused, "THREAD_ROWS", 1 << 30)
    one = steps(model, True, rows=5)
    monkeypatch.setattr(fused, "THREAD_ROWS", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    split = []
    monkeypatch.setattr(fused.library(), "omniar_block_step", _counting(fused.library().omniar_block_step, split))
    got = steps(model, True, rows=5)
    assert split and all(t == threads for t in split)
    assert close(got, one) < 1e-5


def _counting(kernel, seen):
    """``kernel`` (a library function taking a step first), noting each call's thread count in ``seen``."""
    def call(step, *args):
        seen.append(step._obj.threads)
        return kernel(step, *args)
    return call


@pytest.mark.parametrize("kw", [{}, dict(num_kv_heads=4)])
def test_eager_steps_with_the_attention_work_in_c_equal_torch(kw, monkeypatch):
    """No fused block (the row limit at 0): every step, the prompt pass included, still runs the attention's
    norms, rotations and cache write in one C call, and its attention too (causal in the prompt pass), and matches
    the all-torch path."""
    model = model_of(**kw)
    monkeypatch.setattr(fused, "MAX_ROWS", 0)
    calls, attended = [], []
    real, real_attention = fused.qk_prep, fused.attention
    monkeypatch.setattr(fused, "qk_prep", lambda *a: calls.append(a[0]) or real(*a))
    monkeypatch.setattr(fused, "attention", lambda *a: attended.append(a[0]) or real_attention(*a))
    got = steps(model, True)
    want = (1 + 3 * len(SCALES)) * model.config.num_layers
    assert len(calls) == want and len(attended) == want
    assert close(got, steps(model, False)) < 1e-5
    assert len(calls) == want  # fused_steps=False: none


needs_bf16 = pytest.mark.skipif(fused.library() is None or not fused.library().omniar_bf16(),
                                reason="the CPU has no AVX-512 BF16: bf16 attention stays in torch")


@needs_bf16
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("batch,length,held,head_dim,threads", [(3, 64, 300, 32, 1), (2, 1, 7, 32, 2),
                                                                 (5, 5, 40, 64, 3), (2, 3, 29, 48, 1),
                                                                 (2, 50, 0, 32, 2)])
def test_bf16_attention_is_as_close_to_fp32_as_torchs_bf16(batch, length, held, head_dim, threads, causal,
                                                           monkeypatch):
    """The bf16 kernel (pair dot products, fp32 softmax) against fp32 attention of the same bf16 inputs: within
    torch's own bf16 attention's error (both round the output to bf16) for every form of its tiles (query rows
    not a multiple of 4 or 8, slots not a multiple of 32, head dims of one to four vectors), with padding slots
    masked and a row without any real slot giving zeros, its batch in parts on threads; causal (the prompt pass),
    new token l sees the held slots and the new ones through its own."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    heads, kv_heads, n = 8, 4, held + length
    attn = torch.nn.Module()
    attn.num_kv_heads = kv_heads
    cache = KVCache(1, (), 1)
    g = torch.Generator().manual_seed(0)
    cache.keys, cache.values = ([torch.randn(batch, kv_heads, n + 7, head_dim, generator=g).bfloat16()]
                                for _ in range(2))
    cache.key_ok = torch.rand(batch, n + 7, generator=g) > 0.2
    cache.key_ok[-1] = False
    cache.length = held
    q = torch.randn(batch, heads, length, head_dim, generator=g).bfloat16()
    with torch.no_grad():
        got = fused.attention(attn, q, cache, 0, causal).float()
        k, v, mask = cache.keys[0][:, :, :n], cache.values[0][:, :, :n], cache.key_ok[:, None, None, :n]
        if causal:
            mask = mask & (torch.arange(n) <= held + torch.arange(length)[:, None])
        want, torchs = (torch.nan_to_num(F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype),
                                                                        attn_mask=mask, enable_gqa=True)).float()
                        .transpose(1, 2).reshape(batch, length, -1) for dtype in (torch.float32, torch.bfloat16))
    assert got.dtype == torch.float32 and got[-1].abs().max() == 0
    error, torch_error = (got - want)[:-1].abs().mean(), (torchs - want)[:-1].abs().mean()
    assert 0 < error <= 1.1 * torch_error


@pytest.mark.parametrize("threads", [1, 2])
def test_bf16_qk_prep_is_the_fp32_one_rounded_once(threads, monkeypatch):
    """QK-norm, RoPE and the cache write of bf16 tensors: the fp32 kernel's result on the same values, rounded to
    bf16 (to nearest even, as torch rounds), in the same places; the batch in parts on threads alike."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    model = model_of()
    attn, g = model.layers[0].attn, torch.Generator().manual_seed(0)
    batch, length, held = 3, 5, 4
    heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
    q = torch.randn(batch, length, heads * head_dim, generator=g)
    kv = torch.randn(batch, length, 2 * kv_heads * head_dim, generator=g)
    angles = torch.randn(length, head_dim // 2, generator=g)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        cache = KVCache(1, (), 1)
        cache.keys, cache.values = ([torch.zeros(batch, kv_heads, held + length + 2, head_dim, dtype=dtype)]
                                    for _ in range(2))
        cache.length = held
        with torch.no_grad():
            layer = copy.deepcopy(attn).bfloat16().to(dtype)  # bf16 weights in both
            out = fused.qk_prep(layer, *(t.bfloat16().to(dtype) for t in (q, kv, angles.cos(), angles.sin())), cache, 0)
        results.append([t.bfloat16() for t in (out, cache.keys[0], cache.values[0])])
    assert results[1][1][:, :, held:held + length].abs().max() > 0
    for fp32_rounded, bf16 in zip(*results):
        assert torch.equal(fp32_rounded, bf16)


@pytest.mark.parametrize("rows,threads", [(35, 2), (72, 3)])
def test_rms_norm_in_c_is_torchs_and_in_bf16_the_fp32_one_rounded_once(rows, threads, monkeypatch):
    """The eager steps' norms: fp32 within rounding of torch's RMSNorm; bf16 the fp32 kernel's result on the same
    values rounded to bf16, bit for bit (from 64 rows split over threads); with gradients torch's own."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    g = torch.Generator().manual_seed(0)
    norm = torch.nn.RMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2, generator=g)
        norm.weight.copy_(norm.weight.bfloat16())
        x = torch.randn(rows, 1, 48, generator=g).bfloat16().float()
        fp32 = fused.rms_norm(x, norm)
        assert (fp32 - norm(x)).abs().max() < 1e-6
        assert torch.equal(fused.rms_norm(x.bfloat16(), copy.deepcopy(norm).bfloat16()), fp32.bfloat16())
        assert not torch.equal(fp32, fp32.bfloat16().float())  # the rounding is there to see
    assert fused.rms_norm(x, norm).grad_fn is not None


@pytest.mark.skipif(fused._ONEDNN_LINEAR is None, reason="this torch has no oneDNN linear")
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(7, 48), (3, 5, 48)])
def test_dense_is_nn_linear_through_onednn_in_inference_only(bias, shape, monkeypatch):
    """fp32 rows without gradients go through oneDNN's product, within fp32 rounding of ``nn.Linear``; training,
    autocast and other dtypes get ``nn.Linear`` itself."""
    layer, g = torch.nn.Linear(48, 24, bias=bias), torch.Generator().manual_seed(0)
    x = torch.randn(*shape, 48, generator=g)
    calls = []
    monkeypatch.setattr(fused, "_ONEDNN_LINEAR", lambda *a: calls.append(a) or fused._onednn_linear()(*a))
    with torch.no_grad():
        got = fused.dense(x, layer)
        assert len(calls) == 1 and got.shape == (*shape, 24)
        assert (got - layer(x)).abs().max() < 1e-5 * layer(x).abs().max()
        assert torch.equal(fused.dense(x.bfloat16(), layer.bfloat16()), layer(x.bfloat16()))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert fused.dense(x, layer.float()).dtype == torch.bfloat16
    assert fused.dense(x, layer).grad_fn is not None and len(calls) == 1


@needs_bf16
def test_bf16_model_steps_with_the_attention_work_in_c_equal_torch(monkeypatch):
    """A bf16 model's steps, the prompt pass included, run QK-norm, RoPE and the cache write in C (in fp32, rounded
    once) and the bf16 attention kernel (causal in the prompt pass), and give torch's logits within bf16 rounding."""
    model = model_of().to(torch.bfloat16)
    prepared, attended = [], []
    real_prep, real_attention = fused.qk_prep, fused.attention
    monkeypatch.setattr(fused, "qk_prep", lambda *a: prepared.append(a[1].dtype) or real_prep(*a))
    monkeypatch.setattr(fused, "attention", lambda *a: attended.append(a[1].dtype) or real_attention(*a))
    got = steps(model, True)
    want = 3 * len(SCALES) * model.config.num_layers
    assert prepared == attended == [torch.bfloat16] * (want + model.config.num_layers)
    assert close(got, steps(model, False)) < 1e-2


def test_only_steps_within_the_row_limit_run_fused(monkeypatch):
    model = model_of()
    monkeypatch.setattr(fused, "MAX_ROWS", 8)
    rows = []
    monkeypatch.setattr(fused, "block_step", lambda t, x, *a: rows.append(x.shape[0] * x.shape[1]) or
                        block_step(t, x, *a))
    steps(model, True, rows=2)
    assert sorted(set(rows)) == [2, 8]  # scales 1 and 2 of 2 rows; 4x4 (32 rows) stays eager
    assert len(rows) == 3 * 2 * model.config.num_layers


@pytest.mark.parametrize("elastic", [dict(depth=2), dict(num_experts=2, top_k=1)])
def test_fused_elastic_sub_models_equal_eager(elastic):
    model = model_of(exit_adapter_depths=[2], exit_adapter_attention=True, exit_adapter_hidden_size=32,
                     elastic_min_depth=2)
    for p in model.exit_adapters["2"].parameters():  # a trained exit block: not the identity
        p.data.normal_(0, 0.05)
    assert close(steps(model, True, elastic=elastic), steps(model, False, elastic=elastic)) < 1e-5


def test_fused_steps_keep_nacl_queries_and_evict_alike():
    """A NACL budget scores slots by the steps' queries: the fused path hands over the same queries, so the
    same slots go and later steps still match."""
    model = model_of()
    per_frame = sum(n * n for n in SCALES)

    def budget():
        return KVBudget(2 * per_frame, "nacl", generator=torch.Generator().manual_seed(0))
    assert close(steps(model, True, frames=4, budget=budget()), steps(model, False, frames=4, budget=budget())) < 1e-5


def test_shipped_pipeline_draws_the_same_codes_fused_or_eager():
    """The default call's coarse steps run fused; its codes are the eager path's (a code could only differ where a
    draw falls within float rounding of a boundary)."""
    pipe = TextToVideoPipeline.from_pretrained()
    prompts = ["a red circle moves right on a black background", "a blue square moves up on a white background"]
    codes = {}
    for fuse in (True, False):
        pipe.model.fused_steps = fuse
        codes[fuse] = pipe(prompts, num_frames=9, seed=3, output_type="pt").codes.codes
    pipe.model.fused_steps = True
    same = sum(int((a == b).sum()) for a, b in zip(codes[True], codes[False]))
    assert same / sum(c.numel() for c in codes[True]) >= 0.99


def moe_layer(gating: str, shared: int, dim: int = 64, hidden: int = 32, experts: int = 6) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(dim, hidden, experts, shared, gating, 0.0, 0.0, "auto").eval()
    with torch.no_grad():
        for p in (layer.w_in, layer.w_out):
            p.normal_(0, 0.1)
        layer.selection_bias.normal_(0, 0.05)
    return layer


def _moe_calls(monkeypatch) -> list[int]:
    """The thread counts of the kernel's MoE calls from now on."""
    seen = []
    monkeypatch.setattr(fused.library(), "omniar_moe", _counting(fused.library().omniar_moe, seen))
    return seen


@pytest.mark.parametrize("gating,shared,dim,hidden", [("softmax", 1, 64, 32), ("sigmoid", 0, 64, 32),
                                                      ("softmax", 2, 40, 24)])
@pytest.mark.parametrize("experts,top_k", [(6, 2), (5, 3), (6, 1)])
@pytest.mark.parametrize("threads", [1, 3])
def test_moe_layer_in_one_call_equals_the_grouped_dispatch(gating, shared, dim, hidden, experts, top_k, threads,
                                                           monkeypatch):
    """An MoE layer's eval forward without statistics (moe_impl "auto") runs as one kernel call, its rows split
    over the threads, elastic widths (the first 5 of 6 experts) and top-k included, and gives the torch
    dispatch's output within fp32 rounding."""
    layer = moe_layer(gating, shared, dim, hidden)
    in_torch = copy.deepcopy(layer)
    in_torch.impl = "loop"
    calls = _moe_calls(monkeypatch)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    x = torch.randn(2, 7, dim)  # 14 rows: parts of uneven size
    with torch.no_grad():
        got = layer(x, None, None, experts, top_k, 0)
        want = in_torch(x, None, None, experts, top_k, 0)
    assert calls == [threads]
    assert got[2] is None and float(got[1]) == 0.0
    assert float((got[0] - want[0]).abs().max() / want[0].abs().max()) < 1e-5


def test_moe_layer_in_one_call_at_its_row_limit_equals_the_grouped_dispatch(monkeypatch):
    """At fused.MOE_ROWS rows (split over two threads) the one call still gives the torch dispatch's output."""
    layer = moe_layer("softmax", 1)
    in_torch = copy.deepcopy(layer)
    in_torch.impl = "grouped_mm"
    calls = _moe_calls(monkeypatch)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    x = torch.randn(2, fused.MOE_ROWS // 2, 64)
    with torch.no_grad():
        got, want = layer(x, None, None, 6, 2, 0)[0], in_torch(x, None, None, 6, 2, 0)[0]
    assert calls == [2]
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5


def test_moe_layer_in_one_call_only_where_it_applies(monkeypatch):
    layer = moe_layer("softmax", 1)
    calls = _moe_calls(monkeypatch)
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        layer(x, None, None, 6, 2, 0)
        assert len(calls) == 1
        layer(x, torch.ones(1, 5, dtype=torch.bool), torch.zeros(5, dtype=torch.bool), 6, 2, 0)  # statistics
        layer(torch.randn(1, fused.MOE_ROWS + 1, 64), None, None, 6, 2, 0)  # too many rows
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x, None, None, 6, 2, 0)
        layer.impl = "grouped_mm"
        layer(x, None, None, 6, 2, 0)
        layer.impl = "auto"
        copy.deepcopy(layer).half()(x.half(), None, None, 6, 2, 0)  # another dtype
    layer(x, None, None, 6, 2, 0)  # gradients on
    assert len(calls) == 1


def _errors_against_exact(layer, x, got, experts: int, top_k: int, torch_impl: str) -> tuple[float, float]:
    """Mean errors of a bf16 MoE layer's output ``got`` for ``x`` and of torch's bf16 dispatch (``torch_impl``) on
    the same layer, against the exact result (float64 on the same bf16 values)."""
    exact, in_torch = copy.deepcopy(layer).double(), copy.deepcopy(layer)
    exact.impl, in_torch.impl = "loop", torch_impl
    want = exact(x.double(), None, None, experts, top_k, 0)[0]
    torchs = in_torch(x, None, None, experts, top_k, 0)[0]
    return tuple(float((y.double() - want).abs().mean()) for y in (got, torchs))


@needs_bf16
@pytest.mark.parametrize("gating,shared,experts,top_k", [("softmax", 1, 6, 2), ("sigmoid", 0, 5, 3)])
def test_bf16_moe_layer_past_the_row_limit_runs_in_one_bf16_call(gating, shared, experts, top_k, monkeypatch):
    """Past fused.MOE_ROWS rows a bf16 MoE layer runs its own routing, then its experts in one call of the bf16
    kernel (elastic widths and top-k included): nearer the exact result (float64 on the same bf16 values) than
    torch's bf16 dispatch, the same bits whatever the threads, and made again from weights changed in place."""
    layer = moe_layer(gating, shared).to(torch.bfloat16)
    calls = []
    real = fused.library().omniar_moe_bf16
    monkeypatch.setattr(fused.library(), "omniar_moe_bf16", lambda *a: calls.append(a[0]) or real(*a))
    x = torch.randn(3, fused.MOE_ROWS, 64).bfloat16()
    with torch.no_grad():
        for _ in range(2):
            outs = []
            for threads in (1, 3):
                monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
                outs.append(layer(x, None, None, experts, top_k, 0)[0])
            err, torch_err = _errors_against_exact(layer, x, outs[0], experts, top_k, "grouped_mm")
            assert outs[0].dtype == torch.bfloat16 and err <= torch_err, (err, torch_err)
            assert torch.equal(outs[0], outs[1])
            layer.w_out.mul_(-1.5)  # paired again
    assert calls == [1, 3, 1, 3]


@needs_bf16
def test_bf16_moe_layer_past_the_row_limit_leaves_other_widths_to_torch(monkeypatch):
    """Expert widths the bf16 kernel does not take (2 x hidden not a multiple of 64) keep torch's dispatch."""
    layer = moe_layer("softmax", 1, hidden=24).to(torch.bfloat16)
    in_torch = copy.deepcopy(layer)
    in_torch.impl = "grouped_mm"
    monkeypatch.setattr(fused.library(), "omniar_moe_bf16", lambda *a: pytest.fail("the kernel ran"))
    x = torch.randn(2, fused.MOE_ROWS, 64).bfloat16()
    with torch.no_grad():
        assert torch.equal(layer(x, None, None, 6, 2, 0)[0], in_torch(x, None, None, 6, 2, 0)[0])


@pytest.mark.parametrize("threads", [1, 3])
def test_bf16_moe_layer_runs_the_kernel_on_its_weights_widened(threads, monkeypatch):
    """A bf16 MoE layer's eval forward runs the fp32 kernel on its weights widened to fp32 (kept, and widened
    again when a weight changes): bf16 out, nearer the exact result (float64 on the same bf16 values) than torch's
    bf16 dispatch."""
    layer = moe_layer("softmax", 1).to(torch.bfloat16)
    calls = _moe_calls(monkeypatch)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    x = torch.randn(3, 11, 64).bfloat16()
    with torch.no_grad():
        for _ in range(2):
            got = layer(x, None, None, 6, 2, 0)[0]
            assert got.dtype == torch.bfloat16
            err, torch_err = _errors_against_exact(layer, x, got, 6, 2, "loop")
            assert err <= torch_err, (err, torch_err)
            layer.w_in.mul_(-1.5)  # a new weight in place: widened again
    assert calls == [threads, threads]


def test_a_model_that_ran_fused_steps_still_copies_and_pickles():
    model = model_of()
    steps(model, True, frames=1)
    assert fused._TEMPLATES  # the templates are kept, but beside the blocks
    clone = pickle.loads(pickle.dumps(copy.deepcopy(model)))
    assert close(steps(clone, True, frames=1), steps(model, True, frames=1)) == 0


def test_no_fused_step_with_gradients_or_other_dtypes():
    model = model_of()
    x = torch.zeros(1, 1, 64)
    cache = model.new_cache(1)
    model.forward_text(torch.zeros(1, 2, dtype=torch.long), None, cache)
    with torch.no_grad():
        assert fused.prepare(model._blocks(), x, cache.cos[:1], cache) is not None
        over = fused.MAX_ROWS + 1
        assert fused.prepare(model._blocks(), torch.zeros(1, over, 64), cache.cos[:over], cache) is None
    assert fused.prepare(model._blocks(), x, cache.cos[:1], cache) is None  # gradients on
    model.to(torch.bfloat16)
    with torch.no_grad():
        assert fused.prepare(model._blocks(), x.bfloat16(), cache.cos[:1], cache) is None
