"""Unified backbone: causality, KV cache, RoPE, elastic sub-models, config and validation."""

import contextlib
import math

import pytest
import torch

from omniar.backbone import OmniARConfig, OmniARModel, vision_meta
from omniar.backbone.rope import MultiScaleRoPE, axis_pairs

SCALES = (1, 2, 4)
B, L, T, C = 2, 5, 2, 4


def tiny(**kw) -> OmniARModel:
    base = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4, top_k=2,
                expert_hidden_size=16, codebook_size=16, code_dim=C, scales=SCALES, mtp_k=3)
    base.update(kw)
    torch.manual_seed(0)
    return OmniARModel.from_config_obj(OmniARConfig(**base)).eval()


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False
    ids[1, 3:] = 256
    vis = [torch.randn(B, T, C, n, n, generator=g) for n in SCALES]
    return ids, mask, vis


def same(a, b):
    """Equal up to GEMM blocking: MoE group sizes change with unrelated tokens' routing."""
    return (a - b).abs().max() < 1e-5


def blocks():
    """(frame, scale, first token index inside the frame, count) in sequence order."""
    out, off = [], 0
    for s, n in enumerate(SCALES):
        out.append((s, off, n * n))
        off += n * n
    return [(f, s, o, c) for f in range(T) for s, o, c in out]


@torch.no_grad()
def test_block_causality_vision():
    model = tiny(first_dense_layers=1)
    ids, mask, vis = batch()
    ref = model(ids, mask, vis)
    for f, s, off, count in blocks():
        pert = [v.clone() for v in vis]
        pert[s][:, f] += torch.randn_like(pert[s][:, f])
        out = model(ids, mask, pert).visual_logits.flatten(1, 2)
        if (f, s) == (0, 0):  # frame 0 scale 0 is BOV: its input is replaced, nothing changes
            assert torch.equal(out, ref.visual_logits.flatten(1, 2))
            continue
        ref_v = ref.visual_logits.flatten(1, 2)
        first = f * sum(n * n for n in SCALES) + off
        assert same(out[:, :first], ref_v[:, :first]), (f, s)
        assert (out[:, first:first + count] - ref_v[:, first:first + count]).abs().max() > 1e-4, (f, s)
        assert same(model(ids, mask, pert).text_logits, ref.text_logits)


@torch.no_grad()
def test_text_causality_and_padding():
    model = tiny()
    ids, mask, vis = batch()
    ref = model(ids, mask, vis)
    for j in range(1, 3):
        pert = ids.clone()
        pert[0, j] = (pert[0, j] + 7) % 256
        out = model(pert, mask, vis)
        assert same(out.text_logits[0, :j], ref.text_logits[0, :j])
        assert same(out.mtp_logits[0, :j], ref.mtp_logits[0, :j])
        assert not torch.allclose(out.visual_logits[0], ref.visual_logits[0])  # vision sees all text
    pert = ids.clone()
    pert[1, 3:] = 42  # padded ids are invisible to every query
    out = model(pert, mask, vis)
    assert same(out.visual_logits, ref.visual_logits)
    assert same(out.text_logits[1, :3], ref.text_logits[1, :3])
    empty = model(ids, torch.zeros_like(mask), vis)  # no real text at all: still finite
    assert torch.isfinite(empty.text_logits).all() and torch.isfinite(empty.visual_logits).all()


@torch.no_grad()
def test_frame_visibility_hides_earlier_frames():
    model = tiny()
    ids, mask, vis = batch()
    fv = torch.zeros(B, T, T, dtype=torch.bool)  # frame 1 may not see frame 0
    pert = [v.clone() for v in vis]
    pert[2][:, 0] += 1.0
    a = model(ids, mask, vis, frame_visibility=fv).visual_logits
    b = model(ids, mask, pert, frame_visibility=fv).visual_logits
    assert same(a[:, 1], b[:, 1])
    assert not torch.allclose(a[:, 0], b[:, 0])
    c = model(ids, mask, pert).visual_logits  # default: frame 1 sees frame 0
    assert not torch.allclose(c[:, 1], a[:, 1])


