"""Text-to-video evaluation on Moving Shapes: prompt adherence and a Frechet distance (FVD-style).

Adherence: the share of generated clips whose four attributes (colour, shape,
direction, background), as judged by the shipped attribute classifier, all
match the prompt. Frechet distance: between generated and real clips of the
same prompts, in the classifier's attribute-logit space (14 dims, well
conditioned for 64-clip sets), reported next to the distance between two
disjoint real sets. A reference row judges real clips encoded and decoded by
the pipeline's tokenizer: what the tokenizer alone keeps. The command is
``omniar eval t2v`` (:mod:`omniar.commands.eval_t2v`).
"""

from __future__ import annotations


import numpy as np
import torch
from tqdm import tqdm

from .. import assets
from .._checks import check_choice
from ..data.shapes import BACKGROUNDS, HELDOUT, TRAIN_COMBINATIONS, caption, render, sample_clip, to_tensor
from ..pixels import from_uint8
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


def real_clips(combos: list[tuple], num_frames: int, size: int, seed: int, motion: str = "exit") -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.stack([to_tensor(render(sample_clip(rng, c, size, num_frames, motion), size, num_frames))
                        for c in combos])


def classifier_features(classifier: ShapesClassifier, videos: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat(list(classifier(videos).values()), dim=-1).cpu()


def generate(pipe, combos: list[tuple], num_frames: int, batch: int, progress: bool = False, seed: int = 0,
             **kwargs) -> torch.Tensor:
    """Clips for the canonical captions of ``combos``, ``batch`` prompts a call, each call seeded with
    ``seed * len(combos)`` plus the index of its first clip: reproducible for a given ``batch``, which therefore
    changes the draw, and for one ``len(combos)`` no two ``seed`` values share a sampling seed."""
    out = []
    for i in tqdm(range(0, len(combos), batch), disable=not progress, desc="generate"):
        prompts = [caption(*c) for c in combos[i:i + batch]]
        call_seed = seed * len(combos) + i
        out.append(frames_to_videos(pipe(prompts, num_frames=num_frames, seed=call_seed, **kwargs).frames))
    return torch.cat(out)


def object_fraction(clips: torch.Tensor, combos: list[tuple]) -> torch.Tensor:
    """Per clip, the largest share of a frame's pixels that differ from the prompt's background colour by
    more than a quarter of the range in some channel: (B,) in [0, 1]. A real object covers at most 8 %."""
    bg = from_uint8(torch.tensor([BACKGROUNDS[c[3]] for c in combos]))  # (B, 3)
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
                   progress: bool = False, **kwargs) -> dict:
    """Adherence and Frechet distance for one split. ``seed`` picks the draw: the order of the seen prompts,
    the real clips compared with and the sampling seeds."""
    return evaluate_windows(pipe, classifier, split, n, {"all": slice(None)}, num_frames, batch, seed, progress,
                            **kwargs)["all"]


def evaluate_windows(pipe, classifier, split: str, n: int, windows: dict[str, slice], num_frames: int = 17,
                     batch: int = 16, seed: int = 0, progress: bool = False, **kwargs) -> dict[str, dict]:
    """:func:`evaluate_split` of frame windows of the same clips, e.g. ``{"first": slice(0, 17), "last":
    slice(-17, None)}``: how far a long clip drifts from its start. Each window's Frechet reference is a real
    clip as long as the window (a long clip's later frames have no real counterpart: objects leave the canvas)."""
    combos = eval_combinations(split, n, seed)
    fake = generate(pipe, combos, num_frames, batch, progress, seed, **kwargs)
    real, scores = {}, {}
    for name, frames in windows.items():
        length = len(range(num_frames)[frames])
        if length not in real:
            real[length] = real_clips(combos, length, pipe.video_tokenizer.resolution, seed=seed + 1)
        scores[name] = score(classifier, fake[:, :, frames], combos, real[length])
    return scores


def tokenizer_reference(tokenizer, classifier, n: int, num_frames: int = 17, batch: int = 8, seed: int = 0) -> dict:
    """Real clips of the seen prompts, encoded and decoded, judged like generated ones: what the tokenizer
    alone keeps of each attribute. Not a hard ceiling: guided sampling favours typical, easier-to-read clips."""
    combos = eval_combinations("seen", n, seed)
    size = tokenizer.resolution
    source = real_clips(combos, num_frames, size, seed=seed + 303)  # disjoint from the real set compared with
    recon = torch.cat([tokenizer.decode(tokenizer.encode(v.to(tokenizer.device))).cpu() for v in source.split(batch)])
    return score(classifier, recon, combos, real_clips(combos, num_frames, size, seed=seed + 1))


def real_vs_real(classifier, n: int, num_frames: int, size: int, seed: int = 0) -> float:
    """Frechet distance between two disjoint real sets of the same prompts (the floor to compare with)."""
    combos = eval_combinations("seen", n, seed)
    a, b = real_clips(combos, num_frames, size, seed + 101), real_clips(combos, num_frames, size, seed + 202)
    return frechet_distance(classifier_features(classifier, a), classifier_features(classifier, b))


def load_classifier(path: str | None = None) -> ShapesClassifier:
    return ShapesClassifier.from_pretrained(str(path or assets.path("shapes-classifier"))).eval()
