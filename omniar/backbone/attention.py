"""Grouped-query attention with QK-norm and multi-scale RoPE, and its KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layout import TokenMeta
from .rope import apply_rope


class KVCache:
    """Keys/values per layer plus the metadata of every cached token.

    Create it with :meth:`OmniARModel.new_cache`; feed it the text once
    (``forward_text``), then vision blocks in order (``forward_scale``).
    ``next_block`` is the (frame, scale, token) the next vision call must start at.
    """

    def __init__(self, num_layers: int, spec: tuple) -> None:
        self.spec = spec  # the (elastic) sub-model it was made for
        self.keys: list[torch.Tensor | None] = [None] * num_layers
        self.values: list[torch.Tensor | None] = [None] * num_layers
        self.meta: TokenMeta | None = None
        self.text_len: int | None = None
        self.next_block = (0, 0, 0)

    def __len__(self) -> int:
        return 0 if self.meta is None else self.meta.block.numel()

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k = torch.cat([self.keys[layer], k], dim=2)
            v = torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


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
                empty: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        b, length, _ = x.shape
        q = self.q_proj(x).view(b, length, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(x).view(b, length, 2, self.num_kv_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                             enable_gqa=self.num_heads != self.num_kv_heads)
        out = out.masked_fill(empty, 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1))
