"""Peak memory of one ``TextToVideoPipeline`` call (embedded default model, CPU) by batch and clip length.

Each measurement runs in a fresh subprocess: load the pipeline, warm up, reset the kernel's
peak-RSS counter (``/proc/self/clear_refs``), run, read VmHWM. Reported: peak minus the RSS
before the call (the call's own memory). Side by side for the largest case: the decode
step one-shot vs one clip and one latent frame at a time (what the pipeline does).

    OMP_NUM_THREADS=2 python benchmarks/generation_memory.py [--out benchmarks/results/generation_memory.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from demo_load import _mib
from omniar.generation import TextToVideoPipeline

CASES = [(1, 1), (1, 17), (1, 33), (4, 33), (16, 1), (16, 33)]
PROMPT = "a red circle moves right on a black background"


def measure(fn) -> float:
    """MiB the process's peak RSS rises above its current RSS while ``fn`` runs."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _mib("self", "VmRSS")
    fn()
    return _mib("self", "VmHWM") - before


def worker(kind: str, batch: int, frames: int) -> dict:
    pipe = TextToVideoPipeline.from_pretrained()
    pipe(PROMPT, num_frames=1)  # warm-up: lazy allocations are not the call's
    if kind == "call":
        t0 = time.perf_counter()
        mib = measure(lambda: pipe([PROMPT] * batch, num_frames=frames, seed=0))
        return {"batch": batch, "frames": frames, "call_mib": mib, "seconds": time.perf_counter() - t0}
    codes, tok = pipe([PROMPT] * batch, num_frames=frames, seed=0).codes, pipe.video_tokenizer
    if kind == "decode_one_shot":
        return {"batch": batch, "frames": frames, f"{kind}_mib": measure(lambda: tok.decode(codes))}
    clips = codes.split()
    return {"batch": batch, "frames": frames, f"{kind}_mib": measure(lambda: [tok.decode(c, 1) for c in clips])}


def run_worker(kind: str, batch: int, frames: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", kind, str(batch), str(frames)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/generation_memory.json")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "BATCH", "FRAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))))
        return
    calls = [run_worker("call", b, f) for b, f in CASES]
    for row in calls:
        print(f"batch {row['batch']:>2} x {row['frames']:>2} frames: +{row['call_mib']:7.1f} MiB  "
              f"{row['seconds']:.1f} s")
    b, f = CASES[-1]
    one_shot = run_worker("decode_one_shot", b, f)["decode_one_shot_mib"]
    chunked = run_worker("decode_chunked", b, f)["decode_chunked_mib"]
    print(f"decode {b} x {f} frames: one-shot +{one_shot:.1f} MiB, chunked +{chunked:.1f} MiB")
    pipe = TextToVideoPipeline.from_pretrained()
    result = {
        "calls": calls,
        "max_batch_size": pipe.max_batch_size, "max_num_frames": pipe.max_num_frames,
        "peak_call_mib_at_limits": max(r["call_mib"] for r in calls),
        "decode_at_limits_mib": {"one_shot": one_shot, "chunked": chunked},
        "decode_one_shot_vs_chunked_ratio": one_shot / chunked,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, CPU",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
