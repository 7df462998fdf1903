"""Backbone on any scale schedule (#26): non-square (h, w) maps and VAR's 10 scales in the config, the block-causal
layout and the multi-scale RoPE positions; the shipped model's layout unchanged; forward, causality, KV cache and
elastic sub-models of tiny models on such schedules."""

import hashlib
import json

import pytest
import torch

import omniar.assets
from omniar.backbone import OmniARConfig, OmniARModel, attention_mask, text_meta, video_meta, vision_meta
from omniar.backbone.layout import frame_scale_ids, scale_offsets
from omniar.backbone.rope import MultiScaleRoPE, axis_pairs
from omniar.tokenizers import scale_shapes

VAR = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PAIRS = ((1, 1), (2, 3), (3, 5), (6, 10))
SCHEDULES = [(1, 2, 4, 8), VAR, PAIRS, ((1, 2), (2, 2), (2, 4), (4, 8))]  # last: a side that stays
B, L, T, C = 2, 5, 2, 4
CPU = torch.device("cpu")
# VAR's first six scales: uneven steps (fine/n = 6, 3, 2, 1.5, 1.2, 1) at 91 tokens a frame, not 680 (a CPU test)
MODEL_SCHEDULES = [VAR[:6], PAIRS, ((1, 2), (2, 3)), (1, 2, 2)]  # the last: a repeated latent grid


def per_frame(scales):
    return sum(h * w for h, w in scale_shapes(scales))


