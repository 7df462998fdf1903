"""``omniar reconstruct``: tokenize a Moving Shapes clip and write original | reconstruction | coarse previews."""

from __future__ import annotations

import argparse


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="tokenizer folder (default: the shipped shapes-tokenizer)")
    parser.add_argument("--out", default="outputs/reconstruction.mp4", help="output .mp4 or .gif")
    parser.add_argument("--seed", type=int, default=0, help="which held-out clip to render")


def cli_main(args: argparse.Namespace) -> int:
    import torch

    from .. import assets
    from .._checks import check_int, named
    from ..data.shapes import MovingShapes
    from ..data.video_io import check_video_path, write_video
    from ..eval.metrics import psnr
    from ..pixels import to_uint8
    from ..tokenizers import VideoTokenizer

    check_int(args.seed, "seed", 0)
    out = check_video_path(args.out, "out")
    with named("model"):
        tok = VideoTokenizer.from_pretrained(str(args.model or assets.path("shapes-tokenizer"))).eval()
    n = tok.config.temporal_compression * 4 + 1
    item = MovingShapes("heldout", args.seed + 1, tok.resolution, n, seed=1234)[args.seed]
    video = item["video"][None]
    codes = tok.encode(video)
    *previews, full = tok.decode_previews(codes)
    panels = [video, full, *previews]
    frames = to_uint8(torch.cat(panels, dim=-1)[0]).permute(1, 2, 3, 0).numpy()
    write_video(out, frames, fps=8)
    print(f"caption: {item['caption']}")
    print(f"PSNR {float(psnr(panels[1], video).mean()):.2f} dB; panels: original | reconstruction | "
          f"scales <= {', '.join(tok.scale_names[:-1])}")
    print(f"wrote {out}")
    return 0
