"""Do a tokenizer's coarse scales carry the object's colour? Two reads per coarse prefix (scales <= s):

- in pixels: the mean colour of the decoded preview over the real object's pixels, matched to the nearest
  object colour of the palette (what a viewer of the preview sees); and where the preview paints: the R^2 of the
  object's first-frame centroid by the centroid of the preview's squared difference from the background (below
  0 when it paints in one place whatever the object's);
- in the codes: a linear probe (multinomial logistic regression) from the prefix's accumulated latent of the
  first latent frame to the object's colour, fitted on training-split clips, scored on held-out ones. If the
  probe is at chance, no decoder can paint the colour from that prefix: the codes must change;
- of the first scale's code maps of the held-out clips: how many distinct ones there are, and how often the
  majority colour of the clips sharing a map is the clip's own (the most any decoder can show from those codes
  alone, read in-sample), and how much of the object's place (its centroid in the first frame) the maps hold:
  the in-sample R^2 of each map's mean centroid, beside the R^2 of the same maps dealt to the clips at random
  (what fitting that many groups gives by itself);
- with ``--bound``: the most a preview decoder can show at <= the first scale. It sees only each latent frame's
  first-scale code map (and the earlier frames'), so under an object-weighted squared error the best it can paint
  for a map is the weighted mean of the frames of the training clips that share it (conditioned here on each latent
  frame's own map: exact for the first latent frame, an estimate after it). That bound is read on held-out
  clips like ``benchmarks/tokenizer.py`` and the pixel read above (PSNR, the colour over the object's pixels of
  every frame), for several object weights, with the held-out R^2 of the first frame's place by its map.

    python benchmarks/preview_information.py [--model DIR] [--bound] [--out benchmarks/results/preview_information.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from omniar import assets
from omniar.data.shapes import BACKGROUNDS, COLORS, MovingShapes
from omniar.eval.metrics import psnr
from omniar.tokenizers import VideoTokenizer, scale_names

NAMES = list(COLORS)
PALETTE = torch.tensor([COLORS[c] for c in NAMES], dtype=torch.float32) / 127.5 - 1  # [-1, 1], as the clips


@torch.no_grad()
def prefix_reads(tok: VideoTokenizer, split: str, clips: int, frames: int, seed: int, batch: int = 16):
    """Per coarse prefix s: (first-latent-frame accumulated latents (N, D), pixel colour reads right (N,),
    painted centroids (N, 2)), the colour labels (N,), the first latent frame's scale-0 code map of each clip
    (N tuples) and the object's centroid (row, column) in the first frame (N, 2)."""
    n_prefix = len(tok.scales) - 1
    latents, right, painted = ([[] for _ in range(n_prefix)] for _ in range(3))
    labels, first, places = [], [], []
    for video, label, mask, bg in batches(tok, split, clips, frames, seed, batch):
        labels.append(label)
        codes = tok.encode(video)
        first += [tuple(row) for row in codes.codes[0][:, 0].flatten(1).tolist()]
        places.append(centroid(mask[:, 0, 0]))
        for s in range(n_prefix):
            latents[s].append(tok._codes_to_latent(codes, s)[:, :, 0].flatten(1))
            preview = tok.decode_partial(codes, s)
            right[s].append(colour_right(preview, mask, label))
            painted[s].append(centroid((preview[:, :, 0] - bg[:, :, None, None]).square().sum(1)))
    return ([torch.cat(x) for x in latents], [torch.cat(r) for r in right], [torch.cat(p) for p in painted],
            torch.cat(labels), first, torch.cat(places))


def batches(tok: VideoTokenizer, split: str, clips: int, frames: int, seed: int, batch: int):
    """Moving Shapes clips in batches: (video (B, 3, T, H, W), colour labels (B,), the object's mask
    (B, 1, T, H, W), the background colour (B, 3))."""
    data = MovingShapes(split, clips, tok.resolution, frames, seed=seed)
    for start in range(0, clips, batch):
        items = [data[i] for i in range(start, min(start + batch, clips))]
        video = torch.stack([it["video"] for it in items])
        attrs = [it["attributes"] for it in items]
        bg = torch.stack([torch.tensor(BACKGROUNDS[a["background"]], dtype=torch.float32) / 127.5 - 1 for a in attrs])
        mask = ((video - bg[:, :, None, None, None]).abs().sum(1, keepdim=True) > 0.5).float()
        yield video, torch.tensor([NAMES.index(a["color"]) for a in attrs]), mask, bg


