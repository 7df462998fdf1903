"""``omniar generate``: text -> mp4 / gif / png frames (or, for one frame, png / jpg / webp) with the embedded
default model or a pipeline folder.

One prompt (``--prompt``) or one per line of a text file (``--batch``; blank lines and ``#`` comments
skipped). Every prompt uses the same seed, so a batch output equals the single-prompt run.
Long clips: ``--kv-budget`` bounds the KV cache (and lifts the frame limit), ``--stream`` writes the mp4 as
frames are made; ``--init-video`` / ``--init-image`` continue given frames.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from .._checks import check_int, check_output_path, named, require
from ..backbone.attention import KV_POLICIES, KV_ROPE_MODES
from ..generation.pipeline import CALL_DEFAULTS
from ..generation.sampling import GUIDANCE_SCHEDULES
from ._device import add_device_arguments, chosen_device, place

FORMATS = {"mp4": ".mp4", "gif": ".gif", "png-frames": "", "png": ".png", "jpg": ".jpg", "webp": ".webp"}
IMAGE_FORMATS = ("png", "jpg", "webp")  # one frame: --num-frames 1
DEFAULT_NAME = "t2v"
_SUFFIXES = {".mp4": "mp4", ".gif": "gif", ".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="what to generate")
    what.add_argument("--batch", help="text file with one prompt per line")
    parser.add_argument("--out", default=None,
                        help="output file, or folder for png-frames (default outputs/t2v + the format's suffix); "
                             "an existing folder or one ending in / gets t2v.mp4 / t2v.gif inside it; "
                             "--batch numbers it: OUT_000, OUT_001, ...")
    parser.add_argument("--format", choices=tuple(FORMATS), default=None,
                        help="mp4, gif, a folder of png frames, or for --num-frames 1 an image: png, jpg, webp "
                             "(default: from --out's suffix, else mp4)")
    parser.add_argument("--gif", dest="format", action="store_const", const="gif", help="same as --format gif")
    parser.add_argument("--model", default=None, help="pipeline folder (default: the embedded shapes-t2v)")
    parser.add_argument("--num-frames", type=int, default=CALL_DEFAULTS["num_frames"],
                        help="1 + 4k frames; 1 makes an image")
    parser.add_argument("--guidance-scale", type=float, default=CALL_DEFAULTS["guidance_scale"],
                        help="classifier-free guidance; 1 = off")
    parser.add_argument("--guidance-schedule", default=CALL_DEFAULTS["guidance_schedule"], choices=GUIDANCE_SCHEDULES,
                        help="linear ramps guidance up from 1 at the coarsest scale")
    parser.add_argument("--top-k", type=int, default=CALL_DEFAULTS["top_k"],
                        help="sample from the k likeliest codes; 0 = off")
    parser.add_argument("--top-p", type=float, default=CALL_DEFAULTS["top_p"], help="nucleus sampling; 1 = off")
    parser.add_argument("--temperature", type=float, default=CALL_DEFAULTS["temperature"], help="0 = greedy")
    parser.add_argument("--seed", type=int, default=CALL_DEFAULTS["seed"], help="the same seed gives the same clip")
    parser.add_argument("--depth", type=int, default=None, help="elastic sub-model: number of layers")
    parser.add_argument("--num-experts", type=int, default=None, help="elastic sub-model: experts per layer")
    parser.add_argument("--experts-top-k", type=int, default=None, help="elastic sub-model: experts per token")
    parser.add_argument("--fps", type=int, default=8, help="frames per second of a video")
    parser.add_argument("--upscale", type=int, default=1, metavar="N",
                        help="enlarge each frame N times (nearest neighbour: sharp pixels)")
    add_device_arguments(parser)
    long = parser.add_argument_group("long video (docs/long_video.md)")
    long.add_argument("--kv-budget", type=int, default=None, metavar="TOKENS",
                      help="visual tokens each layer's KV cache may hold (half a 33-frame cache, "
                           "pipe.cache_tokens() // 2, keeps quality: docs/long_video.md); lifts --num-frames to 1025")
    long.add_argument("--kv-policy", choices=KV_POLICIES, default=None,
                      help="how a budgeted cache makes room: window or nacl (default with a budget: the pipeline's)")
    long.add_argument("--random-ratio", type=float, default=CALL_DEFAULTS["random_ratio"],
                      help="nacl: share of evictions drawn at random")
    long.add_argument("--kv-rope", choices=KV_ROPE_MODES, default=None,
                      help="temporal positions of kept keys (default with a budget: the pipeline's)")
    long.add_argument("--kv-recent-frames", type=int, default=CALL_DEFAULTS["kv_recent_frames"], metavar="K",
                      help="nacl: the newest K frames are kept whole (as many as fit), only older tokens are scored")
    long.add_argument("--kv-horizon", type=lambda v: None if v == "none" else int(v),
                      default=CALL_DEFAULTS["kv_horizon"], metavar="N",
                      help="nacl: keep no token older than a clip of N frames has before its last frame "
                           "('none': no limit; default: %(default)s)")
    long.add_argument("--stream", action="store_true",
                      help="write the mp4 frame by frame as it is generated: the clip is never held whole")
    init = long.add_mutually_exclusive_group()
    init.add_argument("--init-video", metavar="FILE", help="continue this video (its first 1 + 4k frames)")
    init.add_argument("--init-image", metavar="FILE", help="start from this image (image-to-video)")


def output_paths(out: str | None, fmt: str | None, count: int | None) -> tuple[str, list[Path]]:
    """(format, paths): one path for a single prompt (``count=None``), else ``count`` numbered ones, each
    checked to be writable. png-frames writes a folder, so only a video goes *into* a folder ``out``."""
    into_folder = bool(out) and fmt != "png-frames" and (out.endswith(("/", os.sep)) or Path(out).is_dir())
    base = Path(out, DEFAULT_NAME) if into_folder else Path(out if out is not None else f"outputs/{DEFAULT_NAME}")
    # "" has no name to add a suffix to; as png-frames, ".", "/" and ".." name no folder of their own
    require(base.name not in ("", ".."), "out", f"must end in a file or folder name, got {out!r}")
    implied = _SUFFIXES.get(base.suffix.lower())
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


def write_image(path: Path, frame) -> Path:
    """One frame as png / jpg / webp (by the suffix), written atomically."""
    from PIL import Image

    from .._pretrained import write_file_atomically

    image_format = {".png": "PNG", ".jpg": "JPEG", ".webp": "WEBP"}[path.suffix]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(path, lambda tmp: Image.fromarray(frame).save(tmp, format=image_format))
    return path


def write_png_frames(folder: Path, frames) -> Path:
    """frame_000.png, frame_001.png, ... in ``folder``; earlier frame_*.png there are removed first."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("frame_*.png"):  # a longer earlier clip must not leave frames behind
        old.unlink()
    for i, frame in enumerate(frames):
        Image.fromarray(frame).save(folder / f"frame_{i:03d}.png")
    return folder


