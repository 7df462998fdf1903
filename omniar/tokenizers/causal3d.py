"""Causal 3D convolutional encoder and decoder.

Time is padded only on the past side (with copies of the first frame), so the
latent of frame t never depends on later frames and the first frame is encoded
alone. Normalisation is per frame for the same reason. The decoder can run
chunk by chunk in time: each causal conv keeps the last frames it saw.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import _native


class _KeptCastConv:
    """A conv that, under CPU autocast without autograd (bf16 decode), runs in channels-last layout with its
    weight's autocast cast kept between calls: oneDNN's bf16 convs run 1.2-2x faster on that layout here, and the
    norms, activations and upsampling between the convs keep it, so the layout is converted once per net.
    Autocast would recast the weight in every context (the 256-channel 3D weights, a third of a one-clip bf16
    decode), so the cast is redone only when the weight changes (its version or storage) or the dtype does."""

    layout: torch.memory_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dim() == self.weight.dim() and torch.is_autocast_enabled("cpu")
                and not torch.is_grad_enabled()):  # batched: unbatched inputs have no channels-last layout
            return self._autocast_forward(x.contiguous(memory_format=self.layout))
        return self._plain_forward(x)

    def _autocast_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self._cast_weight(), self.bias)

    def _plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)

    def _cast_weight(self) -> torch.Tensor:
        return self.kept("_cast", torch.get_autocast_dtype("cpu"), lambda w: w)

    def kept(self, name: str, dtype: torch.dtype, make, layout: torch.memory_format | None = None) -> torch.Tensor:
        """``make(weight)`` in ``dtype`` and ``layout`` (default: this conv's), kept as attribute ``name`` and made
        again only when the weight changes (its version or storage) or the dtype does."""
        w = self.weight
        key = (w._version, w.data_ptr(), dtype)
        if getattr(self, name + "_key", None) != key:
            setattr(self, name, make(w.detach()).to(dtype).contiguous(memory_format=layout or self.layout))
            setattr(self, name + "_key", key)
        return getattr(self, name)


class Conv2d(_KeptCastConv, nn.Conv2d):
    """``nn.Conv2d`` with the kept channels-last autocast weight of :class:`_KeptCastConv`; a 3 x 3 one (stride 1,
    zero padding 1) runs bf16 decoding by Winograd's algorithm where :func:`winograd_conv` takes it."""

    layout = torch.channels_last

    def _autocast_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = winograd_conv(self, x)
        return super()._autocast_forward(x) if y is None else y


class Conv3d(_KeptCastConv, nn.Conv3d):
    """``nn.Conv3d`` with the kept channels-last autocast weight of :class:`_KeptCastConv`, which also runs oneDNN
    for every CPU fp32 inference call (unless oneDNN is switched off, ``torch.backends.mkldnn.flags(enabled=False)``).
    PyTorch's dispatch gives a batch-1 input with batch x channels x frames x rows <= 20480 to its native kernel
    instead, 7x slower here, and chunked decoding (one clip, one latent frame at a time) is made of such calls."""

    layout = torch.channels_last_3d

    def _plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
            return torch.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride, self.dilation,
                                            self.groups)
        return super()._plain_forward(x)


CONV_MODES = ("3d", "2+1d")


