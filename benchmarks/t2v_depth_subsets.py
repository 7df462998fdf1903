"""Which layers should a shallower elastic sub-model keep? Zero-shot adherence of the default model's
sub-models made of different layer subsets (the full model first, for reference) on the validation
prompts (seed 12345, seen combinations; never the evaluation seeds of ``omniar eval t2v``).
``model.elastic(depth=d)`` runs the first d layers; the layer list is reordered so that those are
the chosen subset.

    python benchmarks/t2v_depth_subsets.py [--clips 64] [--subsets 012345 012 015 045 024]
        [--out benchmarks/results/t2v_depth_subsets.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from torch import nn

from omniar.eval.t2v import evaluate_split, load_classifier
from omniar.generation import TextToVideoPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--subsets", nargs="+", default=["012345", "012", "015", "045", "024"],
                        help="layer indices per sub-model, one digit each")
    parser.add_argument("--out", default="benchmarks/results/t2v_depth_subsets.json")
    args = parser.parse_args()
    pipe, classifier = TextToVideoPipeline.from_pretrained(), load_classifier()
    layers = list(pipe.model.layers)
    result = {}
    for subset in args.subsets:
        keep = [int(c) for c in subset]
        if len(set(keep)) != len(keep) or not all(i < len(layers) for i in keep):
            parser.error(f"--subsets: {subset!r} must name distinct layers below {len(layers)}")
        pipe.model.layers = nn.ModuleList([layers[i] for i in keep]
                                          + [layer for i, layer in enumerate(layers) if i not in keep])
        start = time.perf_counter()
        res = evaluate_split(pipe, classifier, "seen", args.clips, seed=12345, elastic={"depth": len(keep)})
        result[subset] = {**res, "seconds": time.perf_counter() - start}
        print(f"layers {subset}: adherence {res['all']:.3f} frechet {res['frechet']:.1f} "
              f"(color {res['color']:.2f} shape {res['shape']:.2f} direction {res['direction']:.2f})")
    pipe.model.layers = nn.ModuleList(layers)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
