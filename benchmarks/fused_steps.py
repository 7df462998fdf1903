"""Fused small generation steps (``omniar.backbone.fused``) against the eager blocks, side by side.

Shipped model and pipeline, fp32, in one process, fused and eager alternating within each round:

* per step: one clip's steps with CFG (2 rows) and a batch of 4 with CFG (8 rows), every scale of 3 latent
  frames (rows = batch x tokens: 2-128 and 8-512), the fusion limit lifted so that every row count is timed;
  the median over rounds of each scale's mean step time, and eager / fused;
* prompt passes: the default prompts of 1, 2 and 6 clips with CFG (about 20, 40 and 120 rows), fused (the limit
  lifted) and eager, medians and eager / fused;
* whole calls: the default 1 x 17 call (CFG 3, seed 0) eager, with the fused steps only (``fused.MAX_ROWS``, the
  prompt pass eager) and with both (the shipped limits): median generating and wall seconds, and the medians of the
  per-round ratios against the shipped setting.

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
from omniar.generation.pipeline import text_inputs

PROMPTS = ["a red circle moves right on a black background", "a blue square moves up on a white background",
           "a green triangle moves left on a black background"]
ARMS = ("eager", "fused steps only", "fused")


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


def prompt_time(pipe, clips: int, fuse: bool) -> tuple[float, int]:
    """Seconds of one prompt pass of ``clips`` clips with CFG, and its rows (batch x held tokens)."""
    pipe.model.fused_steps = fuse
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(clips)]
    text = text_inputs(prompts + [None] * clips, pipe.max_text_len, pipe.text_tokenizer, pipe.text_encoder, "cpu")
    with torch.no_grad():
        cache = pipe.model.new_cache(5)
        start = time.perf_counter()
        pipe.model.forward_text(cache=cache, **text)
        return time.perf_counter() - start, len(cache) * 2 * clips


def call_times(pipe, arm: str) -> tuple[float, float]:
    pipe.model.fused_steps = arm != "eager"
    limit = fused.MAX_PROMPT_ROWS
    fused.MAX_PROMPT_ROWS = 0 if arm == "fused steps only" else limit
    try:
        start = time.perf_counter()
        out = pipe(PROMPTS[0], num_frames=17, seed=0)
        return out.timings["generate_s"], time.perf_counter() - start
    finally:
        fused.MAX_PROMPT_ROWS = limit


def run(threads: int, rounds: int) -> dict:
    torch.set_num_threads(threads)
    pipe = TextToVideoPipeline.from_pretrained()
    model = pipe.model
    result = {"steps": {}, "prompt": {}, "call_1x17": {}}
    limits = fused.MAX_ROWS, fused.MAX_PROMPT_ROWS
    fused.MAX_ROWS = fused.MAX_PROMPT_ROWS = 1 << 30
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
        for clips in (1, 2, 6):
            for fuse in (False, True):  # warm-up
                prompt_time(pipe, clips, fuse)
            per = {False: [], True: []}
            for _ in range(rounds):
                for fuse in (False, True):
                    per[fuse].append(prompt_time(pipe, clips, fuse))
            eager, fast = (statistics.median(t for t, _ in per[f]) for f in (False, True))
            result["prompt"][f"{clips} clips ({per[True][0][1]} rows)"] = {
                "eager_ms": eager * 1e3, "fused_ms": fast * 1e3, "eager_over_fused": eager / fast}
    finally:
        fused.MAX_ROWS, fused.MAX_PROMPT_ROWS = limits
    for arm in ARMS:
        call_times(pipe, arm)
    calls = {arm: [] for arm in ARMS}
    for _ in range(rounds):
        for arm in ARMS:
            calls[arm].append(call_times(pipe, arm))
    for i, name in enumerate(("generate_s", "wall_s")):
        row = result["call_1x17"][name] = {arm: statistics.median(c[i] for c in calls[arm]) for arm in ARMS}
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
              "max_rows": fused.MAX_ROWS, "max_prompt_rows": fused.MAX_PROMPT_ROWS, "rounds": args.rounds,
              "threads": {str(t): run(t, args.rounds) for t in args.threads}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
