"""Text-to-video evaluation on Moving Shapes: prompt adherence and a Frechet distance (FVD-style).

Adherence: the share of generated clips whose four attributes (colour, shape,
direction, background), as judged by the shipped attribute classifier, all
match the prompt. Frechet distance: between generated and real clips of the
same prompts, in the classifier's attribute-logit space (14 dims, well
conditioned for 64-clip sets), reported next to the distance between two
disjoint real sets. A reference row judges real clips encoded and decoded by
the pipeline's tokenizer: what the tokenizer alone keeps.

    omniar eval t2v [--model DIR] [--clips 64] [--out t2v_eval.json]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch
from tqdm import tqdm

from .. import assets
from .._checks import check_choice, check_int, check_output_path, named
from .._pretrained import write_file_atomically
from ..data.shapes import BACKGROUNDS, HELDOUT, TRAIN_COMBINATIONS, caption, render, sample_clip, to_tensor
from .metrics import frechet_distance
from .shapes_classifier import ShapesClassifier, frames_to_videos, prompt_adherence

KEYS = ("color", "shape", "direction", "background")
COLLAPSE_FRACTION = 0.25


def eval_combinations(split: str, n: int, seed: int) -> list[tuple[str, str, str, str]]:
    """``n`` combinations of a split, each used once before any repeats: heldout in order, seen in a
    seeded random order (so no single prompt weighs several times in a 64-clip score)."""
    check_choice(split, "split", ("seen", "heldout"))
    if split == "heldout":
        return [HELDOUT[i % len(HELDOUT)] for i in range(n)]
    order = np.random.default_rng(seed).permutation(len(TRAIN_COMBINATIONS))
    return [TRAIN_COMBINATIONS[order[i % len(order)]] for i in range(n)]


def real_clips(combos: list[tuple], num_frames: int, size: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.stack([to_tensor(render(sample_clip(rng, c, size, num_frames), size, num_frames)) for c in combos])


def classifier_features(classifier: ShapesClassifier, videos: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(list(classifier(videos).values()), dim=-1).cpu()


def generate(pipe, combos: list[tuple], num_frames: int, batch: int, progress: bool = False, **kwargs) -> torch.Tensor:
    """Clips for the canonical captions of ``combos``, ``batch`` prompts a call, each call seeded with
    the index of its first clip: reproducible for a given ``batch``, which therefore changes the draw."""
    out = []
    for i in tqdm(range(0, len(combos), batch), disable=not progress, desc="generate"):
        prompts = [caption(*c) for c in combos[i:i + batch]]
        out.append(frames_to_videos(pipe(prompts, num_frames=num_frames, seed=i, **kwargs).frames))
    return torch.cat(out)


def object_fraction(clips: torch.Tensor, combos: list[tuple]) -> torch.Tensor:
    """Per clip, the largest share of a frame's pixels that differ from the prompt's background colour by
    more than a quarter of the range in some channel: (B,) in [0, 1]. A real object covers at most 8 %."""
    bg = torch.tensor([BACKGROUNDS[c[3]] for c in combos], dtype=torch.float32) / 127.5 - 1  # (B, 3)
    diff = (clips.float() - bg[:, :, None, None, None].to(clips.device)).abs().amax(1)  # (B, T, H, W)
    return (diff > 0.5).float().mean((2, 3)).amax(1).cpu()


def score(classifier, clips: torch.Tensor, combos: list[tuple], real: torch.Tensor) -> dict:
    """Adherence of ``clips`` to ``combos``, their Frechet distance to the ``real`` clips, and the number of
    collapsed clips (an object mask over :data:`COLLAPSE_FRACTION` of a frame: a smear, not an object)."""
    result = prompt_adherence(classifier, clips, [dict(zip(KEYS, c)) for c in combos])
    result["frechet"] = frechet_distance(classifier_features(classifier, clips), classifier_features(classifier, real))
    result["collapsed"] = int((object_fraction(clips, combos) > COLLAPSE_FRACTION).sum())
    return result


def evaluate_split(pipe, classifier, split: str, n: int, num_frames: int = 17, batch: int = 16, seed: int = 0,
                   last_frames: int | None = None, progress: bool = False, **kwargs) -> dict:
    """Adherence and Frechet distance for one split; ``last_frames`` judges only the clip's tail."""
    combos = eval_combinations(split, n, seed)
    size = pipe.video_tokenizer.resolution
    fake = generate(pipe, combos, num_frames, batch, progress, **kwargs)
    real = real_clips(combos, num_frames, size, seed=seed + 1)
    if last_frames:
        fake, real = fake[:, :, -last_frames:], real[:, :, -last_frames:]
    return score(classifier, fake, combos, real)


