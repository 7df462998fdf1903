"""Elastic sub-models: which (depth, experts, top-k) to run, how to sample one, how to slice weights.

Sub-models are nested: depth d keeps the first d layers, ``num_experts`` m
keeps experts 0..m-1 of every MoE layer (router rows included), so a
sub-model's weights are a slice of the full model's and one backward pass can
update both.

A sub-model may end in an exit adapter (``OmniARConfig.exit_adapter_depths``): a
small residual MLP that only that depth runs, trained with the shared layers
frozen, so the full model stays exactly as it was.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from .._checks import check_int, require
from .config import OmniARConfig


class ElasticSpec(NamedTuple):
    depth: int
    num_experts: int
    top_k: int


class ExitAdapter(nn.Module):
    """``x + MLP(LayerNorm(x))`` on the last hidden states of a sub-model, before the final norm. The output
    layer starts at zero: a new adapter is the identity, and the sub-model runs as it did without one."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, hidden)
        self.down = nn.Linear(hidden, d)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(nn.functional.silu(self.up(self.norm(x))))


def resolve_elastic(cfg: OmniARConfig, depth: int | None, num_experts: int | None, top_k: int | None,
                    names: tuple[str, str, str] = ElasticSpec._fields) -> ElasticSpec:
    """Fill ``None`` with the full model's value and validate the rest. Errors name
    ``names`` (of depth, num_experts, top_k): callers pass them as their users spell them."""
    depth_name, experts_name, top_k_name = names
    depth = cfg.num_layers if depth is None else check_int(depth, depth_name, 1, cfg.num_layers)
    num_experts = cfg.num_experts if num_experts is None else check_int(num_experts, experts_name, 1,
                                                                         cfg.num_experts)
    if top_k is None:  # the full top_k was not asked for: blame the num_experts that was
        require(cfg.top_k <= num_experts, experts_name,
                f"must be >= the model's top_k={cfg.top_k} unless a smaller {top_k_name} is given, got {num_experts}")
        top_k = cfg.top_k
    else:
        check_int(top_k, top_k_name, 1)
        require(top_k <= num_experts, top_k_name, f"must be <= num_experts={num_experts}, got {top_k}")
    return ElasticSpec(depth, num_experts, top_k)


def _uniform(low: int, high: int, generator: torch.Generator | None) -> int:
    return int(torch.randint(low, high + 1, (), generator=generator))


def _keep_full(prob: float, generator: torch.Generator | None) -> bool:
    return float(torch.rand((), generator=generator)) < prob


def sample_elastic(cfg: OmniARConfig, generator: torch.Generator | None = None) -> ElasticSpec:
    """ERNIE 5.0 style draw: each of depth / experts / top-k is the full value with its
    ``elastic_*_prob``, else uniform over the smaller allowed values."""
    depth, experts, top_k = cfg.num_layers, cfg.num_experts, cfg.top_k
    if depth > cfg.elastic_min_depth and not _keep_full(cfg.elastic_depth_prob, generator):
        depth = _uniform(cfg.elastic_min_depth, cfg.num_layers - 1, generator)
    if top_k > 1 and not _keep_full(cfg.elastic_top_k_prob, generator):
        top_k = _uniform(1, cfg.top_k - 1, generator)
    low = max(cfg.elastic_min_experts, top_k)
    if experts > low and not _keep_full(cfg.elastic_experts_prob, generator):
        experts = _uniform(low, cfg.num_experts - 1, generator)
    return ElasticSpec(depth, experts, top_k)


def submodel_config(cfg: OmniARConfig, spec: ElasticSpec) -> OmniARConfig:
    """Config of the standalone sub-model (elastic lower bounds shrink to fit it; the dense
    layers keep the full model's width, which a derived width would tie to the new top_k)."""
    return cfg.replace(num_layers=spec.depth, num_experts=spec.num_experts, top_k=spec.top_k,
                       first_dense_layers=min(cfg.first_dense_layers, spec.depth),
                       dense_hidden_size=cfg.dense_width,
                       elastic_min_depth=min(cfg.elastic_min_depth, spec.depth),
                       elastic_min_experts=min(cfg.elastic_min_experts, spec.num_experts),
                       exit_adapter_depths=tuple(d for d in cfg.exit_adapter_depths if d <= spec.depth))


def slice_state_dict(full: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The full model's tensors for every key of the sub-model; expert-indexed tensors
    (router rows, expert weights, selection bias) are cut along dim 0."""
    out = {}
    for key, ref in target.items():
        src = full[key]
        if src.shape != ref.shape:
            src = src[: ref.shape[0]]
        require(src.shape == ref.shape, "model", f"cannot slice {key} from {tuple(full[key].shape)} "
                                                 f"to {tuple(ref.shape)}")
        out[key] = src.clone()
    return out
