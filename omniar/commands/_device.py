"""``--device``, ``--dtype`` and ``--decode-dtype`` for the commands that run a pipeline (docs/speed.md)."""

from __future__ import annotations

import argparse

from .._checks import check_device

DTYPES = ("float32", "bfloat16")


def add_device_arguments(parser: argparse.ArgumentParser, gpu_first: bool = False) -> None:
    """``--device`` defaults to cpu, like a pipeline before ``to``; with ``gpu_first`` (the demo, a server) to cuda
    when available."""
    group = parser.add_argument_group("device and precision (docs/speed.md)")
    group.add_argument("--device", default=None if gpu_first else "cpu",
                       help="cpu or cuda[:N] (default: " + ("cuda when available, else cpu)" if gpu_first else "cpu)"))
    group.add_argument("--dtype", choices=DTYPES, default="float32",
                       help="the transformer's weights and compute (default: %(default)s; bfloat16 halves the "
                            "weights' memory and is no faster on a CPU)")
    group.add_argument("--decode-dtype", choices=DTYPES, default=None,
                       help="the dtype the frames are decoded in; the codes never depend on it (default: bfloat16 "
                            "on the CPU, float32 on a GPU)")


def chosen_device(args: argparse.Namespace):
    """``--device``, checked (call it before loading a model); unset: cuda when available, else cpu."""
    import torch  # here, not at the top: the command line's --help must not wait for torch

    return check_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def place(pipe, device, args: argparse.Namespace) -> None:
    """Move ``pipe`` to ``device`` in ``--dtype``, decoding in ``--decode-dtype``."""
    import torch

    decode_dtype = None if args.decode_dtype is None else getattr(torch, args.decode_dtype)
    pipe.to(device, getattr(torch, args.dtype), decode_dtype)
