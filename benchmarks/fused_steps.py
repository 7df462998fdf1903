"""Fused small generation steps (``omniar.backbone.fused``) against the eager blocks, side by side.

Shipped model and pipeline, fp32, in one process, fused and eager alternating within each round:

* per step: one clip's steps with CFG (2 rows) and a batch of 4 with CFG (8 rows), every scale of 3 latent
  frames (rows = batch x tokens: 2-128 and 8-512), the fusion limit lifted so that every row count is timed;
  the median over rounds of each scale's mean step time, and eager / fused; with ``--against REV`` also fused
  with the kernel of revision REV (its C file built beside today's), and REV / fused per round;
* prompt passes: the default prompt for 1 and 2 clips with CFG (96 and 192 rows), eager and fused alternating (the
  limit lifted), medians and eager / fused;
* whole calls, 1 x 17 and 16 x 17 (CFG 3, seed 0), three arms: ``eager`` (``fused_steps = False``: the steps in
  torch, but for the MoE layers' one-call path, ``moe_impl: auto``),
  ``without ABLATE`` (the default with one of the other steps' C calls left to torch, ``--ablate``: ``qk_prep``, the
  attention's QK-norm, RoPE and cache write, or ``attention``, an eager next-scale step's attention) and
  ``fused`` (the default): median generating and wall seconds, and the medians of the per-round ratios of each arm
  to ``fused``;
* the same ablation step by step: one clip's steps at every scale of a third latent frame, with and without the
  ablated call alternating (25 rounds, the first 3 dropped), medians and without / with.

    python benchmarks/fused_steps.py [--threads 1 2] [--rounds 7] [--ablate qk_prep|attention] [--against REV]
        [--out benchmarks/results/fused_steps.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from omniar import _native
from omniar.backbone import fused
from omniar.generation import TextToVideoPipeline
from omniar.generation.pipeline import text_inputs

PROMPT = "a red circle moves right on a black background"
ABLATIONS = ("qk_prep", "attention")


def kernel_at(rev: str, folder: Path):
    """The fused kernel as revision ``rev`` had it (``omniar/_native.c``, before ``omniar/backbone/_fused_step.c``),
    built in ``folder``."""
    source = folder / "_native.c"
    for path in ("omniar/_native.c", "omniar/backbone/_fused_step.c"):
        shown = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True,
                               cwd=Path(__file__).resolve().parents[1])
        if shown.returncode == 0:
            source.write_bytes(shown.stdout)
            break
    else:
        raise SystemExit(f"--against {rev}: it has no fused kernel")
    lib = _native.build(shutil.which(os.environ.get("CC") or "cc"), folder, source)
    if lib is None:
        raise SystemExit(f"--against {rev}: its kernel did not build")
    return fused.declare(lib)


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
    """Seconds of one prompt pass of ``clips`` clips with CFG, and its rows (batch x held text tokens)."""
    pipe.model.fused_steps = fuse
    text = text_inputs([PROMPT] * clips + [None] * clips, pipe.max_text_len, pipe.text_tokenizer, pipe.text_encoder,
                       "cpu")
    with torch.no_grad():
        cache = pipe.model.new_cache(5)
        start = time.perf_counter()
        pipe.model.forward_text(cache=cache, **text)
        return time.perf_counter() - start, len(cache) * 2 * clips


class swapped:
    """Within the block, ``omniar.backbone.fused``'s function ``name`` is ``value`` (None: left as it is)."""

    def __init__(self, name: str, value) -> None:
        self.name, self.value = name, value

    def __enter__(self) -> None:
        if self.value is not None:
            self.real = getattr(fused, self.name)
            setattr(fused, self.name, self.value)

    def __exit__(self, *exc) -> None:
        if self.value is not None:
            setattr(fused, self.name, self.real)


def ablated(name: str | None) -> swapped:
    """Within the block: ``fused``'s function ``name`` does nothing (returns None: torch does it)."""
    return swapped(name or "library", (lambda *args: None) if name else None)


def kernel(lib) -> swapped:
    """Within the block: fused steps call ``lib`` (None: today's kernel)."""
    return swapped("library", None if lib is None else (lambda: lib))


def call_times(pipe, arm: str, batch: int, ablate: str) -> tuple[float, float]:
    pipe.model.fused_steps = arm != "eager"
    with ablated(ablate if arm.startswith("without") else None):
        start = time.perf_counter()
        out = pipe([PROMPT] * batch, num_frames=17, seed=0)
        return out.timings["generate_s"], time.perf_counter() - start


