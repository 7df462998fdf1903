"""``omniar plan``: size an ``omniar train ar`` config before renting GPUs.

    omniar plan --config configs/ar_10b.yaml --gpus 64 [--ep-size 8 ...] [--set section.key=value] [--json]

The model is built on the meta device (shapes only, no memory) and the tokenizer from its config.json
alone, so a 10 B config plans in seconds on a laptop. Prints total and active parameters, tokens per
sample and per step, and DeepSpeed's estimate of the model-state memory per GPU for ZeRO-2 and ZeRO-3
at several expert-parallel sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import torch

# DeepSpeed's logger writes to the stdout of its import time (its accelerator choice, at once): stderr,
# so that --json prints JSON alone
with contextlib.redirect_stdout(sys.stderr):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from .. import assets
from .._checks import check_int, require
from .._pretrained import read_json
from ..backbone import MoELayer, OmniARModel
from ..tokenizers import VideoTokenizer
from ..tokenizers.text import TextTokenizer
from ..train.ar import ARDataConfig, ARTrainConfig, check_ep_size, check_model_section, model_config
from ..train.common import apply_overrides, check_sections, load_yaml, split_train_section
from ..train.engine import config_from_dict

GIB = 2**30
FORMULA = """\
Per GPU, with P_d the parameters every rank holds (attention, shared experts, routers, embeddings, heads),
P_e the routed-expert parameters, N GPUs and expert-parallel size ep (each GPU holds P_e/ep of them, and
ZeRO shards those over the N/ep GPUs holding the same experts, as deepspeed.moe does):
  ZeRO-2 = zero2(P_d, N) + zero2(P_e/ep, N/ep), zero2(P, n) = 2 P + 18 P / n bytes
           (estimate_zero2_model_states_mem_needs: 16-bit weights on every rank; 16- and 32-bit
           gradients, fp32 master weights and Adam moments sharded)
  ZeRO-3 = zero3(P_d, L, N) + zero3(P_e/ep, 0, N/ep), zero3(P, L, n) = 4 L + 18 P / n bytes
           (estimate_zero3_model_states_mem_needs; L = the largest layer, gathered whole, its experts
           split by ep)
