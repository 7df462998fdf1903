"""Causal 3D convolutional encoder and decoder.

Time is padded only on the past side (with copies of the first frame), so the
latent of frame t never depends on later frames and the first frame is encoded
alone. Normalisation is per frame for the same reason. The decoder can run
chunk by chunk in time: each causal conv keeps the last frames it saw.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn


class Conv3d(nn.Conv3d):
    """``nn.Conv3d`` that runs oneDNN for every CPU fp32 inference call (unless oneDNN is switched off,
    ``torch.backends.mkldnn.flags(enabled=False)``). PyTorch's dispatch gives a batch-1 input with
    batch x channels x frames x rows <= 20480 to its native kernel instead, 7x slower here, and
    chunked decoding (one clip, one latent frame at a time) is made of such calls."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
                and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
            return torch.mkldnn_convolution(x, self.weight, self.bias, self.padding, self.stride, self.dilation,
                                            self.groups)
        return super().forward(x)


class CausalConv3d(nn.Module):
    """3D conv whose temporal receptive field only reaches into the past."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, time_stride: int = 1, space_stride: int = 1):
        super().__init__()
        self.time_pad = kernel - 1
        self.conv = Conv3d(cin, cout, kernel, stride=(time_stride, space_stride, space_stride),
                           padding=(0, kernel // 2, kernel // 2))
        self.streaming = False  # keep the trailing input frames for the next chunk
        self._past: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_pad:
            past = self._past if self._past is not None else x[:, :, :1].expand(-1, -1, self.time_pad, -1, -1)
            x = torch.cat([past, x], dim=2)
            if self.streaming:
                self._past = x[:, :, -self.time_pad:]
        return self.conv(x)


class FrameGroupNorm(nn.GroupNorm):
    """GroupNorm over (C, H, W) of each frame: statistics never mix time steps."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = super().forward(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)


def _norm(channels: int) -> FrameGroupNorm:
    return FrameGroupNorm(math.gcd(32, channels), channels, eps=1e-6)


class ResBlock3d(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = nn.Sequential(_norm(cin), nn.SiLU(), CausalConv3d(cin, cout),
                                   _norm(cout), nn.SiLU(), CausalConv3d(cout, cout))
        self.skip = Conv3d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.block(x)


class Upsample3d(nn.Module):
    """Nearest upsampling x2 in space and optionally in time, then a causal conv.

    In time, frame 0 stays one frame and every later frame becomes two, which
    inverts the encoder's causal stride-2 layout (T = 1 + 2k <-> 1 + k).
    """

    def __init__(self, channels: int, time: bool):
        super().__init__()
        self.time = time
        self.conv = CausalConv3d(channels, channels)
        self.streaming = False
        self._seen_first = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time:
            x = x.repeat_interleave(2, dim=2)
            if not self._seen_first:
                x = x[:, :, 1:]
            self._seen_first = self.streaming
        x = F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")
        return self.conv(x)


def _levels(spatial_compression: int, temporal_compression: int) -> tuple[int, int]:
    return int(math.log2(spatial_compression)), int(math.log2(temporal_compression))


class Encoder3d(nn.Module):
    """video (B, 3, 1 + tau k, H, W) -> latent (B, C, 1 + k, H / s, W / s)."""

    def __init__(self, in_channels: int, channels: list[int], num_res_blocks: int, latent_channels: int,
                 spatial_compression: int, temporal_compression: int):
        super().__init__()
        n_space, n_time = _levels(spatial_compression, temporal_compression)
        layers: list[nn.Module] = [CausalConv3d(in_channels, channels[0])]
        for i in range(n_space):
            for j in range(num_res_blocks):
                layers.append(ResBlock3d(channels[i] if j == 0 else channels[i + 1], channels[i + 1]))
            # Temporal downsampling happens at the coarsest levels, where it is cheapest.
            layers.append(CausalConv3d(channels[i + 1], channels[i + 1], time_stride=2 if i >= n_space - n_time else 1,
                                       space_stride=2))
        layers += [ResBlock3d(channels[-1], channels[-1]), _norm(channels[-1]), nn.SiLU(),
                   CausalConv3d(channels[-1], latent_channels)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder3d(nn.Module):
    """latent (B, C, 1 + k, h, w) -> video (B, 3, 1 + tau k, h s, w s); mirrors :class:`Encoder3d`."""

    def __init__(self, out_channels: int, channels: list[int], num_res_blocks: int, latent_channels: int,
                 spatial_compression: int, temporal_compression: int):
        super().__init__()
        n_space, n_time = _levels(spatial_compression, temporal_compression)
        rev = channels[::-1]
        layers: list[nn.Module] = [CausalConv3d(latent_channels, rev[0]), ResBlock3d(rev[0], rev[0])]
        for i in range(n_space):
            layers.append(Upsample3d(rev[i], time=i < n_time))
            for j in range(num_res_blocks):
                layers.append(ResBlock3d(rev[i] if j == 0 else rev[i + 1], rev[i + 1]))
        layers += [_norm(rev[-1]), nn.SiLU(), CausalConv3d(rev[-1], out_channels)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)

    @contextlib.contextmanager
    def streaming(self):
        """Within this context, successive calls decode consecutive chunks of latent frames."""
        stateful = [m for m in self.modules() if isinstance(m, (CausalConv3d, Upsample3d))]
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


class FrameRefiner(nn.Module):
    """Per-frame 2D residual CNN on the decoded frames: ``x + f(x)``, ``f`` zero at initialisation.

    Frames are refined independently, so causality and chunked decoding are untouched. It is small
    and works at pixel level, where the 3D decoder blurs edges (most of its error on Moving Shapes
    lies within two pixels of an edge), and it trains on cached decodes of a frozen tokenizer."""

    def __init__(self, channels: int, num_blocks: int, image_channels: int = 3, norm: bool = True):
        super().__init__()
        self.conv_in = nn.Conv2d(image_channels, channels, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.SiLU(),
                                                  nn.Conv2d(channels, channels, 3, padding=1))
                                    for _ in range(num_blocks))
        # per-channel norm before the last SiLU: the unnormalised residual stream drifts in training
        # (to ~-8,000 in a 6-block run at lr 2e-3), which zeroed every SiLU and stopped all gradient
        self.norm_out = nn.GroupNorm(channels, channels) if norm else nn.Identity()
        self.conv_out = nn.Conv2d(channels, image_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """``frames`` (N, C, H, W) in [-1, 1] -> refined frames (unclamped)."""
        h = self.conv_in(frames)
        for block in self.blocks:
            h = h + block(h)
        return frames + self.conv_out(F.silu(self.norm_out(h)))