def fit_frames(frames: np.ndarray, size: int | tuple[int, int]) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> (1, 3, T, height, width) in [-1, 1] for ``size`` = side or (height, width): resized
    and centre-cropped as training clips are (``VideoFolderDataset``); frames of that size pass unchanged."""
    from ..data.video_folder import resize_center_crop

    # a read-only array (a decoded image) would make torch.from_numpy warn
    return resize_center_crop(frames if frames.flags.writeable else frames.copy(), size)[None]


def read_init(args: argparse.Namespace, size: int | tuple[int, int], tau: int) -> torch.Tensor | None:
    """The frames to continue (``--init-video`` / ``--init-image``) as (1, 3, 1 + tau k, height, width) for
    ``size`` = side or (height, width), the longest such start shorter than ``--num-frames``; None without either
    flag."""
    from ..data.video_io import read_video

    name, path = ("init_video", args.init_video) if args.init_video else ("init_image", args.init_image)
    if path is None:
        return None
    require(Path(path).is_file(), name, f"file not found: {path}")
    require(args.num_frames > 1, name, "needs --num-frames > 1 to continue from")
    try:
        if name == "init_image":
            from PIL import Image

            with Image.open(path) as image:
                frames = np.asarray(image.convert("RGB"))[None]
        else:
            frames = read_video(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"{name}: cannot read {path}: {err}") from err
    count = 1 + min(len(frames) - 1, args.num_frames - 2) // tau * tau
    return fit_frames(frames[:count], size)


def warn_unknown_words(pipe, prompts: list[str], batch: bool) -> None:
    """One stderr line per prompt with words the model never saw in training, naming them and its vocabulary."""
    for number, prompt in enumerate(prompts, 1):
        unknown = pipe.unknown_words(prompt)
        if unknown:
            where = f"prompt {number}" if batch else "prompt"
            print(f"omniar: warning: {where}: the model does not know {', '.join(map(repr, unknown))}; it knows: "
                  f"{' '.join(pipe.vocabulary)}", file=sys.stderr)


def cli_main(args: argparse.Namespace) -> int:
    from ..backbone.elastic import resolve_elastic
    from ..data.video_io import check_fps, mp4_writer, write_video
    from ..generation.pipeline import TextToVideoPipeline
    from ..pixels import upscale

    # everything that can be checked without the model fails before it loads
    prompts = [args.prompt] if args.batch is None else read_prompts(args.batch)
    fmt, paths = output_paths(args.out, args.format, None if args.batch is None else len(prompts))
    require(fmt not in IMAGE_FORMATS or args.num_frames == 1, "out", f"{fmt} holds one image: add "
            "--num-frames 1, or write a video (.mp4, .gif) or --format png-frames")
    check_fps(args.fps)
    check_int(args.upscale, "upscale", 1, 16)
    require(not args.stream or fmt == "mp4", "stream", f"writes an mp4 as it goes, not {fmt}")
    device = chosen_device(args)
    with named("model"):
        pipe = TextToVideoPipeline.from_pretrained(args.model)
    place(pipe, device, args)
    tok = pipe.video_tokenizer
    video = read_init(args, tok.resolution, tok.config.temporal_compression)
    batch = args.batch is not None
    for number, prompt in enumerate(prompts, 1):  # all of them before the first clip is written
        try:
            pipe.check_prompts(prompt)
        except ValueError as err:
            raise ValueError(f"batch: prompt {number}: {err}" if batch else str(err)) from None
    warn_unknown_words(pipe, prompts, batch)
    # checked here, not per prompt, and named as the flags: --experts-top-k is the pipeline's elastic top_k
    resolve_elastic(pipe.model.omniar_config, args.depth, args.num_experts, args.experts_top_k,
                    names=("depth", "num_experts", "experts_top_k"))
    elastic = {k: v for k, v in (("depth", args.depth), ("num_experts", args.num_experts),
                                 ("top_k", args.experts_top_k)) if v is not None}
    for prompt, path in tqdm(list(zip(prompts, paths)), desc="prompts", disable=not batch):
        # the prompts are checked and the other settings are the same for each: a bad one fails the first call
        kwargs = dict(num_frames=args.num_frames, guidance_scale=args.guidance_scale,
                      guidance_schedule=args.guidance_schedule, top_k=args.top_k, top_p=args.top_p,
                      temperature=args.temperature, seed=args.seed, elastic=elastic or None, progress=not batch,
                      video=video, kv_budget=args.kv_budget, kv_policy=args.kv_policy,
                      random_ratio=args.random_ratio, kv_rope=args.kv_rope, kv_recent_frames=args.kv_recent_frames,
                      kv_horizon=args.kv_horizon)
        try:
            if args.stream:
                with mp4_writer(path, args.fps) as write:
                    out = pipe(prompt, on_frames=lambda frames: write(upscale(frames[0], args.upscale)), **kwargs)
                written = path
            else:
                out = pipe(prompt, **kwargs)
                frames = upscale(out.frames[0], args.upscale)
                if fmt == "png-frames":
                    written = write_png_frames(path, frames)
                elif fmt in IMAGE_FORMATS:
                    written = write_image(path, frames[0])
                else:
                    written = write_video(path, frames, fps=args.fps)
        except OSError as err:
            raise ValueError(f"out: cannot write {path}: {err.strerror or err}") from err
        t = out.timings
        tqdm.write(f"wrote {written} ({t['forward_passes']} forward passes, {t['generate_s']:.2f} s, "
                   f"{t['tokens_per_s']:.0f} tokens/s)")
    return 0
