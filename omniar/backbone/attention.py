"""Grouped-query attention with QK-norm and multi-scale RoPE, its preallocated KV cache, and the cache's
budget: long-video eviction at frame boundaries (sliding window, or NACL's proxy-token + random eviction)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_choice, check_float, check_int, require
from . import fused
from .layout import TokenMeta
from .rope import MultiScaleRoPE, apply_rope

KV_POLICIES = ("none", "window", "nacl")
KV_ROPE_MODES = ("extrapolate", "rebase")


@dataclass(frozen=True)
class KVBudget:
    """How many visual tokens each layer's cache may hold, and how it makes room (the text is always kept:
    it is the attention sink). At a frame boundary where the next frame would not fit, each layer drops,
    in one shot, what it needs so that the held visual tokens plus the next frame fit in ``tokens``:

    * ``window``: keeps the newest whole frames that fit;
    * ``nacl``: keeps the newest ``recent_frames`` frames (as many as fit), then scores the older visual
      tokens by the attention the newest frame's queries (the proxy tokens) paid them in that layer, summed
      over heads, batch rows and queries; keeps the top scores, except a ``random_ratio`` share drawn (without
      replacement) with probability proportional to the scores from the rest, with ``generator`` (NACL).
      With ``horizon_frames``, only tokens of the newest ``horizon_frames - 1`` frames before the next one are
      scored and kept: every kept key then sits at a temporal distance a clip of that length has (the older
      ones are evicted first, and the cache may then hold fewer than ``tokens``).

    ``rope``: ``extrapolate`` keeps every key at its own temporal position (past the training length the
    distances grow); ``rebase`` rotates the kept keys so that their frames sit contiguously just before the
    next frame and the text just before them (distances stay those of a short clip)."""

    tokens: int
    policy: str = "nacl"
    random_ratio: float = 0.0
    rope: str = "extrapolate"
    generator: torch.Generator | None = None
    recent_frames: int = 1
    horizon_frames: int | None = None

    def __post_init__(self) -> None:
        check_int(self.tokens, "kv_budget", 1)
        check_int(self.recent_frames, "recent_frames", 1)
        if self.horizon_frames is not None:
            check_int(self.horizon_frames, "horizon_frames", 2)
        check_choice(self.policy, "kv_policy", KV_POLICIES[1:])
        check_float(self.random_ratio, "random_ratio", 0.0, 1.0)
        check_choice(self.rope, "kv_rope", KV_ROPE_MODES)
        require(self.generator is None or isinstance(self.generator, torch.Generator), "generator",
                "must be None or a torch.Generator")


class KVCache:
    """Keys/values per layer in preallocated buffers, written in place, and the tables of one call.

    Create it with :meth:`OmniARModel.new_cache`; feed it the text once (``forward_text``), then
    vision blocks in order (``forward_scale``). ``next_block`` is the (frame, scale, token) the next
    vision call must start at.

    Two index spaces, so that an eviction only has to compact slots:

    * sequence index: where a token sits in ``[text][frame0][frame1]...``. ``meta``, ``cos`` and
      ``sin`` hold the layout and RoPE tables of every token the call may produce (the text and
      ``max_frames`` frames), built once in ``forward_text``;
    * slot: where its keys/values sit in the buffers ``keys[layer]`` / ``values[layer]``
      ``(B, kv_heads, capacity, head_dim)``. Slots ``[0, len(cache))`` are held, in sequence order;
      ``slot_index`` ``(layers, capacity)`` maps each to its sequence index (so its position, frame and
      block are ``meta``'s; layers differ after a per-layer eviction) and ``key_ok`` ``(B, capacity)`` says
      which are real tokens: the attention mask of a step is read from these, not rebuilt. ``key_t``
      ``(layers, capacity)`` is the temporal position each held key is rotated to. :meth:`evict` drops slots.
      The text's padding after the last real token of every row takes no slot (no query ever sees it).

    With a ``budget`` (:class:`KVBudget`) the buffers hold the text and ``budget.tokens`` visual tokens, and
    :meth:`make_room` evicts at frame boundaries.
    """

    def __init__(self, num_layers: int, spec: tuple, max_frames: int, budget: KVBudget | None = None,
                 fused: bool = False) -> None:
        self.spec = spec  # the (elastic) sub-model it was made for
        self.max_frames = max_frames
        self.budget = budget
        self.fused = fused  # steps may run their work in the C kernel (omniar.backbone.fused) where it applies
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        # the newest frame's queries per layer: NACL's proxy tokens
        self.queries = [[] for _ in range(num_layers)] if budget is not None and budget.policy == "nacl" else None
        self.meta: TokenMeta | None = None
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None
        self.key_ok: torch.Tensor | None = None
        self.slot_index: torch.Tensor | None = None
        self.key_t: torch.Tensor | None = None
        self.length = 0
        self.text_len: int | None = None  # the padded text's tokens: the sequence index of the first visual one
        self.text_slots: int | None = None  # the slots the text holds: through the last real token of any row
        self.next_block = (0, 0, 0)

    def __len__(self) -> int:
        return self.length

    def plan(self, meta: TokenMeta, cos: torch.Tensor, sin: torch.Tensor, num_kv_heads: int, head_dim: int,
             depth: int, capacity: int) -> None:
        """Take the tables of the sequence ``meta`` and size the buffers for ``capacity`` slots (held slots are
        kept: a longer plan costs one copy, made only when a call outgrows its ``max_frames``)."""
        self.meta, self.cos, self.sin = meta, cos, sin
        b = meta.valid.shape[0]
        shape = (b, num_kv_heads, capacity, head_dim)
        held = self.length
        key_ok = meta.valid.new_zeros(b, capacity)
        slot_index = meta.block.new_zeros(depth, capacity)
        key_t = meta.pos.new_zeros(depth, capacity)
        if held:
            key_ok[:, :held], slot_index[:, :held], key_t[:, :held] = (
                self.key_ok[:, :held], self.slot_index[:, :held], self.key_t[:, :held])
        self.key_ok, self.slot_index, self.key_t = key_ok, slot_index, key_t
        for i in range(depth):
            for buffers in (self.keys, self.values):
                new = cos.new_empty(shape)
                if held:
                    new[:, :, :held] = buffers[i][:, :, :held]
                buffers[i] = new

    def book(self, start: int, stop: int) -> None:
        """Give sequence tokens ``[start, stop)`` the slots after the held ones."""
        a, b = self.length, self.length + stop - start
        self.key_ok[:, a:b] = self.meta.valid[:, start:stop]
        self.slot_index[:, a:b] = torch.arange(start, stop, device=self.slot_index.device)
        self.key_t[:, a:b] = self.meta.pos[start:stop, 0]

    def step_mask(self, start: int, stop: int, raster: bool) -> torch.Tensor:
        """Mask ``(B, 1, Lq, Lk)`` (True = attend) of booked tokens ``[start, stop)`` over the slots up to
        theirs. A next-scale step is one block, which sees every held slot: a view of ``key_ok``. A raster step
        reads layer 0's slots: evictions keep the text and tokens of earlier frames, visible to every query, and
        the step's own frame sits in the same slots in every layer."""
        mask = self.key_ok[:, None, None, :self.length + stop - start]
        if raster:
            mask = mask & (self.meta.block[self.slot_index[0, :mask.shape[-1]]] <= self.meta.block[start:stop, None])
        return mask

    def evict(self, keep: torch.Tensor) -> None:
        """Drop the held slots where ``keep`` is False: ``(len(cache),)`` bool for every layer, or
        ``(layers, len(cache))`` with the same count and the same padding slots kept in each layer. The kept
        ones move to the front in order, so later steps never attend the dropped tokens; ``slot_index`` still
        names each kept token and ``key_t`` its position."""
        depth = self.slot_index.shape[0]
        require(isinstance(keep, torch.Tensor) and keep.dtype == torch.bool
                and tuple(keep.shape) in ((self.length,), (depth, self.length)), "keep",
                f"must be a bool tensor of shape ({self.length},) or ({depth}, {self.length}), one entry per held slot")
        keep = keep.to(self.slot_index.device).expand(depth, self.length)
        counts = keep.sum(1)
        require(bool((counts == counts[0]).all()), "keep", "every layer must keep the same number of slots")
        idx = keep.nonzero()[:, 1].view(depth, -1)
        key_ok = self.key_ok[:, :self.length][:, idx]  # (B, layers, n)
        require(bool((key_ok == key_ok[:, :1]).all()), "keep", "every layer must keep the same padding slots")
        n = idx.shape[1]
        # the slots before the first one dropped (in any layer) stay where they are (the text at least): move the rest
        moved = (idx != torch.arange(n, device=idx.device)).any(0)
        start = int(moved.int().argmax()) if bool(moved.any()) else n
        for layer, buf in enumerate(zip(self.keys, self.values)):
            for b in buf:
                if b is not None:
                    b[:, :, start:n] = b[:, :, :self.length].index_select(2, idx[layer, start:])
        self.key_ok[:, :n] = key_ok[:, 0]
        self.slot_index[:, :n] = self.slot_index[:, :self.length].gather(1, idx)
        self.key_t[:, :n] = self.key_t[:, :self.length].gather(1, idx)
        self.length = n

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values after the held slots; returns all of them (views, no copy)."""
        a, b = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, a:b] = k
        self.values[layer][:, :, a:b] = v
        return self.keys[layer][:, :, :b], self.values[layer][:, :, :b]

    def note_queries(self, layer: int, q: torch.Tensor) -> None:
        """Keep a step's (rotated) queries ``(B, H, L, D)`` when the budget scores by them (NACL's proxies)."""
        if self.queries is not None:
            self.queries[layer].append(q)

    def commit(self, count: int) -> None:
        self.length += count

    # ------------------------------------------------------------ budget
    def make_room(self, frame_tokens: int, rope: MultiScaleRoPE) -> None:
        """Call at a frame boundary, before the next frame's first step: with a budget that the held visual
        tokens plus ``frame_tokens`` would exceed, evict (one shot, per layer) down to ``budget - frame_tokens``
        visual tokens by the budget's policy. The newest frame's collected queries are dropped either way."""
        budget = self.budget
        if budget is not None and self.length - self.text_slots + frame_tokens > budget.tokens:
            room = budget.tokens - frame_tokens  # visual slots left after the eviction
            depth = self.slot_index.shape[0]
            keep = torch.zeros(depth, self.length, dtype=torch.bool, device=self.slot_index.device)
            keep[:, :self.text_slots] = True
            if budget.policy == "window":
                keep[:, self.length - room // frame_tokens * frame_tokens:] = True
            else:
                recent = min(budget.recent_frames, room // frame_tokens) * frame_tokens  # the recent window
                keep[:, self.length - recent:] = True
                old = slice(self.text_slots, self.length - recent)
                # each layer holds its own older tokens; with a horizon, only those within horizon_frames - 1
                # frames of the next frame are candidates, and every layer keeps as many as the poorest can
                frame = self.meta.frame[self.slot_index[:, old]]  # (layers, old slots)
                near = torch.ones_like(frame, dtype=torch.bool)
                if budget.horizon_frames is not None:
                    near = frame > self.meta.frame[self.slot_index[0, self.length - 1]] + 1 - budget.horizon_frames
                count = min(room - recent, int(near.sum(1).min()))
                for layer in range(depth):
                    keep[layer, old] = self._nacl_keep(self._proxy_scores(layer)[old], count, near[layer])
            if budget.rope == "rebase":
                self._rebase(keep, rope)
            self.evict(keep)
        if self.queries is not None:
            self.queries = [[] for _ in self.queries]

    def _proxy_scores(self, layer: int) -> torch.Tensor:
        """``(len(cache),)`` float32: the attention the newest frame's queries paid each held slot in ``layer``,
        summed over batch rows, heads and queries (each query over the slots its step saw)."""
        q = torch.cat(self.queries[layer], dim=2)  # (B, H, m, D): the newest frame, the last m slots
        k = self.keys[layer][:, :, :self.length]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        logits = (q @ k.transpose(2, 3)).float() * q.shape[-1] ** -0.5
        block = self.meta.block[self.slot_index[layer, :self.length]]
        seen = (block[None, :] <= block[-q.shape[2]:, None])[None, None] & self.key_ok[:, None, None, :self.length]
        return logits.masked_fill(~seen, float("-inf")).softmax(-1).sum((0, 1, 2))

    def _nacl_keep(self, scores: torch.Tensor, count: int, candidates: torch.Tensor) -> torch.Tensor:
        """Which of the scored slots to keep: of the ``candidates`` (bool), the ``count`` best, except a
        ``random_ratio`` share drawn from the rest with probability proportional to the scores (on the CPU, with
        the budget's generator)."""
        candidates = candidates.cpu()
        scores = scores.cpu().masked_fill(~candidates, float("-inf"))
        drawn = round(self.budget.random_ratio * count)
        keep = torch.zeros(scores.shape[0], dtype=torch.bool)
        keep[scores.topk(count - drawn).indices] = True
        if drawn:  # a floor: every candidate stays drawable, so there are always enough
            weights = scores.clamp_min(torch.finfo(torch.float32).tiny).masked_fill(keep | ~candidates, 0.0)
            keep[torch.multinomial(weights, drawn, replacement=False, generator=self.budget.generator)] = True
        return keep

    def _rebase(self, keep: torch.Tensor, rope: MultiScaleRoPE) -> None:
        """Rotate each layer's kept keys in time so that their frames sit contiguously, ending at the newest
        frame, and the text just before the first of them (RoPE rotations compose: rotate by the difference)."""
        base = self.meta.pos[:, 0] - self.meta.frame.clamp(min=0)  # a token's temporal position in frame 0
        for layer in range(keep.shape[0]):
            seq = self.slot_index[layer, :self.length]
            frame = self.meta.frame[seq]
            kept = frame[keep[layer] & (frame >= 0)].unique()  # sorted
            first = int(kept[-1]) - kept.numel() + 1  # the text's shift and the first kept frame's new index
            target = base[seq] + first + torch.searchsorted(kept, frame.clamp(min=0)) * (frame >= 0)
            delta = torch.zeros(self.length, 4, device=target.device)
            delta[:, 0] = target - self.key_t[layer, :self.length]
            cos, sin = rope.cos_sin(delta, self.keys[layer].dtype)
            self.keys[layer][:, :, :self.length] = apply_rope(self.keys[layer][:, :, :self.length], cos, sin)
            self.key_t[layer, :self.length] = target


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, num_kv_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, dim // num_heads
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.kv_proj = nn.Linear(dim, 2 * num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor,
                empty: torch.Tensor | None, cache: KVCache | None, layer: int, causal: bool = False) -> torch.Tensor:
        """``empty`` ``(B, 1, L, 1)`` marks query rows without a visible key (zeroed); None: there are none.
        ``causal``: the prompt pass (``mask`` is its causal mask over the cache's real slots)."""
        b, length, _ = x.shape
        q, kv = fused.dense(x, self.q_proj), fused.dense(x, self.kv_proj)
        # with a cache, the norms, rotations and cache write in one call where they can (omniar.backbone.fused)
        prepared = fused.qk_prep(self, q, kv, cos, sin, cache, layer) if cache is not None and cache.fused else None
        if prepared is not None:
            q, stop = prepared, len(cache) + length
            k, v = cache.keys[layer][:, :, :stop], cache.values[layer][:, :, :stop]
        else:
            q = apply_rope(self.q_norm(q.view(b, length, self.num_heads, self.head_dim).transpose(1, 2)), cos, sin)
            k, v = kv.view(b, length, 2, self.num_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
            k = apply_rope(self.k_norm(k), cos, sin)
            if cache is not None:
                k, v = cache.write(layer, k, v)
        if cache is not None:
            cache.note_queries(layer, q)
        # a next-scale step (every query sees every real held and new slot) or the prompt pass (causal): the
        # attention in one C call where it can
        if cache is not None and cache.fused and (mask.shape[-2] == 1 or causal):
            out = fused.attention(self, q.contiguous(), cache, layer, causal)
            if out is not None:
                return fused.dense(out, self.o_proj)
        groups = self.num_heads // self.num_kv_heads
        if groups > 1 and mask.shape[-2] == 1:
            # a mask the same for every query (a cached next-scale step): the query heads that share a key/value
            # head go in as more query rows of it, a shape the CPU kernel runs faster than enable_gqa's (4x for
            # one-token steps in bf16 at batch 16, BENCHMARKS.md)
            out = F.scaled_dot_product_attention(q.reshape(b, self.num_kv_heads, groups * length, -1), k, v,
                                                 attn_mask=mask).view(b, self.num_heads, length, -1)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=groups > 1)
        if empty is not None:
            out = out.masked_fill(empty, 0.0)
        return fused.dense(out.transpose(1, 2).reshape(b, length, -1), self.o_proj)