def tokenizer_reference(tokenizer, classifier, n: int, num_frames: int = 17, batch: int = 8, seed: int = 0) -> dict:
    """Real clips of the seen prompts, encoded and decoded, judged like generated ones: what the tokenizer
    alone keeps of each attribute. Not a hard ceiling: guided sampling favours typical, easier-to-read clips."""
    combos = eval_combinations("seen", n, seed)
    size = tokenizer.resolution
    source = real_clips(combos, num_frames, size, seed=seed + 303)  # disjoint from the real set compared with
    recon = torch.cat([tokenizer.decode(tokenizer.encode(v)) for v in source.split(batch)])
    return score(classifier, recon, combos, real_clips(combos, num_frames, size, seed=seed + 1))


def real_vs_real(classifier, n: int, num_frames: int, size: int, seed: int = 0) -> float:
    """Frechet distance between two disjoint real sets of the same prompts (the floor to compare with)."""
    combos = eval_combinations("seen", n, seed)
    a, b = real_clips(combos, num_frames, size, seed + 101), real_clips(combos, num_frames, size, seed + 202)
    return frechet_distance(classifier_features(classifier, a), classifier_features(classifier, b))


def load_classifier(path: str | None = None) -> ShapesClassifier:
    return ShapesClassifier.from_pretrained(str(path or assets.path("shapes-classifier"))).eval()


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="pipeline folder (default: embedded shapes-t2v)")
    parser.add_argument("--classifier", default=None, help="classifier folder (default: shipped)")
    parser.add_argument("--clips", type=int, default=64, help="clips per split")
    parser.add_argument("--batch", type=int, default=16)
    # not the shipped benchmarks/results/t2v_eval.json: a quick --clips 2 run must not overwrite it
    parser.add_argument("--out", default="t2v_eval.json",
                        help="JSON report (default: %(default)s in the working directory; the shipped record is "
                             "benchmarks/results/t2v_eval.json)")


def cli_main(args: argparse.Namespace) -> int:
    from ..generation import TextToVideoPipeline

    check_int(args.clips, "--clips", 2)
    check_int(args.batch, "--batch", 1)
    out = check_output_path(args.out, "out")  # before minutes of work
    with named("model"):
        pipe = TextToVideoPipeline.from_pretrained(args.model)
    with named("classifier"):
        classifier = load_classifier(args.classifier)
    cfg = pipe.model.omniar_config
    report = {"clips_per_split": args.clips, "settings": "defaults: 17 frames, guidance 3.0, top_k 0, top_p 1.0, "
              "temperature 1.0, seed = index of the batch's first clip",
              "real_vs_real_frechet": real_vs_real(classifier, args.clips, 17, pipe.video_tokenizer.resolution)}
    report["tokenizer_reference/seen"] = res = tokenizer_reference(pipe.video_tokenizer, classifier, args.clips)
    print(f"tokenizer reference (real clips encoded + decoded): adherence {res['all']:.3f}  "
          f"frechet {res['frechet']:.3f}")
    variants = {"full": None, "half_depth": {"depth": max(1, cfg.num_layers // 2)},
                "half_experts": {"num_experts": max(cfg.top_k, cfg.num_experts // 2)}, "top1": {"top_k": 1}}
    for name, elastic in variants.items():
        splits = ("seen", "heldout") if name == "full" else ("seen",)
        for split in splits:
            res = evaluate_split(pipe, classifier, split, args.clips, batch=args.batch, elastic=elastic, progress=True)
            report[f"{name}/{split}"] = res
            print(f"{name:>12} {split:>8}: adherence {res['all']:.3f}  frechet {res['frechet']:.3f}  "
                  + "  ".join(f"{k} {res[k]:.2f}" for k in KEYS))
    report["collapsed_full"] = report["full/seen"]["collapsed"] + report["full/heldout"]["collapsed"]
    report["half_depth_retention"] = report["half_depth/seen"]["all"] / max(report["full/seen"]["all"], 1e-9)
    print(f"real vs real frechet {report['real_vs_real_frechet']:.3f}; "
          f"half-depth keeps {report['half_depth_retention']:.0%} of full adherence; "
          f"collapsed clips (full model) {report['collapsed_full']} of {2 * args.clips}")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(out, lambda tmp: tmp.write_text(json.dumps(report, indent=2) + "\n"))
    print(f"wrote {out}")
    return 0
