"""Generation steps benchmark: forward passes and wall time for one video's tokens.

One 17-frame 64x64 video = 5 latent frames (temporal compression 4) of an 8x8
latent (spatial compression 8) at the shipped tokenizer's scales (or --scales).
Random weights; batch 2 (a CFG cond/uncond pair); the visual inputs are random
tensors of the right shapes (the tokenizer's accumulation is not timed), codes
are drawn by argmax. Decoders, same weights, same process, one call of each per
round, ratios the median over rounds of the per-round ratio:

* next-scale + KV cache: one forward per (frame, scale) block;
* fair baselines:
  - raster, finest grid + KV cache: a token-causal model over only the last
    grid (8x8: 64 tokens a frame, 320 in all: what a plain raster model needs),
    one forward per token;
  - next-scale, exact-prefix recompute: no cache, each step runs one pass
    over exactly the text and the tokens up to its block;
* the earlier, flattering baselines, kept for comparison:
  - raster over all scales + KV cache: walks all the multi-scale tokens;
  - next-scale, whole-frame recompute: each step of frame f runs frames
    0..f completely (up to a frame of tokens more than the exact prefix).

    python benchmarks/generation_steps.py [--scales 1 2 4 8] [--out benchmarks/results/generation_steps.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import omniar.assets
from omniar.backbone import OmniARConfig, OmniARModel, TokenMeta, attention_mask, text_meta, video_meta
from omniar.backbone.elastic import slice_state_dict


def decode_cached(model: OmniARModel, ids, mask, inputs, per_token: bool) -> tuple[int, int]:
    """Returns (forward passes, tokens processed)."""
    cfg = model.omniar_config
    cache = model.new_cache()
    model.forward_text(ids, mask, cache)
    passes, tokens = 1, ids.shape[1]
    for f in range(inputs[0].shape[1]):
        for s, (h, w) in enumerate(cfg.scale_shapes):
            runs = [(i, i + 1) for i in range(h * w)] if per_token else [(0, h * w)]
            for start, stop in runs:
                model.forward_scale(inputs[s][:, f], f, s, cache, start, stop).argmax(-1)
                passes, tokens = passes + 1, tokens + stop - start
    return passes, tokens


def decode_uncached(model: OmniARModel, ids, mask, inputs) -> tuple[int, int]:
    cfg = model.omniar_config
    passes, tokens = 0, 0
    for f in range(inputs[0].shape[1]):
        prefix = [x[:, :f + 1] for x in inputs]
        for s in range(len(cfg.scales)):
            model(ids, mask, prefix).visual_logits[:, f].argmax(-1)
            passes, tokens = passes + 1, tokens + ids.shape[1] + (f + 1) * cfg.tokens_per_frame
    return passes, tokens


def decode_exact_prefix(model: OmniARModel, ids, mask, inputs) -> tuple[int, int]:
    """No cache: each step is one pass over exactly the text and the tokens up to its block (the
    full forward's layout and mask, cut at the block's end)."""
    cfg = model.omniar_config
    b, length = ids.shape
    frames = inputs[0].shape[1]
    feats = torch.cat([v.flatten(3).transpose(2, 3) for v in inputs], dim=2)
    x_all = torch.cat([model.text_embed(ids), model._embed_vision(feats, model.frame_scale_ids, True)], dim=1)
    meta_all = text_meta(mask).cat(video_meta(b, length, cfg.scales, frames, False, ids.device))
    passes, tokens, end = 0, 0, length
    for _ in range(frames):
        for h, w in cfg.scale_shapes:
            end += h * w
            meta = TokenMeta(meta_all.block[:end], meta_all.frame[:end], meta_all.valid[:, :end],
                             meta_all.pos[:end])
            attn, empty = attention_mask(meta, meta)
            cos, sin = model.rope.cos_sin(meta.pos, x_all.dtype)
            hidden = model._trunk(x_all[:, :end], cos, sin, attn, empty, None, None)[0]
            model.visual_head(hidden[:, end - h * w:]).argmax(-1)
            passes, tokens = passes + 1, tokens + end
    return passes, tokens


def timed_rounds(fns: dict, repeats: int) -> tuple[dict, dict, dict]:
    """Per-round wall and CPU seconds of every decoder (one call each per round, after a warm-up) and
    their counts. CPU time: on a shared machine a niced run waits for the CPU at random, which the
    wall clock counts and the process's CPU time does not (with one thread they agree when idle)."""
    counts = {name: fn() for name, fn in fns.items()}
    wall, cpu = {name: [] for name in fns}, {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return wall, cpu, counts


def paired(times: dict, slow: str, fast: str) -> float:
    return statistics.median(a / b for a, b in zip(times[slow], times[fast]))


def ratios(wall: dict, cpu: dict, counts: dict, raster: str, recompute: str) -> dict:
    return {"forward_passes_ratio_raster": counts[raster][0] / counts["next_scale_cache"][0],
            "wall_ratio_raster": paired(wall, raster, "next_scale_cache"),
            "cpu_ratio_raster": paired(cpu, raster, "next_scale_cache"),
            "kv_cache_speedup_wall": paired(wall, recompute, "next_scale_cache"),
            "kv_cache_speedup_cpu": paired(cpu, recompute, "next_scale_cache")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/generation_steps.json")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--text-len", type=int, default=24)
    parser.add_argument("--scales", type=int, nargs="+", default=None,
                        help="square scale sides (default: the shipped tokenizer's)")
    args = parser.parse_args()
    if args.scales is None:
        tok_cfg = json.loads((omniar.assets.path("shapes-tokenizer") / "config.json").read_text())
        args.scales = tok_cfg["scales"]
    torch.manual_seed(0)
    cfg = OmniARConfig(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, num_experts=16, top_k=2,
                       expert_hidden_size=256, codebook_size=512, code_dim=16, scales=tuple(args.scales))
    frames, batch = 1 + (17 - 1) // 4, 2
    ours = OmniARModel.from_config_obj(cfg).eval()
    raster = OmniARModel.from_config_obj(cfg.replace(vision_mask="raster")).eval()
    raster.load_state_dict(ours.state_dict())
    fine_cfg = cfg.replace(vision_mask="raster", scales=cfg.scales[-1:])
    fine = OmniARModel.from_config_obj(fine_cfg).eval()
    fine.load_state_dict(slice_state_dict(ours.state_dict(), fine.state_dict()))  # scale embedding row 0
    ids = torch.randint(0, 256, (batch, args.text_len))
    mask = torch.ones(batch, args.text_len, dtype=torch.bool)
    inputs = [torch.randn(batch, frames, cfg.code_dim, h, w) for h, w in cfg.scale_shapes]
    fine_inputs = inputs[-1:]
    fns = {"next_scale_cache": lambda: decode_cached(ours, ids, mask, inputs, False),
           "raster_finest_grid_cache": lambda: decode_cached(fine, ids, mask, fine_inputs, True),
           "next_scale_exact_prefix_no_cache": lambda: decode_exact_prefix(ours, ids, mask, inputs),
           "raster_all_scales_cache": lambda: decode_cached(raster, ids, mask, inputs, True),
           "next_scale_whole_frame_no_cache": lambda: decode_uncached(ours, ids, mask, inputs)}
    with torch.no_grad():
        wall, cpu, counts = timed_rounds(fns, args.repeats)
    result = {
        "config": {"video": "17 frames 64x64", "latent_frames": frames, "scales": list(cfg.scales),
                   "tokens_per_frame": cfg.tokens_per_frame, "batch": batch, "text_len": args.text_len,
                   "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "experts": cfg.num_experts,
                   "top_k": cfg.top_k, "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "rounds": args.repeats},
        "forward_passes": {k: c[0] for k, c in counts.items()},
        "tokens_processed": {k: c[1] for k, c in counts.items()},
        "median_wall_s": {k: statistics.median(t) for k, t in wall.items()},
        "median_cpu_s": {k: statistics.median(t) for k, t in cpu.items()},
        "fair": ratios(wall, cpu, counts, "raster_finest_grid_cache", "next_scale_exact_prefix_no_cache"),
        "earlier": ratios(wall, cpu, counts, "raster_all_scales_cache", "next_scale_whole_frame_no_cache"),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
