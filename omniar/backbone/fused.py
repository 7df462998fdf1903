"""Fused small generation steps: one C call per block (``omniar/_native.c``) instead of about 90 aten calls.

A next-scale step of a few rows (the coarse scales: 2 rows for one clip with CFG) does little arithmetic, so
eagerly it costs per op, not per FLOP. The other steps with a KV cache keep torch's products (fp32 ones through
oneDNN, :func:`dense`) but run the attention's QK-norm, RoPE and cache write as one call (:func:`qk_prep`), a
next-scale step's attention too (:func:`attention`) and the block's norms (:func:`rms_norm`), in fp32 or bf16; an
MoE layer's eval forward of a few rows is one call as well (:func:`moe`). The C file is ``omniar/_native.c``
(:mod:`omniar._native` builds it); without a compiler, or if the build fails, steps stay eager (one warning). The
fused block computes what the eager one does, in fp32, in another summation order (the tests hold it to 1e-5 of
the logits' range of eager's)."""

from __future__ import annotations

import ctypes
import functools
import weakref

import torch

from .. import _native

# steps of at most this many rows (batch x tokens, CFG rows included) run fused; measured in BENCHMARKS.md
MAX_ROWS = 128
# fused steps of at least this many rows split their batch across torch.get_num_threads() threads (BENCHMARKS.md)
THREAD_ROWS = 2
# eval forwards of an MoE layer (moe_impl "auto") on at most this many rows run as one call; measured in BENCHMARKS.md
MOE_ROWS = 128


