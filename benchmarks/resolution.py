"""Generation cost by frame size and scale schedule: one 17-frame clip from a tiny random text-to-video pipeline.

Sizes 64x64, 128x128, 256x256 and 128x224 (spatial compression 8: latent grids 8x8 .. 32x32 and 16x28), each with
two schedules whose last map is the latent grid (h x w):
* ``4-scale``: the shipped schedule's shape, each axis at 1/8, 1/4, 1/2 and 1 of the grid (1, 2, 4, 8 at 64x64);
* ``10-scale``: VAR's ticks (1, 2, 3, 4, 5, 6, 8, 10, 13, 16 of 16) applied to each axis on its own, made to grow
  (no side shrinking, more tokens each scale) where rounding repeats a map; at 128x128 it is VAR's own.
Per case: the pipeline's defaults (CFG 3.0, so a batch of 2 rows), seed 0, after a one-image warm-up; generation
wall and CPU seconds (the call with the least generation CPU time of ``--repeats``; CPU time is the steadier on a
shared machine), forward passes, visual tokens, tokens per (CPU) second of generation (the AR steps, not the
decode), the whole call's wall and CPU time, and the peak of live tensor memory of one call (the profiler's
allocation events). ``tokens_per_s_vs_area`` fits log(tokens/s) against log(pixels) per schedule.

    OMP_NUM_THREADS=1 python benchmarks/resolution.py [--out benchmarks/results/resolution.json]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from generation_memory import tensor_peak_mib
from omniar._scales import check_scales
from omniar.backbone import OmniARConfig, OmniARModel
from omniar.generation import TextToVideoPipeline
from omniar.tokenizers import VideoTokenizer
from omniar.tokenizers.text import TextTokenizer

SIZES = [(64, 64), (128, 128), (256, 256), (128, 224)]
SPATIAL = 8
VAR_TICKS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PROMPT = "a red circle moves right on a black background"
FRAMES = 17


def per_axis(grid: tuple[int, int], fractions: list[float]) -> tuple[tuple[int, int], ...]:
    """A schedule from per-axis fractions of the latent ``grid``: each side rounded (at least 1), then each step
    made to grow: sides never shrink, and a map with no more tokens than the one before grows the axis furthest
    from its final side by one."""
    shapes = []
    for f in fractions:
        h, w = (max(1, min(side, round(side * f))) for side in grid)
        if shapes:
            ph, pw = shapes[-1]
            h, w = max(h, ph), max(w, pw)
            while h * w <= ph * pw:
                if h / grid[0] <= w / grid[1]:
                    h += 1
                else:
                    w += 1
        shapes.append((h, w))
    return check_scales(shapes)


def schedules(grid: tuple[int, int]) -> dict[str, tuple]:
    return {"4-scale": per_axis(grid, [1 / 8, 1 / 4, 1 / 2, 1]),
            "10-scale": per_axis(grid, [t / VAR_TICKS[-1] for t in VAR_TICKS])}


def tiny_pipeline(scales) -> TextToVideoPipeline:
    torch.manual_seed(0)
    tok = VideoTokenizer(channels=(8, 16, 16, 16), latent_channels=8, temporal_compression=4,
                         spatial_compression=SPATIAL, scales=scales, codebook_size=64)
    text = TextTokenizer()
    model = OmniARModel.from_config_obj(OmniARConfig(
        text_vocab_size=text.vocab_size, codebook_size=64, code_dim=8, scales=scales, hidden_size=64, num_layers=2,
        num_heads=4, num_kv_heads=2, num_experts=4, top_k=2, expert_hidden_size=32))
    return TextToVideoPipeline(tok, text, model, max_text_len=64, max_num_frames=FRAMES)


def measure(height: int, width: int, name: str, scales, repeats: int) -> dict:
    pipe = tiny_pipeline(scales)
    pipe(PROMPT, num_frames=1)  # warm-up: lazy allocations and kernel choices are not the call's
    best, last_step = None, []

    def on_scale(step: dict) -> None:  # the CPU clock after each scale: the last one ends the generation
        last_step[:] = [time.process_time()]

    for _ in range(repeats):
        cpu, wall = time.process_time(), time.perf_counter()
        out = pipe(PROMPT, num_frames=FRAMES, seed=0, callback=on_scale)
        row = {"call_s": time.perf_counter() - wall, "call_cpu_s": time.process_time() - cpu,
               "generate_cpu_s": last_step[0] - cpu, **out.timings}
        best = row if best is None or row["generate_cpu_s"] < best["generate_cpu_s"] else best
    shapes = pipe.video_tokenizer.scale_shapes
    return {"size": f"{height}x{width}", "pixels": height * width, "schedule": name,
            "scales": [list(s) for s in shapes], "tokens_per_frame": pipe.video_tokenizer.tokens_per_frame,
            "latent_frames": out.codes.num_latent_frames,
            "forward_passes": best["forward_passes"], "tokens": best["tokens"],
            "generate_s": round(best["generate_s"], 3), "generate_cpu_s": round(best["generate_cpu_s"], 3),
            "decode_s": round(best["decode_s"], 3), "call_s": round(best["call_s"], 3),
            "call_cpu_s": round(best["call_cpu_s"], 3), "tokens_per_s": round(best["tokens_per_s"], 1),
            "tokens_per_cpu_s": round(best["tokens"] / best["generate_cpu_s"], 1),
            "peak_tensor_mib": round(tensor_peak_mib(lambda: pipe(PROMPT, num_frames=FRAMES, seed=0)), 1)}


def slope(rows: list[dict], key: str) -> float:
    """Least-squares slope of log(rows[key]) on log(pixels): 0 = flat, 1 = grows in proportion to the area."""
    xs, ys = [math.log(r["pixels"]) for r in rows], [math.log(r[key]) for r in rows]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/resolution.json")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per case (the fastest is kept)")
    args = parser.parse_args()
    rows = []
    for height, width in SIZES:
        for name, scales in schedules((height // SPATIAL, width // SPATIAL)).items():
            rows.append(measure(height, width, name, scales, args.repeats))
            r = rows[-1]
            print(f"{r['size']:>8} {name:>8}: {r['forward_passes']:3d} passes, {r['tokens']:6d} tokens, "
                  f"generate {r['generate_s']:6.2f} s ({r['tokens_per_s']:8.1f} tok/s, "
                  f"{r['tokens_per_cpu_s']:8.1f} tok/CPU s), call {r['call_s']:6.2f} s, "
                  f"tensors {r['peak_tensor_mib']:7.1f} MiB", flush=True)
    names = sorted({r["schedule"] for r in rows})
    result = {
        "rows": rows,
        "tokens_per_s_vs_area": {key: {n: round(slope([r for r in rows if r["schedule"] == n], key), 3) for n in names}
                                 for key in ("tokens_per_s", "tokens_per_cpu_s")},
        "setup": f"tiny random pipeline (tokenizer channels 8-16, spatial x{SPATIAL}, temporal x4, codebook 64; "
                 "AR d 64, 2 layers, 4 experts top-2), one prompt, 17 frames, CFG 3.0, seed 0, "
                 f"best of {args.repeats} calls",
        "command": f"OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/resolution.py --out {args.out}",
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, CPU",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["tokens_per_s_vs_area"]))


if __name__ == "__main__":
    main()
