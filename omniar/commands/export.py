"""``omniar export``: the pipeline folder of an ``omniar train ar`` checkpoint, e.g. one from the middle of a run.

Works on one process for any ZeRO stage and ``train.ep_size``: ZeRO-3's partitions and the expert-parallel
shards are gathered from the checkpoint's files. The result is what ``OUT/final`` would hold had the run
ended at that step, and loads like it (``omniar generate --model DIR``).
"""

from __future__ import annotations

import argparse


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a checkpoint folder OUT/checkpoints/step_N, or a run folder OUT (its "
                                           "newest checkpoint)")
    parser.add_argument("--config", required=True, help="the run's `omniar train ar` YAML config")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="the run's config overrides, as given to `omniar train ar` (repeatable)")
    parser.add_argument("--out", required=True, help="pipeline folder to write")


def cli_main(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .._checks import require
    from ..train.ar import export_checkpoint
    from ..train.common import apply_overrides, load_yaml

    checkpoint = Path(args.checkpoint)
    if (checkpoint / "checkpoints").is_dir():  # a run folder: its newest complete checkpoint
        steps = sorted(p for p in (checkpoint / "checkpoints").glob("step_*") if p.is_dir())
        require(bool(steps), "checkpoint", f"{checkpoint} has no checkpoints yet")
        checkpoint = steps[-1]
    out = export_checkpoint(apply_overrides(load_yaml(args.config), args.set), checkpoint, args.out)
    print(f"pipeline: {out} (from {checkpoint})")
    return 0
