"""Modality-agnostic, dropless mixture of experts (ERNIE 5.0 / DeepSeek-V3 style).

* The router sees only hidden states; text and vision share one expert pool.
* Selection uses ``scores + selection_bias`` (top-k), the combine weights use
  the scores alone, renormalised over the selected experts. The bias is the
  auxiliary-loss-free balancer: :meth:`MoELayer.update_bias` moves it by a
  fixed step toward even load, from the load accumulated since the last call.
* Dropless dispatch: the (token, expert) pairs are sorted by expert and each
  expert runs one SwiGLU over its contiguous rows, through a grouped GEMM
  (``torch.nn.functional.grouped_mm``) when it runs for these tensors, else one
  GEMM per expert. No capacity, no dropped tokens. With ``impl="auto"`` an eval forward without statistics
  of at most ``fused.MOE_ROWS`` fp32 or bf16 CPU rows runs instead as one call of the fused C kernel
  (:func:`.fused.moe`: the same routing and sums in fp32, a bf16 layer's weights widened once, without torch's
  per-op cost); a bf16 layer's longer eval forwards route here and run their experts in one bf16 call.
* Elastic width uses the first ``num_experts`` experts (nested sub-models).
* Expert parallelism (:meth:`MoELayer.shard_experts`): each rank of an expert-parallel group keeps
  ``num_experts / ep_size`` routed experts; rows travel to their expert's rank and back by all-to-all
  with per-rank split sizes (still dropless). Router, bias and shared experts stay replicated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import distributed as dist
from torch import nn

from .._checks import require
from . import fused


def swiglu(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """Dense gated FFN (shared experts, dense layers)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w_in = nn.Linear(dim, 2 * hidden, bias=False)
        self.w_out = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.dense(swiglu(fused.dense(x, self.w_in)), self.w_out)


# Older torch releases (GPU images may ship one) lack the public F.grouped_mm but have the same op,
# CUDA only, as torch._grouped_mm.
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_MM_ON_CPU = hasattr(F, "grouped_mm")