@torch.no_grad()
def test_token_visibility_hides_single_key_tokens():
    """Per-token visibility: the frame-level mask spread over each frame's tokens gives the same logits; a token of
    frame 0 hidden from frame 1 cannot reach frame 1 (one layer, so no other frame-0 token relays it)."""
    model = tiny(num_layers=1)
    ids, mask, vis = batch()
    per_frame = sum(n * n for n in SCALES)
    fv = torch.ones(B, T, T, dtype=torch.bool)
    tv = fv.repeat_interleave(per_frame, dim=2)
    assert same(model(ids, mask, vis, frame_visibility=tv).visual_logits, model(ids, mask, vis).visual_logits)
    hidden = 1 + 2  # scale 1 (2x2), token 2 of frame 0
    tv[:, 1, hidden] = False
    pert = [v.clone() for v in vis]
    pert[1][:, 0, :, 1, 0] += 1.0
    a = model(ids, mask, vis, frame_visibility=tv).visual_logits
    b = model(ids, mask, pert, frame_visibility=tv).visual_logits
    assert same(a[:, 1], b[:, 1])
    assert not torch.allclose(a[:, 0], b[:, 0])  # frame 0 itself still sees it
    c = model(ids, mask, pert).visual_logits
    assert not torch.allclose(c[:, 1], model(ids, mask, vis).visual_logits[:, 1])  # visible by default
    with pytest.raises(ValueError, match=r"frame_visibility: must be a bool tensor .* or \(B, T_lat, T_lat \* "):
        model(ids, mask, vis, frame_visibility=tv[:, :, :-1])


@torch.no_grad()
def test_raster_mode_is_token_causal():
    model = tiny(vision_mask="raster")
    ids, mask, vis = batch()
    ref = model(ids, mask, vis).visual_logits.flatten(1, 2)
    pert = [v.clone() for v in vis]
    pert[2][:, 0, :, 1, 2] += 1.0  # scale 2 (4x4) token 6 of frame 0
    out = model(ids, mask, pert).visual_logits.flatten(1, 2)
    pos = 1 + 4 + 6
    assert same(out[:, :pos], ref[:, :pos])
    assert not torch.allclose(out[:, pos], ref[:, pos])


@torch.no_grad()
@pytest.mark.parametrize("kw", [dict(first_dense_layers=1), dict(gating="sigmoid", num_kv_heads=4)])
@pytest.mark.parametrize("max_frames", [1, T, T + 3])  # regrown, exact, larger than needed
def test_kv_cache_equals_full_forward(kw, max_frames):
    model = tiny(**kw)
    ids, mask, vis = batch()
    full = model(ids, mask, vis)
    want = full.visual_logits.flatten(1, 2)
    cache = model.new_cache(max_frames)
    text = model.forward_text(ids, mask, cache)
    assert (text - full.text_logits).abs().max() < 1e-4
    buffers = [k.data_ptr() for k in cache.keys]
    first = 0
    for f, s, _, count in blocks():  # every step, across frames, against its slice of the full pass
        got = model.forward_scale(vis[s][:, f], f, s, cache)
        assert (got - want[:, first:first + count]).abs().max() < 1e-4, (f, s)
        first += count
    assert len(cache) == L + T * sum(n * n for n in SCALES)
    # buffers sized from the call's limits are written in place, never reallocated
    assert ([k.data_ptr() for k in cache.keys] == buffers) == (max_frames >= T)
    assert cache.keys[0].shape[2] == L + max(max_frames, 2 if max_frames < T else 0) * sum(n * n for n in SCALES)