# ------------------------------------------------------------------ config
def test_config_canonical_schedules():
    assert OmniARConfig(scales=[1, 2, 4, 8]).scales == (1, 2, 4, 8)  # ints stay ints (saved configs unchanged)
    assert all(type(n) is int for n in OmniARConfig(scales=VAR).scales)
    cfg = OmniARConfig(scales=[[1, 1], [2, 3], [3, 5], [6, 10]])  # as config.json gives it back
    assert cfg.scales == PAIRS and cfg.scale_shapes == PAIRS and cfg.tokens_per_frame == 1 + 6 + 15 + 60
    assert OmniARConfig(scales=(1, (2, 3))).scales == ((1, 1), (2, 3))  # an int inside pairs is square
    assert OmniARConfig(scales=VAR).tokens_per_frame == 680
    back = OmniARConfig(**json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.replace(num_layers=1).scales == PAIRS  # elastic sub-model configs keep it


@pytest.mark.parametrize("bad", [(), (2, 1), ((2, 3), (3, 2)), ((2, 3), (2, 3), (4, 4)), ((2, 3, 1),), (0, 2),
                                 (1, True), "1248", (1, 2.0)])
def test_config_refuses_bad_schedules_naming_scales(bad):
    with pytest.raises(ValueError, match="^scales: "):
        OmniARConfig(scales=bad)


# ------------------------------------------------------------------ layout
@pytest.mark.parametrize("scales", SCHEDULES)
@pytest.mark.parametrize("raster", [False, True])
def test_layout_counts_offsets_and_blocks(scales, raster):
    scales = OmniARConfig(scales=scales).scales
    shapes, count = scale_shapes(scales), per_frame(scales)
    offsets = scale_offsets(scales)
    assert offsets == [sum(h * w for h, w in shapes[:s]) for s in range(len(shapes))]
    ids = frame_scale_ids(scales)
    assert ids.dtype == torch.long and ids.tolist() == [s for s, (h, w) in enumerate(shapes) for _ in range(h * w)]
    meta = text_meta(torch.ones(B, L, dtype=torch.bool)).cat(video_meta(B, L, scales, T, raster, CPU))
    assert meta.block.shape == (L + T * count,) and meta.valid.shape == (B, L + T * count)
    assert meta.frame[L:].tolist() == [f for f in range(T) for _ in range(count)]
    assert meta.pos[L:, 3].tolist() == ids.float().tolist() * T
    index = torch.arange(len(meta.block))
    # a block is a (frame, scale) run starting at its first token (raster: one token); a query sees exactly
    # the keys up to the end of its block
    firsts = torch.tensor([L + f * count + o for f in range(T) for o in offsets])
    starts = index[L:] if raster else firsts.repeat_interleave(torch.tensor([h * w for h, w in shapes] * T))
    assert torch.equal(meta.block[L:], starts) and torch.equal(meta.block[:L], index[:L])
    mask, empty = attention_mask(meta, meta)
    ends = torch.cat([index[:L] + 1, torch.tensor([(meta.block <= b).sum() for b in meta.block[L:]])])
    assert torch.equal(mask[0, 0], index[None, :] < ends[:, None]) and not empty.any()


@pytest.mark.parametrize("scales", SCHEDULES)
def test_rope_positions_follow_each_scale_grid(scales):
    """Every scale spans the finest grid on each axis on its own: a token sits at the centre of the fine cells it
    covers, rows share h, columns share w, no two tokens of a scale share a position, and a coarse token is the
    centroid of its children where the grids nest."""
    scales = OmniARConfig(scales=scales).scales
    shapes = scale_shapes(scales)
    fine_h, fine_w = shapes[-1]
    grids = []
    for s, (h, w) in enumerate(shapes):
        pos = vision_meta(1, L, scales, 1, s, 0, h * w, False, CPU).pos.view(h, w, 4)
        assert torch.all(pos[..., 0] == L + 1) and torch.all(pos[..., 3] == s)
        rows = L + (torch.arange(h) + 0.5) * fine_h / h
        cols = L + (torch.arange(w) + 0.5) * fine_w / w
        assert torch.allclose(pos[..., 1], rows[:, None].expand(h, w))
        assert torch.allclose(pos[..., 2], cols[None, :].expand(h, w))
        assert len({tuple(p) for p in pos[..., 1:3].reshape(-1, 2).tolist()}) == h * w
        assert torch.allclose(pos[..., 1:3].reshape(-1, 2).mean(0), torch.tensor([L + fine_h / 2, L + fine_w / 2]))
        grids.append(pos)
    for (h, w), coarse, fine in zip(shapes, grids, grids[1:]):
        fh, fw = fine.shape[:2]
        if fh % h == 0 and fw % w == 0:
            children = fine[..., 1:3].view(h, fh // h, w, fw // w, 2).mean((1, 3))
            assert torch.allclose(children, coarse[..., 1:3])
    # part of a scale (raster steps) sits where the whole scale puts those tokens
    h, w = shapes[-1]
    part = vision_meta(1, L, scales, 1, len(shapes) - 1, w, 2 * w + 1, True, CPU).pos
    assert torch.equal(part, grids[-1].view(-1, 4)[w:2 * w + 1])


def test_rope_phases_keep_h_and_w_apart():
    """On a non-square map, tokens of one row share the h phases and differ in w, and the other way round."""
    rope = MultiScaleRoPE(64, 10000.0)
    t, h_pairs, w_pairs, _ = axis_pairs(64)
    h_axis, w_axis = slice(t, t + h_pairs), slice(t + h_pairs, t + h_pairs + w_pairs)
    phases = rope.phases(vision_meta(1, L, PAIRS, 0, 2, 0, 15, False, CPU).pos).view(3, 5, -1)
    assert torch.equal(phases[0, 0, h_axis], phases[0, 4, h_axis])
    assert not torch.allclose(phases[0, 0, w_axis], phases[0, 4, w_axis])
    assert torch.equal(phases[0, 1, w_axis], phases[2, 1, w_axis])
    assert not torch.allclose(phases[0, 1, h_axis], phases[2, 1, h_axis])


def layout_digest(scales, raster) -> str:
    meta = text_meta(torch.ones(2, 96, dtype=torch.bool)).cat(video_meta(2, 96, scales, 5, raster, CPU))
    digest = hashlib.sha256()
    for table in (meta.block, meta.frame, meta.valid, meta.pos):
        digest.update(table.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def test_square_layouts_are_unchanged():
    """The layout tables of the square schedule (96 text tokens, 5 frames) hash as they did at 2311d6c, before (h, w)
    schedules; so do raster and VAR-schedule tables; the shipped model's config loads with int scales."""
    assert layout_digest((1, 2, 4, 8), False) == "e6b777775e16d55a"
    assert layout_digest((1, 2, 4, 8), True) == "3b471b5ddaa75930"
    assert layout_digest(VAR, False) == "fabcf4cb5eb4d4db"
    model = OmniARModel.from_pretrained(omniar.assets.path("shapes-t2v") / "model")
    cfg = model.omniar_config
    assert cfg.scales == (1, 2, 4, 8) and all(type(n) is int for n in cfg.scales) and cfg.tokens_per_frame == 85
    assert torch.equal(model.frame_scale_ids, frame_scale_ids(cfg.scales))


# ------------------------------------------------------------------- model
def tiny(scales, **kw) -> OmniARModel:
    base = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, num_experts=4, top_k=2,
                expert_hidden_size=16, codebook_size=16, code_dim=C, scales=scales, mtp_k=2)
    base.update(kw)
    torch.manual_seed(0)
    return OmniARModel.from_config_obj(OmniARConfig(**base)).eval()


def batch(scales, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False
    vis = [torch.randn(B, T, C, h, w, generator=g) for h, w in scale_shapes(OmniARConfig(scales=scales).scales)]
    return ids, mask, vis


def blocks(scales):
    """(frame, scale, first index among the visual tokens, count) in sequence order."""
    shapes = scale_shapes(OmniARConfig(scales=scales).scales)
    offsets = scale_offsets(shapes)
    return [(f, s, f * per_frame(shapes) + offsets[s], h * w) for f in range(T) for s, (h, w) in enumerate(shapes)]


@torch.no_grad()
@pytest.mark.parametrize("scales", MODEL_SCHEDULES)
def test_block_causality(scales):
    model = tiny(scales)
    ids, mask, vis = batch(scales)
    ref = model(ids, mask, vis)
    assert ref.visual_logits.shape == (B, T, per_frame(scales), 16)
    ref_v = ref.visual_logits.flatten(1, 2)
    for f, s, first, count in blocks(scales)[1:]:  # frame 0 scale 0 is BOV
        pert = [v.clone() for v in vis]
        pert[s][:, f] += torch.randn_like(pert[s][:, f])
        out = model(ids, mask, pert)
        got = out.visual_logits.flatten(1, 2)
        assert (got[:, :first] - ref_v[:, :first]).abs().max() < 1e-5, (f, s)
        assert (got[:, first:first + count] - ref_v[:, first:first + count]).abs().max() > 1e-4, (f, s)
        assert (out.text_logits - ref.text_logits).abs().max() < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("scales", MODEL_SCHEDULES)
@pytest.mark.parametrize("elastic", [{}, dict(depth=1, num_experts=3, top_k=1)])
def test_kv_cache_equals_full_forward(scales, elastic):
    """Whole scales of a next-scale model, and rows of a raster model, step through the cache to the full pass;
    the same holds for an elastic sub-model (max_frames 1: the cache regrows for frame 1)."""
    for vision_mask in ("block", "raster"):
        model = tiny(scales, vision_mask=vision_mask)
        ids, mask, vis = batch(scales)
        with model.elastic(**elastic):
            want = model(ids, mask, vis).visual_logits.flatten(1, 2)
            cache = model.new_cache(1)
            model.forward_text(ids, mask, cache)
            got = []
            for f, s, _, count in blocks(scales):
                w = vis[s].shape[-1]
                runs = [(i, i + w) for i in range(0, count, w)] if vision_mask == "raster" else [(0, count)]
                got += [model.forward_scale(vis[s][:, f], f, s, cache, a, b) for a, b in runs]
        assert (torch.cat(got, dim=1) - want).abs().max() < 1e-4, vision_mask
        assert len(cache) == L + T * per_frame(scales)


@torch.no_grad()
@pytest.mark.parametrize("scales", MODEL_SCHEDULES)
def test_extracted_submodel_round_trip(scales, tmp_path):
    model = tiny(scales, num_layers=3)
    ids, mask, vis = batch(scales)
    with model.elastic(depth=2, num_experts=2, top_k=1):
        want = model(ids, mask, vis).visual_logits
    model.extract_submodel(depth=2, num_experts=2, top_k=1, save_directory=str(tmp_path))
    loaded = OmniARModel.from_pretrained(str(tmp_path)).eval()
    assert loaded.omniar_config.scales == model.omniar_config.scales
    assert (loaded(ids, mask, vis).visual_logits - want).abs().max() < 1e-5


@torch.no_grad()
def test_forward_checks_name_h_and_w_of_pair_schedules():
    """A (2, 3) map is not a 2 x 2 or 3 x 3 one: the shape checks read each scale's (h, w)."""
    model = tiny(PAIRS)
    ids, mask, vis = batch(PAIRS)
    assert model.frame_scale_ids.tolist() == [0] + [1] * 6 + [2] * 15 + [3] * 60
    bad = list(vis)
    bad[1] = torch.zeros(B, T, C, 3, 2)
    with pytest.raises(ValueError, match=r"visual_inputs.*scale 1 must have shape \(B=2, T_lat>0, 4, 2, 3\)"):
        model(ids, mask, bad)
    cache = model.new_cache(1)
    model.forward_text(ids, mask, cache)
    model.forward_scale(vis[0][:, 0], 0, 0, cache)
    with pytest.raises(ValueError, match=r"inputs.*\(2, 4, 2, 3\)"):
        model.forward_scale(torch.zeros(B, C, 3, 3), 0, 1, cache)
    with pytest.raises(ValueError, match="stop.*<= 6"):
        model.forward_scale(vis[1][:, 0], 0, 1, cache, 0, 7)
    assert model.forward_scale(vis[1][:, 0], 0, 1, cache).shape == (B, 6, 16)
