"""``omniar train classifier``: train the Moving Shapes attribute classifier and report its accuracy on real clips."""

from __future__ import annotations

import argparse

from ..data.shapes import CLIP_MOTIONS


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="omniar/assets/shapes-classifier", help="folder for the trained weights")
    parser.add_argument("--steps", type=int, default=1500, help="optimisation steps")
    parser.add_argument("--batch-size", type=int, default=64, help="clips per step")
    parser.add_argument("--clips", type=int, default=8000, help="real training clips, rendered once")
    parser.add_argument("--motion", choices=CLIP_MOTIONS, default="exit",
                        help="Moving Shapes motion of the training clips: wrap trains a judge of long clips, whose "
                             "objects re-enter at the opposite edge (it is scored on both motions)")
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")


def cli_main(args: argparse.Namespace) -> int:
    import torch

    from .._checks import check_device, check_output_path
    from ..data.shapes import MovingShapes
    from ..eval.shapes_classifier import prompt_adherence
    from ..train.classifier import train_classifier

    out = check_output_path(args.out, "out", folder=True)  # before minutes of training
    device = check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = train_classifier(args.steps, args.batch_size, args.clips, device=str(device), motion=args.motion)
    for motion in ("exit", "wrap") if args.motion == "wrap" else ("exit",):
        test = MovingShapes("all", 256, seed=777, motion=motion)
        videos = torch.stack([test[i]["video"] for i in range(256)])
        accuracy = prompt_adherence(model, videos, [test[i]["attributes"] for i in range(256)])
        print(f"accuracy on 256 real {motion} clips: all {accuracy['all']:.3f}, "
              + ", ".join(f"{k} {accuracy[k]:.3f}" for k in ("color", "shape", "direction", "background")))
    model.cpu().save_pretrained(out)
    print(f"wrote {out}")
    return 0