@torch.no_grad()
@pytest.mark.parametrize("real", [L, 0])  # text slots held: the real text's; none real: one (masked) slot
def test_text_padding_after_every_rows_last_token_takes_no_slot(real):
    """Padding after the last real token of every row is neither run nor cached (positions still count it):
    every step equals the full forward of the padded text, and the cache holds the real text's slots only."""
    model = tiny()
    ids, mask, vis = batch()
    pad = 4  # after the last real token of both rows (row 1 already ends at 3)
    ids, mask = torch.cat([ids, torch.full((B, pad), 256)], 1), torch.cat([mask, torch.zeros(B, pad, dtype=bool)], 1)
    mask[:, real:] = False
    full = model(ids, mask, vis)
    want = full.visual_logits.flatten(1, 2)
    cache = model.new_cache(T)
    text = model.forward_text(ids, mask, cache)
    held = max(real, 1)
    assert text.shape[1] == held and (text - full.text_logits[:, :held]).abs().max() < 1e-4
    assert (cache.text_len, cache.text_slots, len(cache)) == (L + pad, held, held)
    per_frame = sum(n * n for n in SCALES)
    assert cache.keys[0].shape[2] == held + T * per_frame
    got = torch.cat([model.forward_scale(vis[s][:, f], f, s, cache) for f, s, _, _ in blocks()], dim=1)
    assert (got - want).abs().max() < 1e-4
    assert len(cache) == held + T * per_frame


@torch.no_grad()
def test_bf16_cached_steps_stay_close_to_fp32():
    """A bf16 model's cache (buffers and RoPE tables follow the weights' dtype) stays within 2 % of the
    logit range of the fp32 full forward at every step (0.5 % measured)."""
    model = tiny()
    ids, mask, vis = batch()
    want = model(ids, mask, vis).visual_logits.flatten(1, 2)
    model.to(torch.bfloat16)
    cache = model.new_cache(T)
    model.forward_text(ids, mask, cache)
    assert cache.keys[0].dtype == torch.bfloat16 and cache.cos.dtype == torch.bfloat16
    got = torch.cat([model.forward_scale(vis[s][:, f], f, s, cache) for f, s, _, _ in blocks()], dim=1)
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.02 * want.abs().max()


@torch.no_grad()
@pytest.mark.parametrize("vision_mask", ["block", "raster"])
def test_evicted_slots_are_never_attended(vision_mask):
    """Evicting frame 0's visual tokens at the frame boundary (what long-video eviction does) gives
    frame 1 exactly the full forward in which frame 1 may not see frame 0; the text stays."""
    model = tiny(vision_mask=vision_mask)
    ids, mask, vis = batch()
    fv = torch.ones(B, T, T, dtype=torch.bool)
    fv[:, 1, 0] = False
    want = model(ids, mask, vis, frame_visibility=fv).visual_logits[:, 1]
    cache = model.new_cache(T)
    model.forward_text(ids, mask, cache)
    per_frame = sum(n * n for n in SCALES)
    for s in range(len(SCALES)):
        model.forward_scale(vis[s][:, 0], 0, s, cache)
    keep = torch.ones(len(cache), dtype=torch.bool)
    keep[L:] = False
    cache.evict(keep)
    assert len(cache) == L and bool((cache.slot_index[:, :L] == torch.arange(L)).all())  # every layer's
    runs = [(s, i, i + 1) for s, n in enumerate(SCALES) for i in range(n * n)] if vision_mask == "raster" else \
        [(s, 0, n * n) for s, n in enumerate(SCALES)]
    got = torch.cat([model.forward_scale(vis[s][:, 1], 1, s, cache, a, b) for s, a, b in runs], dim=1)
    assert (got - want).abs().max() < 1e-4
    assert len(cache) == L + per_frame  # frame 1 took the freed slots; they name its sequence indices
    assert bool((cache.slot_index[:, L:len(cache)] == L + per_frame + torch.arange(per_frame)).all())
    with pytest.raises(ValueError, match="keep"):
        cache.evict(torch.ones(3, dtype=torch.bool))


def test_new_cache_checks_max_frames():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_frames"):
            tiny().new_cache(bad)


