"""Expert parallelism benchmark: one training step of the MoE layer at ep_size 1 vs 2, two CPU processes (gloo).

Each of the 2 ranks routes its own ``--tokens`` tokens. A step is forward + backward + the gradient
reduction DeepSpeed would do: ep_size 1 is plain data parallelism (every rank holds every expert, all
gradients all-reduced); ep_size 2 shards the experts (``MoELayer.shard_experts``), sends each token's rows
to its experts' rank and back by all-to-all (forward and backward), and all-reduces only the replicated
parameters' gradients (with 2 ranks the expert-data-parallel group is one rank: nothing to reduce).

Reported per ep_size: tokens/s (both ranks' tokens over the median step time), the bytes each rank sends to
the other in all-to-all per step (counted from the split sizes) against the analytic count
4 x tokens x top_k x (ep - 1) / ep x dim x 4 bytes (dispatch and combine, forward and backward, fp32,
routing spread evenly) and against the count for the routing that happened, and the share of the step
spent inside collectives (which includes waiting for the other rank).

    python benchmarks/moe_ep.py --out benchmarks/results/moe_ep.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from omniar.backbone import MoELayer


class CollectiveClock:
    """Wraps ``all_to_all_single`` and ``all_reduce``: time spent inside them, bytes sent to other ranks."""

    def __init__(self) -> None:
        self.seconds, self.a2a_bytes = 0.0, 0
        self.real = dist.all_to_all_single, dist.all_reduce
        dist.all_to_all_single, dist.all_reduce = self.all_to_all_single, self.all_reduce

    def reset(self) -> None:
        self.seconds, self.a2a_bytes = 0.0, 0

    def all_to_all_single(self, out, x, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
        if input_split_sizes is not None and x.dim() == 2:  # the token rows (not the per-expert counts)
            others = sum(n for r, n in enumerate(input_split_sizes) if r != dist.get_rank(group))
            self.a2a_bytes += others * x.shape[1] * x.element_size()
        start = time.perf_counter()
        result = self.real[0](out, x, output_split_sizes, input_split_sizes, group=group, **kw)
        self.seconds += time.perf_counter() - start
        return result

    def all_reduce(self, tensor, *args, **kw):
        start = time.perf_counter()
        result = self.real[1](tensor, *args, **kw)
        self.seconds += time.perf_counter() - start
        return result


def worker(rank: int, args: argparse.Namespace, ep: int, rendezvous: str, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=2)
    torch.manual_seed(0)  # the same layer on both ranks
    layer = MoELayer(args.dim, args.expert_hidden, args.experts, 1, "softmax", 0.0, 0.0, "auto")
    for p in layer.parameters():
        torch.nn.init.normal_(p, std=0.1)
    if ep > 1:
        layer.shard_experts(dist.group.WORLD, f"ep_size_{ep}")
    # requires grad as inside a model: the backward then also sends the rows' gradients back (4 all-to-alls)
    x = torch.randn(1, args.tokens, args.dim, generator=torch.Generator().manual_seed(1 + rank)).requires_grad_()
    valid, is_text = torch.ones(1, args.tokens, dtype=torch.bool), torch.zeros(args.tokens, dtype=torch.bool)
    clock = CollectiveClock()
    steps, comm, sent, remote_rows = [], [], [], []
    for i in range(args.warmup + args.repeats):
        dist.barrier()
        clock.reset()
        start = time.perf_counter()
        out, aux, stats = layer(x, valid, is_text, args.experts, args.top_k, 0)
        (out.square().mean() + aux).backward()
        for p in layer.parameters():  # DeepSpeed's reduction: replicated params over all ranks, experts not
            if getattr(p, "allreduce", True):
                dist.all_reduce(p.grad)
        took = time.perf_counter() - start
        layer.zero_grad(set_to_none=True)
        if i >= args.warmup:
            steps.append(took)
            comm.append(clock.seconds)
            sent.append(clock.a2a_bytes)
            counts = stats.text_counts + stats.vision_counts  # this rank's assignments per (global) expert
            local = args.experts // ep
            remote_rows.append(int(counts.sum() - counts[rank * local:(rank + 1) * local].sum()) if ep > 1 else 0)
    Path(folder, f"{ep}-{rank}.json").write_text(json.dumps(
        {"step_s": steps, "comm_s": comm, "a2a_bytes": sent, "remote_rows": remote_rows}))
    dist.destroy_process_group()


def run(args: argparse.Namespace, ep: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(worker, (args, ep, f"tcp://127.0.0.1:{port}", tmp), nprocs=2)
        ranks = [json.loads(Path(tmp, f"{ep}-{r}.json").read_text()) for r in range(2)]
    # a step ends when the slower rank is done: per repeat the max over ranks
    step = statistics.median(max(r["step_s"][i] for r in ranks) for i in range(args.repeats))
    row_bytes = args.dim * 4
    analytic = 4 * args.tokens * args.top_k * (ep - 1) / ep * row_bytes
    return {
        "ep_size": ep, "experts_per_rank": args.experts // ep,
        "step_ms_median": 1e3 * step,
        "tokens_per_s": 2 * args.tokens / step,
        "comm_share_of_step": [statistics.median(c / s for c, s in zip(r["comm_s"], r["step_s"])) for r in ranks],
        "a2a_bytes_sent_per_rank": [statistics.median(r["a2a_bytes"]) for r in ranks],
        "a2a_bytes_analytic_even_routing": analytic,
        # each rank sends its rows for the other's experts (dispatch, and their gradients back in backward)
        # and the rows it ran for the other (combine, and their gradients back): 2 x both ranks' remote rows
        "a2a_bytes_for_this_routing": statistics.median(
            2 * (a + b) * row_bytes for a, b in zip(ranks[0]["remote_rows"], ranks[1]["remote_rows"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--expert-hidden", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per rank and step")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--note", default="", help="what else ran on the machine (recorded)")
    parser.add_argument("--out", default="benchmarks/results/moe_ep.json")
    args = parser.parse_args()
    rows = [run(args, ep) for ep in (1, 2)]
    result = {
        "args": {k: v for k, v in vars(args).items() if k != "note"},
        "setup": {"processes": 2, "backend": "gloo", "threads_per_process": 1, "cpu_count": os.cpu_count(),
                  "platform": platform.platform(), "torch": torch.__version__, "note": args.note},
        "layer": {"dim": args.dim, "experts": args.experts, "expert_hidden": args.expert_hidden, "top_k": args.top_k,
                  "shared_experts": 1, "tokens_per_rank": args.tokens, "dtype": "float32"},
        "rows": rows,
        "ep2_vs_ep1_tokens_per_s": rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
