"""``OmniARModel``: one decoder-only MoE transformer over ``[text][frame0 scales][frame1 scales]...``."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from diffusers import ConfigMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput
from torch import nn

from .._checks import check_int, require
from .._pretrained import PretrainedModel
from . import fused
from .attention import Attention, KVBudget, KVCache
from .config import OmniARConfig, config_signature
from .elastic import ElasticSpec, ExitAdapter, resolve_elastic, sample_elastic, slice_state_dict, submodel_config
from .layout import TokenMeta, attention_mask, frame_scale_ids, scale_offsets, text_meta, video_meta
from .moe import MoELayer, RouterStats, SwiGLU
from .rope import MultiScaleRoPE


@dataclass
class OmniAROutput(BaseOutput):
    """``text_logits`` (B, L, V_text): position i predicts text token i+1;
    ``mtp_logits`` (B, L, mtp_k - 1, V_text) or None: tokens i+2 .. i+mtp_k;
    ``visual_logits`` (B, T_lat, tokens_per_frame, codebook_size) or None: each
    vision position predicts the code at its own position; ``aux_loss``: sum of
    the MoE auxiliary losses (0 in eval); ``router_stats``: one per MoE layer run.

    A diffusers ``BaseOutput`` (a dict as well): ZeRO-3 finds the tensors of a dict output and hooks them to
    gather the model's own parameters (``bov``) for backward; in a plain dataclass it cannot see them."""

    text_logits: torch.Tensor
    mtp_logits: torch.Tensor | None
    visual_logits: torch.Tensor | None
    aux_loss: torch.Tensor
    router_stats: list[RouterStats]


class Block(nn.Module):
    """Attention + FFN: MoE, or a dense SwiGLU (``dense``) of ``width`` (default ``cfg.dense_width``)."""

    def __init__(self, cfg: OmniARConfig, dense: bool, width: int | None = None) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.attn_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.attn = Attention(d, cfg.num_heads, cfg.num_kv_heads, cfg.norm_eps)
        self.ffn_norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.ffn = SwiGLU(d, width or cfg.dense_width) if dense else MoELayer(
            d, cfg.expert_hidden_size, cfg.num_experts, cfg.num_shared_experts, cfg.gating,
            cfg.seq_balance_loss_coef, cfg.router_z_loss_coef, cfg.moe_impl)

    def forward(self, x, cos, sin, mask, empty, meta: TokenMeta | None, cache: KVCache | None, layer: int,
                spec: ElasticSpec, causal: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor | None, RouterStats | None]:
        # with a cache (generation), the norms in one C call each where they can (omniar.backbone.fused)
        norm = fused.rms_norm if cache is not None and cache.fused else lambda x, module: module(x)
        x = x + self.attn(norm(x, self.attn_norm), cos, sin, mask, empty, cache, layer, causal)
        h = norm(x, self.ffn_norm)
        if isinstance(self.ffn, SwiGLU):
            return x + self.ffn(h), None, None
        valid, is_text = (None, None) if meta is None else (meta.valid, meta.is_text)
        y, aux, stats = self.ffn(h, valid, is_text, spec.num_experts, spec.top_k, layer)
        return x + y, aux, stats


class ExitBlock(Block):
    """An exit adapter that attends (``exit_adapter_attention``): a dense block whose output projections start at
    zero, so a new one is the identity. At depth ``d`` its keys and values take KV-cache layer ``d``, which the
    depth-``d`` sub-model leaves free."""

    def __init__(self, cfg: OmniARConfig, width: int) -> None:
        super().__init__(cfg, dense=True, width=width)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.attn.o_proj.weight)
        nn.init.zeros_(self.ffn.w_out.weight)