18 (P_e/ep) / (N/ep) = 18 P_e / N: expert parallelism saves the replicated 16-bit expert weights (ZeRO-2)
and the gathered expert layer (ZeRO-3), not the sharded states. No offload; activations and
communication buffers come on top. omniar's train.precision bf16 is autocast over fp32 weights, which
holds 2 more bytes per replicated weight than these 16-bit estimates. omniar trains ZeRO-3 only at ep 1
(DeepSpeed's stage 3 does not partition expert-parallel layers); the ZeRO-3 rows at ep > 1 are for comparison."""


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="an `omniar train ar` YAML config")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value, as in `omniar train ar` (repeatable)")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs of the run, all nodes together")
    parser.add_argument("--ep-size", type=int, action="append", default=None, metavar="N",
                        help="expert-parallel size to estimate (repeatable; default: every power of two that "
                             "divides both --gpus and model.num_experts)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def tokenizer_on_meta(name_or_path: str) -> VideoTokenizer:
    """``train.tokenizer`` (a folder or a shipped asset's name) built from its config.json alone, on the meta
    device: the plan needs its scales and temporal compression, not its weights."""
    shipped = isinstance(name_or_path, str) and name_or_path in assets.available()
    require(shipped or isinstance(name_or_path, str) and Path(name_or_path).is_dir(), "train.tokenizer",
            f"must be a tokenizer folder or one of the shipped assets {assets.available()}, got {name_or_path!r}")
    config_file = (assets.path(name_or_path) if shipped else Path(name_or_path)) / VideoTokenizer.config_name
    config = read_json(config_file, "train.tokenizer")
    try:
        with torch.device("meta"):
            return VideoTokenizer.from_config(config)
    except ValueError as err:
        raise ValueError(f"train.tokenizer: {config_file}: {err}") from None


def expert_sizes(model: OmniARModel) -> tuple[int, list[tuple[int, int]]]:
    """(routed-expert parameters, [(own non-expert, own routed-expert) parameters of each module]): the
    routed experts are the (num_experts, ...) weights of the MoE layers; ZeRO-3 gathers one module at a time."""
    routed = {id(p) for m in model.modules() if isinstance(m, MoELayer) for p in (m.w_in, m.w_out)}
    own = []
    for module in model.modules():
        params = list(module.parameters(recurse=False))
        expert = sum(p.numel() for p in params if id(p) in routed)
        own.append((sum(p.numel() for p in params) - expert, expert))
    return sum(e for _, e in own), own


def memory(dense: int, routed: int, own: list[tuple[int, int]], gpus: int, ep: int) -> dict:
    """DeepSpeed's model-state bytes per GPU (no offload) for ZeRO-2 and ZeRO-3 at expert-parallel size ``ep``."""
    local, group = routed // ep, gpus // ep  # this GPU's expert parameters; the GPUs sharing its experts
    largest = max(d + e // ep for d, e in own)
    zero2 = sum(estimate_zero2_model_states_mem_needs(p, num_gpus_per_node=n, cpu_offload=False)[1]
                for p, n in ((dense, gpus), (local, group)))
    zero3 = sum(estimate_zero3_model_states_mem_needs(p, layer, num_gpus_per_node=n, cpu_offload=False)[1]
                for p, layer, n in ((dense, largest, gpus), (local, 0, group)))
    return {"zero2_bytes": zero2, "zero3_bytes": zero3, "largest_layer_params": largest}


def plan(config: dict, gpus: int, ep_sizes: list[int] | None = None) -> dict:
    """The plan of an ``omniar train ar`` config (validated as the trainer does) on ``gpus`` GPUs."""
    check_sections(config)
    check_int(gpus, "--gpus", 1)
    data = config_from_dict(ARDataConfig, config.get("data", {}), "data")
    engine, train = split_train_section(config.get("train", {}), ARTrainConfig)
    model_fields = check_model_section(config.get("model", {}))
    tok = tokenizer_on_meta(train.tokenizer)
    tok.check_num_frames(data.num_frames, "data.num_frames")
    cfg = model_config(model_fields, tok, TextTokenizer())
    check_ep_size(engine.ep_size, cfg)
    require(gpus % engine.ep_size == 0, "train.ep_size", f"must divide --gpus={gpus}, got {engine.ep_size}")
    with torch.device("meta"):
        model = OmniARModel.from_config_obj(cfg)
    total = sum(p.numel() for p in model.parameters())
    routed, own = expert_sizes(model)
    dense = total - routed
    # dropless top-k: every token runs top_k of the num_experts routed experts plus all the rest
    active = dense + routed * cfg.top_k // cfg.num_experts
    common = math.gcd(gpus, cfg.num_experts)
    ep_choices = ep_sizes or [2**i for i in range(common.bit_length()) if common % 2**i == 0]
    for ep in ep_choices:
        require(isinstance(ep, int) and ep >= 1 and cfg.num_experts % ep == 0 and gpus % ep == 0, "--ep-size",
                f"must divide both model.num_experts={cfg.num_experts} and --gpus={gpus}, got {ep}")
    text, frames = data.max_text_len, tok.num_latent_frames(data.num_frames)
    per_sample = text + frames * cfg.tokens_per_frame
    rows = [{"ep_size": ep, "experts_per_gpu": cfg.num_experts // ep} | memory(dense, routed, own, gpus, ep)
            for ep in ep_choices]
    return {
        "total_params": total, "active_params": active, "routed_expert_params": routed, "other_params": dense,
        "moe_layers": cfg.num_layers - cfg.first_dense_layers, "num_experts": cfg.num_experts, "top_k": cfg.top_k,
        "tokens_per_sample": {"text": text, "latent_frames": frames, "per_frame": cfg.tokens_per_frame,
                              "scales": list(cfg.scales), "total": per_sample},
        "gpus": gpus, "micro_batch_size": engine.micro_batch_size, "zero_stage": engine.zero_stage,
        "ep_size": engine.ep_size,
        "tokens_per_step": per_sample * engine.micro_batch_size * gpus, "memory_per_gpu": rows,
    }


def format_plan(p: dict, config: str) -> str:
    t = p["tokens_per_sample"]
    lines = [
        f"config: {config}",
        f"parameters: {p['total_params'] / 1e9:.3f} B total, {p['active_params'] / 1e9:.3f} B active per token "
        f"(top_k {p['top_k']} of {p['num_experts']} routed experts in {p['moe_layers']} MoE layers, "
        f"plus everything else)",
        f"  routed experts {p['routed_expert_params'] / 1e9:.3f} B, the rest {p['other_params'] / 1e9:.3f} B",
        f"tokens per sample: {t['total']} = {t['text']} text + {t['latent_frames']} latent frames x "
        f"{t['per_frame']} (scales {', '.join(map(str, t['scales']))})",
        f"tokens per step: {p['tokens_per_step']:,} = {t['total']} x micro_batch_size {p['micro_batch_size']} x "
        f"{p['gpus']} GPUs (the config trains with ZeRO-{p['zero_stage']})",
        "",
        f"model-state memory per GPU on {p['gpus']} GPUs, GiB (DeepSpeed's estimators):",
        f"{'ep_size':>8} {'experts/GPU':>12} {'ZeRO-2':>8} {'ZeRO-3':>8}",
    ]
    for row in p["memory_per_gpu"]:
        lines.append(f"{row['ep_size']:>8} {row['experts_per_gpu']:>12} {row['zero2_bytes'] / GIB:>8.1f} "
                     f"{row['zero3_bytes'] / GIB:>8.1f}")
    return "\n".join(lines + ["", FORMULA])


def cli_main(args: argparse.Namespace) -> int:
    config = apply_overrides(load_yaml(args.config), args.set)
    result = plan(config, args.gpus, args.ep_size)
    print(json.dumps(result | {"config": args.config}, indent=2) if args.json else format_plan(result, args.config))
    return 0
