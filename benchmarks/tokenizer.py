"""Shipped tokenizer on held-out Moving Shapes clips: PSNR / SSIM, per-scale PSNR, codebook usage, the
attributes the shipped classifier still reads in the reconstructions (PSNR barely sees a square turned blob) and in
each coarse-to-fine preview (does it keep the background and the object's colour?), speed.

    python benchmarks/tokenizer.py [--model DIR] [--clips 64] [--device cuda] [--out benchmarks/results/tokenizer.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from moe import sync  # CUDA kernels are asynchronous: time them to completion
from omniar import assets
from omniar.data.shapes import MovingShapes
from omniar.eval.metrics import psnr, ssim
from omniar.eval.shapes_classifier import prompt_adherence
from omniar.eval.t2v import load_classifier
from omniar.tokenizers import VideoTokenizer, scale_names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="tokenizer folder (default: shipped shapes-tokenizer)")
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seed", type=int, default=2024, help="evaluation set seed (never used in training)")
    parser.add_argument("--device", default="cpu", help="fp32 on any device (CUDA: for judging GPU training runs)")
    parser.add_argument("--out", default="benchmarks/results/tokenizer.json")
    args = parser.parse_args()

    device = torch.device(args.device)
    tok = VideoTokenizer.from_pretrained(str(args.model or assets.path("shapes-tokenizer"))).eval().to(device)
    data = MovingShapes("heldout", args.clips, tok.resolution, args.frames, seed=args.seed)
    n_scales = len(tok.scales)
    per_scale = [[] for _ in range(n_scales)]
    previews = [[] for _ in range(n_scales - 1)]
    psnrs, ssims, used, recs, attributes = [], [], set(), [], []
    enc_s = dec_s = 0.0
    for start in range(0, args.clips, args.batch):
        items = [data[i] for i in range(start, min(start + args.batch, args.clips))]  # each clip rendered once
        video = torch.stack([it["video"] for it in items]).to(device)
        attributes += [it["attributes"] for it in items]
        t0 = time.perf_counter()
        codes = tok.encode(video)
        sync(device)
        t1 = time.perf_counter()
        rec = tok.decode(codes)
        sync(device)
        t2 = time.perf_counter()
        enc_s, dec_s = enc_s + t1 - t0, dec_s + t2 - t1
        recs.append(rec.cpu())
        psnrs.append(psnr(rec, video).cpu())
        ssims.append(ssim(rec, video).cpu())
        for s in range(n_scales - 1):  # the last "partial" decode is the full one above
            preview = tok.decode_partial(codes, s)
            per_scale[s].append(psnr(preview, video).cpu())
            previews[s].append(preview.cpu())
        per_scale[-1].append(psnrs[-1])
        for c in codes.codes:
            used.update(c.unique().tolist())
    frames = args.clips * args.frames
    classifier = load_classifier()
    keys = scale_names(tok.scales, side_for_square=True)
    result = {
        "clips": args.clips, "frames_per_clip": args.frames, "resolution": tok.resolution, "split": "heldout",
        "psnr_db": float(torch.cat(psnrs).mean()),
        "ssim": float(torch.cat(ssims).mean()),
        "codebook_usage": len(used) / tok.config.codebook_size,
        "attributes_kept": prompt_adherence(classifier, torch.cat(recs), attributes),
        "psnr_per_scale_db": {key: float(torch.cat(v).mean()) for key, v in zip(keys, per_scale)},
        # per preview (scales 0..s)
        "preview_attributes_kept": {key: prompt_adherence(classifier, torch.cat(v), attributes)
                                    for key, v in zip(keys, previews)},
        "encode_frames_per_s": frames / enc_s,
        "decode_frames_per_s": frames / dec_s,
        "encode_decode_frames_per_s": frames / (enc_s + dec_s),
        "tokens_per_clip": tok.num_latent_frames(args.frames) * tok.tokens_per_frame,
        "machine": (torch.cuda.get_device_name(device) if device.type == "cuda" else
                    f"{platform.machine()} {torch.get_num_threads()} threads, CPU") + f", torch {torch.__version__}",
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
