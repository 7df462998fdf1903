"""``omniar eval t2v``: prompt adherence, Frechet distance and collapsed clips of a text-to-video pipeline on
Moving Shapes, for the full model and its elastic sub-models (:mod:`omniar.eval.t2v`).

    omniar eval t2v [--model DIR] [--clips 64] [--seed 0] [--half-depth-temperature 0.5] [--out t2v_eval.json]
        [--device cuda] [--dtype bfloat16] [--decode-dtype float32]

The half-depth sub-model is scored twice: at the defaults, like every row, and at its own sampling temperature
(``half_depth_tuned``), the setting a validation sweep picked for it (BENCHMARKS.md, "Half-depth sampling").
"""

from __future__ import annotations

import argparse
import json

from .._checks import check_float, check_int, check_output_path, named
from .._pretrained import write_file_atomically
from ..eval.t2v import KEYS, evaluate_split, load_classifier, real_vs_real, tokenizer_reference
from ..generation import TextToVideoPipeline
from ..generation.pipeline import CALL_DEFAULTS
from ._device import add_device_arguments, chosen_device, place


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="pipeline folder (default: embedded shapes-t2v)")
    parser.add_argument("--classifier", default=None, help="classifier folder (default: shipped)")
    parser.add_argument("--clips", type=int, default=64, help="clips per split")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0,
                        help="which draw: the seen prompts' order, the real clips and the sampling seeds (default: "
                             "%(default)s); score models side by side on one seed, and on a fresh one to choose "
                             "between models already scored")
    parser.add_argument("--half-depth-temperature", type=float, default=0.5,
                        help="temperature of the half_depth_tuned row (default: %(default)s, the half-depth "
                             "sub-model's documented setting; the half_depth row samples at the defaults)")
    # not the shipped benchmarks/results/t2v_eval.json: a quick --clips 2 run must not overwrite it
    parser.add_argument("--out", default="t2v_eval.json",
                        help="JSON report (default: %(default)s in the working directory; the shipped record is "
                             "benchmarks/results/t2v_eval.json)")
    add_device_arguments(parser)


def cli_main(args: argparse.Namespace) -> int:
    check_int(args.clips, "--clips", 2)
    check_int(args.batch, "--batch", 1)
    check_int(args.seed, "--seed", 0)
    check_float(args.half_depth_temperature, "--half-depth-temperature", 0.0, low_inclusive=False)
    out = check_output_path(args.out, "out")  # before minutes of work
    device = chosen_device(args)
    with named("model"):
        pipe = TextToVideoPipeline.from_pretrained(args.model)
    place(pipe, device, args)
    with named("classifier"):
        classifier = load_classifier(args.classifier)
    cfg = pipe.model.omniar_config
    seed = args.seed
    report = {"clips_per_split": args.clips, "seed": seed,
              "settings": f"defaults: 17 frames, guidance {CALL_DEFAULTS['guidance_scale']}, "
                          f"top_k {CALL_DEFAULTS['top_k']}, top_p {CALL_DEFAULTS['top_p']}, "
                          f"temperature {CALL_DEFAULTS['temperature']}, "
                          "sampling seed = seed x clips + index of the batch's first clip",
              "real_vs_real_frechet": real_vs_real(classifier, args.clips, 17, pipe.video_tokenizer.resolution, seed)}
    report["tokenizer_reference/seen"] = res = tokenizer_reference(pipe.video_tokenizer, classifier, args.clips,
                                                                   seed=seed)
    print(f"tokenizer reference (real clips encoded + decoded): adherence {res['all']:.3f}  "
          f"frechet {res['frechet']:.3f}")
    half_depth = {"depth": max(1, cfg.num_layers // 2)}
    report["half_depth_tuned_settings"] = {"temperature": args.half_depth_temperature}
    variants = {"full": {}, "half_depth": {"elastic": half_depth},
                "half_depth_tuned": {"elastic": half_depth, **report["half_depth_tuned_settings"]},
                "half_experts": {"elastic": {"num_experts": max(cfg.top_k, cfg.num_experts // 2)}},
                "top1": {"elastic": {"top_k": 1}}}
    for name, kwargs in variants.items():
        splits = ("seen", "heldout") if name == "full" else ("seen",)
        for split in splits:
            res = evaluate_split(pipe, classifier, split, args.clips, batch=args.batch, seed=seed, progress=True,
                                 **kwargs)
            report[f"{name}/{split}"] = res
            print(f"{name:>12} {split:>8}: adherence {res['all']:.3f}  frechet {res['frechet']:.3f}  "
                  + "  ".join(f"{k} {res[k]:.2f}" for k in KEYS))
    report["collapsed_full"] = report["full/seen"]["collapsed"] + report["full/heldout"]["collapsed"]
    full = max(report["full/seen"]["all"], 1e-9)
    for name in ("half_depth", "half_depth_tuned"):
        report[f"{name}_retention"] = report[f"{name}/seen"]["all"] / full
    print(f"real vs real frechet {report['real_vs_real_frechet']:.3f}; half-depth keeps "
          f"{report['half_depth_retention']:.0%} of full adherence at the defaults, "
          f"{report['half_depth_tuned_retention']:.0%} at temperature {args.half_depth_temperature}; "
          f"collapsed clips (full model) {report['collapsed_full']} of {2 * args.clips}")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(out, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
    print(f"wrote {out}")
    return 0
