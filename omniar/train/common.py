"""Pieces shared by the trainers: YAML configs, video datasets, the tokenizer they start from, step-indexed data.

Trainers import from here, never from each other."""

from __future__ import annotations

import argparse
import itertools
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.utils.checkpoint
import yaml
from torch.utils.data import DataLoader, Dataset, Sampler

from .. import assets
from .._checks import check_choice, check_int, check_keys, check_output_path, require
from .._pretrained import load_checked_state_dict
from ..data.shapes import MOTIONS, MovingShapes
from ..data.video_folder import frame_size
from ..limits import MAX_NUM_WORKERS
from ..tokenizers import VideoTokenizer


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``3e-4`` (no dot) as a string; read it as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.[\d_]*)?[eE][-+]?\d+$|^[-+]?\d[\d_]*\.[\d_]*$|^[-+]?\.\d[\d_]*$"),
    list("-+0123456789."))


def _parse(text: str, name: str, what: str):
    """YAML ``text``; malformed YAML is a one-line ValueError naming ``name`` (``what`` says where it came from)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{name}: {what} is not valid YAML ({problem})") from None


def load_yaml(path: str | Path, name: str = "config") -> dict:
    path = Path(path)
    require(path.is_file(), name, f"file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{name}: {path} is not UTF-8 text") from None
    data = _parse(text, name, str(path)) or {}
    require(isinstance(data, dict), name, f"{path} must hold a mapping at the top level")
    return data


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a nested config dict."""
    for item in overrides:
        require("=" in item, "--set", f"expected section.key=value, got {item!r}")
        key, value = item.split("=", 1)
        node = config
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            require(isinstance(node, dict), key, f"{part!r} is not a section (it is set to {node!r})")
        node[leaf] = _parse(value, key, repr(value))
    return config


def check_sections(config: Any) -> dict:
    """A trainer's config: a mapping of model/data/train sections (a misspelled section must not be ignored)."""
    check_keys(config, "config", ("model", "data", "train"))
    for section, values in config.items():
        require(isinstance(values, dict), section, f"must be a section of key: value settings, got {values!r}")
    return config


def build_model(factory: Callable[..., Any], values: dict) -> Any:
    """``factory(**values)`` for the ``model`` section, its errors named as the config spells the key
    (``channels: ...`` -> ``model.channels: ...``)."""
    try:
        return factory(**values)
    except ValueError as err:
        raise ValueError(f"model.{err}") from None


def last_step(steps: int, stop_at: int | None) -> int:
    """The step this invocation ends at: ``stop_at`` (checked before any work starts), at most ``steps``."""
    return steps if stop_at is None else min(check_int(stop_at, "stop_at", 1), steps)


def load_init_from(model: torch.nn.Module, init_from: str, what: str, sub: str = "",
                   optional: str | tuple[str, ...] | None = None) -> list[str]:
    """Start ``model`` from the checked weights in ``init_from/sub`` (``train.init_from``, which is ``what``);
    tensors whose names start with ``optional`` keep their own values where the folder lacks them (their names
    are returned)."""
    folder = Path(init_from, sub)
    require(folder.is_dir(), "train.init_from", f"{init_from} is not {what}")
    return model.load_state_dict(load_checked_state_dict(folder, model.state_dict(), "train.init_from", optional),
                                 strict=optional is None).missing_keys


def split_train_section(section: dict, own_cls):
    """The ``train`` section's engine fields -> ``EngineConfig``, the rest -> the trainer's ``own_cls``."""
    from .engine import EngineConfig, config_from_dict

    engine_keys = {f.name for f in fields(EngineConfig)}
    engine = config_from_dict(EngineConfig, {k: v for k, v in section.items() if k in engine_keys}, "train")
    own = config_from_dict(own_cls, {k: v for k, v in section.items() if k not in engine_keys}, "train")
    return engine, own


def config_cli(default_config: str, train: Callable[..., Path], what: str):
    """``(add_cli_arguments, cli_main)`` of a YAML-config trainer, ``omniar train X``: flags, then
    ``train(config, stop_at=...)``, which returns the exported folder (written only when the run is done)."""
    def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
        _add_config_arguments(parser, default_config)

    def cli_main(args: argparse.Namespace) -> int:
        final = train(resolve_config(args), stop_at=args.stop_at)
        if final.is_dir():
            print(f"{what}: {final}")
        return 0

    return add_cli_arguments, cli_main


def _add_config_arguments(parser: argparse.ArgumentParser, default_config: str) -> None:
    parser.add_argument("--config", default=default_config, help="YAML config (default: %(default)s)")
    parser.add_argument("--out", default=None, help="run directory (overrides train.out_dir)")
    parser.add_argument("--steps", type=int, default=None, help="total optimisation steps (overrides train.steps)")
    parser.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                        help="stop (with a checkpoint) after STEP steps; rerun the same command to resume")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override any config value, e.g. --set train.lr=3e-4 (repeatable)")
    parser.add_argument("--deepspeed-config", default=None, metavar="FILE",
                        help="DeepSpeed JSON merged into omniar's settings (sets train.deepspeed_config); a key "
                             "that omniar sets otherwise is refused, naming it")


def resolve_config(args: argparse.Namespace) -> dict:
    config = check_sections(apply_overrides(load_yaml(args.config), args.set))
    train = config.setdefault("train", {})
    if args.out is not None:
        train["out_dir"] = str(check_output_path(args.out, "out", folder=True))
    if args.steps is not None:
        train["steps"] = args.steps
    if args.deepspeed_config is not None:
        train["deepspeed_config"] = args.deepspeed_config
    return config


