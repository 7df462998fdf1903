"""Train the video tokenizer on DeepSpeed: ``omniar train tokenizer --config configs/tokenizer_shapes.yaml``.

Loss: MSE + L1 reconstruction (optionally weighted toward edges and objects) + the
quantizer's VQ loss. Logs loss, PSNR, codebook usage, grad norm, throughput and the
config to TensorBoard, and every ``train.sample_every`` steps the first training clips
beside their reconstructions and coarse-to-fine previews; checkpoints atomically;
resumes from the newest complete checkpoint; exports ``save_pretrained`` weights to
``<out_dir>/final``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .._checks import check_bool, check_choice, check_float, check_int, check_keys, require
from ..data.skipped import log_skipped
from ..eval.metrics import psnr
from ..pixels import to_uint8
from ..tokenizers import VideoTokenizer
from .common import (VideoDataConfig, build_dataset, build_model, check_sections, config_cli, last_step,
                     load_init_from, mean_scalars, split_train_section, step_loader)
from .engine import TrainEngine, config_from_dict, cosine_lr


@dataclass
class TokenizerTrainConfig:
    steps: int = 1000
    l1_weight: float = 1.0
    # Small objects cover few pixels, so a plain mean lets their outline go (a small circle can decode as a
    # blob while the PSNR stays high). > 0 weights each pixel by 1 + edge_weight * (edge strength near it).
    edge_weight: float = 0.0
    # The coarsest scales average the whole frame, where a small object is a few per cent of the pixels, so
    # its colour is lost there. > 0 weights each pixel by 1 + object_weight * (its distance from the frame's
    # background, the per-channel median colour), so coarse previews are pushed to keep the object.
    object_weight: float = 0.0
    # object_weight for the clips decoded from a coarse prefix (None: object_weight). A preview that cannot
    # know where the object is paints the background (the cheaper error) unless the object weighs more there.
    preview_object_weight: float | None = None
    init_from: str | None = None  # pretrained tokenizer folder to start from (fine-tuning / longer runs)
    # "decoder": freeze encoder and quantizer so every code stays the same (AR models trained on
    # this tokenizer's codes stay valid) and fine-tune only the decoder on the quantized latents.
    # "preview": only the preview decoder (model.preview_decoder, and its model.preview_positions map) learns,
    # from previews alone (truncate_prob 1).
    trainable: str = "all"
    # Share of clips reconstructed from a random coarse prefix of the scales (0..S-2) instead of all of them,
    # so the decoder learns to turn partial accumulations into faithful blurry previews (VAR-style).
    truncate_prob: float = 0.0
    # Those previews also train the encoder (straight through the unquantized partial sums), so the coarse codes
    # learn to hold what a preview needs (e.g. the object's colour), not only what the finer scales leave over.
    preview_grad: bool = False
    # Share of those previews decoded from the unquantized partial sums (needs preview_grad), so the decoder learns to
    # read, and the encoder to write, what the coarse latents could say (e.g. where the object is) before the codes
    # hold it.
    soft_preview_prob: float = 0.0
    # Learning-rate multiplier for the modules of ``model.global_context`` / ``positions`` / ``preview_positions`` /
    # ``preview_code_maps`` (the context's projection, the position and code maps), which start at zero (or as a
    # copy of one that did). AdamW moves a weight by about lr a step, so from zero at lr 1e-4 they need thousands
    # of steps to reach the latent's scale; a fine-tune of a few hundred steps needs them faster.
    context_lr_scale: float = 1.0
    sample_every: int = 500  # steps between reconstruction previews in TensorBoard (0 = none)
    # model.preview_codes that train.init_from lacks (or all, without it) get their palette tables by k-means on the
    # cells of the first this many training clips (omniar.tokenizers.previews), before the first step
    preview_fit_clips: int = 256

    def __post_init__(self) -> None:
        check_int(self.steps, "train.steps", 1)
        check_int(self.sample_every, "train.sample_every", 0)
        check_int(self.preview_fit_clips, "train.preview_fit_clips", 1)
        check_float(self.l1_weight, "train.l1_weight", 0.0)
        check_float(self.edge_weight, "train.edge_weight", 0.0)
        check_float(self.object_weight, "train.object_weight", 0.0)
        if self.preview_object_weight is not None:
            check_float(self.preview_object_weight, "train.preview_object_weight", 0.0)
        check_float(self.truncate_prob, "train.truncate_prob", 0.0, 1.0)
        check_bool(self.preview_grad, "train.preview_grad")
        check_float(self.soft_preview_prob, "train.soft_preview_prob", 0.0, 1.0)
        check_float(self.context_lr_scale, "train.context_lr_scale", 0.0, low_inclusive=False)
        require(self.soft_preview_prob == 0 or self.preview_grad, "train.soft_preview_prob",
                "needs train.preview_grad=true")
        require(not self.preview_grad or self.trainable == "all", "train.preview_grad",
                "trains the encoder: it needs train.trainable=all")
        check_choice(self.trainable, "train.trainable", ("all", "decoder", "preview"))
        require(self.trainable == "all" or bool(self.init_from), "train.trainable",
                f"'{self.trainable}' needs train.init_from (a trained encoder and codebook to keep)")
        require(self.trainable != "preview" or self.truncate_prob == 1, "train.truncate_prob",
                f"must be 1 with train.trainable=preview (a full clip teaches the preview decoder nothing), "
                f"got {self.truncate_prob}")


# the modules that global_context, positions, preview_positions, preview_code_maps and preview_codes add: optional
# in train.init_from (zero at the start, the preview decoder's map a copy of the shared one) and trained at
# train.context_lr_scale
CONTEXT_MODULES = ("encoder.context.", "position_map.", "preview_position_map.", "preview_code_map",
                   "preview_palette.")


def fit_preview_codes(model: VideoTokenizer, dataset, num_clips: int, seed: int) -> None:
    """Fit ``model.preview_palette``'s tables (``model.preview_codes``) to the first ``num_clips`` clips of
    ``dataset``."""
    check_int(num_clips, "train.preview_fit_clips", 1, len(dataset))
    video = torch.stack([dataset[i]["video"] for i in range(num_clips)])
    model.preview_palette.fit(video, torch.Generator().manual_seed(seed))


def edge_weights(video: torch.Tensor, strength: float) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, T, H, W) for ``video`` (B, C, T, H, W) in [-1, 1]: 1 on flat regions,
    up to ``1 + strength`` within one pixel of an edge (the largest colour step to a spatial neighbour)."""
    dx = (video[..., :, 1:] - video[..., :, :-1]).abs().amax(1, keepdim=True)
    dy = (video[..., 1:, :] - video[..., :-1, :]).abs().amax(1, keepdim=True)
    step = torch.maximum(F.pad(dx, (0, 1)), F.pad(dx, (1, 0)))
    step = torch.maximum(step, torch.maximum(F.pad(dy, (0, 0, 0, 1)), F.pad(dy, (0, 0, 1, 0))))
    edges = F.max_pool3d(step, (1, 3, 3), stride=1, padding=(0, 1, 1)) / 2  # colour steps are <= 2
    return 1 + strength * edges


