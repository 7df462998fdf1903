"""``OmniARConfig``: the validated hyper-parameters of :class:`OmniARModel`.

The dataclass is the single source of the field names and defaults; the
model's diffusers config (``config.json``) holds exactly these fields.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

from .._checks import check_bool, check_choice, check_float, check_int, require
from .._scales import Scales, ScaleSchedule, check_scales
from ..limits import MAX_CHANNELS, MAX_CODEBOOK_SIZE, MAX_EXPERTS, MAX_HEADS, MAX_LAYERS, MAX_MTP_K, MAX_TEXT_VOCAB


@dataclass
class OmniARConfig(ScaleSchedule):
    """Hyper-parameters of the unified MoE backbone.

    Sequence: ``text_vocab_size`` byte-level text ids, then ``codebook_size``
    visual codes per position; visual inputs have ``code_dim`` channels
    (the tokenizer's ``latent_channels``) and come in ``scales``, coarse to
    fine: ints (square maps) or ``(h, w)`` pairs, the last being the latent
    grid (the tokenizer's schedule, in the same canonical form).
    ``text_embed_dim``: None reads byte-level text ids; an int reads the last
    hidden states of a frozen pretrained text encoder of that width
    (:class:`omniar.backbone.text_encoder.TextEncoder`) through a learned
    projection ``text_proj`` instead (the byte-level text embedding and heads
    then go unused). ``mtp_k`` is
    the text group size: position i predicts tokens i+1 .. i+mtp_k
    (``mtp_k - 1`` extra heads). ``vision_mask`` is
    ``"block"`` (next-scale, block-causal) or ``"raster"`` (one token per
    step, the baseline). MoE: ``num_experts`` routed experts of hidden size
    ``expert_hidden_size`` (``top_k`` active) plus ``num_shared_experts``;
    the first ``first_dense_layers`` layers are a dense SwiGLU of hidden size
    ``dense_hidden_size`` (None = the active width, ``(top_k + num_shared_experts)
    * expert_hidden_size``; extracted sub-models pin it). ``gating`` is
    ``"softmax"`` or ``"sigmoid"`` (selected weights renormalised to sum 1 either
    way). ``bias_update_step`` is the auxiliary-loss-free balancing step (the
    bias moves by it after every optimizer step; 1e-3 by BENCHMARKS.md, "Balancer";
    the shipped model was trained with 1e-4), ``seq_balance_loss_coef`` and
    ``router_z_loss_coef`` weight the optional losses. ``moe_impl``:
    ``"auto"`` (an eval forward without statistics of a few fp32 CPU rows as one call of the fused
    kernel, else grouped_mm where it runs), ``"grouped_mm"`` or ``"loop"`` (always in torch).
    ``elastic_*``: sampling probabilities and lower bounds of elastic training.
    ``exit_adapter_depths``: the sub-model depths that end in an exit adapter (a residual MLP of hidden size
    ``exit_adapter_hidden_size`` before the final norm, run only at that depth, identity at the start), trained
    by distillation with the rest of the model frozen (``omniar train ar`` with ``train.trainable=exit_adapters``).
    ``exit_adapter_attention``: each exit adapter is a transformer block instead (attention over the sub-model's
    context and a dense SwiGLU of that hidden size, both output projections zero at the start), so it can read
    the other tokens, which an MLP on each token's own state cannot; it takes one more layer of KV cache.
    """

    text_vocab_size: int = 261
    text_embed_dim: int | None = None
    codebook_size: int = 512
    code_dim: int = 16
    scales: Scales = (1, 2, 4, 8)
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    rope_theta: float = 10000.0
    mtp_k: int = 2
    vision_mask: str = "block"
    num_experts: int = 16
    num_shared_experts: int = 1
    top_k: int = 2
    expert_hidden_size: int = 256
    first_dense_layers: int = 0
    dense_hidden_size: int | None = None
    gating: str = "softmax"
    bias_update_step: float = 1e-3
    seq_balance_loss_coef: float = 1e-4
    router_z_loss_coef: float = 0.0
    moe_impl: str = "auto"
    elastic_depth_prob: float = 0.75
    elastic_experts_prob: float = 0.8
    elastic_top_k_prob: float = 0.8
    elastic_min_depth: int = 1
    elastic_min_experts: int = 2
    exit_adapter_depths: tuple[int, ...] = ()
    exit_adapter_hidden_size: int = 512
    exit_adapter_attention: bool = False
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self) -> None:
        # canonical: an all-int schedule stays a tuple of ints, so saved configs load unchanged
        self.scales = check_scales(self.scales)
        # bounded (omniar.limits): a model folder's config.json must not size the allocations at will
        for name, high in (("text_vocab_size", MAX_TEXT_VOCAB), ("codebook_size", MAX_CODEBOOK_SIZE),
                           ("code_dim", MAX_CHANNELS), ("hidden_size", MAX_CHANNELS), ("num_layers", MAX_LAYERS),
                           ("num_heads", MAX_HEADS), ("num_kv_heads", MAX_HEADS), ("mtp_k", MAX_MTP_K),
                           ("num_experts", MAX_EXPERTS), ("top_k", MAX_EXPERTS),
                           ("expert_hidden_size", MAX_CHANNELS), ("elastic_min_depth", MAX_LAYERS),
                           ("elastic_min_experts", MAX_EXPERTS)):
            check_int(getattr(self, name), name, 1, high)
        check_int(self.num_shared_experts, "num_shared_experts", 0, MAX_EXPERTS)
        check_int(self.first_dense_layers, "first_dense_layers", 0, self.num_layers)
        for name in ("dense_hidden_size", "text_embed_dim"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), name, 1, MAX_CHANNELS)
        require(self.hidden_size % self.num_heads == 0, "hidden_size",
                f"must be divisible by num_heads={self.num_heads}, got {self.hidden_size}")
        require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads",
                f"must divide num_heads={self.num_heads}, got {self.num_kv_heads}")
        require(self.head_dim % 2 == 0 and self.head_dim >= 8, "hidden_size",
                f"head_dim = hidden_size / num_heads must be even and >= 8, got {self.head_dim}")
        check_int(self.top_k, "top_k", 1, self.num_experts)
        check_float(self.rope_theta, "rope_theta", 1.0)
        check_choice(self.vision_mask, "vision_mask", ("block", "raster"))
        check_choice(self.gating, "gating", ("softmax", "sigmoid"))
        check_choice(self.moe_impl, "moe_impl", ("auto", "grouped_mm", "loop"))
        for name in ("bias_update_step", "seq_balance_loss_coef", "router_z_loss_coef"):
            check_float(getattr(self, name), name, 0.0)
        for name in ("elastic_depth_prob", "elastic_experts_prob", "elastic_top_k_prob"):
            check_float(getattr(self, name), name, 0.0, 1.0)
        check_int(self.elastic_min_depth, "elastic_min_depth", 1, self.num_layers)
        check_int(self.elastic_min_experts, "elastic_min_experts", 1, self.num_experts)
        # canonical (sorted, a tuple), so a config.json list loads to the same config
        require(isinstance(self.exit_adapter_depths, (list, tuple)), "exit_adapter_depths",
                f"must be a list of depths, got {self.exit_adapter_depths!r}")
        depths = [check_int(d, "exit_adapter_depths", 1, self.num_layers) for d in self.exit_adapter_depths]
        require(len(set(depths)) == len(depths), "exit_adapter_depths", f"has a repeated depth: {depths}")
        self.exit_adapter_depths = tuple(sorted(depths))
        check_int(self.exit_adapter_hidden_size, "exit_adapter_hidden_size", 1, MAX_CHANNELS)
        check_bool(self.exit_adapter_attention, "exit_adapter_attention")
        check_float(self.norm_eps, "norm_eps", 0.0, low_inclusive=False)
        check_float(self.init_std, "init_std", 0.0, low_inclusive=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def dense_width(self) -> int:
        """Hidden size of the dense SwiGLU layers: ``dense_hidden_size``, else the active width."""
        if self.dense_hidden_size is not None:
            return self.dense_hidden_size
        return (self.top_k + self.num_shared_experts) * self.expert_hidden_size

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> "OmniARConfig":
        return dataclasses.replace(self, **changes)


def config_signature() -> inspect.Signature:
    """``(self, *, field=default, ...)``: lets diffusers' ``register_to_config`` see the fields."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    params += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default)
               for f in dataclasses.fields(OmniARConfig)]
    return inspect.Signature(params)