@dataclass
class VideoDataConfig:
    """The ``data`` section of a trainer that reads clips (tokenizer, refiner)."""

    dataset: str = "shapes"  # "shapes" | "video_folder"
    path: str | None = None  # JSONL for video_folder
    size: int | tuple[int, int] = 64  # a side, or [height, width]
    num_frames: int = 17
    num_samples: int = 10_000_000  # shapes: clips are generated, so this is effectively unbounded
    seed: int = 0
    num_workers: int = 0
    motion: str = "exit"  # shapes: "exit" (objects stay inside) | "wrap" (they re-enter at the opposite edge) | "mixed"

    def __post_init__(self) -> None:
        check_choice(self.dataset, "data.dataset", ("shapes", "video_folder"))
        require(self.dataset != "video_folder" or bool(self.path), "data.path", "is required for video_folder")
        check_int(self.num_workers, "data.num_workers", 0, MAX_NUM_WORKERS)
        check_motion(self.motion, self.dataset)
        height, width = frame_size(self.size, "data.size")
        self.size = height if height == width else (height, width)  # VideoTokenizer.resolution's form


def check_motion(motion: Any, dataset: str) -> None:
    """``data.motion``: how Moving Shapes objects meet the canvas edge (:data:`omniar.data.shapes.MOTIONS`)."""
    check_choice(motion, "data.motion", MOTIONS)
    require(motion == "exit" or dataset == "shapes", "data.motion",
            f"applies to the shapes dataset only, got {motion!r} with data.dataset {dataset!r}")


def motion_source(motion: str) -> dict:
    """``data.motion`` as an entry of a cache's source settings: none for the default, so that caches made
    before the option existed stay valid."""
    return {} if motion == "exit" else {"motion": motion}


def build_dataset(dataset: str, path: str | None, num_samples: int, size: int | tuple[int, int], num_frames: int,
                  seed: int, motion: str = "exit"):
    """Training clips: ``num_samples`` Moving Shapes clips of the training split, or a video folder's."""
    if dataset == "shapes":
        return MovingShapes("train", num_samples, size, num_frames, seed, motion=motion)
    from ..data.video_folder import VideoFolderDataset

    return VideoFolderDataset(path, num_frames=num_frames, size=size, seed=seed)


def load_video_tokenizer(name_or_path: str) -> VideoTokenizer:
    """``train.tokenizer``: a tokenizer folder or the name of a shipped asset."""
    require(isinstance(name_or_path, str) and (Path(name_or_path).is_dir() or name_or_path in assets.available()),
            "train.tokenizer", f"must be a tokenizer folder or one of the shipped assets {assets.available()}, "
            f"got {name_or_path!r}")
    folder = Path(name_or_path)
    return VideoTokenizer.from_pretrained(str(folder if folder.is_dir() else assets.path(name_or_path)))


class StepBatchSampler(Sampler[list[int]]):
    """Micro-batches of dataset indices that depend only on (step, micro-batch, rank), ``accum`` per step:
    resuming at step k reproduces exactly the batches an uninterrupted run would have seen."""

    def __init__(self, dataset_len: int, batch_size: int, start_step: int, total_steps: int, rank: int = 0,
                 world_size: int = 1, accum: int = 1):
        self.n, self.bs, self.start, self.total = dataset_len, batch_size, start_step, total_steps
        self.rank, self.world, self.accum = rank, world_size, accum

    def __len__(self) -> int:
        return max(0, self.total - self.start) * self.accum

    def __iter__(self) -> Iterator[list[int]]:
        for micro in range(self.start * self.accum, self.total * self.accum):
            first = (micro * self.world + self.rank) * self.bs
            yield [(first + i) % self.n for i in range(self.bs)]


def step_loader(dataset: Dataset, batch_size: int, start_step: int, total_steps: int, rank: int, world_size: int,
                num_workers: int = 0, collate_fn: Any = None, accum: int = 1) -> Iterator[list]:
    """The micro-batches of steps ``start_step..total_steps - 1``, as one list of ``accum`` per step."""
    sampler = StepBatchSampler(len(dataset), batch_size, start_step, total_steps, rank, world_size, accum)
    loader = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate_fn,
                             persistent_workers=False, pin_memory=torch.cuda.is_available()))
    while step := list(itertools.islice(loader, accum)):
        yield step


def checkpoint_blocks(blocks) -> None:
    """``train.activation_checkpointing``: each of ``blocks`` (modules) keeps only its inputs in a training
    forward and recomputes its activations in backward. Only ``forward`` is wrapped: parameters, state_dict
    keys and eval or no-grad calls (generation) stay as they are."""
    for block in blocks:
        block.forward = _checkpointed(block, block.forward)


def _checkpointed(block: torch.nn.Module, forward: Callable) -> Callable:
    def run(*args, **kwargs):
        if not (block.training and torch.is_grad_enabled()):
            return forward(*args, **kwargs)
        calls = 0

        def body(*args, **kwargs):
            nonlocal calls
            calls += 1
            if calls == 1:
                return forward(*args, **kwargs)
            # the recomputation must not repeat the forward's buffer updates (e.g. an MoE layer's load count)
            saved = [b.clone() for b in block.buffers()]
            try:
                return forward(*args, **kwargs)
            finally:
                with torch.no_grad():
                    for buffer, value in zip(block.buffers(), saved):
                        buffer.copy_(value)

        return torch.utils.checkpoint.checkpoint(body, *args, use_reentrant=False, **kwargs)

    return run


def mean_scalars(rows: list[dict[str, float]]) -> dict[str, float]:
    """A step's scalars: per key, the mean over the micro-batches that logged it."""
    keys = dict.fromkeys(key for row in rows for key in row)
    return {key: sum(row[key] for row in rows if key in row) / sum(key in row for row in rows) for key in keys}