@torch.no_grad()
def test_raster_kv_cache_token_by_token():
    model = tiny(vision_mask="raster")
    ids, mask, vis = batch()
    full = model(ids, mask, vis).visual_logits
    cache = model.new_cache()
    model.forward_text(ids, mask, cache)
    steps = [model.forward_scale(vis[s][:, f], f, s, cache, start=i, stop=i + 1)
             for f, s, _, c in blocks() for i in range(c)]
    assert (torch.cat(steps, dim=1).view_as(full) - full).abs().max() < 1e-4


def test_cache_order_and_inputs_validated():
    model = tiny()
    ids, mask, vis = batch()
    cache = model.new_cache()
    with pytest.raises(ValueError, match="cache"):
        model.forward_scale(vis[0][:, 0], 0, 0, cache)
    model.forward_text(ids, mask, cache)
    with pytest.raises(ValueError, match="frame/scale/start"):
        model.forward_scale(vis[1][:, 0], 0, 1, cache)
    with pytest.raises(ValueError, match="inputs"):
        model.forward_scale(vis[1][:, 0], 0, 0, cache)
    model.forward_scale(vis[0][:, 0], 0, 0, cache)
    with pytest.raises(ValueError, match="start/stop"):
        model.forward_scale(vis[1][:, 0], 0, 1, cache, stop=1)
    for dtype in (torch.float32, torch.bool, torch.uint8, torch.int16):  # nn.Embedding takes int64 / int32 only
        with pytest.raises(ValueError, match="text_ids"):
            model(ids.to(dtype), mask)
    with pytest.raises(ValueError, match="visual_inputs"):
        model(ids, mask, vis[:2])
    with pytest.raises(ValueError, match="visual_inputs"):
        model(ids, mask, [None] * len(SCALES))
    with pytest.raises(ValueError, match="frame_visibility"):
        model(ids, mask, vis, frame_visibility=torch.ones(B, T + 1, T + 1, dtype=torch.bool))


@torch.no_grad()
def test_cache_of_another_sub_model_is_refused_and_left_usable():
    model = tiny()
    ids, mask, vis = batch()
    cache = model.new_cache()
    with model.elastic(depth=1):
        with pytest.raises(ValueError, match=r"cache: was made for sub-model ElasticSpec\(depth=2"):
            model.forward_text(ids, mask, cache)
    with pytest.raises(ValueError, match="cache: must be a KVCache that went through forward_text"):
        model.forward_scale(vis[0][:, 0], 0, 0, cache)
    text = model.forward_text(ids, mask, cache)  # the refused call left the cache empty
    assert same(text, model(ids, mask).text_logits)
    assert same(model.forward_scale(vis[0][:, 0], 0, 0, cache), model(ids, mask, vis).visual_logits[:, 0, :1])


def test_config_validation_names_argument():
    with pytest.raises(ValueError, match="num_kv_heads"):
        OmniARConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(ValueError, match="scales"):
        OmniARConfig(scales=(2, 1))
    with pytest.raises(ValueError, match="top_k"):
        OmniARConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="gating"):
        OmniARConfig(gating="relu")
    with pytest.raises(ValueError, match="dense_hidden_size"):
        OmniARConfig(dense_hidden_size=0)


def test_rope_same_location_same_phase():
    n_fine = 9
    scales = (1, 3, 9)
    meta = {s: vision_meta(1, 7, scales, 2, s, 0, n * n, False, torch.device("cpu")) for s, n in enumerate(scales)}
    rope = MultiScaleRoPE(64, 10000.0)
    t, h, w, sc = axis_pairs(64)
    spatial = t + h + w
    centre = [rope.phases(meta[0].pos)[0], rope.phases(meta[1].pos)[4], rope.phases(meta[2].pos)[4 * n_fine + 4]]
    for other in centre[1:]:
        assert torch.allclose(other[:spatial], centre[0][:spatial])
        assert not torch.allclose(other[spatial:], centre[0][spatial:])  # the scale component differs
    # a 2x2 scale token sits at the centroid of its four 4x4 children
    pos2 = vision_meta(1, 0, (1, 2, 4), 0, 1, 0, 4, False, torch.device("cpu")).pos
    pos4 = vision_meta(1, 0, (1, 2, 4), 0, 2, 0, 16, False, torch.device("cpu")).pos.view(4, 4, 4)
    assert torch.allclose(pos4[:2, :2, 1:3].reshape(4, 2).mean(0), pos2[0, 1:3])
    # a later frame shifts only t
    later = vision_meta(1, 7, scales, 3, 1, 0, 9, False, torch.device("cpu")).pos
    assert torch.allclose(later[:, 1:], meta[1].pos[:, 1:]) and torch.all(later[:, 0] == meta[1].pos[:, 0] + 1)
    assert math.isclose(sum(axis_pairs(64)), 32)


