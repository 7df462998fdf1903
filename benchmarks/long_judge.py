"""Long-video judges (#27): how attribute classifiers read real long clips, first 17 frames vs last 17.

A judge of long clips must score real clips the same at both ends, or `long_video.py`'s last/first ratio
measures the judge rather than the model. Per classifier and draw: ``--clips`` real Moving Shapes clips of
``--frames`` frames (seen prompts, ``--motion``), the share whose four attributes are all read right in the
first and in the last 17 frames.

    nice -n 19 env OMP_NUM_THREADS=1 python benchmarks/long_judge.py --classifiers shipped weights/classifier_wrap
        [--out benchmarks/results/long_judge.json]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from long_video import WINDOW  # the frames judged at each end of a clip
from omniar.data.shapes import MOTIONS
from omniar.eval.shapes_classifier import prompt_adherence
from omniar.eval.t2v import KEYS, eval_combinations, load_classifier, real_clips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classifiers", nargs="+", default=["shipped", "weights/classifier_wrap"],
                        help="judges' folders; 'shipped' is the shipped classifier")
    parser.add_argument("--frames", type=int, default=129)
    parser.add_argument("--clips", type=int, default=64, help="clips per draw")
    parser.add_argument("--draws", type=int, default=3, help="draws (seeds 0..N-1)")
    parser.add_argument("--motion", choices=MOTIONS, default="wrap")
    parser.add_argument("--out", default="benchmarks/results/long_judge.json")
    args = parser.parse_args()
    classifiers = {name: load_classifier(None if name == "shipped" else name) for name in args.classifiers}
    rows = []
    for seed in range(args.draws):  # each draw's clips rendered once, read by every judge
        combos = eval_combinations("seen", args.clips, seed=seed)
        clips = real_clips(combos, args.frames, 64, seed=seed, motion=args.motion)
        attrs = [dict(zip(KEYS, c)) for c in combos]
        for name, classifier in classifiers.items():
            first = prompt_adherence(classifier, clips[:, :, :WINDOW], attrs)["all"]
            last = prompt_adherence(classifier, clips[:, :, -WINDOW:], attrs)["all"]
            rows.append({"classifier": name, "seed": seed, "adherence_first17": first, "adherence_last17": last})
            print(json.dumps(rows[-1]), flush=True)
    result = {"benchmark": "long_judge", "frames": args.frames, "clips_per_draw": args.clips,
              "motion": args.motion, "runs": rows, "torch": torch.__version__, "machine": platform.machine()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