# block or MoE layer -> (its weights' addresses, its template): beside the modules, not on them, which keeps them
# copyable and picklable (ctypes structures with pointers are neither)
_TEMPLATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# bf16 MoE layer -> (its weights' keys, their fp32 copies | their bf16 pairs): see _kept
_WIDENED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PAIRED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Step(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_int) for n in ("B", "L", "D", "H", "KVH", "HD", "held", "cap", "E", "top_k", "hidden",
                                             "shared_hidden", "sigmoid")]
                + [(n, ctypes.c_float) for n in ("eps_attn", "eps_q", "eps_k", "eps_ffn")]
                + [(n, ctypes.c_void_p) for n in ("attn_norm", "wq", "wkv", "wo", "q_norm", "k_norm", "ffn_norm",
                                                  "router", "bias", "w_in", "w_out", "s_in", "s_out", "cos", "sin",
                                                  "key_ok", "keys", "values", "x", "queries")]
                + [(n, ctypes.c_int) for n in ("threads", "causal", "bf16")])


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` (:func:`omniar._native.build`'s) with the prototypes of the functions this module calls."""
    lib.omniar_block_step.argtypes = [ctypes.POINTER(_Step)]
    lib.omniar_block_step.restype = ctypes.c_int
    lib.omniar_attention.argtypes = [ctypes.POINTER(_Step), ctypes.c_void_p, ctypes.c_void_p]
    lib.omniar_attention.restype = ctypes.c_int
    lib.omniar_bf16.restype = ctypes.c_int
    lib.omniar_moe.argtypes = [ctypes.POINTER(_Step), ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    lib.omniar_moe.restype = ctypes.c_int
    lib.omniar_linear.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 3
    lib.omniar_rms_norm.argtypes = [ctypes.c_int] * 4 + [ctypes.c_float] + [ctypes.c_void_p] * 3
    lib.omniar_qk_prep.argtypes = [ctypes.POINTER(_Step), ctypes.c_void_p, ctypes.c_void_p]
    lib.omniar_qk_prep.restype = ctypes.c_int
    if lib.omniar_bf16():
        lib.omniar_moe_bf16.argtypes = [ctypes.c_int] * 7 + [ctypes.c_void_p] * 8
        lib.omniar_moe_bf16.restype = ctypes.c_int
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """omniar's kernels (:func:`omniar._native.library`) declared for this module, or None (steps stay eager)."""
    lib = _native.library()
    return None if lib is None else declare(lib)


def _eps(norm: torch.nn.RMSNorm) -> float:
    return torch.finfo(torch.float32).eps if norm.eps is None else norm.eps


def _ffn_weights(ffn) -> dict[str, torch.Tensor | None]:
    """The tensors the kernel reads from an MoE layer or a dense SwiGLU ``ffn``, by the kernel's field names."""
    moe = "router" in ffn._modules
    dense = ffn._modules.get("shared") if moe else ffn
    return {"router": ffn._modules["router"]._parameters["weight"] if moe else None,
            "s_in": None if dense is None else dense._modules["w_in"]._parameters["weight"],
            "s_out": None if dense is None else dense._modules["w_out"]._parameters["weight"],
            "bias": ffn._buffers["selection_bias"] if moe else None, "w_in": ffn._parameters["w_in"] if moe else None,
            "w_out": ffn._parameters["w_out"] if moe else None}


def _weights(block) -> dict[str, torch.Tensor | None]:
    """The tensors the kernel reads from ``block``, by the kernel's field names (straight from the modules'
    tables: this runs every step)."""
    attn = block._modules["attn"]
    w = {"attn_norm": block._modules["attn_norm"], "wq": attn._modules["q_proj"], "wkv": attn._modules["kv_proj"],
         "wo": attn._modules["o_proj"], "q_norm": attn._modules["q_norm"], "k_norm": attn._modules["k_norm"],
         "ffn_norm": block._modules["ffn_norm"]}
    w = {name: None if m is None else m._parameters["weight"] for name, m in w.items()}
    return w | _ffn_weights(block._modules["ffn"])


def _cached(module, weights: dict[str, torch.Tensor | None], fields) -> _Step | None:
    """``module``'s template, kept beside it while its ``weights`` stay where they are: a :class:`_Step` with
    ``fields()`` and the weights' addresses, or None where the kernel cannot read them (another dtype or
    device)."""
    key = tuple(0 if w is None else w.data_ptr() for w in weights.values())
    cached = _TEMPLATES.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    usable = all(w is None or (w.dtype == torch.float32 and w.device.type == "cpu" and w.is_contiguous())
                 for w in weights.values())
    step = _Step(**fields(), **{name: None if w is None else w.data_ptr() for name, w in weights.items()}) \
        if usable else None
    _TEMPLATES[module] = (key, step)
    return step


def _ffn_fields(ffn) -> dict:
    """The kernel's shape fields of an MoE layer or a dense SwiGLU ``ffn``."""
    weights = _ffn_weights(ffn)
    moe = weights["router"] is not None
    return dict(D=(weights["router"] if moe else weights["s_in"]).shape[1],
                hidden=weights["w_in"].shape[2] // 2 if moe else 0,
                shared_hidden=0 if weights["s_out"] is None else weights["s_out"].shape[1],
                sigmoid=int(moe and ffn.gating == "sigmoid"))


def _template(block) -> _Step | None:
    """``block``'s fixed fields (shapes, norms' eps, weight addresses), or None where the kernel cannot run it (a
    norm without weight, sharded experts, weights it cannot read)."""
    weights = _weights(block)
    if (any(weights[n] is None for n in ("attn_norm", "q_norm", "k_norm", "ffn_norm"))
            or getattr(block.ffn, "ep_group", None) is not None):
        return None
    attn = block.attn
    return _cached(block, weights, lambda: _ffn_fields(block.ffn) | dict(
        H=attn.num_heads, KVH=attn.num_kv_heads, HD=attn.head_dim, eps_attn=_eps(block.attn_norm),
        eps_q=_eps(attn.q_norm), eps_k=_eps(attn.k_norm), eps_ffn=_eps(block.ffn_norm)))


def prepare(blocks, x: torch.Tensor, cos: torch.Tensor, cache) -> list[_Step] | None:
    """The blocks' kernel templates if they can run this step or prompt pass fused (fp32 CPU tensors without
    gradients, MoE or dense SwiGLU blocks with affine norms, a cache in fp32, at most :data:`MAX_ROWS` rows), else
    None."""
    if (x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_grad_enabled()
            or x.shape[0] * x.shape[1] > MAX_ROWS or not cos.is_contiguous() or cos.dtype != torch.float32
            or not cache.key_ok.is_contiguous() or library() is None):
        return None
    templates = [_template(block) for block in blocks]
    ok = all(t is not None and k is not None and k.dtype == torch.float32 and k.is_contiguous() and v.is_contiguous()
             for t, k, v in zip(templates, cache.keys, cache.values))
    return templates if ok else None


def block_step(template: _Step, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache, layer: int,
               num_experts: int, top_k: int, causal: bool = False) -> None:
    """Run the block of ``template`` (from :func:`prepare`) on ``x`` ``(B, L, d)`` in place, writing its keys and
    values after the cache's held slots in ``layer`` (the caller commits them), as ``Block.forward`` does: in a
    next-scale step every query sees every real held or new slot; ``causal`` (the prompt pass), new token l sees
    the held slots and the new ones through its own, and a query with no real key among them gives zeros."""
    step = _Step.from_buffer_copy(template)  # a copy: calls in other threads may share the block
    step.causal = causal
    b, length, _ = x.shape
    queries = None
    if cache.queries is not None:  # NACL scores by the step's queries
        queries = x.new_empty(b, step.H, length, step.HD)
    step.B, step.L, step.held, step.cap = b, length, len(cache), cache.keys[layer].shape[2]
    step.threads = torch.get_num_threads() if b * length >= THREAD_ROWS else 1
    step.E, step.top_k = (num_experts, top_k) if step.router is not None else (0, 0)
    step.cos, step.sin, step.key_ok, step.x = cos.data_ptr(), sin.data_ptr(), cache.key_ok.data_ptr(), x.data_ptr()
    step.keys, step.values = cache.keys[layer].data_ptr(), cache.values[layer].data_ptr()
    step.queries = None if queries is None else queries.data_ptr()
    if library().omniar_block_step(ctypes.byref(step)):
        raise MemoryError("omniar: the fused block step could not allocate its work buffers")
    if queries is not None:
        cache.note_queries(layer, queries)


def _cache_step(cache, layer: int, batch: int, length: int, heads: int, kv_heads: int, head_dim: int,
                **fields) -> _Step:
    """The kernel's fields of an eager step's attention work over ``layer``'s cache (its dtype says bf16 or fp32),
    the batch split over torch's threads, and ``fields``."""
    keys = cache.keys[layer]
    return _Step(B=batch, L=length, H=heads, KVH=kv_heads, HD=head_dim, held=len(cache), cap=keys.shape[2],
                 keys=keys.data_ptr(), values=cache.values[layer].data_ptr(), threads=torch.get_num_threads(),
                 bf16=keys.dtype == torch.bfloat16, **fields)


def attention(attn, q: torch.Tensor, cache, layer: int, causal: bool = False) -> torch.Tensor | None:
    """For an eager next-scale step or prompt pass whose keys and values are in the cache: ``attn``'s attention of
    the rotated queries ``q`` ``(B, H, L, HD)`` over the real slots of ``layer`` held before the step and written
    by it (every query sees them all; ``causal``, the prompt pass: new token l the held slots and the new ones
    through its own; none: zeros), as ``(B, L, H * HD)``, the batch split over torch's threads. In fp32, or in bf16
    (queries and cache) where the CPU has AVX-512 BF16 and the head dim is a multiple of 16: products in bf16 pairs
    accumulated in fp32, the softmax in fp32. None (nothing done) where it does not apply: another dtype or device,
    gradients, or no kernel."""
    if (q.device.type != "cpu" or torch.is_grad_enabled() or cache.keys[layer].dtype != q.dtype
            or not q.is_contiguous() or library() is None):
        return None
    if not (q.dtype == torch.float32
            or q.dtype == torch.bfloat16 and q.shape[-1] % 16 == 0 and library().omniar_bf16()):
        return None
    b, heads, length, head_dim = q.shape
    step = _cache_step(cache, layer, b, length, heads, attn.num_kv_heads, head_dim, key_ok=cache.key_ok.data_ptr(),
                       causal=causal)
    out = q.new_empty(b, length, heads * head_dim)
    if library().omniar_attention(ctypes.byref(step), q.data_ptr(), out.data_ptr()):
        raise MemoryError("omniar: the fused attention could not allocate its work buffers")
    return out


def _kept(store: weakref.WeakKeyDictionary, layer, weights: dict[str, torch.Tensor | None], make) -> dict:
    """``{name: make(name, weight)}`` of ``layer``'s ``weights`` (None stays None), kept in ``store`` beside the
    layer and made again only when a weight changes (storage, version or dtype)."""
    key = tuple(None if w is None else (w.data_ptr(), w._version, w.dtype) for w in weights.values())
    kept = store.get(layer)
    if kept is None or kept[0] != key:
        kept = key, {n: None if w is None else make(n, w.detach()) for n, w in weights.items()}
        store[layer] = kept
    return kept[1]


def _fp32_weights(layer) -> dict[str, torch.Tensor | None]:
    """The MoE ``layer``'s tensors for the kernel (:func:`_ffn_weights`): its own in fp32; those of a bf16 layer
    widened to fp32 (exact), kept beside it (:func:`_kept`)."""
    weights = _ffn_weights(layer)
    if all(w is None or w.dtype == torch.float32 for w in weights.values()):
        return weights
    return _kept(_WIDENED, layer, weights, lambda name, w: w.float().contiguous())


def _pairs(w: torch.Tensor) -> torch.Tensor:
    """bf16 ``w`` ``(..., K, N)`` as ``(..., K / 2, N)`` int32 pairs along K (row 2k in the low half): the bf16
    kernel's form for the weight of a product that sums over K."""
    u = w.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    return (u[..., 0::2, :] | (u[..., 1::2, :] << 16)).contiguous()


def _bf16_pairs(layer) -> dict[str, torch.Tensor | None] | None:
    """The bf16 MoE ``layer``'s expert weights as the bf16 kernel reads them (:func:`_pairs`; the shared expert's
    linears transposed first), kept beside it (:func:`_kept`); None where the kernel cannot take them (not all
    bf16, or the model width or an expert's hidden width not a multiple of 32)."""
    weights = {n: w for n, w in _ffn_weights(layer).items() if n in ("w_in", "w_out", "s_in", "s_out")}
    d, two_hid = weights["w_in"].shape[1], weights["w_in"].shape[2]
    if (any(w is not None and w.dtype != torch.bfloat16 for w in weights.values()) or d % 32 or two_hid % 64
            or weights["s_in"] is not None and weights["s_in"].shape[0] % 64):
        return None
    return _kept(_PAIRED, layer, weights, lambda name, w: _pairs(w.t() if name.startswith("s_") else w))


def _moe_bf16(layer, x: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor | None:
    """:func:`moe` for a bf16 layer's rows past :data:`MOE_ROWS`: the layer's own routing, then its experts in one
    call of the bf16 kernel (products in bf16 pairs accumulated in fp32, each hidden rounded to bf16 once, the sum
    rounded once); None where the CPU has no AVX-512 BF16 or the kernel cannot take the weights."""
    paired = _bf16_pairs(layer) if library().omniar_bf16() else None
    if paired is None:
        return None
    _, _, idx, weights = layer.route(x, num_experts, top_k)
    d = x.shape[-1]
    s_hid = 0 if paired["s_out"] is None else paired["s_out"].shape[0] * 2
    idx, weights = idx.reshape(-1, top_k).contiguous(), weights.reshape(-1, top_k).float().contiguous()
    out = torch.empty_like(x)
    ptr = lambda t: None if t is None else t.data_ptr()  # noqa: E731
    if library().omniar_moe_bf16(torch.get_num_threads(), x.numel() // d, d, num_experts, top_k,
                                 paired["w_in"].shape[2] // 2, s_hid, x.data_ptr(), idx.data_ptr(),
                                 weights.data_ptr(), *(ptr(paired[n]) for n in ("w_in", "w_out", "s_in", "s_out")),
                                 out.data_ptr()):
        raise MemoryError("omniar: the bf16 MoE layer could not allocate its work buffers")
    return out


def moe(layer, x: torch.Tensor, num_experts: int, top_k: int) -> torch.Tensor | None:
    """The eval output of the MoE layer ``layer`` (routing, shared and routed experts, no statistics) for ``x``
    ``(B, L, d)`` in one call, its rows split over torch's threads. A bf16 layer runs it in fp32 on its weights
    widened once (:func:`_fp32_weights`), the output rounded to bf16 once: a bf16 model's steps do not pay torch's
    per-op cost either (BENCHMARKS.md, "A bf16 model's MoE layers through the fp32 kernel"); past :data:`MOE_ROWS`
    rows, its experts in bf16 (:func:`_moe_bf16`). None (nothing done) where it does not apply: not fp32 or bf16
    CPU rows without gradients or autocast, more than :data:`MOE_ROWS` fp32 rows, sharded experts, no kernel."""
    if (x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16) or torch.is_grad_enabled()
            or not x.is_contiguous() or torch.is_autocast_enabled("cpu") or layer.ep_group is not None
            or library() is None):
        return None
    if x.numel() > MOE_ROWS * x.shape[-1]:
        return _moe_bf16(layer, x, num_experts, top_k) if x.dtype == torch.bfloat16 else None
    template = _cached(layer, _fp32_weights(layer), lambda: _ffn_fields(layer))
    if template is None:
        return None
    step = _Step.from_buffer_copy(template)
    step.E, step.top_k, step.threads = num_experts, top_k, torch.get_num_threads()
    rows = x.float()
    out = torch.empty_like(rows)
    if library().omniar_moe(ctypes.byref(step), rows.numel() // rows.shape[-1], rows.data_ptr(), out.data_ptr()):
        raise MemoryError("omniar: the fused MoE layer could not allocate its work buffers")
    return out.to(x.dtype)


def rms_norm(x: torch.Tensor, norm: torch.nn.RMSNorm) -> torch.Tensor:
    """``norm(x)`` in one C call (instead of half a dozen aten ops) for CPU rows without gradients, in fp32 or in
    bf16 (computed in fp32, rounded once), the weight in the same dtype; else ``norm(x)``."""
    w = norm.weight
    if (x.dtype not in (torch.float32, torch.bfloat16) or x.device.type != "cpu" or torch.is_grad_enabled()
            or w is None or w.dtype != x.dtype or library() is None):
        return norm(x)
    x = x.contiguous()
    out = torch.empty_like(x)
    library().omniar_rms_norm(torch.get_num_threads(), x.dtype == torch.bfloat16, x.numel() // x.shape[-1],
                              x.shape[-1], _eps(norm), x.data_ptr(), w.data_ptr(), out.data_ptr())
    return out


def _onednn_linear():
    """torch's oneDNN fp32 linear (the op its CPU compiler emits), or None in a build without it."""
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


_ONEDNN_LINEAR = _onednn_linear()


def dense(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """``layer(x)`` for inference: fp32 CPU rows without gradients or autocast go through oneDNN's fp32 product,
    which uses the CPU's widest vectors where MKL's (torch's default for fp32) may not: 2.2-2.4x on AVX-512 AMD CPUs
    (BENCHMARKS.md, "fp32 products through oneDNN in inference"). Anything else (training, other dtypes or devices)
    is ``layer(x)``."""
    w = layer.weight
    if (_ONEDNN_LINEAR is None or x.dtype != torch.float32 or w.dtype != torch.float32 or x.device.type != "cpu"
            or w.device.type != "cpu" or torch.is_grad_enabled() or torch.is_autocast_enabled("cpu")):
        return layer(x)
    return _ONEDNN_LINEAR(x, w, layer.bias, "none", [], "")


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, weight)`` for the few contiguous fp32 rows of a fused step."""
    if weight.dtype != torch.float32 or weight.device.type != "cpu" or not weight.is_contiguous():
        return torch.nn.functional.linear(x, weight)
    out = x.new_empty(*x.shape[:-1], weight.shape[0])
    library().omniar_linear(x.numel() // x.shape[-1], x.shape[-1], weight.shape[0], x.data_ptr(), weight.data_ptr(),
                            out.data_ptr())
    return out


def qk_prep(attn, q: torch.Tensor, kv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache,
            layer: int) -> torch.Tensor | None:
    """For an eager step with a cache: ``attn``'s QK-norm and RoPE of the projections ``q`` ``(B, L, H * HD)`` and
    ``kv`` ``(B, L, 2 * KVH * HD)``, the keys and values written after the cache's held slots in ``layer``, in one
    call; returns the queries ``(B, H, L, HD)``. In fp32, or in bf16 (computed in fp32, rounded once). None (nothing
    done) where it does not apply: not fp32 or bf16 CPU tensors (weights, tables and cache alike) without
    gradients, or no kernel."""
    keys, values = cache.keys[layer], cache.values[layer]
    tensors = (q, kv, cos, sin, keys, values, attn.q_norm.weight, attn.k_norm.weight)
    if (q.dtype not in (torch.float32, torch.bfloat16) or q.device.type != "cpu" or torch.is_grad_enabled()
            or not all(t is not None and t.dtype == q.dtype and t.is_contiguous() for t in tensors)
            or library() is None):
        return None
    b, length, _ = q.shape
    out = q.new_empty(b, attn.num_heads, length, attn.head_dim)
    step = _cache_step(cache, layer, b, length, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                       eps_q=_eps(attn.q_norm), eps_k=_eps(attn.k_norm), q_norm=attn.q_norm.weight.data_ptr(),
                       k_norm=attn.k_norm.weight.data_ptr(), cos=cos.data_ptr(), sin=sin.data_ptr(),
                       queries=out.data_ptr())
    if library().omniar_qk_prep(ctypes.byref(step), q.data_ptr(), kv.data_ptr()):
        raise MemoryError("omniar: the fused QK-norm and RoPE could not allocate their work space")
    return out
