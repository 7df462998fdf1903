"""Grouped-query attention with QK-norm and multi-scale RoPE, and its preallocated KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import require
from .layout import TokenMeta
from .rope import apply_rope


class KVCache:
    """Keys/values per layer in preallocated buffers, written in place, and the tables of one call.

    Create it with :meth:`OmniARModel.new_cache`; feed it the text once (``forward_text``), then
    vision blocks in order (``forward_scale``). ``next_block`` is the (frame, scale, token) the next
    vision call must start at.

    Two index spaces, so that a later eviction only has to compact slots:

    * sequence index: where a token sits in ``[text][frame0][frame1]...``. ``meta``, ``cos`` and
      ``sin`` hold the layout and RoPE tables of every token the call may produce (the text and
      ``max_frames`` frames), built once in ``forward_text``;
    * slot: where its keys/values sit in the buffers ``keys[layer]`` / ``values[layer]``
      ``(B, kv_heads, capacity, head_dim)``. Slots ``[0, len(cache))`` are held, in sequence order;
      ``slot_index`` ``(capacity,)`` maps each to its sequence index (so its position, frame and
      block are ``meta``'s) and ``key_ok`` ``(B, capacity)`` says which are real tokens: the
      attention mask of a step is read from these, not rebuilt. :meth:`evict` drops slots.
    """

    def __init__(self, num_layers: int, spec: tuple, max_frames: int) -> None:
        self.spec = spec  # the (elastic) sub-model it was made for
        self.max_frames = max_frames
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.meta: TokenMeta | None = None
        self.cos: torch.Tensor | None = None
        self.sin: torch.Tensor | None = None
        self.key_ok: torch.Tensor | None = None
        self.slot_index: torch.Tensor | None = None
        self.length = 0
        self.text_len: int | None = None
        self.next_block = (0, 0, 0)

    def __len__(self) -> int:
        return self.length

    def plan(self, meta: TokenMeta, cos: torch.Tensor, sin: torch.Tensor, num_kv_heads: int, head_dim: int,
             depth: int) -> None:
        """Take the tables of the sequence ``meta`` and size the buffers for all of it (held slots are
        kept: a longer plan costs one copy, made only when a call outgrows its ``max_frames``)."""
        self.meta, self.cos, self.sin = meta, cos, sin
        b, capacity = meta.valid.shape
        shape = (b, num_kv_heads, capacity, head_dim)
        held = self.length
        key_ok = meta.valid.new_zeros(b, capacity)
        slot_index = meta.block.new_zeros(capacity)
        if held:
            key_ok[:, :held], slot_index[:held] = self.key_ok[:, :held], self.slot_index[:held]
        self.key_ok, self.slot_index = key_ok, slot_index
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
        self.slot_index[a:b] = torch.arange(start, stop, device=self.slot_index.device)

    def step_mask(self, start: int, stop: int, raster: bool) -> torch.Tensor:
        """Mask ``(B, 1, Lq, Lk)`` (True = attend) of booked tokens ``[start, stop)`` over the slots up to
        theirs. A next-scale step is one block, which sees every held slot: a view of ``key_ok``."""
        mask = self.key_ok[:, None, None, :self.length + stop - start]
        if raster:
            mask = mask & (self.meta.block[self.slot_index[:mask.shape[-1]]] <= self.meta.block[start:stop, None])
        return mask

    def evict(self, keep: torch.Tensor) -> None:
        """Drop the held slots where ``keep`` (``(len(cache),)`` bool) is False: the kept ones move to the
        front in order, in every layer, so later steps never attend the dropped tokens. Positions stay
        as cached (the keys carry their RoPE rotation); ``slot_index`` still names each kept token."""
        require(isinstance(keep, torch.Tensor) and keep.dtype == torch.bool and tuple(keep.shape) == (self.length,),
                "keep", f"must be a bool tensor of shape ({self.length},), one entry per held slot")
        idx = keep.nonzero().squeeze(1).to(self.slot_index.device)
        n = idx.numel()
        for buffers in (self.keys, self.values):
            for buf in buffers:
                if buf is not None:
                    buf[:, :, :n] = buf[:, :, :self.length].index_select(2, idx)
        self.key_ok[:, :n] = self.key_ok[:, :self.length].index_select(1, idx)
        self.slot_index[:n] = self.slot_index[:self.length].index_select(0, idx)
        self.length = n

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values after the held slots; returns all of them (views, no copy)."""
        a, b = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, a:b] = k
        self.values[layer][:, :, a:b] = v
        return self.keys[layer][:, :, :b], self.values[layer][:, :, :b]

    def commit(self, count: int) -> None:
        self.length += count


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
                empty: torch.Tensor | None, cache: KVCache | None, layer: int) -> torch.Tensor:
        """``empty`` ``(B, 1, L, 1)`` marks query rows without a visible key (zeroed); None: there are none."""
        b, length, _ = x.shape
        q = self.q_proj(x).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(x).view(b, length, 2, self.num_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        if cache is not None:
            k, v = cache.write(layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        if empty is not None:
            out = out.masked_fill(empty, 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1))