def ablation_steps(model, ablate: str, rounds: int = 25) -> dict:
    """One clip's (2 rows) step at every scale of latent frame 2, with and without ``ablate``'s C call."""
    g = torch.Generator().manual_seed(0)
    out = {}
    with torch.no_grad():
        cache = model.new_cache(3)
        model.forward_text(torch.randint(0, 200, (2, 48), generator=g), torch.ones(2, 48, dtype=torch.bool), cache)
        for f in range(2):
            for s, n in enumerate(model.config.scales):
                model.forward_scale(torch.randn(2, model.config.code_dim, n, n, generator=g), f, s, cache)
        for s, n in enumerate(model.config.scales):
            inputs = torch.randn(2, model.config.code_dim, n, n, generator=g)
            held, block = len(cache), cache.next_block
            times = {True: [], False: []}
            for _ in range(rounds):
                for on in (True, False):
                    with ablated(None if on else ablate):
                        cache.length, cache.next_block = held, block  # the same step again, over the same slots
                        start = time.perf_counter()
                        model.forward_scale(inputs, 2, s, cache)
                        times[on].append(time.perf_counter() - start)
            with_, without = (statistics.median(times[on][3:]) for on in (True, False))
            out[f"{n * n} tokens ({2 * n * n} rows)"] = {"with_ms": with_ * 1e3, "without_ms": without * 1e3,
                                                         "without_over_with": without / with_}
    return out


def run(threads: int, rounds: int, ablate: str, against: str | None = None, old_kernel=None) -> dict:
    torch.set_num_threads(threads)
    pipe = TextToVideoPipeline.from_pretrained()
    model = pipe.model
    result = {"steps": {}, "call_1x17": {}, "call_16x17": {}}
    limit = fused.MAX_ROWS
    fused.MAX_ROWS = 1 << 30
    arms = ("eager", "fused") + ((against,) if against else ())
    try:
        for batch in (1, 4):
            per = {arm: [] for arm in arms}
            for r in range(rounds + 1):  # round 0 warms up
                for i in range(len(arms)):  # the order rotates each round
                    arm = arms[(i + r) % len(arms)]
                    with kernel(old_kernel if arm == against else None):
                        times = step_times(model, batch, 3, arm != "eager")
                    if r:
                        per[arm].append(times)
            for s, n in enumerate(model.config.scales):
                med = {arm: statistics.median(t[s] for t in per[arm]) for arm in arms}
                row = result["steps"][f"batch {batch}, {n * n} tokens ({2 * batch * n * n} rows)"] = {
                    "batch": batch, "tokens": n * n, "eager_ms": med["eager"] * 1e3, "fused_ms": med["fused"] * 1e3,
                    "eager_over_fused": med["eager"] / med["fused"]}
                if against:
                    row[f"{against}_ms"] = med[against] * 1e3
                    row[f"{against}_over_fused"] = statistics.median(o[s] / f[s] for o, f in
                                                                     zip(per[against], per["fused"]))
        result["prompt"] = {}
        for clips in (1, 2):
            per = {False: [], True: []}
            for r in range(2 * rounds + 1):  # round 0 warms up; the pass is short, so twice the rounds
                for fuse in ((False, True) if r % 2 else (True, False)):
                    seconds, rows = prompt_time(pipe, clips, fuse)
                    if r:
                        per[fuse].append(seconds)
            eager, fast = (statistics.median(per[f]) for f in (False, True))
            result["prompt"][f"{clips} clips ({rows} rows)"] = {
                "eager_ms": eager * 1e3, "fused_ms": fast * 1e3,
                "eager_over_fused": statistics.median(e / f for e, f in zip(per[False], per[True]))}
    finally:
        fused.MAX_ROWS = limit
    arms = ("eager", f"without {ablate}", "fused")
    for batch in (1, 16):
        for arm in arms:
            call_times(pipe, arm, batch, ablate)
        calls = {arm: [] for arm in arms}
        for _ in range(rounds):
            for arm in arms:
                calls[arm].append(call_times(pipe, arm, batch, ablate))
        for i, name in enumerate(("generate_s", "wall_s")):
            row = result[f"call_{batch}x17"][name] = {arm: statistics.median(c[i] for c in calls[arm]) for arm in arms}
            for arm in arms[:-1]:
                row[f"{arm} / fused"] = statistics.median(a[i] / f[i] for a, f in zip(calls[arm], calls["fused"]))
    model.fused_steps = True
    result[f"steps without {ablate}"] = ablation_steps(model, ablate)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ablate", choices=ABLATIONS, default="qk_prep",
                        help="the C call the middle arm leaves to torch")
    parser.add_argument("--against", metavar="REV", help="also time the steps with revision REV's kernel")
    parser.add_argument("--out", default="benchmarks/results/fused_steps.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        old_kernel = kernel_at(args.against, Path(tmp)) if args.against else None
        result = {"machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
                  "max_rows": fused.MAX_ROWS, "rounds": args.rounds, "ablate": args.ablate, "against": args.against,
                  "threads": {str(t): run(t, args.rounds, args.ablate, args.against, old_kernel)
                              for t in args.threads}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
