"""Peak memory of one ``TextToVideoPipeline`` call (embedded default model, CPU) by batch and clip length.

Each measurement runs in a fresh subprocess: load the pipeline, warm up, then run once under
two meters: the kernel's peak RSS (reset through ``/proc/self/clear_refs``, read from VmHWM,
minus the RSS before) and the peak of live tensor bytes (the profiler's allocation events).
RSS is what a user sees but depends on the machine's allocator (freed memory it keeps, pages
it rounds to); the tensor peak depends only on the code and the kernels it picks. Side by
side for the largest case: the decode step one-shot vs one clip and one latent frame at a
time (what the pipeline does).

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

from torch.profiler import ProfilerActivity, profile

from demo_load import _mib
from omniar.generation import TextToVideoPipeline

CASES = [(1, 1), (1, 17), (1, 33), (4, 33), (16, 1), (16, 33)]
PROMPT = "a red circle moves right on a black background"


def tensor_peak_mib(fn) -> float:
    """Peak MiB of CPU tensor memory allocated while ``fn`` runs, from the profiler's allocation events."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # kineto_results holds every allocation and free; prof.events() folds most of them away
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak / 2**20


def measure(fn) -> dict[str, float]:
    """MiB the process's peak RSS rises above its current RSS while ``fn`` runs (``rss_mib``) and
    that run's ``seconds``; the peak of live tensor memory during a second run (``tensor_mib``)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before, t0 = _mib("self", "VmRSS"), time.perf_counter()
    fn()
    row = {"seconds": time.perf_counter() - t0, "rss_mib": _mib("self", "VmHWM") - before}
    return row | {"tensor_mib": tensor_peak_mib(fn)}


def worker(kind: str, batch: int, frames: int) -> dict:
    pipe = TextToVideoPipeline.from_pretrained()
    pipe(PROMPT, num_frames=1)  # warm-up: lazy allocations are not the call's
    row = {"kind": kind, "batch": batch, "frames": frames}
    if kind == "call":
        return row | measure(lambda: pipe([PROMPT] * batch, num_frames=frames, seed=0))
    codes, tok = pipe([PROMPT] * batch, num_frames=frames, seed=0).codes, pipe.video_tokenizer
    if kind == "decode_one_shot":
        return row | measure(lambda: tok.decode(codes))
    clips = codes.split()
    return row | measure(lambda: [tok.decode(c, 1) for c in clips])


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
    b, f = CASES[-1]
    one_shot, chunked = run_worker("decode_one_shot", b, f), run_worker("decode_chunked", b, f)
    for row in [*calls, one_shot, chunked]:
        print(f"{row['kind']:<16} {row['batch']:>2} x {row['frames']:>2} frames: peak RSS +{row['rss_mib']:7.1f} MiB, "
              f"tensors {row['tensor_mib']:7.1f} MiB")
    pipe = TextToVideoPipeline.from_pretrained()
    result = {
        "calls": calls,
        "max_batch_size": pipe.max_batch_size, "max_num_frames": pipe.max_num_frames,
        "peak_call_mib_at_limits": {m: max(r[m] for r in calls) for m in ("rss_mib", "tensor_mib")},
        "decode_at_limits": {"one_shot": one_shot, "chunked": chunked},
        "decode_one_shot_vs_chunked_ratio": {m: one_shot[m] / chunked[m] for m in ("rss_mib", "tensor_mib")},
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, CPU",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
