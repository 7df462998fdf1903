"""The ``omniar`` command line: ``omniar train tokenizer|refiner|ar|uda``, ``omniar eval t2v``, ``omniar generate``,
``omniar reconstruct``."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module exposing add_cli_arguments(parser) and cli_main(args) -> int
_GROUPS = {
    "train": ("train a model on DeepSpeed", {
        "tokenizer": ("omniar.train.tokenizer", "train the 3D multi-scale video tokenizer"),
        "refiner": ("omniar.train.refiner", "train a per-frame refiner on a frozen tokenizer's decodes"),
        "ar": ("omniar.train.ar", "pre-tokenize and train the unified AR text-to-video model"),
        "uda": ("omniar.uda.train", "BiPC / DANN / source-only domain adaptation of a timm classifier"),
    }),
    "eval": ("evaluate a model", {
        "t2v": ("omniar.eval.t2v", "prompt adherence and Frechet distance of text-to-video on Moving Shapes"),
    }),
}
_COMMANDS = {
    "generate": ("omniar.generation.cli", "generate a video (or image) from text"),
    "reconstruct": ("omniar.tokenizers.reconstruct", "tokenize and reconstruct a Moving Shapes clip to mp4"),
    "demo": ("omniar.demo", "Gradio app: text-to-video and tokenizer reconstructions on 127.0.0.1:7860"),
}


def _add(sub, name: str, module: str, help_text: str) -> None:
    parser = sub.add_parser(name, help=help_text, description=help_text)
    importlib.import_module(module).add_cli_arguments(parser)
    parser.set_defaults(_module=module)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omniar", description="Multimodal autoregressive generation toolkit.")
    # The deepspeed launcher inserts --local_rank=N before the subcommand; LOCAL_RANK is read from the env.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    for group, (group_help, members) in _GROUPS.items():
        group_sub = sub.add_parser(group, help=group_help, description=group_help).add_subparsers(
            dest="what", required=True)
        for name, (module, help_text) in members.items():
            _add(group_sub, name, module, help_text)
    for name, (module, help_text) in _COMMANDS.items():
        _add(sub, name, module, help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return importlib.import_module(args._module).cli_main(args)
    except ValueError as err:  # bad input: one line, non-zero exit
        print(f"omniar: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