@torch.no_grad()
def test_elastic_equals_masked_full_model(tmp_path):
    model = tiny(num_layers=3)
    ids, mask, vis = batch()
    with model.elastic(depth=2, num_experts=3, top_k=1):
        sub = model(ids, mask, vis)
    # reference: the full model's first 2 layers, experts 3.. blocked from selection, top-1
    ref = OmniARModel.from_config_obj(model.omniar_config.replace(num_layers=2, top_k=1)).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("layers.2.")}
    ref.load_state_dict(state)
    for block in ref.layers:
        block.ffn.selection_bias[3:] = -1e4
    want = ref(ids, mask, vis)
    assert (sub.visual_logits - want.visual_logits).abs().max() < 1e-5
    assert (sub.text_logits - want.text_logits).abs().max() < 1e-5
    assert not torch.allclose(sub.visual_logits, model(ids, mask, vis).visual_logits)
    # extract + save + reload gives the same sub-model
    small = model.extract_submodel(depth=2, num_experts=3, top_k=1, save_directory=str(tmp_path))
    loaded = OmniARModel.from_pretrained(str(tmp_path)).eval()
    assert loaded.omniar_config.num_experts == 3 and len(loaded.layers) == 2
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in model.parameters())
    assert (loaded(ids, mask, vis).visual_logits - sub.visual_logits).abs().max() < 1e-5
    assert (small(ids, mask, vis).text_logits - sub.text_logits).abs().max() < 1e-5


@torch.no_grad()
def test_extracted_submodel_keeps_dense_width_when_top_k_changes(tmp_path):
    model = tiny(first_dense_layers=1)  # dense width derives from top_k: (2 + 1 shared) * 16
    ids, mask, vis = batch()
    with model.elastic(top_k=1):
        want = model(ids, mask, vis)
    small = model.extract_submodel(top_k=1, save_directory=str(tmp_path))
    assert small.omniar_config.dense_hidden_size == 48 and small.omniar_config.top_k == 1
    loaded = OmniARModel.from_pretrained(str(tmp_path)).eval()
    for sub in (small, loaded):
        got = sub(ids, mask, vis)
        assert same(got.visual_logits, want.visual_logits) and same(got.text_logits, want.text_logits)


def test_elastic_sampling_and_joint_backward():
    model = tiny(num_layers=3, elastic_depth_prob=0.0, elastic_experts_prob=0.0, elastic_top_k_prob=0.0)
    g = torch.Generator().manual_seed(0)
    specs = [model.sample_elastic(g) for _ in range(20)]
    assert all(s.depth < 3 and s.top_k == 1 and 2 <= s.num_experts < 4 for s in specs)
    full = tiny(num_layers=3, elastic_depth_prob=1.0, elastic_experts_prob=1.0, elastic_top_k_prob=1.0)
    assert all(tuple(full.sample_elastic(g)) == (3, 4, 2) for _ in range(5))
    with pytest.raises(ValueError, match="num_experts: must be >= the model's top_k=2"):  # top_k was not given
        with model.elastic(num_experts=1):
            pass
    with pytest.raises(ValueError, match="top_k: must be <= num_experts=2"):
        with model.elastic(num_experts=2, top_k=3):
            pass
    model.train()
    ids, mask, vis = batch()
    loss = model(ids, mask, vis).visual_logits.square().mean()
    with model.elastic(depth=1, num_experts=2, top_k=1):
        loss = loss + model(ids, mask, vis).visual_logits.square().mean()
    loss.backward()
    assert model.layers[2].attn.q_proj.weight.grad is not None  # full model path
    assert model.layers[0].ffn.w_in.grad[2:].abs().sum() > 0  # experts outside the sub-model still learn