def centroid(weights: torch.Tensor) -> torch.Tensor:
    """(row, column) centroid (B, 2) of non-negative ``weights`` (B, H, W)."""
    rows, cols = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in weights.shape[1:]), indexing="ij")
    return (torch.stack([(weights * rows).sum((1, 2)), (weights * cols).sum((1, 2))], 1)
            / weights.sum((1, 2)).clamp(min=1e-8)[:, None])


def colour_right(video: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) bool: the mean colour of ``video`` over the object's pixels is nearest its own palette colour."""
    mean = (video * mask).sum((2, 3, 4)) / mask.sum((2, 3, 4)).clamp(min=1)
    return torch.cdist(mean, PALETTE).argmin(1) == labels


@torch.no_grad()
def first_code_bound(tok: VideoTokenizer, train_clips: int, test_clips: int, frames: int,
                     weights: list[float], batch: int = 32) -> dict:
    """The best preview at <= the first scale under each object weight w (pixels weighted 1 + w on the object):
    per latent frame, each first-scale code map's weighted mean frames over the training clips sharing it (maps
    no training clip has: the mean over all of them), read on held-out clips."""
    def load(split: str, clips: int, seed: int):
        parts = [(video, tok.encode(video).codes[0].flatten(2), label, mask)
                 for video, label, mask, _ in batches(tok, split, clips, frames, seed, batch)]
        return [torch.cat(p) for p in zip(*parts)]

    train_video, train_maps, _, train_mask = load("train", train_clips, 11)
    video, maps, labels, mask = load("heldout", test_clips, 12)
    tau = tok.config.temporal_compression
    reads = {}
    for w in weights:
        best = torch.empty_like(video)
        for j in range(maps.shape[1]):  # latent frame j covers frames [a, b)
            a, b = (0, 1) if j == 0 else (1 + tau * (j - 1), 1 + tau * j)
            best[:, :, a:b] = shared_mean(train_maps[:, j], maps[:, j], train_video[:, :, a:b],
                                          1 + w * train_mask[:, :, a:b])
        reads[f"object_weight_{w:g}"] = {"psnr_db": float(psnr(best, video).mean()),
                                         "colour_kept": float(colour_right(best, mask, labels).float().mean())}
    train_places, places = centroid(train_mask[:, 0, 0]), centroid(mask[:, 0, 0])
    predicted = shared_mean(train_maps[:, 0], maps[:, 0], train_places, torch.ones(len(train_places), 1))
    return {"train_clips": train_clips, "test_clips": test_clips, "frames": frames, "bound": reads,
            "place_r2_heldout": r2(predicted, places),
            "maps_in_use": len(torch.cat([train_maps[:, 0], maps[:, 0]]).unique(dim=0))}


def shared_mean(train_keys: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                weight: torch.Tensor) -> torch.Tensor:
    """For each row of ``keys`` (N, K): the ``weight``-ed mean of ``values`` (M, ...) over the training rows whose
    key (``train_keys``, (M, K)) is the same, or over all of them when none is."""
    overall = (values * weight).sum(0) / weight.sum(0)
    out = overall.new_empty(len(keys), *overall.shape)
    for key in keys.unique(dim=0):
        share = (train_keys == key).all(1)
        out[(keys == key).all(1)] = ((values[share] * weight[share]).sum(0) / weight[share].sum(0)
                                     if share.any() else overall)
    return out


def r2(predicted: torch.Tensor, true: torch.Tensor) -> float:
    """1 - squared error / variance of ``true`` (N, 2), no fit."""
    return 1 - float((predicted - true).square().sum()) / float((true - true.mean(0)).square().sum())


