"""Fused small generation steps (``omniar.backbone.fused``) against the eager blocks, side by side.

Shipped model and pipeline, fp32, in one process, fused and eager alternating within each round:

* per step: one clip's steps with CFG (2 rows) and a batch of 4 with CFG (8 rows), every scale of 3 latent
  frames (rows = batch x tokens: 2-128 and 8-512), the fusion limit lifted so that every row count is timed;
  the median over rounds of each scale's mean step time, and eager / fused;
* whole calls, 1 x 17 and 16 x 17 (CFG 3, seed 0), three arms: ``eager`` (``fused_steps = False``: all in torch),
  ``fused blocks only`` (the small steps fused, the other steps' attention work in torch) and ``fused`` (the
  default: also the other steps' QK-norm, RoPE and cache write in one C call): median generating and wall
  seconds, and the medians of the per-round ratios of each arm to ``fused``.

    python benchmarks/fused_steps.py [--threads 1 2] [--rounds 7] [--out benchmarks/results/fused_steps.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from omniar.backbone import fused
from omniar.generation import TextToVideoPipeline

PROMPT = "a red circle moves right on a black background"
ARMS = ("eager", "fused blocks only", "fused")


def step_times(model, batch: int, frames: int, fuse: bool) -> list[float]:
    """Mean seconds of a step at each scale over ``frames`` latent frames (random inputs, CFG rows included)."""
    model.fused_steps = fuse
    g = torch.Generator().manual_seed(0)
    rows = 2 * batch
    times = [0.0] * len(model.config.scales)
    with torch.no_grad():
        cache = model.new_cache(frames)
        model.forward_text(torch.randint(0, 200, (rows, 12), generator=g), torch.ones(rows, 12, dtype=torch.bool),
                           cache)
        for f in range(frames):
            for s, n in enumerate(model.config.scales):
                inputs = torch.randn(rows, model.config.code_dim, n, n, generator=g)
                start = time.perf_counter()
                model.forward_scale(inputs, f, s, cache)
                times[s] += (time.perf_counter() - start) / frames
    return times


def call_times(pipe, arm: str, batch: int) -> tuple[float, float]:
    pipe.model.fused_steps = arm != "eager"
    real = fused.qk_prep
    if arm == "fused blocks only":
        fused.qk_prep = lambda *args: None
    try:
        start = time.perf_counter()
        out = pipe([PROMPT] * batch, num_frames=17, seed=0)
        return out.timings["generate_s"], time.perf_counter() - start
    finally:
        fused.qk_prep = real


def run(threads: int, rounds: int) -> dict:
    torch.set_num_threads(threads)
    pipe = TextToVideoPipeline.from_pretrained()
    model = pipe.model
    result = {"steps": {}, "call_1x17": {}, "call_16x17": {}}
    limit = fused.MAX_ROWS
    fused.MAX_ROWS = 1 << 30
    try:
        for batch in (1, 4):
            for fuse in (False, True):  # warm-up
                step_times(model, batch, 3, fuse)
            per = {False: [], True: []}
            for _ in range(rounds):
                for fuse in (False, True):
                    per[fuse].append(step_times(model, batch, 3, fuse))
            for s, n in enumerate(model.config.scales):
                eager = statistics.median(r[s] for r in per[False])
                fast = statistics.median(r[s] for r in per[True])
                result["steps"][f"batch {batch}, {n * n} tokens ({2 * batch * n * n} rows)"] = {
                    "batch": batch, "tokens": n * n, "eager_ms": eager * 1e3, "fused_ms": fast * 1e3,
                    "eager_over_fused": eager / fast}
    finally:
        fused.MAX_ROWS = limit
    for batch in (1, 16):
        for arm in ARMS:
            call_times(pipe, arm, batch)
        calls = {arm: [] for arm in ARMS}
        for _ in range(rounds):
            for arm in ARMS:
                calls[arm].append(call_times(pipe, arm, batch))
        for i, name in enumerate(("generate_s", "wall_s")):
            row = result[f"call_{batch}x17"][name] = {arm: statistics.median(c[i] for c in calls[arm]) for arm in ARMS}
            for arm in ARMS[:-1]:
                row[f"{arm} / fused"] = statistics.median(a[i] / f[i] for a, f in zip(calls[arm], calls["fused"]))
    model.fused_steps = True
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default="benchmarks/results/fused_steps.json")
    args = parser.parse_args()
    result = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
              "max_rows": fused.MAX_ROWS, "rounds": args.rounds,
              "threads": {str(t): run(t, args.rounds) for t in args.threads}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
