"""The ``omniar`` command line: ``omniar train tokenizer|refiner|ar|classifier|uda``, ``omniar eval t2v``,
``omniar data shapes``, ``omniar generate``, ``omniar reconstruct``, ``omniar plan``, ``omniar export``,
``omniar demo``.

Only the module of the chosen subcommand is imported (each brings torch and more), so ``omniar --help``
answers at once.
"""

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
        "classifier": ("omniar.commands.train_classifier",
                       "train the Moving Shapes attribute classifier that judges prompt adherence"),
        "uda": ("omniar.uda.train", "BiPC / DANN / source-only domain adaptation of a timm classifier"),
    }),
    "eval": ("evaluate a model", {
        "t2v": ("omniar.commands.eval_t2v", "prompt adherence and Frechet distance of text-to-video on Moving Shapes"),
    }),
    "data": ("make a dataset", {
        "shapes": ("omniar.commands.data", "write Moving Shapes clips as a video folder: mp4 files + captions.jsonl"),
    }),
}
_COMMANDS = {
    "generate": ("omniar.commands.generate", "generate a video (or image) from text"),
    "reconstruct": ("omniar.commands.reconstruct", "tokenize and reconstruct a Moving Shapes clip to mp4"),
    "plan": ("omniar.commands.plan", "parameters, tokens and DeepSpeed memory per GPU of an AR config"),
    "export": ("omniar.commands.export", "the pipeline folder of an `omniar train ar` checkpoint (any ZeRO stage "
                                         "and ep_size)"),
    "demo": ("omniar.commands.demo", "Gradio app: text-to-video and tokenizer reconstructions on 127.0.0.1:7860"),
}


class _HelpFormatter(argparse.HelpFormatter):
    """Appends each option's default to its help, unless there is none to show or the help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (not action.option_strings or default is None or default is False or default == []
                or default is argparse.SUPPRESS or "default" in text):
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def _chosen(argv: list[str]) -> tuple[str, ...]:
    """The subcommand words of ``argv``, e.g. ``("train", "ar")``; options are skipped (the launcher's
    ``--local_rank=N`` comes before them)."""
    words = [a for a in argv if not a.startswith("-")]
    return tuple(words[:2]) if words and words[0] in _GROUPS else tuple(words[:1])


def _add(sub, name: str, module: str, help_text: str, populate: bool) -> None:
    parser = sub.add_parser(name, help=help_text, description=help_text, formatter_class=_HelpFormatter)
    if populate:
        importlib.import_module(module).add_cli_arguments(parser)
    parser.set_defaults(_module=module)


def build_parser(chosen: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``chosen`` (subcommand words), only that subcommand's options are added."""
    parser = argparse.ArgumentParser(prog="omniar", description="Multimodal autoregressive generation toolkit.",
                                     formatter_class=_HelpFormatter)
    # The deepspeed launcher inserts --local_rank=N before the subcommand; LOCAL_RANK is read from the env.
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    for group, (group_help, members) in _GROUPS.items():
        group_sub = sub.add_parser(group, help=group_help, description=group_help).add_subparsers(
            dest="what", required=True)
        for name, (module, help_text) in members.items():
            _add(group_sub, name, module, help_text, chosen is None or chosen == (group, name))
    for name, (module, help_text) in _COMMANDS.items():
        _add(sub, name, module, help_text, chosen is None or chosen == (name,))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(_chosen(argv)).parse_args(argv)
    try:
        return importlib.import_module(args._module).cli_main(args)
    except ValueError as err:  # bad input: one line, non-zero exit
        print(f"omniar: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
