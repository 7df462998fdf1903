"""Ablation: Cross-Frame Error Correction + Random Frame Mask on vs off, judged on clips longer than the
training length (17 frames): adherence and Frechet distance of the first and last frames and the whole clip.

Both arms train the same small model (configs/ar_ablation.yaml) on the same pre-tokenized clips with
the same seed and step budget; only train.cfec_max_rate and train.frame_mask_prob differ.

    python benchmarks/t2v_ablation.py [--steps 400] [--clips 32] [--frames 33] [--last 9] [--kv-budget N]
        [--work runs/ablation] [--resume] [--out benchmarks/results/t2v_ablation.json]

Each arm trains into ``WORK/<arm>``; a non-empty one is refused unless ``--resume`` continues it (the
trainer resumes from its newest checkpoint), so a rerun never silently re-exports old runs.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from omniar.eval.t2v import evaluate_windows, load_classifier
from omniar.generation import TextToVideoPipeline
from omniar.train.ar import train
from omniar.train.common import load_yaml

ARMS = {"with_cfec_rfm": {"cfec_max_rate": 0.15, "frame_mask_prob": 0.25},
        "without": {"cfec_max_rate": 0.0, "frame_mask_prob": 0.0}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/ar_ablation.yaml")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--clips", type=int, default=32, help="evaluation clips per arm")
    parser.add_argument("--frames", type=int, default=33, help="generated clip length (training: 17)")
    parser.add_argument("--last", type=int, default=9, help="judge the first and the last N frames")
    parser.add_argument("--kv-budget", type=int, default=None,
                        help="visual tokens per layer's KV cache (window policy): needed past 33 frames")
    parser.add_argument("--work", default="runs/ablation", help="folder of the two arms' runs")
    parser.add_argument("--resume", action="store_true", help="continue the runs already in --work")
    parser.add_argument("--out", default="benchmarks/results/t2v_ablation.json")
    args = parser.parse_args()
    runs = {name: Path(args.work, name) for name in ARMS}
    for run in runs.values():
        if run.is_dir() and any(run.iterdir()) and not args.resume:
            parser.error(f"--work: {run} holds an earlier run; pass --resume to continue it or choose another --work")

    result = {"steps": args.steps, "clips": args.clips, "frames": args.frames, "last_frames": args.last,
              "kv_budget": args.kv_budget,
              "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, CPU"}
    pipes = {}
    for name, arm in ARMS.items():
        config = load_yaml(args.config)
        config["train"].update(steps=args.steps, out_dir=str(runs[name]), **arm)
        start = time.perf_counter()
        pipes[name] = TextToVideoPipeline.from_pretrained(train(config))
        result[name] = {**arm, "train_s": time.perf_counter() - start}
    classifier = load_classifier()
    for name, pipe in pipes.items():
        windows = {"first_frames": slice(0, args.last), "last_frames": slice(-args.last, None)}
        if args.kv_budget is None:  # clips within the model's frame cap; longer ones have no real counterpart
            windows["whole_clip"] = slice(None)
        result[name].update(evaluate_windows(pipe, classifier, "seen", args.clips, windows, args.frames,
                                             kv_budget=args.kv_budget))
        print(name, json.dumps(result[name]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
