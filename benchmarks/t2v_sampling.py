"""Sampling settings of a text-to-video model or of its shallower elastic sub-model (``--depth``), compared
on a *validation* set of prompts (seed 12345 unless ``--seed``, seen combinations; never the evaluation seeds of
``omniar eval t2v``).

    python benchmarks/t2v_sampling.py [--model DIR] [--depth D] [--clips 64] [--seed 12345]
        [--settings NAME ...] [--out benchmarks/results/t2v_sampling.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from omniar.eval.t2v import evaluate_split, load_classifier
from omniar.generation import TextToVideoPipeline

SETTINGS = {
    "guidance 3, no filter (API example)": {"guidance_scale": 3.0},
    "guidance 1 (no CFG)": {"guidance_scale": 1.0},
    "guidance 5": {"guidance_scale": 5.0},
    "guidance 3, top_k 32": {"guidance_scale": 3.0, "top_k": 32},
    "guidance 3, top_p 0.9": {"guidance_scale": 3.0, "top_p": 0.9},
    "guidance 3, temperature 0.7": {"guidance_scale": 3.0, "temperature": 0.7},
    "guidance 3, linear ramp": {"guidance_scale": 3.0, "guidance_schedule": "linear"},
    "guidance 3, temperature 0.5": {"guidance_scale": 3.0, "temperature": 0.5},
    "guidance 5, temperature 0.7": {"guidance_scale": 5.0, "temperature": 0.7},
    "guidance 3, temperature 0.5, linear ramp": {"guidance_scale": 3.0, "temperature": 0.5,
                                                 "guidance_schedule": "linear"},
    "guidance 4, temperature 0.5, linear ramp": {"guidance_scale": 4.0, "temperature": 0.5,
                                                 "guidance_schedule": "linear"},
    "guidance 3, temperature 0.3, linear ramp": {"guidance_scale": 3.0, "temperature": 0.3,
                                                 "guidance_schedule": "linear"},
    "guidance 3, temperature 0.15, linear ramp": {"guidance_scale": 3.0, "temperature": 0.15,
                                                  "guidance_schedule": "linear"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="pipeline folder (default: the embedded shapes-t2v)")
    parser.add_argument("--depth", type=int, default=None, help="score the sub-model of this many layers")
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--seed", type=int, default=12345, help="the validation draw (keep it off the eval seeds)")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS),
                        help="the settings to score (default: all), by name")
    parser.add_argument("--out", default="benchmarks/results/t2v_sampling.json")
    args = parser.parse_args()
    pipe, classifier = TextToVideoPipeline.from_pretrained(args.model), load_classifier()
    elastic = None if args.depth is None else {"depth": args.depth}
    result = {"model": args.model or "shapes-t2v", "depth": args.depth or pipe.model.omniar_config.num_layers,
              "clips": args.clips, "seed": args.seed, "settings": {}}
    for name in args.settings:
        kwargs = SETTINGS[name]
        start = time.perf_counter()
        res = evaluate_split(pipe, classifier, "seen", args.clips, seed=args.seed, elastic=elastic, **kwargs)
        result["settings"][name] = {"kwargs": kwargs, **res, "seconds": time.perf_counter() - start}
        print(f"{name:<34} adherence {res['all']:.3f} frechet {res['frechet']:.2f} "
              f"(color {res['color']:.2f} shape {res['shape']:.2f} direction {res['direction']:.2f} "
              f"background {res['background']:.2f})")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