@torch.no_grad()
def test_save_load_round_trip(tmp_path):
    model = tiny(first_dense_layers=1, gating="sigmoid")
    ids, mask, vis = batch()
    model.save_pretrained(str(tmp_path))
    loaded = OmniARModel.from_pretrained(str(tmp_path)).eval()
    assert loaded.omniar_config == model.omniar_config
    assert same(loaded(ids, mask, vis).visual_logits, model(ids, mask, vis).visual_logits)


@torch.no_grad()
@pytest.mark.parametrize("attention", [False, True], ids=["mlp", "block"])
def test_exit_adapter_runs_only_at_its_depth_and_travels_with_the_submodel(tmp_path, attention):
    plain = tiny(num_layers=3)
    model = tiny(num_layers=3, exit_adapter_depths=[2], exit_adapter_attention=attention)
    assert model.omniar_config.exit_adapter_depths == (2,)  # a config.json list loads canonical
    assert not plain.exit_adapters and sum(p.numel() for p in model.exit_adapters.parameters()) > 0
    assert not model.load_state_dict(plain.state_dict(), strict=False).unexpected_keys
    ids, mask, vis = batch()
    for depth in (2, 3):  # a new adapter is the identity
        with plain.elastic(depth=depth), model.elastic(depth=depth):
            assert torch.equal(model(ids, mask, vis).visual_logits, plain(ids, mask, vis).visual_logits)
    for p in model.exit_adapters.parameters():  # a trained adapter
        p.normal_(std=0.3)
    with model.elastic(depth=2):
        sub = model(ids, mask, vis)
    with plain.elastic(depth=2):
        assert not torch.allclose(sub.visual_logits, plain(ids, mask, vis).visual_logits, atol=1e-3)
    for depth in (1, 3):  # other depths, the full model among them, stay exact
        with plain.elastic(depth=depth), model.elastic(depth=depth):
            assert torch.equal(model(ids, mask, vis).visual_logits, plain(ids, mask, vis).visual_logits)
    # extracted and reloaded, the depth-2 sub-model keeps its adapter; a shallower one has none
    model.extract_submodel(depth=2, save_directory=str(tmp_path))
    loaded = OmniARModel.from_pretrained(str(tmp_path)).eval()
    assert loaded.omniar_config.exit_adapter_depths == (2,)
    assert same(loaded(ids, mask, vis).visual_logits, sub.visual_logits)
    assert not model.extract_submodel(depth=1).exit_adapters
    # the KV cache path applies it too, in the full model's cache and in the extracted model's (where an exit
    # block needs a layer more than the model has)
    for net, context in ((model, model.elastic(depth=2)), (loaded, contextlib.nullcontext())):
        with context:
            cache = net.new_cache(T)
            net.forward_text(ids, mask, cache)
            first, want = 0, sub.visual_logits.flatten(1, 2)
            for f, s, _, count in blocks():
                got = net.forward_scale(vis[s][:, f], f, s, cache)
                assert (got - want[:, first:first + count]).abs().max() < 1e-4
                first += count


@pytest.mark.parametrize("depths, message", [([4], "must be <= 3"), ([2, 2], "repeated depth"),
                                             (2, "must be a list"), ([0], "must be >= 1")])
def test_exit_adapter_depths_validated(depths, message):
    with pytest.raises(ValueError, match=f"exit_adapter_depths: .*{message}"):
        tiny(num_layers=3, exit_adapter_depths=depths)
