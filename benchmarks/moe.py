"""MoE layer benchmark: omniar's dropless MoE vs a dense FFN, a per-expert masked loop, DeepSpeed MoE.

Forward + backward of one layer on (tokens, d) inputs, all candidates in this
process with the same shapes, one run of each per round; each ratio is the median
over rounds of the two times taken in the same round, in CPU time of this process
(``time.process_time``, what a loaded machine leaves least distorted) and in wall time.
Also: achieved GFLOP/s of a full ``OmniARModel`` forward against this machine's measured
fp32 matmul rate.

    python benchmarks/moe.py [--out benchmarks/results/moe.json] [--device cuda --dtype bf16]
    OMP_NUM_THREADS=1 python benchmarks/moe.py --dim 256 --experts 8 --expert-hidden 128 --tokens 8192 \
        --generation 1 2 4 8 16 24 32 48 64 128 [--generation-layers 6] \
        --out benchmarks/results/moe_shipped_generation.json

``--generation N ...``: also, in the same run, eval-time forward only (no autograd) at those token
counts, as a generation step runs the layer: ours with and without routing statistics, ours with
``moe_impl="grouped_mm"`` (without the fused kernel's one-call path that ``"auto"`` takes up to
``fused.MOE_ROWS`` rows), and an alternative dispatch for a few tokens measured and not adopted
(:func:`all_experts_forward`).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from omniar.backbone import MoELayer, OmniARConfig, OmniARModel, grouped_mm_supported
from omniar.backbone.moe import SwiGLU, swiglu


class MaskedLoopMoE(nn.Module):
    """The eager pattern of common Hugging Face MoE blocks: a one-hot expert mask, then
    for each hit expert gather its tokens, run it, and index_add the weighted result."""

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, shared: int) -> None:
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(dim, hidden) for _ in range(num_experts))
        self.shared = SwiGLU(dim, hidden * shared)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        probs = self.router(flat).softmax(-1)
        weights, idx = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(flat)
        hit = F.one_hot(idx, len(self.experts)).permute(2, 1, 0)  # (E, k, N)
        for e in torch.nonzero(hit.sum((1, 2))).flatten().tolist():
            slot, tok = torch.where(hit[e])
            out.index_add_(0, tok, self.experts[e](flat[tok]) * weights[tok, slot, None])
        return (out + self.shared(flat)).view_as(x)


def all_experts_forward(layer: MoELayer, x: torch.Tensor, top_k: int) -> torch.Tensor:
    """``layer``'s eval output (all its experts) by another dispatch, for a few tokens: every expert runs every
    token in one batched GEMM, unchosen experts weighted 0, summed into the shared expert's output by addbmm;
    no sort, no grouped GEMM, E / k times the FLOPs. Measured and not adopted (BENCHMARKS.md, "MoE layer")."""
    flat = x.reshape(-1, x.shape[-1])
    (n, d), e = flat.shape, layer.w_in.shape[0]
    _, _, idx, weights = layer.route(flat, e, top_k)
    combine = flat.new_zeros(n, e).scatter_(1, idx, weights.to(flat.dtype))  # (N, E)
    hidden = swiglu(torch.bmm(flat.expand(e, n, d), layer.w_in)) * combine.t()[:, :, None]  # (E, N, h)
    return torch.addbmm(layer.shared(flat), hidden, layer.w_out).view_as(x)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def deepspeed_moe(dim: int, hidden: int, num_experts: int, top_k: int) -> nn.Module:
    """DeepSpeed's MoE at the same config: dropless (drop_tokens=False), the residual MLP
    (use_residual=True) standing in for the shared expert, no gating noise."""
    import deepspeed
    from deepspeed.moe.layer import MoE

    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0")
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    moe = MoE(dim, SwiGLU(dim, hidden), num_experts=num_experts, k=top_k, capacity_factor=1.0,
              drop_tokens=False, use_rts=False, use_residual=True, top2_2nd_expert_sampling=False)
    moe.set_deepspeed_parallelism()
    return moe


def timed(fn, device: torch.device, calls: int = 1) -> dict[str, float]:
    """CPU time of this process and wall time of one call of ``fn``, over ``calls`` calls."""
    sync(device)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return {"cpu": (time.process_time() - cpu) / calls, "wall": (time.perf_counter() - wall) / calls}


def fwd_bwd(fn, params, x: torch.Tensor) -> None:
    for p in params:
        p.grad = None
    fn(x.detach().requires_grad_()).backward()


def round_robin(candidates: dict, device: torch.device, repeats: int, calls: int = 1) -> dict[str, dict[str, list]]:
    """CPU and wall seconds per candidate (name -> fn()) and round; one run of each per round, so load
    from other processes on a shared machine hits all candidates alike, in an order rotated each round
    (no candidate always runs first, after another one's weights filled the caches). Round 0 warms up."""
    times = {name: {"cpu": [], "wall": []} for name in candidates}
    names = list(candidates)
    for r in range(repeats + 1):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t = timed(candidates[name], device, calls)
            if r:
                for clock in ("cpu", "wall"):
                    times[name][clock].append(t[clock])
    return times


def paired_ratio(ours: list[float], theirs: list[float]) -> dict[str, float]:
    """Median over rounds of ours / theirs timed in the same round (slow phases of a shared
    machine cancel), and the share of rounds in which ours was faster."""
    ratios = [a / b for a, b in zip(ours, theirs)]
    return {"median": statistics.median(ratios), "rounds_faster": sum(r < 1 for r in ratios) / len(ratios)}


def summary(times: dict[str, dict[str, list]], ours: str = "ours") -> dict:
    """Median seconds per candidate and clock, and ``ours``' paired ratios against every other candidate."""
    return {"median_s": {name: {c: statistics.median(t[c]) for c in t} for name, t in times.items()},
            "ours_vs": {name: {c: paired_ratio(times[ours][c], t[c]) for c in t}
                        for name, t in times.items() if name != ours}}


def generation_sizes(candidates: dict, layers: int, dim: int, token_counts: list[int], repeats: int,
                     device: torch.device, dtype: torch.dtype) -> dict:
    """Forward-only paired ratios of ``candidates`` (name -> fn(x), which runs a stack of ``layers`` copies)
    against ``"ours"`` per token count; seconds per layer. Each timing covers ~2k layer-tokens."""
    out = {}
    with torch.no_grad():
        for n in token_counts:
            x = torch.randn(1, n, dim, device=device, dtype=dtype)
            times = round_robin({name: (lambda fn=fn: fn(x)) for name, fn in candidates.items()}, device, repeats,
                                calls=max(1, 2048 // ((n + 16) * layers)))
            for t in times.values():
                for clock in t:
                    t[clock] = [s / layers for s in t[clock]]
            out[str(n)] = summary(times)
            print(n, json.dumps({k: v["cpu"]["median"] for k, v in out[str(n)]["ours_vs"].items()}), flush=True)
    return out


def matmul_gflops(a: torch.Tensor, b: torch.Tensor) -> float:
    sync(a.device)
    t0 = time.perf_counter()
    a @ b
    sync(a.device)
    return 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - t0) / 1e9


def model_forward_rate(repeats: int, device: torch.device, dtype: torch.dtype) -> dict:
    """GFLOP/s of a full model forward (FLOPs counted on the per-expert path, same math) and the
    matmul rate (2048^3, or 8192^3 on a GPU) in the same dtype, measured alternately; medians."""
    cfg = OmniARConfig(hidden_size=512, num_layers=4, num_heads=8, num_kv_heads=4, num_experts=16, top_k=2,
                       expert_hidden_size=512, codebook_size=512, code_dim=16, scales=(1, 2, 4, 8))
    model = OmniARModel.from_config_obj(cfg).eval().to(device, dtype)
    b, text_len, frames = (4, 32, 5) if device.type == "cpu" else (64, 32, 5)
    ids = torch.randint(0, 256, (b, text_len), device=device)
    vis = [torch.randn(b, frames, cfg.code_dim, h, w, device=device, dtype=dtype) for h, w in cfg.scale_shapes]
    moes = [blk.ffn for blk in model.layers if isinstance(blk.ffn, MoELayer)]
    side = 2048 if device.type == "cpu" else 8192
    a, w = (torch.randn(side, side, device=device, dtype=dtype) for _ in range(2))
    with torch.no_grad():
        for m in moes:
            m.impl = "loop"  # FlopCounterMode does not count grouped_mm
        with FlopCounterMode(display=False) as counter:
            model(ids, None, vis)
        for m in moes:
            m.impl = cfg.moe_impl
        model(ids, None, vis)
        matmul_gflops(a, w)
        seconds, peak = [], []
        for _ in range(repeats):
            peak.append(matmul_gflops(a, w))
            sync(device)
            t0 = time.perf_counter()
            model(ids, None, vis)
            sync(device)
            seconds.append(time.perf_counter() - t0)
    flops, sec, peak = counter.get_total_flops(), statistics.median(seconds), statistics.median(peak)
    return {"model_tokens": b * (text_len + frames * cfg.tokens_per_frame), "model_forward_gflop": flops / 1e9,
            "model_forward_s": sec, "model_forward_gflops_per_s": flops / sec / 1e9,
            "matmul_peak_gflops_per_s": peak, "model_forward_fraction_of_peak": flops / sec / 1e9 / peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/moe.json")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-hidden", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=21, help="rounds")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    parser.add_argument("--generation", type=int, nargs="+", metavar="N",
                        help="also eval forward-only at these token counts (then no full-model rate)")
    parser.add_argument("--generation-layers", type=int, default=1, metavar="L",
                        help="time each generation-size candidate as a stack of L copies (cold weights per layer)")
    args = parser.parse_args()
    if args.generation and (min(args.generation) < 1 or max(args.generation) > args.tokens):
        parser.error("--generation token counts must be in [1, --tokens]")
    if args.generation_layers < 1:
        parser.error("--generation-layers must be at least 1")
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    d, h, e, k = args.dim, args.expert_hidden, args.experts, args.top_k
    x = torch.randn(1, args.tokens, d, device=device, dtype=dtype)

    ours = MoELayer(d, h, e, 1, "softmax", 1e-4, 0.0, "auto").train()
    for p in (ours.w_in, ours.w_out):
        nn.init.normal_(p, std=0.02)
    valid = torch.ones(1, args.tokens, dtype=torch.bool)
    is_text = torch.zeros(args.tokens, dtype=torch.bool)

    def run_ours(xi):
        out, aux, _ = ours(xi, valid, is_text, e, k, 0)
        return out.square().mean() + aux

    dense = SwiGLU(d, (k + 1) * h)  # same active FLOPs: k routed + 1 shared expert
    loop = MaskedLoopMoE(d, h, e, k, 1)
    ds = deepspeed_moe(d, h, e, k)
    for module in (ours, dense, loop, ds):
        module.to(device, dtype)
    valid, is_text = valid.to(device), is_text.to(device)
    candidates = {
        "ours": (run_ours, list(ours.parameters())),
        "dense": (lambda xi: dense(xi).square().mean(), list(dense.parameters())),
        "masked_loop": (lambda xi: loop(xi).square().mean(), list(loop.parameters())),
        "deepspeed": (lambda xi: (lambda o: o[0].square().mean() + o[1])(ds(xi)), list(ds.parameters())),
    }
    times = round_robin({name: (lambda fn=fn, params=params: fwd_bwd(fn, params, x))
                         for name, (fn, params) in candidates.items()}, device, args.repeats)
    fwd_bwd_summary = summary(times)
    seconds = {name: t["cpu"] for name, t in fwd_bwd_summary["median_s"].items()}
    paired = {name: r["cpu"] for name, r in fwd_bwd_summary["ours_vs"].items()}
    result = {
        "config": {"tokens": args.tokens, "dim": d, "experts": e, "top_k": k, "shared_experts": 1,
                   "expert_hidden": h, "dense_hidden": (k + 1) * h, "dtype": str(dtype).replace("torch.", ""),
                   "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                   "ours_uses_grouped_mm": grouped_mm_supported(x, ours.w_in, ours.w_out),
                   "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "machine": platform.processor() or platform.machine()},
        "repeats": args.repeats,
        "clock": "ratios and seconds below: CPU time of this process; fwd_bwd and generation hold wall time too",
        "seconds_fwd_bwd": seconds,
        "moe_vs_dense_ratio": paired["dense"]["median"],
        "moe_vs_loop_ratio": paired["masked_loop"]["median"],
        "moe_vs_deepspeed_ratio": paired["deepspeed"]["median"],
        "paired_ratios": paired,
        "fwd_bwd": fwd_bwd_summary,
    }
    print(f"{'candidate':<16} {'median s':>9} {'ours / it':>10} {'rounds ours faster':>19}  (fwd+bwd, CPU time)")
    print(f"{'ours':<16} {seconds['ours']:>9.4f} {1:>10.3f}")
    for name, p in paired.items():
        print(f"{name:<16} {seconds[name]:>9.4f} {p['median']:>10.3f} {p['rounds_faster']:>19.0%}", flush=True)
    if args.generation:
        # copies in their own memory: with more than one, each layer's weights are cold, as in a model's step
        extra = range(args.generation_layers - 1)
        grouped = copy.deepcopy(ours)
        grouped.impl = "grouped_mm"
        stacks = {"ours": [ours] + [copy.deepcopy(ours) for _ in extra],
                  "ours_grouped": [grouped] + [copy.deepcopy(grouped) for _ in extra],
                  "dense": [dense] + [copy.deepcopy(dense) for _ in extra],
                  "masked_loop": [loop] + [copy.deepcopy(loop) for _ in extra],
                  "deepspeed": [ds] + [deepspeed_moe(d, h, e, k).to(device, dtype) for _ in extra]}
        for module in (m for stack in stacks.values() for m in stack):
            module.eval()
        forwards = {
            "ours": ("ours", lambda m, xi: m(xi, None, None, e, k, 0)),
            "ours_with_statistics": ("ours", lambda m, xi: m(xi, valid[:, :xi.shape[1]], is_text[:xi.shape[1]],
                                                             e, k, 0)),
            "ours_grouped": ("ours_grouped", lambda m, xi: m(xi, None, None, e, k, 0)),
            "all_experts": ("ours", lambda m, xi: all_experts_forward(m, xi, k)),
            "dense": ("dense", lambda m, xi: m(xi)), "masked_loop": ("masked_loop", lambda m, xi: m(xi)),
            "deepspeed": ("deepspeed", lambda m, xi: m(xi))}
        result["generation_layers"] = args.generation_layers
        result["generation"] = generation_sizes(
            {name: (lambda xi, stack=stacks[s], f=f: [f(m, xi) for m in stack]) for name, (s, f) in forwards.items()},
            args.generation_layers, d, args.generation, args.repeats, device, dtype)
    else:
        result.update(model_forward_rate(args.repeats, device, dtype))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

if __name__ == "__main__":
    main()