def _cat_time(past: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``torch.cat([past, x], dim=2)``, channels-last under CPU autocast (bf16 decode), where cat would give
    the channels-last ``x`` back contiguous and the next conv convert it again (a quarter of the bf16 decode
    time). Elsewhere plain cat, so fp32 results stay bit for bit what they were."""
    if not (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")) or x.is_contiguous():
        return torch.cat([past, x], dim=2)
    b, c, t, h, w = x.shape
    out = torch.empty((b, c, past.shape[2] + t, h, w), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last_3d)
    out[:, :, :past.shape[2]] = past
    out[:, :, past.shape[2]:] = x
    return out


class CausalConv3d(nn.Module):
    """3D conv whose temporal receptive field only reaches into the past.

    ``mode``: ``"3d"`` a full k x k x k kernel; ``"2+1d"`` a k x k spatial conv then a causal k x 1 x 1
    temporal conv (R(2+1)D: 12 instead of 27 weights per channel pair, same receptive field)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, time_stride: int = 1, space_stride: int = 1,
                 mode: str = "3d"):
        super().__init__()
        self.time_pad = kernel - 1
        if mode == "2+1d" and kernel > 1:
            self.spatial = Conv3d(cin, cout, (1, kernel, kernel), stride=(1, space_stride, space_stride),
                                  padding=(0, kernel // 2, kernel // 2))
            self.conv = Conv3d(cout, cout, (kernel, 1, 1), stride=(time_stride, 1, 1))
        else:
            self.spatial = None
            self.conv = Conv3d(cin, cout, kernel, stride=(time_stride, space_stride, space_stride),
                               padding=(0, kernel // 2, kernel // 2))
        self.streaming = False  # keep the trailing input frames for the next chunk
        self._past: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.spatial is not None:
            x = self.spatial(x)
        if self.time_pad:
            past = self._past if self._past is not None else x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
            x = _cat_time(past, x)
            if self.streaming:
                self._past = x[:, :, -self.time_pad:]
        return self.conv(x)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm over (C, H, W) of each frame: statistics never mix time steps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)


def _groups(channels: int) -> int:
    return math.gcd(32, channels)


def _norm(channels: int) -> FrameGroupNorm:
    return FrameGroupNorm(_groups(channels), channels, eps=1e-6)


def _norm2d(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(_groups(channels), channels, eps=1e-6)


@functools.cache
def _kernels() -> ctypes.CDLL | None:
    """omniar's C kernels with the decoder's declared, or None (no compiler, or no AVX-512 BF16)."""
    lib = _native.library()
    if lib is None or not lib.omniar_bf16():
        return None
    lib.omniar_group_norm_silu.argtypes = [ctypes.c_int] * 5 + [ctypes.c_float] + [ctypes.c_void_p] * 4
    lib.omniar_group_norm_silu.restype = ctypes.c_int
    lib.omniar_winograd_bf16.argtypes = [ctypes.c_int] * 6 + [ctypes.c_void_p] * 4
    lib.omniar_winograd_bf16.restype = ctypes.c_int
    return lib


def _c_bf16(x: torch.Tensor) -> bool:
    """Whether the C kernels take ``x``: a channels-last bf16 CPU tensor without gradients, on a CPU with AVX-512
    BF16 (bf16 decoding)."""
    layout = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    return (layout is not None and x.dtype == torch.bfloat16 and x.device.type == "cpu" and not torch.is_grad_enabled()
            and x.is_contiguous(memory_format=layout) and _kernels() is not None)


# Winograd F(2 x 2, 3 x 3)'s weight transform G (Lavin and Gray, 2016): a 3 x 3 kernel g becomes G g G^T (4 x 4)
_WINOGRAD_G = ((1.0, 0.0, 0.0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.0, 0.0, 1.0))


def _winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 3 x 3 conv weight (K, C, 3, 3) transformed, G g G^T, as the kernel reads it: (16, C / 2, K, 2), pairs of
    input channels innermost."""
    weight = weight.float()  # the transform's sums in fp32 whatever the weight's dtype, rounded once by kept()
    g = weight.new_tensor(_WINOGRAD_G)
    k, c = weight.shape[:2]
    return torch.einsum("ai,kcij,bj->abck", g, weight, g).reshape(16, c // 2, 2, k).transpose(2, 3)


def winograd_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor | None:
    """``conv(x)`` for bf16 decoding by Winograd F(2 x 2, 3 x 3) in one C call, or None where it does not apply: a
    3 x 3 conv (stride 1, zero padding 1, no groups or dilation) of 32k to 32k' channels on channels-last bf16 CPU
    images of even size without gradients, under bf16 autocast, on a CPU with AVX-512 BF16. Each 2 x 2 output tile
    takes 16 instead of 36 products per channel pair; the input tile's transform is rounded to bf16 (as the weights
    are), the sums and the bias stay fp32 and the output is rounded once (BENCHMARKS.md, "Winograd convolutions for
    the decoder")."""
    if not (x.dim() == 4 and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and x.shape[1] % 32 == 0 and conv.out_channels % 32 == 0 and x.shape[2] % 2 == 0 and x.shape[3] % 2 == 0
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and _c_bf16(x)):
        return None
    n, c, h, w = x.shape
    u = conv.kept("_winograd", torch.bfloat16, _winograd_weight, torch.contiguous_format)
    bias = None if conv.bias is None else conv.bias.detach().float().contiguous()
    y = torch.empty((n, conv.out_channels, h, w), dtype=torch.bfloat16, memory_format=torch.channels_last)
    if _kernels().omniar_winograd_bf16(torch.get_num_threads(), n, h, w, c, conv.out_channels, x.data_ptr(),
                                       u.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr()):
        return None
    return y


def group_norm_silu(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``F.silu(norm(x))``. For bf16 decoding (channels-last bf16 CPU tensors without gradients, an affine
    ``nn.GroupNorm`` or :class:`FrameGroupNorm`, a CPU with AVX-512 BF16) one C call: the statistics in fp32, the
    output rounded to bf16 once (torch rounds the norm, then the SiLU), 2-3x faster than torch's two ops
    (BENCHMARKS.md, "The decoder's GroupNorm and SiLU in one call")."""
    if not isinstance(norm, nn.GroupNorm) or not norm.affine or not _c_bf16(x):
        return F.silu(norm(x))
    n, c = x.shape[:2]
    # channels-last: each clip's (or, per frame, each frame's) rows of C channels lie together
    items = n * x.shape[2] if isinstance(norm, FrameGroupNorm) else n
    w, b = (p.detach().float().contiguous() for p in (norm.weight, norm.bias))
    y = torch.empty_like(x)
    if _kernels().omniar_group_norm_silu(torch.get_num_threads(), items, x.numel() // (items * c), c, norm.num_groups,
                                         norm.eps, x.data_ptr(), w.data_ptr(), b.data_ptr(), y.data_ptr()):
        return F.silu(norm(x))  # channels the kernel does not take (not a multiple of 16)
    return y


class ResBlock3d(nn.Module):
    def __init__(self, cin: int, cout: int, mode: str = "3d"):
        super().__init__()
        self.block = FusedSequential(_norm(cin), nn.SiLU(), CausalConv3d(cin, cout, mode=mode),
                                     _norm(cout), nn.SiLU(), CausalConv3d(cout, cout, mode=mode))
        self.skip = Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


class ResBlock2d(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = FusedSequential(_norm2d(cin), nn.SiLU(), Conv2d(cin, cout, 3, padding=1),
                                     _norm2d(cout), nn.SiLU(), Conv2d(cout, cout, 3, padding=1))
        self.skip = Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


class Upsample3d(nn.Module):
    """Nearest upsampling x2 in space and optionally in time, then a causal conv.

    In time, frame 0 stays one frame and every later frame becomes two, which
    inverts the encoder's causal stride-2 layout (T = 1 + 2k <-> 1 + k).
    """

    def __init__(self, channels: int, time: bool, mode: str = "3d"):
        super().__init__()
        self.time = time
        self.conv = CausalConv3d(channels, channels, mode=mode)
        self.streaming = False
        self._seen_first = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one nearest upsampling in time and space: the same values as repeating each frame, in one copy
        x = F.interpolate(x, scale_factor=(2 if self.time else 1, 2, 2), mode="nearest")
        if self.time:
            if not self._seen_first:
                x = x[:, :, 1:]
            self._seen_first = self.streaming
        return self.conv(x)


class TimeUnfold(nn.Module):
    """(B, C tau, 1 + k, H, W) -> (B, C, 1 + tau k, H, W), inverting :func:`fold_time`: keeps the last of
    frame 0's tau copies (in the first chunk only, when a decode is streamed)."""

    def __init__(self, tau: int):
        super().__init__()
        self.tau = tau
        self.streaming = False
        self._seen_first = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = unfold_time(x, self.tau, first=not self._seen_first)
        self._seen_first = self.streaming
        return x


def fold_time(x: torch.Tensor, tau: int, first: bool = True) -> torch.Tensor:
    """(B, C, 1 + tau k, H, W) -> (B, C tau, 1 + k, H, W): each latent frame's tau frames become channels.
    Frame 0 is padded with tau - 1 copies of itself, so it is still encoded alone. ``first=False``: ``x`` holds
    whole groups (B, C, tau k, H, W), a later chunk of a streamed clip."""
    if first:
        x = torch.cat([x[:, :, :1].expand(-1, -1, tau - 1, -1, -1), x], dim=2)
    return x.unflatten(2, (-1, tau)).transpose(2, 3).flatten(1, 2)


def unfold_time(x: torch.Tensor, tau: int, first: bool = True) -> torch.Tensor:
    """The inverse of :func:`fold_time`: with ``first``, the last of frame 0's tau copies is kept."""
    x = x.unflatten(1, (-1, tau)).transpose(2, 3).flatten(2, 3)
    return x[:, :, tau - 1:] if first else x


def per_frame(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a 2D ``net`` on every frame of (B, C, t, H, W), channels-last (oneDNN's fast CPU layout: 4x the
    bf16 throughput of NCHW here)."""
    b, _, t = x.shape[:3]
    y = net(x.transpose(1, 2).flatten(0, 1).contiguous(memory_format=torch.channels_last))
    return y.unflatten(0, (b, t)).transpose(1, 2).contiguous()


# Nearest x2 upsampling then a 3x3 conv (padding 1) is a stride-2 transposed conv with a 4x4 kernel (padding 1):
# output row 2i + a sees input rows i - 1 + a and i + a only, through transposed tap k = 2 (i - p) + a + 1 of input
# row p, and _TAPS[k] sums the 3x3 kernel's rows (taps -1, 0, +1) that land on that input row; columns alike.
_TAPS = ((0.0, 0.0, 1.0), (0.0, 1.0, 1.0), (1.0, 1.0, 0.0), (1.0, 0.0, 0.0))


class FusedSequential(nn.Sequential):
    """``nn.Sequential`` that runs two pairs of modules as one call each. Each ``nn.Upsample(scale_factor=2,
    mode="nearest")`` followed by a 3 x 3 :class:`Conv2d` (stride 1, zero padding 1) runs as one stride-2 transposed
    conv at the input resolution: the same sums with 4 instead of 9 products per output and no upsampled copy, which
    is what the decoder's upsampling convs cost. Each GroupNorm followed by ``nn.SiLU`` runs as
    :func:`group_norm_silu`. The modules stay as they are (their weights keep their names); run one by one they give
    the reference result."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        modules, i = list(self), 0
        while i < len(modules):
            m = modules[i]
            nxt = modules[i + 1] if i + 1 < len(modules) else None
            if (isinstance(m, nn.Upsample) and m.scale_factor == 2 and m.mode == "nearest" and isinstance(nxt, Conv2d)
                    and nxt.kernel_size == (3, 3) and nxt.stride == (1, 1) and nxt.padding == (1, 1)
                    and nxt.dilation == (1, 1) and nxt.groups == 1 and nxt.padding_mode == "zeros" and x.dim() == 4):
                x, i = _upsample_conv(x, nxt), i + 2
            elif isinstance(m, nn.GroupNorm) and isinstance(nxt, nn.SiLU):
                x, i = group_norm_silu(m, x), i + 2
            else:
                x, i = m(x), i + 1
        return x


def _transposed_weight(weight: torch.Tensor) -> torch.Tensor:
    """A 3 x 3 conv weight (co, ci, 3, 3) as the 4 x 4 transposed-conv weight (ci, co, 4, 4) of the upsampling
    pair."""
    taps = weight.new_tensor(_TAPS)
    return torch.einsum("kh,lv,oihv->iokl", taps, taps, weight)


def _upsample_conv(x: torch.Tensor, conv: Conv2d) -> torch.Tensor:
    """``conv(F.interpolate(x, scale_factor=2, mode="nearest"))`` for ``x`` (B, C, H, W)."""
    if torch.is_grad_enabled():
        weight = _transposed_weight(conv.weight)
    else:  # kept between calls, channels-last (oneDNN's fast layout), as the conv keeps its cast
        cast = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        weight = conv.kept("_transposed", torch.get_autocast_dtype("cpu") if cast else conv.weight.dtype,
                           _transposed_weight)
        x = x.contiguous(memory_format=conv.layout)
    return F.conv_transpose2d(x, weight, conv.bias, stride=2, padding=1)


def _levels(spatial_compression: int, temporal_compression: int) -> tuple[int, int]:
    return int(math.log2(spatial_compression)), int(math.log2(temporal_compression))


def _coords(h: int, w: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres of an h x w grid in [-1, 1]: y (h, 1) and x (1, w), of ``like``'s device and dtype; the same
    relative positions at any resolution."""
    y = torch.linspace(-1 + 1 / h, 1 - 1 / h, h, device=like.device, dtype=like.dtype)
    x = torch.linspace(-1 + 1 / w, 1 - 1 / w, w, device=like.device, dtype=like.dtype)
    return y[:, None], x[None, :]


def _fourier(coord: torch.Tensor, frequencies: int, dim: int) -> torch.Tensor:
    """Sines and cosines of coordinates in [-1, 1] at ``frequencies`` octaves of pi, stacked along a new ``dim``."""
    shape = [1] * (coord.dim() + 1)
    shape[dim] = frequencies
    octaves = math.pi * 2.0 ** torch.arange(frequencies, device=coord.device, dtype=coord.dtype).view(shape)
    angle = coord.unsqueeze(dim) * octaves
    return torch.cat([angle.sin(), angle.cos()], dim)


class GlobalContext(nn.Module):
    """Per latent frame, a vector added to every cell of the latent: a linear map (zero at initialisation) of the
    spatial mean and maximum of the encoder's last features. A frame's coarsest code (1x1) quantizes the mean of
    the latent, where a small object is a few cells of 64; this lets the encoder move that mean by what those
    cells hold (the object's colour) without touching the finer scales' residuals. Per frame, so causal.
    ``positions``: also where the frame's salient region is and what it holds: cells weighted by how far their
    features are from the frame's mean feature (a small object on a plain ground takes nearly all the weight),
    the features pooled by those weights and Fourier features of their centroid. Both are at full scale however
    small the region, so the coarsest code can tell places apart (first moments of the features, tried before,
    shrink with the object's share of the frame and never reached the code)."""

    def __init__(self, channels: int, latent_channels: int, positions: bool = False, frequencies: int = 4):
        super().__init__()
        self.positions, self.frequencies = positions, frequencies
        self.proj = nn.Linear((3 * channels + 4 * frequencies) if positions else 2 * channels, latent_channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Features (B, C, t, h, w) -> (B, latent_channels, t, 1, 1)."""
        stats = [h.mean((3, 4)), h.amax((3, 4))]
        if self.positions:
            with torch.autocast(h.device.type, enabled=False):  # weights are ratios of small sums
                f = h.float()
                far = (f - f.mean((3, 4), keepdim=True)).pow(2).sum(1)  # (B, t, h, w)
                weight = far / far.sum((2, 3), keepdim=True).clamp_min(1e-6)
                y, x = _coords(*h.shape[-2:], f)
                place = torch.cat([_fourier((weight * c).sum((2, 3)), self.frequencies, 1) for c in (y, x)], 1)
                stats += [(f * weight[:, None]).sum((3, 4)).to(h.dtype), place.to(h.dtype)]
        return self.proj(torch.cat(stats, dim=1).transpose(1, 2)).transpose(1, 2)[..., None, None]


class PositionMap(nn.Module):
    """A map added to the decoder's input latent: sines and cosines of each cell's (y, x) at ``frequencies``
    octaves, through a 1x1 conv, plus a product of the latent with those features (a 1x1 conv of each, multiplied
    cell by cell, through a 1x1 conv). A coarse preview's latent is nearly constant over the frame (its 1x1 code
    upsampled): the first term gives the decoder the positions, the product lets that constant say where to paint
    (Fourier coefficients of a place times the cells' own features make a bump there), which the decoder's
    convolutions would otherwise have to learn to multiply. Both output convs start at zero, so a tokenizer trained
    without the map decodes unchanged."""

    def __init__(self, latent_channels: int, frequencies: int = 4):
        super().__init__()
        self.frequencies = frequencies
        self.proj = nn.Conv2d(4 * frequencies, latent_channels, 1)
        self.key = nn.Conv2d(latent_channels, latent_channels, 1, bias=False)
        self.basis = nn.Conv2d(4 * frequencies, latent_channels, 1, bias=False)
        self.mix = nn.Conv2d(latent_channels, latent_channels, 1)
        for conv in (self.proj, self.mix):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, C, t, h, w) -> the same plus the position map (per frame, by the same map in every frame)."""
        b, c, t, h, w = z.shape
        y, x = _coords(h, w, z)
        dtype = self.proj.weight.dtype
        feats = torch.cat([_fourier(v.expand(h, w), self.frequencies, 0) for v in (y, x)])[None].to(dtype)
        frames = z.transpose(1, 2).reshape(b * t, c, h, w).to(dtype)
        added = self.proj(feats) + self.mix(self.key(frames) * self.basis(feats))  # (B t, C, h, w)
        return z + added.reshape(b, t, c, h, w).transpose(1, 2).to(z.dtype)


def _latent_out(layers: nn.Sequential, context: GlobalContext | None, x: torch.Tensor) -> torch.Tensor:
    """``layers`` (its last one maps features to the latent), plus the global context of those features."""
    if context is None:
        return layers(x)
    h = layers[:-1](x)
    return layers[-1](h) + context(h).to(h.dtype)


class Encoder3d(nn.Module):
    """video (B, 3, 1 + tau k, H, W) -> latent (B, C, 1 + k, H / s, W / s)."""

    def __init__(self, in_channels: int, channels: list[int], num_res_blocks: int, latent_channels: int,
                 spatial_compression: int, temporal_compression: int, mode: str = "3d", global_context: bool = False,
                 positions: bool = False):
        super().__init__()
        n_space, n_time = _levels(spatial_compression, temporal_compression)
        layers: list[nn.Module] = [CausalConv3d(in_channels, channels[0], mode=mode)]
        for i in range(n_space):
            for j in range(num_res_blocks):
                layers.append(ResBlock3d(channels[i] if j == 0 else channels[i + 1], channels[i + 1], mode))
            # Temporal downsampling happens at the coarsest levels, where it is cheapest.
            layers.append(CausalConv3d(channels[i + 1], channels[i + 1], time_stride=2 if i >= n_space - n_time else 1,
                                       space_stride=2, mode=mode))
        layers += [ResBlock3d(channels[-1], channels[-1], mode), _norm(channels[-1]), nn.SiLU(),
                   CausalConv3d(channels[-1], latent_channels, mode=mode)]
        self.net = nn.Sequential(*layers)
        self.context = GlobalContext(channels[-1], latent_channels, positions) if global_context else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _latent_out(self.net, self.context, x)


class _StreamingDecoder(nn.Module):
    @contextlib.contextmanager
    def streaming(self):
        """Within this context, successive calls decode consecutive chunks of latent frames."""
        stateful = [m for m in self.modules() if isinstance(m, (CausalConv3d, Upsample3d, TimeUnfold))]
        for m in stateful:
            m.streaming = True
        try:
            yield
        finally:
            for m in stateful:
                m.streaming = False
                if isinstance(m, CausalConv3d):
                    m._past = None
                else:
                    m._seen_first = False


class Decoder3d(_StreamingDecoder):
    """latent (B, C, 1 + k, h, w) -> video (B, 3, 1 + tau k, h s, w s); mirrors :class:`Encoder3d`."""

    def __init__(self, out_channels: int, channels: list[int], num_res_blocks: int, latent_channels: int,
                 spatial_compression: int, temporal_compression: int, mode: str = "3d"):
        super().__init__()
        n_space, n_time = _levels(spatial_compression, temporal_compression)
        rev = channels[::-1]
        layers: list[nn.Module] = [CausalConv3d(latent_channels, rev[0], mode=mode), ResBlock3d(rev[0], rev[0], mode)]
        for i in range(n_space):
            layers.append(Upsample3d(rev[i], time=i < n_time, mode=mode))
            for j in range(num_res_blocks):
                layers.append(ResBlock3d(rev[i] if j == 0 else rev[i + 1], rev[i + 1], mode))
        layers += [_norm(rev[-1]), nn.SiLU(), CausalConv3d(rev[-1], out_channels, mode=mode)]
        self.net = FusedSequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class FoldEncoder(nn.Module):
    """The cheap design: video (B, 3, 1 + tau k, H, W) -> latent (B, C, 1 + k, H / s, W / s).

    Each latent frame's tau frames are folded into channels (:func:`fold_time`) and a 2D CNN downsamples
    each latent frame on its own; time mixes only in a causal 3D block at the latent resolution. Its
    full-resolution convs see 1 + k frames with 3 x 3 kernels, where :class:`Encoder3d`'s see 1 + tau k
    frames with 3 x 3 x 3 kernels."""

    def __init__(self, in_channels: int, channels: list[int], num_res_blocks: int, latent_channels: int,
                 spatial_compression: int, temporal_compression: int, mode: str = "3d", global_context: bool = False,
                 positions: bool = False):
        super().__init__()
        n_space, _ = _levels(spatial_compression, temporal_compression)
        self.tau = temporal_compression
        layers: list[nn.Module] = [Conv2d(in_channels * self.tau, channels[0], 3, padding=1)]
        for i in range(n_space):
            for j in range(num_res_blocks):
                layers.append(ResBlock2d(channels[i] if j == 0 else channels[i + 1], channels[i + 1]))
            layers.append(Conv2d(channels[i + 1], channels[i + 1], 3, stride=2, padding=1))
        self.frames = nn.Sequential(*layers)
        self.time = nn.Sequential(ResBlock3d(channels[-1], channels[-1], mode), _norm(channels[-1]), nn.SiLU(),
                                  CausalConv3d(channels[-1], latent_channels, mode=mode))
        self.context = GlobalContext(channels[-1], latent_channels, positions) if global_context else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _latent_out(self.time, self.context, per_frame(self.frames, fold_time(x, self.tau)))


class FoldDecoder(_StreamingDecoder):
    """latent (B, C, 1 + k, h, w) -> video (B, 3, 1 + tau k, h s, w s); mirrors :class:`FoldEncoder`."""

    def __init__(self, out_channels: int, channels: list[int], num_res_blocks: int, latent_channels: int,
                 spatial_compression: int, temporal_compression: int, mode: str = "3d"):
        super().__init__()
        n_space, _ = _levels(spatial_compression, temporal_compression)
        rev = channels[::-1]
        self.time = nn.Sequential(CausalConv3d(latent_channels, rev[0], mode=mode), ResBlock3d(rev[0], rev[0], mode))
        layers: list[nn.Module] = []
        for i in range(n_space):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), Conv2d(rev[i], rev[i], 3, padding=1)]
            for j in range(num_res_blocks):
                layers.append(ResBlock2d(rev[i] if j == 0 else rev[i + 1], rev[i + 1]))
        layers += [_norm2d(rev[-1]), nn.SiLU(),
                   Conv2d(rev[-1], out_channels * temporal_compression, 3, padding=1)]
        self.frames = FusedSequential(*layers)
        self.unfold = TimeUnfold(temporal_compression)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.unfold(per_frame(self.frames, self.time(z)))


class FrameRefiner(nn.Module):
    """Per-frame 2D residual CNN on the decoded frames: ``x + f(x)``, ``f`` zero at initialisation.

    Frames are refined independently, so causality and chunked decoding are untouched. It is small
    and works at pixel level, where the 3D decoder blurs edges (most of its error on Moving Shapes
    lies within two pixels of an edge), and it trains on cached decodes of a frozen tokenizer.

    ``scale`` > 1 runs the blocks on ``scale`` x ``scale`` pixel cells folded into channels (pixel unshuffle),
    so a 3x3 conv sees ``3 scale`` pixels across for 1 / scale^2 of the positions: a wider, cheaper refiner
    (BENCHMARKS.md, "U64 and U48")."""

    def __init__(self, channels: int, num_blocks: int, image_channels: int = 3, norm: bool = True, scale: int = 1):
        super().__init__()
        self.scale = scale
        folded = image_channels * scale * scale
        self.conv_in = Conv2d(folded, channels, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(Conv2d(channels, channels, 3, padding=1), nn.SiLU(),
                                                  Conv2d(channels, channels, 3, padding=1))
                                    for _ in range(num_blocks))
        # per-channel norm before the last SiLU: the unnormalised residual stream drifts in training
        # (to ~-8,000 in a 6-block run at lr 2e-3), which zeroed every SiLU and stopped all gradient
        self.norm_out = nn.GroupNorm(channels, channels) if norm else nn.Identity()
        self.conv_out = Conv2d(channels, folded, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """``frames`` (N, C, H, W) in [-1, 1], H and W multiples of ``scale`` -> refined frames (unclamped)."""
        h = self.conv_in(F.pixel_unshuffle(frames, self.scale) if self.scale > 1 else frames)
        for block in self.blocks:
            h = h + block(h)
        h = self.conv_out(group_norm_silu(self.norm_out, h))
        return frames + (F.pixel_shuffle(h, self.scale) if self.scale > 1 else h)
