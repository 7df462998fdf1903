"""omniar.backbone: the unified MoE autoregressive backbone.

Sequence ``[text][frame0: s0(=BOV) s1 .. sK-1][frame1: s0 .. sK-1]...``; each
vision position predicts the code at its own position of its scale from the
accumulated coarser-scale features (VAR teacher forcing); text position i
predicts tokens i+1 .. i+mtp_k.

Config: ``OmniARConfig`` (dataclass, validated) is the single source of the
fields; ``OmniARModel.from_config_obj(cfg)`` builds a model, ``model.omniar_config``
returns it back, and diffusers' ``save_pretrained`` / ``from_pretrained`` store
the same fields in ``config.json`` (``OmniARModel(**cfg.to_dict())`` also works).

Training::

    out = model(text_ids, text_mask, visual_inputs, frame_visibility=None)
    # out.text_logits (B, L, V_text), out.mtp_logits (B, L, mtp_k-1, V_text) | None,
    # out.visual_logits (B, T_lat, tokens_per_frame, codebook_size), out.aux_loss,
    # out.router_stats[i].to_dict() -> entropy, modality_iou, max/min load
    spec = model.sample_elastic(generator)          # elastic training
    with model.elastic(*spec):
        sub = model(text_ids, text_mask, visual_inputs)
    (loss(out) + loss(sub)).backward(); optimizer.step()
    model.update_router_biases()                    # aux-loss-free balancing

Generation (KV cache, one forward per scale)::

    cache = model.new_cache(max_frames)                         # buffers for text + max_frames frames
    model.forward_text(text_ids, text_mask, cache)              # (B, L', V_text), L' through the last real token
    logits = model.forward_scale(acc, frame, scale, cache)      # (B, n_s^2, codebook_size)

The cache preallocates its keys/values per layer and builds the layout, RoPE
tables and key mask once per call; each step writes in place (see ``KVCache``).
Steps and prompt passes of at most ``fused.MAX_ROWS`` rows run each block as one C call (fp32,
CPU, no gradients; :mod:`omniar.backbone.fused`), the others their attention's QK-norm, RoPE and
cache write; ``model.fused_steps = False`` keeps every step in torch (for caches made after).
The text's padding after the last real token of every row is neither run nor cached.
``model.new_cache(max_frames, budget=KVBudget(tokens, "window" | "nacl"))`` bounds it for long video:
at frame boundaries each layer evicts visual tokens (see ``KVBudget``).

``acc`` is the scale's accumulated input (B, code_dim, n_s, n_s). Vision
positions start after the padded text length L of the batch (independent of
per-sample padding). Raster-order models (``vision_mask="raster"``) take any
run of tokens per step via ``start``/``stop``.

Elastic serving: ``with model.elastic(depth=2, num_experts=8, top_k=1): ...``
runs the nested sub-model (first layers, first experts);
``model.extract_submodel(depth, num_experts, top_k, save_directory=None)``
returns (and optionally saves) it as a standalone ``OmniARModel``. A config with
``exit_adapter_depths=(3,)`` gives depth 3 its own small residual MLP before the
final norm (``model.exit_adapters["3"]``, identity when new), trained with the rest frozen;
``exit_adapter_attention=True`` makes it a dense block that also attends to the context.
"""

from .attention import KVBudget, KVCache
from .config import OmniARConfig
from .elastic import ElasticSpec
from .layout import TokenMeta, attention_mask, text_meta, video_meta, vision_meta
from .model import OmniARModel, OmniAROutput
from .moe import MoELayer, RouterStats, dropless_moe, grouped_mm_supported
from .rope import MultiScaleRoPE

__all__ = ["OmniARConfig", "OmniARModel", "OmniAROutput", "KVBudget", "KVCache", "ElasticSpec", "RouterStats",
           "MoELayer", "dropless_moe", "grouped_mm_supported", "MultiScaleRoPE", "TokenMeta",
           "attention_mask", "text_meta", "video_meta", "vision_meta"]
