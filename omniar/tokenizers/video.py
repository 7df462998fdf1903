"""``VideoTokenizer``: causal 3D conv autoencoder + multi-scale residual VQ per latent frame.

A video ``(B, 3, T, H, W)`` in [-1, 1] with ``T = 1 + tau * k`` becomes
``1 + k`` latent frames of ``h x w`` (``H / spatial_compression`` x ``W / spatial_compression``),
each a stack of code maps of the sizes of ``config.scales`` (coarse to fine, last = the latent grid).
An image is a one-frame video.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config

from .._checks import check_bool, check_choice, check_float, check_int, require
from .._pretrained import PretrainedModel
from .._scales import ScaleSchedule, scale_shapes
from ..limits import MAX_BLOCKS, MAX_CHANNELS, MAX_CODEBOOK_SIZE
from .causal3d import (CONV_MODES, Decoder3d, Encoder3d, FoldDecoder, FoldEncoder, FrameRefiner, PositionMap,
                       per_frame, fold_time, unfold_time)
from .codes import MultiScaleCodes, Scales, check_scales
from .previews import PreviewCodes
from .quantizer import MultiScaleResidualVQ, resize


@dataclass
class TokenizerOutput:
    reconstruction: torch.Tensor  # (B, 3, T, H, W)
    vq_loss: torch.Tensor
    codes: MultiScaleCodes


class VideoTokenizer(ScaleSchedule, PretrainedModel, ConfigMixin):
    """Causal 3D multi-scale VQ tokenizer.

    Args:
        channels: encoder widths, one more entry than spatial downsampling levels
            (``len(channels) == log2(spatial_compression) + 1``); the decoder mirrors them.
        num_res_blocks: residual blocks per level.
        latent_channels: latent / code dimension.
        temporal_compression: tau in {1, 2, 4}; the first frame is always encoded alone.
        spatial_compression: 4, 8 or 16.
        scales: code map sizes, coarse to fine; the last is the latent grid, so it sets the frame size
            (latent grid x ``spatial_compression``). Ints ``n`` for square ``n x n`` maps, or ``(h, w)`` pairs
            (each side growing or staying, more tokens each scale), e.g. ``[[1, 1], [2, 3], [3, 5], [5, 8]]``
            for 40 x 64 frames at spatial compression 8. The latent grid may repeat at the end (``[1, 2, 4, 8,
            8]``): each repeat quantizes what the maps before it left, at full resolution.
        codebook_size: number of shared codes.
        beta: commitment weight of the VQ loss.
        ema_decay: codebook EMA decay.
        num_refine: shared refinement convs across scales (VAR's phi); with more map sizes than convs, each
            size takes the conv nearest to its relative position (:func:`~omniar.tokenizers.quantizer.refine_index`);
            repeats of the latent grid share its conv.
        refine_ratio: mix of refinement conv vs identity.
        dead_code_threshold: EMA assignment count under which a code is restarted.
        coarse_codes: if > 0, the first scale quantizes with its own table of this many codes (indices
            ``0..coarse_codes - 1``), learnt and restarted from the first scale's residuals only. With one shared
            table, codes in use by the finer scales are never restarted near the first scale's residuals, so
            a 1x1 code can stay one per background (BENCHMARKS.md, "Why the 1x1 preview does not move").
        refiner_blocks: residual blocks of the per-frame 2D refiner applied to the decoded frames
            (:class:`~omniar.tokenizers.causal3d.FrameRefiner`); 0 = none.
        refiner_channels: the refiner's width.
        refiner_norm: a per-channel GroupNorm before the refiner's last SiLU, so a residual stream
            drifting in training cannot zero every activation (refiners saved before it existed: false).
        refiner_scale: the refiner works on ``refiner_scale`` x ``refiner_scale`` pixel cells folded into
            channels (1, 2 or 4; 1 = pixels): at 2 a 3x3 conv costs a quarter as much and sees twice as far.
        refiner_fold_time: the refiner works on each latent frame's ``temporal_compression`` decoded frames folded
            into channels (frame 0 alone, as the encoder folds it): one pass per latent frame instead of one per
            frame, at about a quarter of the cost, and it sees the frames beside each one.
        conv: ``"3d"`` full k x k x k causal convs; ``"2+1d"`` a k x k spatial conv then a causal k-frame
            temporal conv (fewer FLOPs, same receptive field; not faster on CPU: see BENCHMARKS.md).
        fold_time: :class:`~omniar.tokenizers.causal3d.FoldEncoder` / ``FoldDecoder``: each latent frame's
            ``temporal_compression`` frames folded into channels, per-frame 2D levels, causal 3D blocks (of
            ``conv``) only at the latent resolution. Much cheaper to train than the full 3D nets.
        global_context: the encoder adds to each latent frame a vector computed from the whole frame
            (:class:`~omniar.tokenizers.causal3d.GlobalContext`, zero at initialisation, so a tokenizer trained
            without it starts unchanged), which lets the coarsest codes hold a small object's colour.
        positions: the global context also pools where the features are (needs ``global_context``), and the
            decoder's input gets a map of each cell's position
            (:class:`~omniar.tokenizers.causal3d.PositionMap`, zero at initialisation), so a preview from the
            1x1 code, constant over the frame, can still be painted at the object's place.
        preview_decoder: a second decoder, ``preview_net`` (a copy of ``decoder`` at initialisation), for coarse
            prefixes of the scales: previews (:meth:`decode_partial` below the last scale, and clips truncated in
            training) go through it, full decodes through ``decoder``, so painting a faithful blurry preview from a
            few codes and keeping detail in a full decode do not compete for one net's weights. Its previews
            skip the refiner, which sharpens full decodes (on A15q's previews it cost 0.1-0.4 dB: BENCHMARKS.md).
        preview_positions: the preview decoder reads a position map of its own (``preview_position_map``, a copy
            of ``position_map`` at initialisation; needs ``preview_decoder`` and ``positions``), so a stage that
            trains it to paint a 1x1 code's place leaves full decodes as they are.
        preview_code_maps: each first-scale code gets its own latent-grid map (``preview_code_map``, zero at
            initialisation), added to the latent of a preview decoded from the first scale alone (needs
            ``preview_decoder``, ``coarse_codes`` and a 1x1 first scale). That latent is otherwise one vector
            repeated over the grid, from which no decoder learnt to paint the object's place (BENCHMARKS.md, A15s-w);
            a map per code can hold the place its clips share. The codes and full decodes do not change.
        preview_codes: one table size per scale but the last (e.g. ``(16, 32, 32)``; empty: none): side codes that
            only previews read (:mod:`omniar.tokenizers.previews`: each coarse cell's colour sketch, quantized in
            pixel space, and a learned latent patch per code added to the preview's latent). Needs
            ``preview_decoder``. :meth:`encode` returns them as ``MultiScaleCodes.previews``; the residual codes,
            full decodes and AR inputs do not change.
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, channels: tuple[int, ...] = (32, 64, 128, 128), num_res_blocks: int = 1,
                 latent_channels: int = 16, temporal_compression: int = 4, spatial_compression: int = 8,
                 scales: Scales = (1, 2, 4, 8), codebook_size: int = 512, beta: float = 0.25,
                 ema_decay: float = 0.99, num_refine: int = 4, refine_ratio: float = 0.5,
                 dead_code_threshold: float = 0.05, refiner_blocks: int = 0, refiner_channels: int = 32,
                 refiner_norm: bool = True, refiner_scale: int = 1, refiner_fold_time: bool = False,
                 conv: str = "3d", fold_time: bool = False, global_context: bool = False, positions: bool = False,
                 coarse_codes: int = 0, preview_decoder: bool = False, preview_positions: bool = False,
                 preview_code_maps: bool = False, preview_codes: tuple[int, ...] = ()):
        super().__init__()
        check_int(in_channels, "in_channels", 1, MAX_CHANNELS)
        check_choice(temporal_compression, "temporal_compression", (1, 2, 4))
        check_choice(spatial_compression, "spatial_compression", (4, 8, 16))
        require(isinstance(channels, (list, tuple)), "channels", f"must be a list of ints, got {channels!r}")
        channels = [check_int(c, "channels", 1, MAX_CHANNELS) for c in channels]
        n_space = int(math.log2(spatial_compression))
        require(len(channels) == n_space + 1, "channels",
                f"needs log2(spatial_compression) + 1 = {n_space + 1} entries, got {len(channels)}")
        scales = check_scales(scales)
        check_int(num_res_blocks, "num_res_blocks", 1, MAX_BLOCKS)
        check_int(latent_channels, "latent_channels", 1, MAX_CHANNELS)
        check_int(codebook_size, "codebook_size", 2, MAX_CODEBOOK_SIZE)
        check_int(num_refine, "num_refine", 1, MAX_BLOCKS)
        check_float(beta, "beta", 0.0)
        check_float(ema_decay, "ema_decay", 0.0, 1.0, low_inclusive=False, high_inclusive=False)
        check_float(refine_ratio, "refine_ratio", 0.0, 1.0)
        check_float(dead_code_threshold, "dead_code_threshold", 0.0)
        check_int(coarse_codes, "coarse_codes", 0, codebook_size)
        check_int(refiner_blocks, "refiner_blocks", 0, MAX_BLOCKS)
        check_int(refiner_channels, "refiner_channels", 1, MAX_CHANNELS)
        check_bool(refiner_norm, "refiner_norm")
        check_choice(check_int(refiner_scale, "refiner_scale"), "refiner_scale", (1, 2, 4))
        check_bool(refiner_fold_time, "refiner_fold_time")
        check_choice(conv, "conv", CONV_MODES)
        check_bool(fold_time, "fold_time")
        check_bool(global_context, "global_context")
        check_bool(positions, "positions")
        check_bool(preview_decoder, "preview_decoder")
        check_bool(preview_positions, "preview_positions")
        check_bool(preview_code_maps, "preview_code_maps")
        require(global_context or not positions, "positions", "needs global_context=True (the encoder's side of it)")
        require(not preview_positions or (preview_decoder and positions), "preview_positions",
                "needs preview_decoder=True and positions=True")
        require(not preview_code_maps or (preview_decoder and coarse_codes and scale_shapes(scales)[0] == (1, 1)),
                "preview_code_maps", "needs preview_decoder=True, coarse_codes > 0 and a 1x1 first scale")
        require(isinstance(preview_codes, (list, tuple)) and len(preview_codes) in (0, len(scales) - 1),
                "preview_codes", f"must list one table size per scale but the last ({len(scales) - 1}) or none, "
                                 f"got {preview_codes!r}")
        preview_codes = [check_int(k, "preview_codes", 1, MAX_CODEBOOK_SIZE) for k in preview_codes]
        require(not preview_codes or preview_decoder, "preview_codes", "needs preview_decoder=True")
        nets = (FoldEncoder, FoldDecoder) if fold_time else (Encoder3d, Decoder3d)
        self.encoder = nets[0](in_channels, channels, num_res_blocks, latent_channels,
                               spatial_compression, temporal_compression, conv, global_context, positions)
        self.decoder = nets[1](in_channels, channels, num_res_blocks, latent_channels,
                               spatial_compression, temporal_compression, conv)
        self.position_map = PositionMap(latent_channels) if positions else None
        self.quantizer = MultiScaleResidualVQ(latent_channels, codebook_size, scales, beta, ema_decay,
                                              num_refine, refine_ratio, dead_code_threshold, coarse_codes)
        self.refiner_fold = temporal_compression if refiner_fold_time else 1
        self.refiner = (FrameRefiner(refiner_channels, refiner_blocks, in_channels * self.refiner_fold, refiner_norm,
                                     refiner_scale) if refiner_blocks else None)
        self.preview_net = copy.deepcopy(self.decoder) if preview_decoder else None
        self.preview_position_map = copy.deepcopy(self.position_map) if preview_positions else None
        self.preview_code_map = (torch.nn.Parameter(torch.zeros(coarse_codes, latent_channels,
                                                                *scale_shapes(scales)[-1]))
                                 if preview_code_maps else None)
        self.preview_palette = (PreviewCodes(tuple(preview_codes), scale_shapes(scales)[:-1], scale_shapes(scales)[-1],
                                           latent_channels, temporal_compression) if preview_codes else None)

    # ------------------------------------------------------------------ shapes
    @property
    def scales(self) -> Scales:
        """The schedule as configured, canonical (:func:`~omniar.tokenizers.codes.check_scales`): ints for a
        square one, else (h, w) pairs. Read sizes through :attr:`scale_shapes`."""
        return check_scales(self.config.scales)

    @property
    def latent_size(self) -> tuple[int, int]:
        """``(h, w)`` of the latent grid: the last scale."""
        return self.scale_shapes[-1]

    @property
    def frame_size(self) -> tuple[int, int]:
        """``(height, width)`` in pixels of the frames this tokenizer takes."""
        h, w = self.latent_size
        return h * self.config.spatial_compression, w * self.config.spatial_compression

    @property
    def resolution(self) -> int | tuple[int, int]:
        """The frame size as the datasets take it (``MovingShapes``, ``VideoFolderDataset``): the side of a
        square tokenizer, else ``(height, width)``."""
        h, w = self.frame_size
        return h if h == w else (h, w)

    def scale_vocab(self, s: int) -> int:
        """How many codes scale ``s`` may take: ``coarse_codes`` for the first scale when set, else
        ``codebook_size`` (generation masks the rest)."""
        return self.quantizer.table(s).shape[0]

    def num_latent_frames(self, num_frames: int) -> int:
        return 1 + (num_frames - 1) // self.config.temporal_compression

    def check_num_frames(self, num_frames: int, name: str = "num_frames") -> None:
        tau = self.config.temporal_compression
        check_int(num_frames, name, 1)
        require((num_frames - 1) % tau == 0, name, f"must be 1 + {tau} * k (causal layout), got {num_frames}")

    def check_video(self, video: torch.Tensor, name: str = "video") -> None:
        """Raise ``ValueError`` naming ``name`` unless ``video`` is a valid (B, C, T, H, W) clip in [-1, 1]."""
        require(isinstance(video, torch.Tensor), name, f"must be a torch.Tensor, got {type(video).__name__}")
        require(video.dim() == 5, name, f"must have shape (B, {self.config.in_channels}, T, H, W), "
                f"got {video.dim()} dims {tuple(video.shape)}")
        require(video.is_floating_point(), name, f"must be a float tensor, got {video.dtype}")
        b, c, t, h, w = video.shape
        require(b >= 1, name, "batch size must be >= 1")
        require(c == self.config.in_channels, name, f"must have {self.config.in_channels} channels, got {c}")
        self.check_num_frames(t, f"{name} (frames)")
        fh, fw = self.frame_size
        require((h, w) == (fh, fw), name, f"frames must be {fh}x{fw} (height x width) for scales {self.scales}, "
                f"got {h}x{w}")
        require(bool(torch.isfinite(video).all()), name, "contains NaN or Inf")
        require(float(video.abs().max()) <= 1.0 + 1e-3, name, "values must lie in [-1, 1]")

    def check_latent(self, latent: torch.Tensor, name: str = "latent") -> None:
        """Raise ``ValueError`` naming ``name`` unless ``latent`` is a finite (B, C_lat, t, h, w) map."""
        (lh, lw), c = self.latent_size, self.config.latent_channels
        got = getattr(latent, "shape", type(latent).__name__)
        require(isinstance(latent, torch.Tensor) and latent.dim() == 5 and latent.is_floating_point(), name,
                f"must be a float tensor (B, {c}, t, {lh}, {lw}), got {got}")
        b, lc, t, h, w = latent.shape
        require(b >= 1 and t >= 1 and lc == c and (h, w) == (lh, lw), name,
                f"must have shape (B >= 1, {c}, t >= 1, {lh}, {lw}), got {tuple(latent.shape)}")
        require(bool(torch.isfinite(latent).all()), name, "contains NaN or Inf")

    def _check_codes(self, codes: MultiScaleCodes) -> None:
        require(isinstance(codes, MultiScaleCodes), "codes", f"must be MultiScaleCodes, got {type(codes).__name__}")
        require(codes.scales == self.scales, "codes",
                f"scales {codes.scales} differ from the tokenizer's {self.scales}")
        frames = 1 + self.config.temporal_compression * (codes.num_latent_frames - 1)
        require(codes.num_frames == frames, "codes", f"num_frames {codes.num_frames} does not match its "
                                                     f"{codes.num_latent_frames} latent frames ({frames})")
        tables = [("indices", codes.codes, [self.scale_vocab(s) for s in range(len(self.scales))])]
        if codes.previews is not None:
            require(self.preview_palette is not None, "codes",
                    "carry preview codes (previews) but this tokenizer has none (preview_codes)")
            tables.append(("preview indices", codes.previews, [len(p) for p in self.preview_palette.patches]))
        for what, maps, sizes in tables:
            for s, (c, n) in enumerate(zip(maps, sizes)):
                require(not c.is_floating_point() and int(c.min()) >= 0 and int(c.max()) < n,
                        "codes", f"{what} of scale {s} must be integers in [0, {n})")

    # --------------------------------------------------------------- internals
    def _quantize(self, latent: torch.Tensor, upto_scale: torch.Tensor | None = None, preview_grad: bool = False,
                  soft: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Quantize each latent frame on its own: (B, C, t, h, w) -> f_hat, codes (B, t, h_s, w_s), loss.
        ``upto_scale`` (B,): keep only scales ``0..upto_scale[b]`` of every frame of clip b in f_hat
        (``preview_grad``, ``soft`` (B,): see :class:`MultiScaleResidualVQ`)."""
        b, _, t = latent.shape[:3]
        f = latent.transpose(1, 2).flatten(0, 1)
        f_hat, codes, loss = self.quantizer(f, None if upto_scale is None else upto_scale.repeat_interleave(t),
                                            preview_grad, None if soft is None else soft.repeat_interleave(t))
        f_hat = f_hat.unflatten(0, (b, t)).transpose(1, 2)
        return f_hat, [c.unflatten(0, (b, t)) for c in codes], loss

    def _codes_to_latent(self, codes: MultiScaleCodes, upto_scale: int | None = None) -> torch.Tensor:
        b, t = codes.batch_size, codes.num_latent_frames
        flat = [c.to(self.device).flatten(0, 1) for c in codes.codes]
        f_hat = self.quantizer.codes_to_latent(flat, upto_scale).unflatten(0, (b, t)).transpose(1, 2)
        if upto_scale is not None and upto_scale < len(self.scales) - 1 and codes.previews is not None:
            f_hat = f_hat + self.preview_palette.latent(codes.previews[upto_scale].to(self.device), upto_scale)
        return self.with_code_map(f_hat, codes.codes[0]) if upto_scale == 0 else f_hat

    def with_code_map(self, latent: torch.Tensor, first_codes: torch.Tensor) -> torch.Tensor:
        """``latent`` (B, C, t, h, w) of a preview from the first scale alone, plus the map of each latent frame's
        first-scale code ``first_codes`` (B, t, 1, 1) (``preview_code_maps``; without them, ``latent`` itself)."""
        if self.preview_code_map is None:
            return latent
        return latent + self.preview_code_map[first_codes.flatten(1).to(self.device)].transpose(1, 2).to(latent.dtype)

    def decoder_for(self, preview: bool) -> torch.nn.Module:
        """The net that decodes a coarse prefix of the scales (``preview``) or all of them."""
        return self.preview_net if preview and self.preview_net is not None else self.decoder

    def render(self, latent: torch.Tensor, preview: bool = False) -> torch.Tensor:
        """The decoder (:meth:`decoder_for` ``preview``; after its position map, if any) and the refiner (full
        decodes, or every decode of a tokenizer without a preview decoder) on latents (B, C, t, h, w): unclamped
        frames, no checks, gradients kept (training, and streaming inside the decoder's ``streaming()``)."""
        own = preview and self.preview_net is not None
        position_map = (self.preview_position_map if own and self.preview_position_map is not None
                        else self.position_map)
        latent = latent if position_map is None else position_map(latent)
        video = self.decoder_for(preview)(latent)
        return video if own else self.refine(video)

    def refine(self, video: torch.Tensor) -> torch.Tensor:
        """The refiner (if any) on each frame, or each latent frame's folded frames (``refiner_fold_time``), of
        decoded ``video`` (B, C, T, H, W), clamped first: it sees the frames as the images a plain decode would
        give. T = 1 + tau k holds frame 0; T = tau k, a later chunk of a streamed decode, whole latent frames."""
        if self.refiner is None:
            return video
        tau = self.refiner_fold
        first = tau > 1 and video.shape[2] % tau == 1
        return unfold_time(per_frame(self.refiner, fold_time(video.clamp(-1, 1), tau, first)), tau, first)

    def autocast(self, dtype: torch.dtype | None = None) -> contextlib.AbstractContextManager:
        """A context in which the decoder and refiner compute in ``dtype`` (``torch.bfloat16`` or
        ``torch.float16``) under ``torch.autocast``, casting the live weights: no copy of the tokenizer that
        could fall out of step with them. None or the tokenizer's own dtype: no change. Not for encoding or
        quantizing (the codes would change)."""
        require(dtype is None or isinstance(dtype, torch.dtype), "dtype",
                f"must be None or a torch.dtype, got {dtype!r}")
        if dtype is None or dtype == self.dtype:
            return contextlib.nullcontext()
        require(dtype in (torch.bfloat16, torch.float16), "dtype",
                f"must be torch.bfloat16, torch.float16 or the tokenizer's {self.dtype}, got {dtype}")
        return torch.autocast(self.device.type, dtype=dtype)

    # ------------------------------------------------------------------ public
    def forward(self, video: torch.Tensor, upto_scale: torch.Tensor | None = None,
                preview_grad: bool = False, soft_previews: torch.Tensor | None = None) -> TokenizerOutput:
        """Training forward: reconstruction, VQ loss and codes. ``upto_scale`` (B,) ints in
        ``[0, len(scales))`` reconstructs clip b from scales ``0..upto_scale[b]`` only (training the decoder
        on coarse-to-fine previews, and with ``preview_grad`` the encoder too, straight through the
        unquantized partial sums; ``soft_previews`` (B,) bool: those clips' previews are decoded from the
        unquantized partial sums themselves); the codes and VQ loss are those of all scales either way."""
        self.check_video(video)
        if upto_scale is not None:
            require(isinstance(upto_scale, torch.Tensor) and upto_scale.shape == (video.shape[0],)
                    and not upto_scale.is_floating_point(), "upto_scale", "must be an int tensor of shape (B,)")
            require(bool(((upto_scale >= 0) & (upto_scale < len(self.scales))).all()), "upto_scale",
                    f"values must lie in [0, {len(self.scales)})")
        if soft_previews is not None:
            require(preview_grad and upto_scale is not None, "soft_previews", "needs preview_grad=True and upto_scale")
            require(isinstance(soft_previews, torch.Tensor) and soft_previews.shape == (video.shape[0],)
                    and soft_previews.dtype == torch.bool, "soft_previews", "must be a bool tensor of shape (B,)")
        f_hat, codes, loss = self._quantize(self.encoder(video), upto_scale, preview_grad, soft_previews)
        f_hat = f_hat.to(video.dtype)
        if upto_scale is not None and self.preview_code_map is not None:
            first = (upto_scale.to(f_hat.device) == 0)[:, None, None, None, None]
            f_hat = torch.where(first, self.with_code_map(f_hat, codes[0]), f_hat)
        if upto_scale is not None and self.preview_palette is not None:
            f_hat = f_hat + self.preview_palette.latents(video, upto_scale).to(f_hat.dtype)
        if self.preview_net is None or upto_scale is None:
            rec = self.render(f_hat)
        else:  # each clip through the decoder of its prefix
            preview = upto_scale.to(f_hat.device) < len(self.scales) - 1
            groups = [(i, self.render(f_hat[i], p)) for p in (False, True) if len(i := (preview == p).nonzero()[:, 0])]
            order = torch.cat([i for i, _ in groups])
            rec = torch.cat([r for _, r in groups])[torch.argsort(order)]
        return TokenizerOutput(rec, loss, MultiScaleCodes(codes, self.scales, video.shape[2]))

    @torch.no_grad()
    def encode_latent(self, video: torch.Tensor) -> torch.Tensor:
        """Video -> continuous latents (B, C, T_lat, h, w) before quantization."""
        self.check_video(video)
        return self.encoder(video.to(self.device, self.dtype))

    @torch.no_grad()
    def quantize_latent(self, latent: torch.Tensor) -> MultiScaleCodes:
        """Continuous latents (B, C, T_lat, h, w) -> :class:`MultiScaleCodes`."""
        self.check_latent(latent)
        _, codes, _ = self._quantize(latent.to(self.device, self.dtype))
        return MultiScaleCodes(codes, self.scales, 1 + self.config.temporal_compression * (latent.shape[2] - 1))

    def encode(self, video: torch.Tensor) -> MultiScaleCodes:
        """Video (B, 3, 1 + tau k, H, W) in [-1, 1] -> :class:`MultiScaleCodes` (with ``previews`` if the
        tokenizer has ``preview_codes``)."""
        codes = self.quantize_latent(self.encode_latent(video))
        if self.preview_palette is not None:
            codes.previews = self.preview_palette.encode(video.to(self.device))
        return codes

    @torch.no_grad()
    def decode_latent(self, latent: torch.Tensor, chunk_size: int | None = None,
                      dtype: torch.dtype | None = None, preview: bool = False) -> torch.Tensor:
        """Decode continuous latents (B, C, t, h, w); ``chunk_size`` latent frames at a time if given.
        ``dtype``: compute the decoder in it (:meth:`autocast`); the frames come back in ``latent``'s dtype.
        ``preview``: the latents are a coarse prefix of the scales (:meth:`decoder_for`)."""
        self.check_latent(latent)
        if chunk_size is not None:
            check_int(chunk_size, "chunk_size", 1)
        with self.autocast(dtype):
            if chunk_size is None:
                return self.render(latent, preview).clamp(-1, 1).to(latent.dtype)
            with self.decoder_for(preview).streaming():
                parts = [self.render(latent[:, :, i:i + chunk_size], preview)
                         for i in range(0, latent.shape[2], chunk_size)]
            return torch.cat(parts, dim=2).clamp(-1, 1).to(latent.dtype)

    def decode(self, codes: MultiScaleCodes, chunk_size: int | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """Codes -> video (B, 3, T, H, W) in [-1, 1]. ``chunk_size`` latent frames per decoder call
        (the causal decoder carries its state across chunks, so the result equals the one-shot decode).
        ``dtype`` (e.g. ``torch.bfloat16``): decode in it (:meth:`autocast`); the latent is built in fp32."""
        return self.decode_partial(codes, len(self.scales) - 1, chunk_size, dtype)

    @torch.no_grad()
    def decode_partial(self, codes: MultiScaleCodes, upto_scale: int, chunk_size: int | None = None,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
        """Coarse preview: decode only scales ``0..upto_scale`` (inclusive). With ``preview_codes``, codes that
        carry none (``codes.previews`` None, e.g. an AR model's that does not sample them) decode as a tokenizer
        without them would: through the decoder and refiner."""
        self._check_codes(codes)
        check_int(upto_scale, "upto_scale", 0, len(self.scales) - 1)
        preview = upto_scale < len(self.scales) - 1 and (self.preview_palette is None or codes.previews is not None)
        return self.decode_latent(self._codes_to_latent(codes, upto_scale), chunk_size, dtype, preview=preview)

    def decode_previews(self, codes: MultiScaleCodes) -> list[torch.Tensor]:
        """Every coarse-to-fine decode of ``codes``: entry s decodes scales ``0..s``, the last one is the full
        :meth:`decode`."""
        return [self.decode_partial(codes, s) for s in range(len(self.scales))]

    # ------------------------------------------------- AR steps (training and generation)
    def scale_input(self, source: torch.Tensor | None, s: int, batch_size: int) -> torch.Tensor:
        """The AR model's input for scale ``s`` of a latent frame: ``source`` (B, C, h, w) area-resized to
        scale s's (h_s, w_s). ``source`` is the frame's accumulation of scales < s (:meth:`accumulate`), and
        for s = 0 the previous frame's full accumulation; None (the first frame's scale 0) gives zeros."""
        size = self.scale_shapes[s]
        if source is None:
            return torch.zeros(batch_size, self.config.latent_channels, *size, device=self.device)
        return resize(source, size)

    def accumulate(self, f_hat: torch.Tensor | None, idx: torch.Tensor, s: int) -> torch.Tensor:
        """``f_hat`` (B, C, h, w; None before scale 0) plus the refined code map of scale ``s`` codes ``idx``
        (B, h_s, w_s): the running reconstruction of a latent frame, coarse to fine."""
        part = self.quantizer.embed_scale(idx.to(self.device), s)
        return part if f_hat is None else f_hat + part

    @torch.no_grad()
    def codes_to_accumulated(self, codes: MultiScaleCodes) -> list[torch.Tensor]:
        """Teacher-forcing inputs for the AR model: per scale s, (B, T_lat, C, h_s, w_s), the
        :meth:`scale_input` of every latent frame at once (the same steps generation takes one at a time)."""
        self._check_codes(codes)
        b, t = codes.batch_size, codes.num_latent_frames
        inputs, f_hat = [None], None
        for s, idx in enumerate(codes.codes):
            if s > 0:
                inputs.append(self.scale_input(f_hat, s, b * t))
            f_hat = self.accumulate(f_hat, idx.flatten(0, 1), s)
        full = f_hat.unflatten(0, (b, t))  # each frame's full accumulation feeds the next frame's scale 0
        previous = torch.cat([torch.zeros_like(full[:, :1]), full[:, :-1]], 1)  # frame 0: zeros, as in generation
        inputs[0] = self.scale_input(previous.flatten(0, 1), 0, b * t)
        return [x.unflatten(0, (b, t)) for x in inputs]

    def codebook_usage(self) -> float:
        """Share of codes in recent use during training (EMA statistic)."""
        return self.quantizer.usage()
