"""``omniar data shapes``: write Moving Shapes clips as a captioned video folder (mp4 files + ``captions.jsonl``)
that :class:`omniar.data.VideoFolderDataset` and the trainers' ``dataset: video_folder`` read."""

from __future__ import annotations

import argparse
import re

from ..data.shapes import MOTIONS

CAPTIONS = "captions.jsonl"


def parse_size(text: str) -> tuple[int, int]:
    """``"HxW"`` (or one side ``"N"`` for a square) -> ``(height, width)``; the sides are checked by the renderer."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if m is None:
        raise ValueError(f"size: must be HxW (height x width, e.g. 64x112) or one side, got {text!r}")
    height = int(m.group(1))
    return height, int(m.group(2) or height)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="new (or empty) folder for the clips and captions.jsonl")
    parser.add_argument("--size", required=True,
                        help="HxW in pixels (e.g. 64x112), sides multiples of 16 in [32, 1024], aspect ratio <= 4")
    parser.add_argument("--clips", type=int, required=True, help="number of clips")
    parser.add_argument("--frames", type=int, default=17, help="frames per clip")
    parser.add_argument("--fps", type=int, default=8, help="frame rate stored in the mp4 files")
    parser.add_argument("--seed", type=int, default=0, help="clip i is Moving Shapes item i of this seed")
    parser.add_argument("--split", default="train", choices=("train", "heldout", "all"),
                        help="attribute combinations: train (all but the 12 held out), heldout or all")
    parser.add_argument("--motion", default="exit", choices=MOTIONS,
                        help="exit: the object stays inside the canvas (clips of at most 35 frames at 64 px); "
                             "wrap: it re-enters at the opposite edge (any number of frames); mixed: half each")


def cli_main(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .._checks import check_int, check_output_path, named, require
    from .._pretrained import write_folder_atomically
    from ..data.shapes import MovingShapes, caption, canvas, render
    from ..data.video_folder import MAX_ASPECT
    from ..data.video_io import check_fps, write_video

    # Every argument is checked before a clip is rendered.
    height, width = canvas(parse_size(args.size))
    require(max(height, width) <= MAX_ASPECT * min(height, width), "size",
            f"aspect ratio of {height}x{width} is over {MAX_ASPECT:g}: VideoFolderDataset would skip every clip")
    check_int(args.clips, "clips", 1)
    check_int(args.seed, "seed", 0)
    check_fps(args.fps, "fps")
    check_int(args.frames, "frames", 1)
    with named("frames"):  # the one check left: frames that fit the canvas's motion
        shapes = MovingShapes(args.split, args.clips, (height, width), args.frames, seed=args.seed,
                              motion=args.motion)
    out = check_output_path(args.out, "out", folder=True).resolve()  # a name to write beside, even for "."
    # The folder is written aside and swapped in, which replaces what is there: only an empty one may be reused.
    require(not out.exists() or not any(out.iterdir()), "out", f"{out} is not empty; choose a new folder")

    def write(folder: Path) -> None:
        (folder / "clips").mkdir(parents=True)
        lines = []
        for i in range(args.clips):
            clip, template = shapes.clip(i)  # what shapes[i] renders, kept as uint8 for the encoder
            name = f"clips/{i:06d}.mp4"
            write_video(folder / name, render(clip, (height, width), args.frames), fps=args.fps)
            lines.append(json.dumps({"video": name, "caption": caption(**clip.attributes, template=template)}))
        (folder / CAPTIONS).write_text("\n".join(lines) + "\n", encoding="utf-8")

    write_folder_atomically(out, write)
    print(f"wrote {args.clips} clips ({height}x{width}, {args.frames} frames at {args.fps} fps) "
          f"and {CAPTIONS} to {out}")
    return 0
