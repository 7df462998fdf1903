"""``omniar generate``: text -> mp4 / gif / png frames with the embedded default model or a pipeline folder.

One prompt (``--prompt``) or one per line of a text file (``--batch``; blank lines and ``#`` comments
skipped). Every prompt uses the same seed, so a batch output equals the single-prompt run.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tqdm import tqdm

from .._checks import check_output_path, named, require
from .sampling import GUIDANCE_SCHEDULES

FORMATS = {"mp4": ".mp4", "gif": ".gif", "png-frames": ""}
DEFAULT_NAME = "t2v"
_VIDEO_SUFFIXES = {".mp4": "mp4", ".gif": "gif"}


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="what to generate")
    what.add_argument("--batch", help="text file with one prompt per line")
    parser.add_argument("--out", default=None,
                        help="output file, or folder for png-frames (default outputs/t2v + the format's suffix); "
                             "an existing folder or one ending in / gets t2v.mp4 / t2v.gif inside it; "
                             "--batch numbers it: OUT_000, OUT_001, ...")
    parser.add_argument("--format", choices=tuple(FORMATS), default=None,
                        help="mp4, gif or a folder of png frames (default: from --out's suffix, else mp4)")
    parser.add_argument("--model", default=None, help="pipeline folder (default: the embedded shapes-t2v)")
    parser.add_argument("--num-frames", type=int, default=17, help="1 + 4k frames; 1 makes an image")
    parser.add_argument("--guidance-scale", type=float, default=3.0)
    parser.add_argument("--guidance-schedule", default="constant", choices=GUIDANCE_SCHEDULES)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depth", type=int, default=None, help="elastic sub-model: number of layers")
    parser.add_argument("--num-experts", type=int, default=None, help="elastic sub-model: experts per layer")
    parser.add_argument("--experts-top-k", type=int, default=None, help="elastic sub-model: experts per token")
    parser.add_argument("--fps", type=int, default=8)


def output_paths(out: str | None, fmt: str | None, count: int | None) -> tuple[str, list[Path]]:
    """(format, paths): one path for a single prompt (``count=None``), else ``count`` numbered ones, each
    checked to be writable. png-frames writes a folder, so only a video goes *into* a folder ``out``."""
    into_folder = bool(out) and fmt != "png-frames" and (out.endswith(("/", os.sep)) or Path(out).is_dir())
    base = Path(out, DEFAULT_NAME) if into_folder else Path(out if out is not None else f"outputs/{DEFAULT_NAME}")
    # "" has no name to add a suffix to; as png-frames, ".", "/" and ".." name no folder of their own
    require(base.name not in ("", ".."), "out", f"must end in a file or folder name, got {out!r}")
    implied = _VIDEO_SUFFIXES.get(base.suffix.lower())
    if implied is not None:
        require(fmt in (None, implied), "format", f"{fmt} conflicts with --out {base.name!r}; drop the suffix "
                "or make them agree")
        fmt, base = implied, base.with_suffix("")
    fmt = fmt or "mp4"
    suffix = FORMATS[fmt]
    names = [base.name] if count is None else [f"{base.name}_{i:03d}" for i in range(count)]
    return fmt, [check_output_path(base.with_name(name + suffix), "out", folder=fmt == "png-frames")
                 for name in names]


def read_prompts(path: str) -> list[str]:
    """Non-blank, non-comment lines of a prompt file."""
    file = Path(path)
    require(file.is_file(), "batch", f"file not found: {path}")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"batch: {path} is not UTF-8 text") from err
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    require(len(prompts) > 0, "batch", f"{path} holds no prompts")
    return prompts


def write_png_frames(folder: Path, frames) -> Path:
    """frame_000.png, frame_001.png, ... in ``folder``; earlier frame_*.png there are removed first."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("frame_*.png"):  # a longer earlier clip must not leave frames behind
        old.unlink()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"frame_{i:03d}.png")
    return folder


def cli_main(args: argparse.Namespace) -> int:
    from ..backbone.elastic import resolve_elastic
    from ..data.video_io import check_fps, write_video
    from .pipeline import TextToVideoPipeline

    # everything that can be checked without the model fails before it loads
    prompts = [args.prompt] if args.batch is None else read_prompts(args.batch)
    fmt, paths = output_paths(args.out, args.format, None if args.batch is None else len(prompts))
    check_fps(args.fps)
    with named("model"):
        pipe = TextToVideoPipeline.from_pretrained(args.model)
    batch = args.batch is not None
    for number, prompt in enumerate(prompts, 1):  # all of them before the first clip is written
        try:
            pipe.check_prompts(prompt)
        except ValueError as err:
            raise ValueError(f"batch: prompt {number}: {err}" if batch else str(err)) from None
    # checked here, not per prompt, and named as the flags: --experts-top-k is the pipeline's elastic top_k
    resolve_elastic(pipe.model.omniar_config, args.depth, args.num_experts, args.experts_top_k,
                    names=("depth", "num_experts", "experts_top_k"))
    elastic = {k: v for k, v in (("depth", args.depth), ("num_experts", args.num_experts),
                                 ("top_k", args.experts_top_k)) if v is not None}
    for prompt, path in tqdm(list(zip(prompts, paths)), desc="prompts", disable=not batch):
        # the prompts are checked and the other settings are the same for each: a bad one fails the first call
        out = pipe(prompt, num_frames=args.num_frames, guidance_scale=args.guidance_scale,
                   guidance_schedule=args.guidance_schedule, top_k=args.top_k, top_p=args.top_p,
                   temperature=args.temperature, seed=args.seed, elastic=elastic or None, progress=not batch)
        try:
            written = (write_png_frames(path, out.frames[0]) if fmt == "png-frames"
                       else write_video(path, out.frames[0], fps=args.fps))
        except OSError as err:
            raise ValueError(f"out: cannot write {path}: {err.strerror or err}") from err
        t = out.timings
        tqdm.write(f"wrote {written} ({t['forward_passes']} forward passes, {t['generate_s']:.2f} s, "
                   f"{t['tokens_per_s']:.0f} tokens/s)")
    return 0
