"""Generation steps benchmark: forward passes and wall time for one video's tokens.

One 17-frame 64x64 video = 5 latent frames (temporal compression 4) of an 8x8
latent (spatial compression 8), scales (1, 2, 4, 8): 85 tokens per frame.
Random weights; batch 2 (a CFG cond/uncond pair); the visual inputs are random
tensors of the right shapes (the tokenizer's accumulation is not timed), codes
are drawn by argmax. Three decoders, same weights, same process:

* next-scale + KV cache: one forward per (frame, scale) block;
* raster order + KV cache: a token-causal model, one forward per token;
* next-scale without cache: each step re-runs the whole sequence so far; the
  full forward takes whole frames, so a step of frame f runs frames 0..f
  completely (up to 84 tokens more than the exact prefix; see
  ``tokens_processed``).

    python benchmarks/generation_steps.py [--out benchmarks/results/generation_steps.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from omniar.backbone import OmniARConfig, OmniARModel


def decode_cached(model: OmniARModel, ids, mask, inputs, per_token: bool) -> tuple[int, int]:
    """Returns (forward passes, tokens processed)."""
    cfg = model.omniar_config
    cache = model.new_cache()
    model.forward_text(ids, mask, cache)
    passes, tokens = 1, ids.shape[1]
    for f in range(inputs[0].shape[1]):
        for s, n in enumerate(cfg.scales):
            runs = [(i, i + 1) for i in range(n * n)] if per_token else [(0, n * n)]
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


def timed(fn, repeats: int) -> tuple[float, tuple[int, int]]:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        counts = fn()
        best = min(best, time.perf_counter() - t0)
    return best, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/generation_steps.json")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text-len", type=int, default=24)
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = OmniARConfig(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, num_experts=16, top_k=2,
                       expert_hidden_size=256, codebook_size=512, code_dim=16, scales=(1, 2, 4, 8))
    frames, batch = 1 + (17 - 1) // 4, 2
    ours = OmniARModel.from_config_obj(cfg).eval()
    raster = OmniARModel.from_config_obj(cfg.replace(vision_mask="raster")).eval()
    raster.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 256, (batch, args.text_len))
    mask = torch.ones(batch, args.text_len, dtype=torch.bool)
    inputs = [torch.randn(batch, frames, cfg.code_dim, n, n) for n in cfg.scales]
    with torch.no_grad():
        t_ours, (p_ours, n_ours) = timed(lambda: decode_cached(ours, ids, mask, inputs, False), args.repeats)
        t_raster, (p_raster, n_raster) = timed(lambda: decode_cached(raster, ids, mask, inputs, True), args.repeats)
        t_nocache, (p_nocache, n_nocache) = timed(lambda: decode_uncached(ours, ids, mask, inputs), args.repeats)
    result = {
        "config": {"video": "17 frames 64x64", "latent_frames": frames, "scales": list(cfg.scales),
                   "tokens_per_frame": cfg.tokens_per_frame, "batch": batch, "text_len": args.text_len,
                   "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "experts": cfg.num_experts,
                   "top_k": cfg.top_k, "torch": torch.__version__, "threads": torch.get_num_threads()},
        "forward_passes": {"next_scale_cache": p_ours, "raster_cache": p_raster, "next_scale_no_cache": p_nocache},
        "tokens_processed": {"next_scale_cache": n_ours, "raster_cache": n_raster,
                             "next_scale_no_cache": n_nocache},
        "wall_s": {"next_scale_cache": t_ours, "raster_cache": t_raster, "next_scale_no_cache": t_nocache},
        "forward_passes_ratio_raster": p_raster / p_ours,
        "wall_ratio_raster": t_raster / t_ours,
        "kv_cache_speedup": t_nocache / t_ours,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