def object_weights(video: torch.Tensor, strength: float | torch.Tensor) -> torch.Tensor:
    """Per-pixel loss weights (B, 1, T, H, W) for ``video`` (B, C, T, H, W) in [-1, 1]: 1 on the background
    (each frame's per-channel median colour, so objects must cover under half the frame), up to
    ``1 + strength`` where a pixel's largest channel difference from it is the full range. ``strength``: a
    number, or one per clip (B,)."""
    background = video.flatten(3).median(3).values[..., None, None]
    if isinstance(strength, torch.Tensor):
        strength = strength.to(video.dtype).view(-1, 1, 1, 1, 1)
    return 1 + strength * (video - background).abs().amax(1, keepdim=True) / 2


def reconstruction_loss(rec: torch.Tensor, video: torch.Tensor, l1_weight: float, edge_weight: float,
                        object_weight: float | torch.Tensor = 0.0) -> torch.Tensor:
    """MSE + ``l1_weight`` x L1, per pixel weighted by :func:`edge_weights` times :func:`object_weights`
    (``object_weight``: a number or one per clip), the weights normalised to mean 1 in each clip so that
    every clip counts alike."""
    err = (rec - video).square() + l1_weight * (rec - video).abs()
    # only the weightings in use are computed: each costs a pass over the clip (the object one a median)
    w = edge_weights(video, edge_weight) if edge_weight else None
    if isinstance(object_weight, torch.Tensor) or object_weight:
        w = object_weights(video, object_weight) if w is None else w * object_weights(video, object_weight)
    if w is None:
        return err.mean()
    return ((err * w).flatten(1).mean(1) / w.flatten(1).mean(1)).mean()


