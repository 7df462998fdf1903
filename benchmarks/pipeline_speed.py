"""Speed of the default text-to-video pipeline: wall time, generation vs decoding, forward passes and
tokens per second of one 17-frame clip per prompt, at a few batch sizes (median of ``--repeats`` after
one warm-up call).

    python benchmarks/pipeline_speed.py [--device cuda] [--batches 1 8 16] [--repeats 3]
        [--out benchmarks/results/pipeline_speed.json]

On CUDA the AR model runs in bf16 and the tokenizer in fp32 (``TextToVideoPipeline.to``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from omniar.generation import TextToVideoPipeline

PROMPTS = ["a red circle moves right on a black background", "a blue square moves up on a white background",
           "a green triangle moves left on a black background", "a yellow circle moves down on a white background"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/pipeline_speed.json")
    args = parser.parse_args()
    if min(args.batches) < 1 or args.repeats < 1:
        parser.error("--batches and --repeats must be >= 1")
    cuda = args.device.startswith("cuda")
    pipe = TextToVideoPipeline.from_pretrained().to(args.device, torch.bfloat16 if cuda else None)
    result = {"device": torch.cuda.get_device_name(args.device) if cuda else f"CPU {platform.machine()}, "
              f"{torch.get_num_threads()} threads", "dtype": "bfloat16 model, fp32 tokenizer" if cuda else "fp32",
              "torch": torch.__version__}
    for batch in args.batches:
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        runs = []
        for i in range(args.repeats + 1):  # the first call warms up kernels and allocators
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            timings = pipe(prompts, seed=i).timings  # frames come back on the CPU: the call has synchronised
            runs.append({"wall_s": time.perf_counter() - start, **timings})
        runs = runs[1:]
        row = {key: statistics.median(r[key] for r in runs) for key in ("wall_s", "generate_s", "decode_s")}
        row.update(forward_passes=runs[0]["forward_passes"], tokens=runs[0]["tokens"])
        row["tokens_per_s"] = row["tokens"] / row["generate_s"]
        result[f"batch{batch}"] = row
        print(f"batch {batch}: {json.dumps(row)}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
