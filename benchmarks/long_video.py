"""Long video (#27): KV-cache policies on the shipped default model, 17 to 257 frames, streamed output.

Per (policy arm, clip length), in a fresh process (so peak RSS is that run's): ``--clips`` clips of seen
prompts, one prompt per call (a budget's eviction is shared by a call's batch rows), each streamed
(``on_frames``: only the first and the last 17 frames are kept). Recorded: the KV cache's allocated bytes and
slots, peak RSS, per-frame latency (the time between two streamed latent frames: generation + decode) in
the first and the last quarter of the clip, and, with the shipped attribute classifier (as ``omniar eval t2v``),
prompt adherence of the first and the last 17 frames, the Frechet distance between them and each one's to
real 17-frame clips of the same prompts.

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/long_video.py [--clips 5] [--budget N]
        [--out benchmarks/results/long_video.json]

``none`` is today's unbounded cache; the pipeline caps it at ``max_num_frames`` (33), so this script lifts
that cap to ``omniar.limits.MAX_NUM_FRAMES`` for it, as the reference of what a full cache does.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from omniar.data.shapes import MOTIONS, caption
from omniar.eval.metrics import frechet_distance
from omniar.eval.shapes_classifier import frames_to_videos, prompt_adherence
from omniar.eval.t2v import KEYS, classifier_features, eval_combinations, load_classifier, real_clips
from omniar.generation import TextToVideoPipeline
from omniar.limits import MAX_NUM_FRAMES

FRAMES = (17, 65, 129, 257)
WINDOW = 17  # frames judged at each end of a clip
NACL = {"kv_policy": "nacl", "kv_horizon": None}  # nacl arms read without a horizon unless they name one
ARMS = {"none": {}, "window/extrapolate": {"kv_policy": "window", "kv_rope": "extrapolate"},
        "window/rebase": {"kv_policy": "window", "kv_rope": "rebase"},
        "nacl/extrapolate": {**NACL, "kv_rope": "extrapolate"}, "nacl/rebase": {**NACL, "kv_rope": "rebase"},
        **{f"nacl{k}/extrapolate": {**NACL, "kv_rope": "extrapolate", "kv_recent_frames": k}
           for k in (1, 2, 3, 4)},  # nacl/extrapolate: the default recent window (3)
        "nacl-h33/extrapolate": {**NACL, "kv_rope": "extrapolate", "kv_horizon": 33},
        "nacl-h17/extrapolate": {**NACL, "kv_rope": "extrapolate", "kv_horizon": 17}}  # the default horizon
# the others: BENCHMARKS.md
DEFAULT_ARMS = ("none", "window/extrapolate", "window/rebase", "nacl/extrapolate", "nacl-h17/extrapolate")


SEED_STRIDE = 10_000  # draw s generates clip i with seed 10,000 s + i: draws of up to 10,000 clips share no seed


def run_arm(arm: str, num_frames: int, clips: int, budget: int, random_ratio: float, model: str | None,
            classifier: str | None, motion: str, seed: int) -> dict:
    """One arm at one length, in this process."""
    pipe = TextToVideoPipeline.from_pretrained(model)
    kwargs = dict(ARMS[arm])
    if arm == "none":
        pipe.max_num_frames = MAX_NUM_FRAMES
    else:
        kwargs.update(kv_budget=budget, random_ratio=random_ratio)
    caches, new_cache = [], pipe.model.new_cache
    pipe.model.new_cache = lambda *a, **k: caches.append(new_cache(*a, **k)) or caches[-1]
    combos = eval_combinations("seen", clips, seed=seed)
    heads, tails, first_q, last_q = [], [], [], []
    start = time.perf_counter()
    for i, combo in enumerate(combos):
        head, tail, stamps = [], [], [time.perf_counter()]

        def on_frames(frames):
            stamps.append(time.perf_counter())
            if sum(map(len, head)) < WINDOW:
                head.append(frames[0])
            tail.append(frames[0])
            while sum(map(len, tail[1:])) >= WINDOW:  # the newest 17+ frames: never the whole clip
                tail.pop(0)

        pipe(caption(*combo), num_frames=num_frames, seed=seed * SEED_STRIDE + i, on_frames=on_frames, **kwargs)
        steps = np.diff(stamps[1:])  # per latent frame after the first (which also holds the prompt pass)
        quarter = max(1, len(steps) // 4)
        first_q.append(float(np.median(steps[:quarter])))
        last_q.append(float(np.median(steps[-quarter:])))
        heads.append(np.concatenate(head)[:WINDOW])
        tails.append(np.concatenate(tail)[-WINDOW:])
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    cache = caches[-1]
    kv_bytes = sum(b.nbytes for b in cache.keys + cache.values if b is not None)
    tau = pipe.video_tokenizer.config.temporal_compression
    result = {"arm": arm, "num_frames": num_frames,
              "kv_capacity_visual_tokens": cache.keys[0].shape[2] - cache.text_slots, "kv_bytes": kv_bytes,
              "peak_rss_bytes": rss, "wall_s": wall,
              "ms_per_frame_first_quarter": 1000 * float(np.median(first_q)) / tau,
              "ms_per_frame_last_quarter": 1000 * float(np.median(last_q)) / tau}
    return {**result, **judge(combos, np.stack(heads), np.stack(tails), pipe.video_tokenizer.resolution,
                              load_classifier(classifier), motion)}


def judge(combos: list[tuple], heads: np.ndarray, tails: np.ndarray, size: int, classifier, motion: str) -> dict:
    attrs = [dict(zip(KEYS, c)) for c in combos]
    first, last = frames_to_videos(heads), frames_to_videos(tails)
    real = real_clips(combos, WINDOW, size, seed=1, motion=motion)
    feats = {name: classifier_features(classifier, v) for name, v in (("first", first), ("last", last),
                                                                      ("real", real))}
    a_first = prompt_adherence(classifier, first, attrs)["all"]
    a_last = prompt_adherence(classifier, last, attrs)["all"]
    return {"adherence_first17": a_first, "adherence_last17": a_last,
            "last_over_first": a_last / a_first if a_first else None,
            "frechet_last_vs_first": frechet_distance(feats["last"], feats["first"]),
            "frechet_first_vs_real": frechet_distance(feats["first"], feats["real"]),
            "frechet_last_vs_real": frechet_distance(feats["last"], feats["real"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=5, help="clips (seen prompts) per arm and length")
    parser.add_argument("--budget", type=int, default=None,
                        help="kv_budget (default: half the model's full cache, pipe.cache_tokens() // 2)")
    parser.add_argument("--random-ratio", type=float, default=0.25, help="nacl's random share (fixed, not tuned)")
    parser.add_argument("--frames", type=int, nargs="+", default=list(FRAMES))
    parser.add_argument("--arms", nargs="+", default=list(DEFAULT_ARMS), choices=list(ARMS))
    parser.add_argument("--model", default=None, help="pipeline folder (default: the shipped default)")
    parser.add_argument("--classifier", default=None,
                        help="judge's folder (default: the shipped classifier, trained on objects inside the canvas; "
                             "`omniar train classifier --motion wrap` trains one that reads objects crossing an edge)")
    parser.add_argument("--motion", choices=MOTIONS, default="exit", help="motion of the real reference clips")
    parser.add_argument("--seed", type=int, default=0,
                        help=f"draw: the prompts' seed, clip i generated with seed {SEED_STRIDE} x seed + i")
    parser.add_argument("--out", default="benchmarks/results/long_video.json")
    parser.add_argument("--child", nargs=2, metavar=("ARM", "FRAMES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_arm(args.child[0], int(args.child[1]), args.clips, args.budget, args.random_ratio,
                                 args.model, args.classifier, args.motion, args.seed)))
        return
    if args.budget is None:
        args.budget = TextToVideoPipeline.from_pretrained(args.model).cache_tokens() // 2
    start, runs = time.perf_counter(), []
    for num_frames in args.frames:
        for arm in args.arms:
            cmd = [sys.executable, __file__, "--child", arm, str(num_frames), "--clips", str(args.clips),
                   "--budget", str(args.budget), "--random-ratio", str(args.random_ratio), "--motion", args.motion,
                   "--seed", str(args.seed)]
            cmd += [f"--{k}={v}" for k, v in (("model", args.model), ("classifier", args.classifier)) if v]
            out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout  # stderr: shown
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
    combos = eval_combinations("seen", args.clips, seed=args.seed)
    real, other = (real_clips(combos, WINDOW, 64, seed=seed, motion=args.motion) for seed in (1, 2))
    classifier = load_classifier(args.classifier)
    floor = frechet_distance(classifier_features(classifier, real), classifier_features(classifier, other))
    result = {"benchmark": "long_video", "model": args.model or "shipped default (TextToVideoPipeline.from_pretrained())",
              "classifier": args.classifier or "shipped", "real_motion": args.motion,
              "kv_budget": args.budget, "random_ratio": args.random_ratio, "clips_per_run": args.clips,
              "seed": args.seed,
              "clips_note": f"{args.clips} seen prompts per arm and length, one clip each, seeds "
                            f"{args.seed * SEED_STRIDE}..{args.seed * SEED_STRIDE + args.clips - 1}: "
                            "sized to keep the whole run on a 2-core CPU well under 30 minutes; an adherence step is "
                            f"one clip ({100 / args.clips:.0f} points), so small differences are noise",
              "frechet_real_vs_real_17": floor, "runs": runs, "total_wall_s": time.perf_counter() - start,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} ({result['total_wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
