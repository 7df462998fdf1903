"""Where a tokenizer's full decodes lose the object's shape: its codes, or its decoder? The same decoder (and
refiner) decodes the held-out clips' latents quantized several ways, and the shipped classifier reads the
attributes of each:

- ``codes``: the tokenizer's own codes (what the AR model learns);
- ``unquantized``: the encoder's latents themselves (no quantizer: the decoder's ceiling);
- ``last_kmeans_K``: the last scale's residuals quantized by a K-means table of K codes fitted on training-split
  residuals of that scale (coarser scales unchanged): what a larger codebook for the finest scale would give;
- ``scales_...``: another schedule of square scales with the tokenizer's tables and refinement convs, e.g. the
  last scale twice (``1,2,4,8,8``: a second residual step on what its codes left unexplained) or a 6x6 step
  before it (``1,2,4,6,8``).

The decoder was trained on its own codes' sums, so each row is a lower bound of what a tokenizer trained that way
would reach. No tokenizer weight changes.

    python benchmarks/quantization_headroom.py --model weights/tokenizer_A15r \
        --out benchmarks/results/quantization_headroom_A15r.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
import torch.nn.functional as F

from omniar.data.shapes import MovingShapes
from omniar.eval.metrics import psnr
from omniar.eval.shapes_classifier import prompt_adherence
from omniar.eval.t2v import load_classifier
from omniar.tokenizers import VideoTokenizer
from omniar.tokenizers.quantizer import kmeans, nearest_code, resize


def frames_of(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, t, h, w) -> (B t, C, h, w), the quantizer's per-frame maps."""
    return latent.transpose(1, 2).flatten(0, 1)


@torch.no_grad()
def quantize(tok: VideoTokenizer, latent: torch.Tensor, sizes: list[tuple[int, int]] | None = None,
             last_table: torch.Tensor | None = None) -> torch.Tensor:
    """``latent`` (B, C, t, h, w) through the tokenizer's quantizer over the scale ``sizes`` (default: its own),
    each step embedded as the quantizer embeds its own codes, with the refinement conv of the tokenizer's scale
    nearest in size (the finer on a tie) and the first scale's table at step 0; the last step's codes drawn from
    ``last_table`` when given. Returns the quantized latent in the same layout."""
    q = tok.quantizer
    sizes = list(q.shapes) if sizes is None else sizes
    f = frames_of(latent).float()
    f_hat = torch.zeros_like(f)
    for s, size in enumerate(sizes):
        r = resize(f - f_hat, size)
        table = last_table if s == len(sizes) - 1 and last_table is not None else q.table(min(s, 1))
        trained = min(range(len(q.shapes)), key=lambda i: (abs(q.shapes[i][0] - size[0]), -i))
        f_hat = f_hat + q.embed_vectors(F.embedding(nearest_code(r, table), table).permute(0, 3, 1, 2), trained)
    b, t = latent.shape[0], latent.shape[2]
    return f_hat.unflatten(0, (b, t)).transpose(1, 2)


@torch.no_grad()
def last_residuals(tok: VideoTokenizer, clips: int, frames: int, seed: int, batch: int) -> torch.Tensor:
    """The last scale's residual vectors (N, C) of ``clips`` training-split clips under the tokenizer's codes."""
    data = MovingShapes("train", clips, tok.resolution, frames, seed=seed)
    coarse, out = list(tok.quantizer.shapes[:-1]), []
    for start in range(0, clips, batch):
        video = torch.stack([data[i]["video"] for i in range(start, min(start + batch, clips))])
        latent = tok.encode_latent(video)
        residual = frames_of(latent).float() - frames_of(quantize(tok, latent, coarse))
        out.append(residual.permute(0, 2, 3, 1).flatten(0, 2))
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="tokenizer folder")
    parser.add_argument("--clips", type=int, default=128, help="held-out clips (the selection set: seed 3031)")
    parser.add_argument("--seed", type=int, default=3031)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--train-clips", type=int, default=256, help="training clips for the K-means tables")
    parser.add_argument("--kmeans", type=int, nargs="*", default=[1024, 4096], metavar="K")
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--schedules", nargs="*", default=[[1, 2, 4, 8, 8], [1, 2, 4, 6, 8]], metavar="SIDES",
                        type=lambda v: [int(n) for n in v.split(",")],
                        help="other square scale schedules, quantized with the tokenizer's tables and convs")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", default="benchmarks/results/quantization_headroom.json")
    args = parser.parse_args()

    tok = VideoTokenizer.from_pretrained(args.model).eval()
    generator = torch.Generator().manual_seed(0)
    residuals = last_residuals(tok, args.train_clips, args.frames, seed=1, batch=args.batch)
    tables = {k: kmeans(residuals, k, generator, args.iterations) for k in args.kmeans}
    arms = {"codes": {}, "unquantized": None}
    arms |= {"scales_" + "_".join(map(str, sides)): {"sizes": [(n, n) for n in sides]} for sides in args.schedules}
    arms |= {f"last_kmeans_{k}": {"last_table": table} for k, table in tables.items()}
    data = MovingShapes("heldout", args.clips, tok.resolution, args.frames, seed=args.seed)
    decoded = {name: [] for name in arms}
    scores = {name: [] for name in arms}
    attributes = []
    for start in range(0, args.clips, args.batch):
        items = [data[i] for i in range(start, min(start + args.batch, args.clips))]
        video = torch.stack([it["video"] for it in items])
        attributes += [it["attributes"] for it in items]
        latent = tok.encode_latent(video)
        for name, options in arms.items():
            z = latent if options is None else quantize(tok, latent, **options)
            rec = tok.decode_latent(z)
            decoded[name].append(rec)
            scores[name].append(psnr(rec, video))
    classifier = load_classifier()
    result = {
        "model": args.model, "clips": args.clips, "seed": args.seed, "train_clips": args.train_clips,
        "last_scale_residual_vectors": residuals.shape[0], "kmeans_iterations": args.iterations,
        "arms": {name: {"psnr_db": float(torch.cat(scores[name]).mean())}
                 | prompt_adherence(classifier, torch.cat(decoded[name]), attributes) for name in arms},
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for name, row in result["arms"].items():
        print(f"{name:<18} PSNR {row['psnr_db']:.2f} dB  all {row['all']:.1%}  shape {row['shape']:.1%}")


if __name__ == "__main__":
    main()