def place_r2(maps: list[tuple], places: torch.Tensor) -> float:
    """In-sample R^2 of ``places`` (N, 2) predicted by the mean place of the clips sharing each one's map."""
    groups = collections.defaultdict(list)
    for i, m in enumerate(maps):
        groups[m].append(i)
    predicted = places.clone()
    for i in map(torch.tensor, groups.values()):
        predicted[i] = places[i].mean(0)
    return r2(predicted, places)


def code_map_reads(maps: list[tuple], labels: torch.Tensor, places: torch.Tensor) -> dict[str, float]:
    """Distinct code maps, the share of clips whose colour is the majority colour of their map's clips, and the
    place R^2 of the maps and of the same maps dealt at random."""
    groups = collections.defaultdict(collections.Counter)
    for m, y in zip(maps, labels.tolist()):
        groups[m][y] += 1
    best = sum(max(c.values()) for c in groups.values())
    dealt = [maps[i] for i in torch.randperm(len(maps), generator=torch.Generator().manual_seed(0)).tolist()]
    return {"distinct_maps": len(groups), "majority_colour_right": best / len(maps),
            "place_r2": place_r2(maps, places), "place_r2_random_maps": place_r2(dealt, places)}


def probe_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                   l2: float = 1e-3) -> tuple[float, float]:
    """(train, test) accuracy of an L2-regularised multinomial logistic regression (L-BFGS, standardised inputs)."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    w = torch.zeros(a.shape[1], len(NAMES), requires_grad=True)
    bias = torch.zeros(len(NAMES), requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], max_iter=300)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(a @ w + bias, train_y) + l2 * w.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return (float(((a @ w + bias).argmax(1) == train_y).float().mean()),
                float(((b @ w + bias).argmax(1) == test_y).float().mean()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="tokenizer folder (default: shipped shapes-tokenizer)")
    parser.add_argument("--train-clips", type=int, default=1024)
    parser.add_argument("--test-clips", type=int, default=256)
    parser.add_argument("--frames", type=int, default=5, help="clip length (the probe reads the first latent frame)")
    parser.add_argument("--bound", action="store_true",
                        help="read only the bound on any preview decoder at <= the first scale")
    parser.add_argument("--bound-train-clips", type=int, default=1536)
    parser.add_argument("--bound-test-clips", type=int, default=128)
    parser.add_argument("--bound-frames", type=int, default=17)
    parser.add_argument("--bound-weights", type=float, nargs="+", default=[5, 7, 9, 11])
    parser.add_argument("--out", default="benchmarks/results/preview_information.json")
    args = parser.parse_args()

    tok = VideoTokenizer.from_pretrained(str(args.model or assets.path("shapes-tokenizer"))).eval().float()
    result = {"model": args.model or "shapes-tokenizer",
              "machine": f"{platform.machine()} {torch.get_num_threads()} threads, CPU, torch {torch.__version__}"}
    result |= (first_code_bound(tok, args.bound_train_clips, args.bound_test_clips, args.bound_frames,
                                args.bound_weights) if args.bound else information_reads(tok, args))
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def information_reads(tok: VideoTokenizer, args: argparse.Namespace) -> dict:
    """The pixel reads and the linear probe per coarse prefix, and the first scale's code maps."""
    train_lat, _, _, train_y, _, _ = prefix_reads(tok, "train", args.train_clips, args.frames, seed=11)
    test_lat, test_right, test_painted, test_y, test_maps, test_places = prefix_reads(
        tok, "heldout", args.test_clips, args.frames, seed=12)
    keys = scale_names(tok.scales, side_for_square=True)[:-1]
    rows = {}
    for s, key in enumerate(keys):
        fit, held = probe_accuracy(train_lat[s], train_y, test_lat[s], test_y)
        rows[key] = {"pixel_colour_right": float(test_right[s].float().mean()),
                     "pixel_place_r2": r2(test_painted[s], test_places), "probe_train_accuracy": fit,
                     "probe_test_accuracy": held}
    return {"train_clips": args.train_clips, "test_clips": args.test_clips, "frames": args.frames,
            "chance": 1 / len(NAMES), "prefix": rows,
            "first_scale_codes": code_map_reads(test_maps, test_y, test_places)}


if __name__ == "__main__":
    main()