def truncation(batch: int, num_scales: int, prob: float, gen: torch.Generator) -> torch.Tensor:
    """Per-clip last scale to reconstruct from, (batch,) long: ``num_scales - 1`` (all scales) except, with
    probability ``prob``, a uniform draw from ``0..num_scales - 2``."""
    upto = torch.randint(0, max(num_scales - 1, 1), (batch,), generator=gen)
    keep_all = torch.rand(batch, generator=gen) >= prob
    return torch.where(keep_all | (num_scales == 1), num_scales - 1, upto)


PREVIEW_CLIPS = 2  # training clips 0, 1: the same clips at every preview


def reconstruction_filmstrips(model: VideoTokenizer, video: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 2 + S - 1, T, H, W, 3) for ``video`` (B, 3, T, H, W) in [-1, 1]: per clip the rows original,
    reconstruction and the coarse-to-fine previews decoded from scales 0..s for s = 0..S-2."""
    *previews, full = model.decode_previews(model.encode(video))
    rows = [video, full, *previews]
    return to_uint8(torch.stack(rows, 1)).permute(0, 1, 3, 4, 5, 2)


def train(config: dict, progress: bool = True, stop_at: int | None = None) -> Path:
    """Run (or resume) tokenizer training; returns the exported model folder.

    ``stop_at`` ends this invocation after that many steps (with a checkpoint) while the
    schedule still spans ``train.steps``: a later call resumes where it stopped."""
    check_sections(config)
    data_cfg = config_from_dict(VideoDataConfig, config.get("data", {}), "data")
    engine_cfg, train_cfg = split_train_section(config.get("train", {}), TokenizerTrainConfig)
    end = last_step(train_cfg.steps, stop_at)
    model_cfg = check_keys(config.get("model", {}), "model", inspect.signature(VideoTokenizer).parameters)
    torch.manual_seed(engine_cfg.seed)  # same initial weights on every rank and every resume
    model = build_model(VideoTokenizer, model_cfg)
    build = partial(build_model, VideoTokenizer, model_cfg)  # a new model, to load whole weights into
    require(train_cfg.trainable != "preview" or model.preview_net is not None, "train.trainable",
            "'preview' needs model.preview_decoder=true")
    missing = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
    if train_cfg.init_from:
        # a tokenizer trained without the global context or position map starts them at zero (no change),
        # without the first scale's own codes starts them on the first batch's first-scale residuals, and
        # without a preview decoder (or its position map) starts it as a copy of the decoder's (previews unchanged)
        missing = load_init_from(model, train_cfg.init_from, "a tokenizer folder",
                                 optional=CONTEXT_MODULES + ("quantizer.coarse_", "preview_net."))
        for target, source in (("preview_net", "decoder"), ("preview_position_map", "position_map")):
            if any(name.startswith(target + ".") for name in missing):
                getattr(model, target).load_state_dict(getattr(model, source).state_dict())
    require(model.resolution == data_cfg.size, "data.size",
            f"must equal the tokenizer resolution {model.resolution} (side, or [height, width]: scales[-1] x "
            f"spatial_compression), got {data_cfg.size}")
    model.check_num_frames(data_cfg.num_frames, "data.num_frames")
    frozen = {"all": (), "decoder": (model.encoder, model.quantizer),
              "preview": tuple(m for name, m in model.named_children() if not name.startswith("preview_"))
              }[train_cfg.trainable]
    for module in frozen:
        module.requires_grad_(False)
    factory = None
    if train_cfg.context_lr_scale != 1:
        require(any(name.startswith(CONTEXT_MODULES) for name, _ in model.named_parameters()), "train.context_lr_scale",
                "scales the learning rate of the modules model.global_context, positions, preview_positions, "
                "preview_code_maps and preview_codes add: the model has none")

        def context_groups(module: VideoTokenizer) -> torch.optim.Optimizer:
            named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
            groups = [{"params": [p for name, p in named if not name.startswith(CONTEXT_MODULES)]},
                      {"params": [p for name, p in named if name.startswith(CONTEXT_MODULES)],
                       "lr": engine_cfg.lr * train_cfg.context_lr_scale}]
            return torch.optim.AdamW(groups, lr=engine_cfg.lr, betas=engine_cfg.betas,
                                     weight_decay=engine_cfg.weight_decay)

        factory = context_groups

    with TrainEngine(model, engine_cfg, optimizer_factory=factory,
                     lr_lambda=cosine_lr(train_cfg.steps, engine_cfg.warmup_steps)) as engine:
        for module in frozen:
            module.eval()  # eval mode: no codebook EMA updates or code restarts
        dataset = build_dataset(data_cfg.dataset, data_cfg.path, data_cfg.num_samples, data_cfg.size,
                                data_cfg.num_frames, data_cfg.seed, data_cfg.motion)
        if model.preview_palette is not None and any(name.startswith("preview_palette.") for name in missing):
            fit_preview_codes(model, dataset, train_cfg.preview_fit_clips, engine_cfg.seed)  # before a resume
        start = engine.resume()
        log_skipped(engine, start, data=dataset)
        engine.log_hparams(config)
        preview = None
        # rank 0 logs them; under ZeRO-3 every rank helps gather the model for them
        previewing = train_cfg.sample_every and (engine.rank == 0 or engine_cfg.zero_stage == 3)
        if train_cfg.sample_every and engine.rank == 0:
            clips = range(min(PREVIEW_CLIPS, len(dataset)))
            preview = torch.stack([dataset[i]["video"] for i in clips]).to(engine.device)
        loader = step_loader(dataset, engine_cfg.micro_batch_size, start, end,
                             engine.rank, engine.world_size, data_cfg.num_workers, accum=engine_cfg.grad_accum_steps)
        bar = tqdm(total=train_cfg.steps, initial=start, disable=not progress or engine.rank != 0, desc="tokenizer")
        step = start
        for micro_batches in loader:
            logging = (step + 1) % engine_cfg.log_every == 0 or step + 1 == train_cfg.steps
            rows = []
            for micro, batch in enumerate(micro_batches):
                video = batch["video"].to(engine.device, non_blocking=True)
                upto = truncation(video.shape[0], len(model.scales), train_cfg.truncate_prob,
                                  engine.generator(step, micro=micro))
                full = upto == len(model.scales) - 1  # clips decoded from all scales (the rest are previews)
                soft = None
                if train_cfg.soft_preview_prob:
                    soft = ~full & (torch.rand(video.shape[0], generator=engine.generator(step, salt=1, micro=micro))
                                    < train_cfg.soft_preview_prob)
                object_weight = (train_cfg.object_weight if train_cfg.preview_object_weight is None else
                                 torch.where(full, train_cfg.object_weight, train_cfg.preview_object_weight))
                with engine.autocast():
                    out = engine.ds(video, upto, train_cfg.preview_grad, soft)
                    rec = out.reconstruction.float()
                    loss = reconstruction_loss(rec, video, train_cfg.l1_weight, train_cfg.edge_weight,
                                               object_weight) + out.vq_loss
                engine.backward_step(loss)  # the last one also steps
                if logging:
                    rows.append({"loss": loss.item(), "vq_loss": out.vq_loss.item()}
                                | {name: psnr(rec[m], video[m]).mean().item()
                                   for name, m in (("psnr", full), ("preview_psnr", ~full)) if m.any()})
            step += 1
            bar.update(1)
            if logging:
                scalars = mean_scalars(rows) | {"codebook_usage": engine.module.codebook_usage()}
                engine.log_step(scalars, step, samples=video.shape[0] * len(micro_batches))
                shown = {k: f"{scalars[k]:.1f}" for k in ("psnr", "preview_psnr") if k in scalars}
                bar.set_postfix(loss=f"{scalars['loss']:.4f}", **shown, usage=f"{scalars['codebook_usage']:.2f}")
            if previewing and (step % train_cfg.sample_every == 0 or step == train_cfg.steps):
                with engine.paused(engine.module):
                    tokenizer = engine.whole_module(build)  # ZeRO-3: a copy on rank 0 only
                    if preview is not None:
                        for i, clip in enumerate(reconstruction_filmstrips(tokenizer, preview)):
                            engine.log_filmstrips(f"reconstruction/{i}", clip, step)
            if engine.checkpoint_due(step, end):  # SIGTERM: checkpoint saved; rerun the command to resume
                break
        bar.close()
        log_skipped(engine, step, data=dataset)
        final = Path(engine_cfg.out_dir) / "final"
        if step == train_cfg.steps:
            model = engine.whole_module(build)  # ZeRO-3: the partitions gathered onto rank 0 (a collective)
            if engine.rank == 0:
                model.save_pretrained(final)
    return final


add_cli_arguments, cli_main = config_cli("configs/tokenizer_shapes.yaml", train, "tokenizer weights")