class OmniARModel(PretrainedModel, ConfigMixin):
    """Unified MoE autoregressive backbone (see :mod:`omniar.backbone` for the API)."""

    def _init(self, **fields) -> None:
        super().__init__()
        cfg = OmniARConfig(**fields)
        self._omniar_config = cfg
        d = cfg.hidden_size
        self.text_embed = nn.Embedding(cfg.text_vocab_size, d)
        # a text encoder's states -> the backbone's width; absent (not None-valued) for byte-level models,
        # so their parameters, init draws and state dict stay as they were
        if cfg.text_embed_dim is not None:
            self.text_proj = nn.Linear(cfg.text_embed_dim, d)
        self.visual_in = nn.Linear(cfg.code_dim, d)
        self.scale_embed = nn.Embedding(len(cfg.scales), d)
        self.bov = nn.Parameter(torch.zeros(d))
        self.rope = MultiScaleRoPE(cfg.head_dim, cfg.rope_theta)
        self.layers = nn.ModuleList(Block(cfg, i < cfg.first_dense_layers) for i in range(cfg.num_layers))
        self.norm = nn.RMSNorm(d, eps=cfg.norm_eps)
        self.text_head = nn.Linear(d, cfg.text_vocab_size, bias=False)
        self.mtp_heads = nn.ModuleList(nn.Linear(d, cfg.text_vocab_size, bias=False) for _ in range(cfg.mtp_k - 1))
        self.visual_head = nn.Linear(d, cfg.codebook_size, bias=False)
        # empty (no tensors) unless the config names depths
        self.exit_adapters = nn.ModuleDict({
            str(depth): ExitBlock(cfg, cfg.exit_adapter_hidden_size) if cfg.exit_adapter_attention
            else ExitAdapter(d, cfg.exit_adapter_hidden_size) for depth in cfg.exit_adapter_depths})
        self.register_buffer("frame_scale_ids", frame_scale_ids(cfg.scales), persistent=False)
        self._elastic: ElasticSpec | None = None
        # generation steps run their work in C where they can (omniar.backbone.fused): whole blocks in small
        # next-scale steps, the attention's per-token work in the others; False: eager (for caches made after)
        self.fused_steps = True
        for name, p in self.named_parameters():
            if p.dim() >= 2 or name == "bov":
                nn.init.normal_(p, std=cfg.init_std)
        for adapter in self.exit_adapters.values():
            adapter.reset_parameters()

    # diffusers reads the config fields from the __init__ signature; the dataclass owns them.
    _init.__signature__ = config_signature()
    __init__ = register_to_config(_init)
    del _init

    # ------------------------------------------------------------------ config
    @classmethod
    def from_config_obj(cls, cfg: OmniARConfig) -> "OmniARModel":
        require(isinstance(cfg, OmniARConfig), "cfg", f"must be an OmniARConfig, got {type(cfg).__name__}")
        return cls(**cfg.to_dict())

    @property
    def omniar_config(self) -> OmniARConfig:
        return self._omniar_config.replace()

    # ----------------------------------------------------------------- elastic
    @contextlib.contextmanager
    def elastic(self, depth: int | None = None, num_experts: int | None = None,
                top_k: int | None = None) -> Iterator["OmniARModel"]:
        """Run the nested sub-model (first ``depth`` layers, first ``num_experts`` experts,
        ``top_k`` active) inside the ``with`` block; None keeps the full value."""
        spec = resolve_elastic(self._omniar_config, depth, num_experts, top_k)
        previous, self._elastic = self._elastic, spec
        try:
            yield self
        finally:
            self._elastic = previous

    def sample_elastic(self, generator: torch.Generator | None = None) -> ElasticSpec:
        """Draw a training sub-model with the config's ``elastic_*`` probabilities;
        use it as ``with model.elastic(*spec): ...``."""
        return sample_elastic(self._omniar_config, generator)

    @property
    def active_spec(self) -> ElasticSpec:
        cfg = self._omniar_config
        return self._elastic or ElasticSpec(cfg.num_layers, cfg.num_experts, cfg.top_k)

    def extract_submodel(self, depth: int | None = None, num_experts: int | None = None,
                         top_k: int | None = None, save_directory: str | None = None) -> "OmniARModel":
        """A standalone model equal to ``self.elastic(depth, num_experts, top_k)``; saved with
        ``save_pretrained`` when ``save_directory`` is given."""
        spec = resolve_elastic(self._omniar_config, depth, num_experts, top_k)
        sub = OmniARModel.from_config_obj(submodel_config(self._omniar_config, spec))
        sub.load_state_dict(slice_state_dict(self.state_dict(), sub.state_dict()))
        sub.to(device=self.device, dtype=self.dtype)
        if save_directory is not None:
            sub.save_pretrained(save_directory)
        return sub

    # -------------------------------------------------------------- balancing
    def update_router_biases(self) -> None:
        """Auxiliary-loss-free balancing step; call once after each optimizer step."""
        for block in self.layers:
            if isinstance(block.ffn, MoELayer):
                block.ffn.update_bias(self._omniar_config.bias_update_step)

    # ------------------------------------------------------------------- trunk
    def _blocks(self) -> list[Block]:
        """The active sub-model's blocks, with its exit block where it has one that attends (KV-cache layer
        ``depth``)."""
        depth = self.active_spec.depth
        adapter = self._exit_adapter(depth)
        return [self.layers[i] for i in range(depth)] + ([adapter] if isinstance(adapter, ExitBlock) else [])

    def _trunk(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
               empty: torch.Tensor | None, meta: TokenMeta | None, cache: KVCache | None,
               templates: list | None = None, causal: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, list[RouterStats]]:
        """The layers over ``x`` (B, L, d); ``meta`` None skips the routing statistics (generation),
        a ``cache`` takes the new keys/values in its booked slots. ``templates`` (from :func:`.fused.prepare`):
        run the step one C call per block, ``causal`` for the prompt pass (as ``mask`` says)."""
        spec = self.active_spec
        aux, stats = x.new_zeros((), dtype=torch.float32), []
        if templates is not None:
            x = x.contiguous()
            for i, template in enumerate(templates):
                fused.block_step(template, x, cos, sin, cache, i, spec.num_experts, spec.top_k, causal)
        else:
            for i, block in enumerate(self._blocks()):
                x, layer_aux, layer_stats = block(x, cos, sin, mask, empty, meta, cache, i, spec, causal)
                if layer_stats is not None:
                    aux, stats = aux + layer_aux, stats + [layer_stats]
        adapter = self._exit_adapter(spec.depth)
        if adapter is not None and not isinstance(adapter, ExitBlock):
            x = adapter(x)
        if cache is not None:
            cache.commit(x.shape[1])
        return fused.rms_norm(x, self.norm) if cache is not None and cache.fused else self.norm(x), aux, stats

    def _text_outputs(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        mtp = torch.stack([head(h) for head in self.mtp_heads], dim=2) if len(self.mtp_heads) else None
        return self.text_head(h), mtp

    def _embed_vision(self, feats: torch.Tensor, scale_ids: torch.Tensor, with_bov: bool) -> torch.Tensor:
        """``feats`` (B, T, m, C) -> (B, T*m, d); BOV replaces the input of position (0, 0)."""
        x = self.visual_in(feats.to(self.visual_in.weight.dtype)) + self.scale_embed(scale_ids)
        if with_bov:
            x[:, 0, 0] = self.bov + self.scale_embed.weight[0]
        return x.flatten(1, 2)

    def _embed_text(self, text_ids: torch.Tensor | None, text_mask: torch.Tensor | None,
                    text_embeds: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x (B, L, d), text_mask (B, L) bool)`` of the text prefix: the embedded byte-level ``text_ids``, or,
        for a model with ``text_embed_dim``, a text encoder's states ``text_embeds`` projected by ``text_proj``."""
        dim = self._omniar_config.text_embed_dim
        if dim is None:
            require(text_embeds is None, "text_embeds", "this model reads byte-level text_ids (text_embed_dim=None), "
                    "not a text encoder's states")
            text_mask = self._check_text(text_ids, text_mask)
            return self.text_embed(text_ids), text_mask
        require(text_ids is None, "text_ids", f"this model was trained with a text encoder (text_embed_dim={dim}): "
                "pass the encoder's states as text_embeds, not text ids")
        require(isinstance(text_embeds, torch.Tensor) and text_embeds.dim() == 3 and text_embeds.is_floating_point()
                and min(text_embeds.shape[:2]) >= 1 and text_embeds.shape[2] == dim, "text_embeds",
                f"must be a float tensor (B, L, {dim}) with B, L >= 1 (the text encoder's states), got "
                f"{getattr(text_embeds, 'dtype', text_embeds)} {tuple(getattr(text_embeds, 'shape', ()))}")
        if text_mask is None:
            text_mask = torch.ones(text_embeds.shape[:2], dtype=torch.bool, device=text_embeds.device)
        text_mask = self._check_mask(text_mask, text_embeds.shape[:2])
        return self.text_proj(text_embeds.to(self.text_proj.weight.dtype)), text_mask

    @staticmethod
    def _check_mask(text_mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        require(isinstance(text_mask, torch.Tensor) and text_mask.dtype == torch.bool
                and text_mask.shape == shape, "text_mask", f"must be a bool tensor of shape {tuple(shape)}")
        return text_mask

    def _check_text(self, text_ids: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        # int64 / int32: the only index dtypes nn.Embedding takes
        require(isinstance(text_ids, torch.Tensor) and text_ids.dim() == 2 and min(text_ids.shape) >= 1
                and text_ids.dtype in (torch.int64, torch.int32), "text_ids",
                f"must be an int64 or int32 tensor (B, L) with B, L >= 1, got {getattr(text_ids, 'dtype', text_ids)} "
                f"{tuple(getattr(text_ids, 'shape', ()))}")
        vocab = self._omniar_config.text_vocab_size
        require(bool(((text_ids >= 0) & (text_ids < vocab)).all()), "text_ids", f"ids must be in [0, {vocab})")
        if text_mask is None:
            return torch.ones_like(text_ids, dtype=torch.bool)
        return self._check_mask(text_mask, text_ids.shape)

    # ------------------------------------------------------------- full pass
    def forward(self, text_ids: torch.Tensor | None, text_mask: torch.Tensor | None = None,
                visual_inputs: list[torch.Tensor] | None = None,
                frame_visibility: torch.Tensor | None = None,
                text_embeds: torch.Tensor | None = None) -> OmniAROutput:
        """Teacher-forced pass over the whole sequence.

        ``text_ids`` (B, L) right-padded, ``text_mask`` (B, L) bool (True = real);
        ``visual_inputs[s]`` (B, T_lat, code_dim, h_s, w_s): the accumulated inputs of
        scale s (``VideoTokenizer.codes_to_accumulated``); ``frame_visibility``
        (B, T_lat, T_lat) bool [query frame, key frame] hides earlier frames (Random
        Frame Mask), or (B, T_lat, T_lat * tokens_per_frame) [query frame, key token]
        single tokens of them (what an evicting KV cache hides); a frame always sees
        itself and the text. A model with ``text_embed_dim`` takes
        ``text_ids=None`` and its text encoder's states ``text_embeds`` (B, L, text_embed_dim) instead.
        """
        cfg = self._omniar_config
        x, text_mask = self._embed_text(text_ids, text_mask, text_embeds)
        b, length = text_mask.shape
        meta = text_meta(text_mask)
        num_frames = 0
        if visual_inputs is not None:
            require(isinstance(visual_inputs, (list, tuple)) and len(visual_inputs) == len(cfg.scales)
                    and all(isinstance(v, torch.Tensor) for v in visual_inputs), "visual_inputs",
                    f"must be a list of {len(cfg.scales)} tensors, one per scale")
            num_frames = visual_inputs[0].shape[1] if visual_inputs[0].dim() == 5 else 0
            for s, (v, (h, w)) in enumerate(zip(visual_inputs, cfg.scale_shapes)):
                require(v.dim() == 5 and tuple(v.shape) == (b, num_frames, cfg.code_dim, h, w) and num_frames > 0,
                        "visual_inputs", f"scale {s} must have shape (B={b}, T_lat>0, {cfg.code_dim}, {h}, {w}) "
                                         f"with T_lat shared, got {tuple(v.shape)}")
            feats = torch.cat([v.flatten(3).transpose(2, 3) for v in visual_inputs], dim=2)
            x = torch.cat([x, self._embed_vision(feats, self.frame_scale_ids, True)], dim=1)
            meta = meta.cat(video_meta(b, length, cfg.scales, num_frames, cfg.vision_mask == "raster", x.device))
        if frame_visibility is not None:
            per_frame = cfg.tokens_per_frame
            require(num_frames > 0 and isinstance(frame_visibility, torch.Tensor)
                    and frame_visibility.dtype == torch.bool and frame_visibility.dim() == 3
                    and tuple(frame_visibility.shape[:2]) == (b, num_frames)
                    and frame_visibility.shape[2] in (num_frames, num_frames * per_frame), "frame_visibility",
                    f"must be a bool tensor (B, T_lat, T_lat) = {(b, num_frames, num_frames)} or (B, T_lat, T_lat * "
                    f"tokens_per_frame) = {(b, num_frames, num_frames * per_frame)} with visual_inputs, got "
                    f"{getattr(frame_visibility, 'dtype', frame_visibility)} {tuple(getattr(frame_visibility, 'shape', ()))}")
            if frame_visibility.shape[2] != num_frames * per_frame:  # per frame: each key token follows its frame
                frame_visibility = frame_visibility.repeat_interleave(per_frame, dim=2)
        mask, empty = attention_mask(meta, meta, frame_visibility)
        cos, sin = self.rope.cos_sin(meta.pos, x.dtype)
        hidden, aux, stats = self._trunk(x, cos, sin, mask, empty, meta, None)
        text_logits, mtp_logits = self._text_outputs(hidden[:, :length])
        visual_logits = None
        if num_frames:
            visual_logits = self.visual_head(hidden[:, length:]).view(b, num_frames, cfg.tokens_per_frame, -1)
        return OmniAROutput(text_logits, mtp_logits, visual_logits, aux, stats)

    # ----------------------------------------------------------- incremental
    def new_cache(self, max_frames: int = 1, budget: KVBudget | None = None) -> KVCache:
        """An empty KV cache for :meth:`forward_text` / :meth:`forward_scale`, with buffers and tables
        for the text and ``max_frames`` latent frames (allocated by ``forward_text``; a longer run
        regrows them, one copy per doubling). With a ``budget`` the buffers hold the text and
        ``budget.tokens`` visual tokens, at least two frames (the newest and the next): ``forward_scale``
        makes room at frame boundaries (:meth:`KVCache.make_room`)."""
        check_int(max_frames, "max_frames", 1)
        per_frame = self._omniar_config.tokens_per_frame
        require(budget is None or isinstance(budget, KVBudget), "budget", "must be None or a KVBudget")
        require(budget is None or budget.tokens >= 2 * per_frame, "kv_budget",
                f"must be at least two frames' tokens ({2 * per_frame}) to hold the newest and the next frame, "
                f"got {budget and budget.tokens}")
        return KVCache(max(self._omniar_config.num_layers, self._cache_depth()), self.active_spec, max_frames,
                       budget, self.fused_steps)

    def _exit_adapter(self, depth: int) -> nn.Module | None:
        return self.exit_adapters[str(depth)] if str(depth) in self.exit_adapters else None

    def _cache_depth(self) -> int:
        """KV-cache layers the active sub-model writes: its depth, plus one for an exit block that attends."""
        depth = self.active_spec.depth
        return depth + isinstance(self._exit_adapter(depth), ExitBlock)

    def _check_cache_spec(self, cache: KVCache) -> None:
        spec = self.active_spec
        require(cache.spec == spec, "cache", f"was made for sub-model {cache.spec}, the model now runs {spec}")

    def _plan(self, cache: KVCache, text_valid: torch.Tensor, max_frames: int, text_slots: int) -> None:
        """Layout and RoPE tables of the text and ``max_frames`` frames, once per call (and per regrowth); buffers
        for ``text_slots`` text tokens and the frames."""
        cfg = self._omniar_config
        b, length = text_valid.shape
        meta = text_meta(text_valid).cat(video_meta(b, length, cfg.scales, max_frames, cfg.vision_mask == "raster",
                                                    text_valid.device))
        cos, sin = self.rope.cos_sin(meta.pos, self.text_embed.weight.dtype)
        cache.max_frames = max_frames
        visual = max_frames * cfg.tokens_per_frame
        capacity = text_slots + (visual if cache.budget is None else min(visual, cache.budget.tokens))
        cache.plan(meta, cos, sin, cfg.num_kv_heads, cfg.head_dim, self._cache_depth(), capacity)

    def forward_text(self, text_ids: torch.Tensor | None, text_mask: torch.Tensor | None,
                     cache: KVCache, text_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Encode the text prefix (``text_ids``, or ``text_embeds`` as in :meth:`forward`) into an empty
        ``cache``; returns text logits (B, L', V_text) of its first L' tokens, through the last real one of any
        row: the padding after it is never seen by a real token, so it is neither run nor cached (the visual
        positions still start after all L tokens, as in :meth:`forward`)."""
        require(isinstance(cache, KVCache) and len(cache) == 0, "cache", "must be an empty KVCache")
        self._check_cache_spec(cache)
        x, text_mask = self._embed_text(text_ids, text_mask, text_embeds)
        real = text_mask.any(0).nonzero()
        held = int(real[-1]) + 1 if real.numel() else 1
        self._plan(cache, text_mask, cache.max_frames, held)
        meta = text_meta(text_mask[:, :held])
        mask, empty = attention_mask(meta, meta)
        cache.book(0, held)
        x, cos = x[:, :held], cache.cos[:held]
        templates = fused.prepare(self._blocks(), x, cos, cache) if cache.fused else None
        hidden, _, _ = self._trunk(x, cos, cache.sin[:held], mask, empty, None, cache, templates, causal=True)
        # only now: a refused pass leaves the cache empty and usable
        cache.text_len, cache.text_slots = text_mask.shape[1], held
        # not the MTP heads: nobody reads them here
        return fused.dense(hidden, self.text_head) if templates is None else fused.linear(hidden, self.text_head.weight)

    def forward_scale(self, inputs: torch.Tensor, frame: int, scale: int, cache: KVCache,
                      start: int = 0, stop: int | None = None) -> torch.Tensor:
        """One step: tokens ``[start, stop)`` (row-major; default the whole scale) of block
        (``frame``, ``scale``), appended to ``cache``. ``inputs`` (B, code_dim, h_s, w_s) is the
        scale's accumulated input; at frame 0 scale 0, BOV replaces the input of token 0 only (the
        other tokens of a scales[0] > 1 still read ``inputs``). Blocks must come in order; next-scale
        models take whole scales, raster models any run of tokens.
        Returns visual logits (B, stop - start, codebook_size)."""
        cfg = self._omniar_config
        require(isinstance(cache, KVCache) and cache.text_len is not None, "cache",
                "must be a KVCache that went through forward_text")
        self._check_cache_spec(cache)
        check_int(scale, "scale", 0, len(cfg.scales) - 1)
        check_int(frame, "frame", 0)
        h, w = cfg.scale_shapes[scale]
        stop = h * w if stop is None else check_int(stop, "stop", 1, h * w)
        check_int(start, "start", 0, stop - 1)
        require((frame, scale, start) == cache.next_block, "frame/scale/start",
                f"the cache expects block (frame, scale, start) = {cache.next_block}, got {(frame, scale, start)}")
        raster = cfg.vision_mask == "raster"
        require(raster or (start, stop) == (0, h * w), "start/stop",
                "next-scale models take a whole scale per step")
        b = cache.meta.valid.shape[0]
        require(isinstance(inputs, torch.Tensor) and tuple(inputs.shape) == (b, cfg.code_dim, h, w), "inputs",
                f"must have shape {(b, cfg.code_dim, h, w)}, got {getattr(inputs, 'shape', inputs)}")
        feats = inputs.flatten(2).transpose(1, 2)[:, None, start:stop]
        scale_ids = torch.full((stop - start,), scale, device=feats.device)
        x = self._embed_vision(feats, scale_ids, frame == 0 and scale == 0 and start == 0)
        if frame >= cache.max_frames:
            self._plan(cache, cache.meta.valid[:, :cache.text_len], max(frame + 1, 2 * cache.max_frames),
                       cache.text_slots)
        if (scale, start) == (0, 0) and frame > 0:
            cache.make_room(cfg.tokens_per_frame, self.rope)
        first = cache.text_len + frame * cfg.tokens_per_frame + scale_offsets(cfg.scales)[scale]
        seq_start, seq_stop = first + start, first + stop
        cache.book(seq_start, seq_stop)
        block_mask = raster and stop - start > 1
        mask = cache.step_mask(seq_start, seq_stop, block_mask)
        cos, sin = cache.cos[seq_start:seq_stop], cache.sin[seq_start:seq_stop]
        # a step whose queries all see every held slot may run fused (omniar.backbone.fused)
        templates = fused.prepare(self._blocks(), x, cos, cache) if cache.fused and not block_mask else None
        hidden, _, _ = self._trunk(x, cos, sin, mask, None, None, cache, templates)
        if stop < h * w:
            cache.next_block = (frame, scale, stop)
        else:
            cache.next_block = (frame, scale + 1, 0) if scale + 1 < len(cfg.scales) else (frame + 1, 0, 0)
        head = self.visual_head
        return fused.dense(hidden, head) if templates is None else fused.linear(hidden, head.weight)