def grouped_mm_supported(x: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether grouped_mm runs here: CPU (public op only), or CUDA bf16 on SM >= 80, 16-byte aligned
    strides; under ``torch.compile`` bf16 only (its fake-tensor kernel rejects other dtypes)."""
    if _GROUPED_MM is None:
        return False
    if torch.compiler.is_compiling() and x.dtype != torch.bfloat16:
        return False
    if x.device.type == "cuda":
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    elif x.device.type != "cpu" or not _GROUPED_MM_ON_CPU:
        return False
    size = x.element_size()
    return all(n * size % 16 == 0 for w in weights for n in w.shape[1:])


def expert_swiglu(xs: torch.Tensor, counts: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
                  use_grouped_mm: bool, scale: torch.Tensor | None = None) -> torch.Tensor:
    """SwiGLU of expert e over its rows of ``xs`` (rows sorted by expert, ``counts[e]`` each), each row's
    hidden times ``scale`` ``(rows, 1)`` when given (the combine weight: the hidden is narrower than the
    output in fine-grained MoE, so scaling it moves less memory, forward and backward)."""
    if xs.shape[0] == 0:
        # an expert-parallel rank that received no rows stays in the graph (the all-to-all's backward must run
        # on every rank); grouped_mm's backward rejects zero rows
        return swiglu(xs @ w_in[0]) @ w_out[0]
    if use_grouped_mm:
        offs = counts.cumsum(0).to(torch.int32)
        hidden = swiglu(_GROUPED_MM(xs, w_in, offs=offs))
        return _GROUPED_MM(hidden if scale is None else hidden * scale, w_out, offs=offs)
    sizes = counts.tolist()
    scales = [1.0] * len(sizes) if scale is None else scale.split(sizes)
    # unbind, not w_in[e]: one backward stack instead of a full-size zero gradient per expert
    groups = zip(xs.split(sizes), w_in.unbind(0), w_out.unbind(0), scales)
    return torch.cat([(swiglu(c @ wi) * s) @ wo for c, wi, wo, s in groups if c.shape[0]])


class _AllToAll(torch.autograd.Function):
    """Rows of ``x``, ``send[r]`` of them to rank r of ``group``, ``recv[r]`` received from each;
    the gradient goes back the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
        ctx.back = recv, send, group
        out = x.new_empty((sum(recv), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad, *ctx.back), None, None, None


def expert_parallel_swiglu(xs: torch.Tensor, counts: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor,
                           use_grouped_mm: bool, group) -> torch.Tensor:
    """:func:`expert_swiglu` over experts spread on ``group``: rank r holds experts ``[r E_l, (r + 1) E_l)``
    (``w_in`` ``(E_l, d, 2h)``), ``counts`` has one entry per expert of the group. Each rank's rows go to
    their experts' rank and come back in their order, by two all-to-alls with this step's split sizes."""
    size, local = dist.get_world_size(group), w_in.shape[0]
    received = torch.empty_like(counts)
    dist.all_to_all_single(received, counts, group=group)
    received = received.view(size, local)  # rows from each source rank for each of this rank's experts
    send, recv = counts.view(size, local).sum(1).tolist(), received.sum(1).tolist()
    rows = _AllToAll.apply(xs, send, recv, group)  # by source rank, then by expert
    expert = torch.arange(local, device=xs.device).repeat(size).repeat_interleave(received.flatten())
    order = expert.argsort(stable=True)
    ys = expert_swiglu(rows.index_select(0, order), received.sum(0), w_in, w_out, use_grouped_mm)
    return _AllToAll.apply(ys.index_select(0, order.argsort()), recv, send, group)


def dropless_moe(x: torch.Tensor, expert_idx: torch.Tensor, weights: torch.Tensor, w_in: torch.Tensor,
                 w_out: torch.Tensor, impl: str = "auto", group=None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Routed-expert output ``(N, d)`` for tokens ``x`` ``(N, d)`` sent to ``expert_idx`` ``(N, k)``
    with combine ``weights`` ``(N, k)``; ``w_in`` ``(E, d, 2h)``, ``w_out`` ``(E, h, d)``. With an
    expert-parallel ``group`` they hold this rank's experts (see :func:`expert_parallel_swiglu`).
    Given ``out`` ``(N, d)`` (the shared experts' output), the result is added into it in place, which
    saves a zero fill and an addition."""
    k = expert_idx.shape[1]
    w_in, w_out = w_in.to(x.dtype), w_out.to(x.dtype)
    flat = expert_idx.reshape(-1)
    order = flat.argsort(stable=True)
    token = order // k
    counts = torch.bincount(flat, minlength=w_in.shape[0] * (1 if group is None else dist.get_world_size(group)))
    use_gmm = impl == "grouped_mm" or (impl == "auto" and grouped_mm_supported(x, w_in, w_out))
    scale = weights.reshape(-1)[order].to(x.dtype)[:, None]
    # index_select / index_add_ rather than x[idx]: their backward passes are plain gathers/scatters.
    xs = x.index_select(0, token)
    if group is None:
        ys = expert_swiglu(xs, counts, w_in, w_out, use_gmm, scale)
    else:  # the rows travel without their weights: scale the outputs once they are back
        ys = expert_parallel_swiglu(xs, counts, w_in, w_out, use_gmm, group) * scale
    return (torch.zeros_like(x) if out is None else out).index_add_(0, token, ys)


@dataclass
class RouterStats:
    """Routing counts of one MoE layer over the valid tokens of one forward."""

    layer: int
    text_counts: torch.Tensor
    vision_counts: torch.Tensor

    @property
    def load(self) -> torch.Tensor:
        """Share of (token, expert) assignments per expert."""
        c = self.text_counts + self.vision_counts
        return c / c.sum().clamp(min=1)

    @property
    def entropy(self) -> torch.Tensor:
        """Normalised entropy ``-sum p log p / log E`` of the load (1 = perfectly even)."""
        p = self.load
        e = p.numel()
        if e == 1:
            return p.new_tensor(1.0)
        return -(p * p.clamp(min=1e-12).log()).sum() / math.log(e)

    @property
    def modality_iou(self) -> torch.Tensor:
        """IoU of the top-25 % experts by text load vs by vision load (NaN if a modality is absent)."""
        if self.text_counts.sum() == 0 or self.vision_counts.sum() == 0:
            return self.text_counts.new_tensor(float("nan"))
        m = math.ceil(self.text_counts.numel() / 4)
        top_text = torch.zeros_like(self.text_counts, dtype=torch.bool)
        top_text[self.text_counts.topk(m).indices] = True
        top_vision = torch.zeros_like(top_text)
        top_vision[self.vision_counts.topk(m).indices] = True
        return (top_text & top_vision).sum() / (top_text | top_vision).sum()

    def to_dict(self) -> dict[str, float]:
        """Scalars for logging."""
        load = self.load
        return {"entropy": float(self.entropy), "modality_iou": float(self.modality_iou),
                "max_load": float(load.max()), "min_load": float(load.min())}


class MoELayer(nn.Module):
    def __init__(self, dim: int, hidden: int, num_experts: int, num_shared: int, gating: str,
                 seq_balance_loss_coef: float, router_z_loss_coef: float, impl: str) -> None:
        super().__init__()
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.shared = SwiGLU(dim, hidden * num_shared) if num_shared else None
        self.register_buffer("selection_bias", torch.zeros(num_experts))
        self.register_buffer("load_error", torch.zeros(num_experts), persistent=False)
        self.gating, self.impl = gating, impl
        self.seq_balance_loss_coef, self.router_z_loss_coef = seq_balance_loss_coef, router_z_loss_coef
        self.ep_group = None  # the expert-parallel process group once shard_experts ran

    def shard_experts(self, group, group_name: str) -> None:
        """Keep only this rank's share of the routed experts, rank r of ``group`` (size ep) experts
        ``[r E/ep, (r + 1) E/ep)``, and mark them as ``deepspeed.moe`` marks expert parameters
        (``allreduce=False``, ``group_name``: DeepSpeed reduces their gradients over the expert-data-parallel
        group ``group_name`` only). Call it once, after the weights are initialised the same on every rank."""
        size, rank, total = dist.get_world_size(group), dist.get_rank(group), self.w_in.shape[0]
        require(total % size == 0, "ep_size", f"must divide num_experts={total}, got {size}")
        local = total // size
        for name in ("w_in", "w_out"):
            shard = nn.Parameter(getattr(self, name).detach()[rank * local:(rank + 1) * local].clone())
            shard.allreduce, shard.group_name = False, group_name
            setattr(self, name, shard)
        self.ep_group = group

    @staticmethod
    def first_experts(weight: torch.Tensor, num_experts: int) -> torch.Tensor:
        """The rows of the first ``num_experts`` experts. The full set is the parameter itself: a slice
        would cost a zero-filled, parameter-sized gradient in every backward (17 % of a 512-token step)."""
        return weight if num_experts == weight.shape[0] else weight[:num_experts]

    def route(self, x: torch.Tensor, num_experts: int, top_k: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router logits and scores ``(..., E')`` over the first ``num_experts`` experts,
        selected experts and their renormalised weights ``(..., top_k)``."""
        logits = F.linear(x.float(), self.first_experts(self.router.weight, num_experts).float())
        scores = logits.softmax(-1) if self.gating == "softmax" else logits.sigmoid()
        idx = (scores + self.selection_bias[:num_experts]).topk(top_k, dim=-1).indices
        weights = scores.gather(-1, idx)
        return logits, scores, idx, weights / weights.sum(-1, keepdim=True)

    @torch.no_grad()
    def rerouted(self, x: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor:
        """Bool ``(...)``: the tokens of ``x`` ``(..., d)`` whose chosen experts the selection bias changes,
        the top-k set of ``scores + selection_bias`` vs of the scores alone (the balancer's reach)."""
        _, scores, idx, _ = self.route(x, num_experts, top_k)
        plain = scores.topk(top_k, dim=-1).indices
        return (idx.sort(-1).values != plain.sort(-1).values).any(-1)

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None, is_text: torch.Tensor | None, num_experts: int,
                top_k: int, layer: int) -> tuple[torch.Tensor, torch.Tensor, RouterStats | None]:
        """``x`` ``(B, L, d)``, ``valid`` ``(B, L)``, ``is_text`` ``(L,)`` (for statistics only; None in
        eval skips the statistics and returns None for them: generation steps need none)."""
        b, length, d = x.shape
        if valid is None:
            require(not self.training, "valid", "is needed in training (load balancing)")
            out = fused.moe(self, x, num_experts, top_k) if self.impl == "auto" else None
            if out is not None:
                return out, x.new_zeros((), dtype=torch.float32), None
        logits, scores, idx, weights = self.route(x, num_experts, top_k)
        # expert-parallel: this rank's experts whatever the width (tokens of a narrower one just skip the rest)
        w_in, w_out = ((self.w_in, self.w_out) if self.ep_group is not None else
                       (self.first_experts(self.w_in, num_experts), self.first_experts(self.w_out, num_experts)))
        flat = x.reshape(-1, d)  # the shared output of flat rows is no view: adding into it needs no copy in backward
        # in x's dtype, as the sum was before it went in place (autocast may run the shared expert in bf16)
        shared = None if self.shared is None else self.shared(flat).to(x.dtype)
        out = dropless_moe(flat, idx.reshape(-1, top_k), weights.reshape(-1, top_k), w_in, w_out, self.impl,
                           self.ep_group, shared).view(b, length, d)
        if valid is None:
            return out, x.new_zeros((), dtype=torch.float32), None
        vf = valid.to(scores.dtype)[..., None]
        with torch.no_grad():
            chosen = torch.zeros_like(scores).scatter_(-1, idx, 1.0) * vf  # (B, L, E')
            text_counts = (chosen * is_text.to(chosen.dtype)[:, None]).sum((0, 1))
            counts = chosen.sum((0, 1))
            if self.training:
                self.load_error[:num_experts] += counts.sum() / num_experts - counts
        aux = x.new_zeros((), dtype=torch.float32)
        if self.training and self.seq_balance_loss_coef > 0:
            ntok = vf.sum(1).clamp(min=1)  # (B, 1)
            share = chosen.sum(1) * num_experts / (top_k * ntok)
            prob = ((scores / scores.sum(-1, keepdim=True)) * vf).sum(1) / ntok
            aux = aux + self.seq_balance_loss_coef * (share * prob).sum(-1).mean()
        if self.training and self.router_z_loss_coef > 0:
            z = logits.logsumexp(-1).square()[..., None] * vf
            aux = aux + self.router_z_loss_coef * z.sum() / vf.sum().clamp(min=1)
        return out, aux, RouterStats(layer, text_counts, counts - text_counts)

    @torch.no_grad()
    def update_bias(self, step: float) -> None:
        """Auxiliary-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.load_error)
        self.selection_bias += step * self.load_error.sign()
        self.load_error.zero_()


def gathered_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """``model.state_dict()`` with the routed experts of every expert-parallel :class:`MoELayer` gathered
    whole, the state of the unsharded model, on the first rank of each expert-parallel group (None on the
    others). A collective: every rank calls it."""
    state, leader = model.state_dict(), True
    for prefix, layer in model.named_modules():
        if isinstance(layer, MoELayer) and layer.ep_group is not None:
            group = layer.ep_group
            leader = dist.get_rank(group) == 0
            for name in ("w_in", "w_out"):
                shard = getattr(layer, name).detach().contiguous()
                parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))] if leader else None
                dist.gather(shard, parts, dst=dist.get_global_rank(group, 0), group=group)
                if leader:
                    state[f"{prefix}.{name}" if prefix else name] = torch.cat(parts)
    return state if leader else None
