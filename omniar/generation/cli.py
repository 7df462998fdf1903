"""``omniar generate``: text -> mp4 / gif with the embedded default model or a pipeline folder."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prompt", required=True, help="what to generate")
    parser.add_argument("--out", default="outputs/t2v.mp4", help="output file (.mp4 or .gif)")
    parser.add_argument("--model", default=None, help="pipeline folder (default: the embedded shapes-t2v)")
    parser.add_argument("--num-frames", type=int, default=17, help="1 + 4k frames; 1 makes an image")
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--guidance-schedule", default="constant", choices=("constant", "linear"))
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depth", type=int, default=None, help="elastic sub-model: number of layers")
    parser.add_argument("--num-experts", type=int, default=None, help="elastic sub-model: experts per layer")
    parser.add_argument("--experts-top-k", type=int, default=None, help="elastic sub-model: experts per token")
    parser.add_argument("--fps", type=int, default=8)


def cli_main(args: argparse.Namespace) -> int:
    from ..data.video_io import write_video
    from .pipeline import TextToVideoPipeline

    pipe = TextToVideoPipeline.from_pretrained(args.model)
    elastic = {k: v for k, v in (("depth", args.depth), ("num_experts", args.num_experts),
                                 ("top_k", args.experts_top_k)) if v is not None}
    out = pipe(args.prompt, num_frames=args.num_frames, guidance_scale=args.guidance_scale,
               guidance_schedule=args.guidance_schedule, top_k=args.top_k, top_p=args.top_p,
               temperature=args.temperature, seed=args.seed, elastic=elastic or None, progress=True)
    path = write_video(Path(args.out), out.frames[0], fps=args.fps)
    t = out.timings
    print(f"{t['forward_passes']} forward passes, {t['generate_s']:.2f} s, {t['tokens_per_s']:.0f} tokens/s")
    print(f"wrote {path}")
    return 0
