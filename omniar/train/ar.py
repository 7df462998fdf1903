"""Train the unified AR model on ``[caption][video codes]``: ``omniar train ar --config configs/ar_shapes.yaml``.

Teacher forcing (VAR): the positions of scale s take the accumulated
reconstruction of the coarser scales and predict scale s's codes. Loss: visual
cross-entropy (per token, or each scale weighted equally), text next-token and
multi-token cross-entropy, the MoE auxiliary terms. Regularisers: caption
dropout (null prompt, for classifier-free guidance), Cross-Frame Error
Correction (corrupt a random share of earlier codes, re-quantize the later
scales against the corrupted accumulation), Random Frame Mask (hide earlier
frames from a frame's attention), elastic sub-model sampling.

TensorBoard: the loss (``loss/full`` and, on steps that sampled a sub-model, ``loss/elastic``, which
``loss`` adds up), its parts, grad norm, throughput (clips/s and tokens/s), the config, and every
``train.sample_every`` steps clips generated for the first captions of the training data.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, fields
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .._checks import check_bool, check_choice, check_float, check_int, check_keys, check_output_path, require
from .._scales import Scales, check_scales, scale_shapes, tokens_per_frame
from ..backbone import OmniARConfig, OmniARModel, OmniAROutput
from ..backbone.moe import gathered_state_dict
from ..backbone.text_encoder import TextEncoder
from ..data.shapes import vocabulary as shapes_vocabulary
from ..data.skipped import log_skipped
from ..generation.pipeline import TextToVideoPipeline, text_inputs
from ..limits import MAX_NUM_FRAMES, MAX_NUM_WORKERS, MAX_SEED, MAX_TEXT_LEN
from ..tokenizers import MultiScaleCodes, VideoTokenizer
from ..tokenizers.text import TextTokenizer
from .common import (build_dataset, build_model, check_motion, check_sections, checkpoint_blocks, config_cli,
                     last_step, load_init_from, load_video_tokenizer, mean_scalars, motion_source,
                     split_train_section, step_loader)
from .engine import TrainEngine, checkpoint_state_dict, config_from_dict, cosine_lr
from .pretokenize import TokenizedDataset, pretokenize


@dataclass
class ARDataConfig:
    dataset: str = "shapes"  # "shapes" | "video_folder"
    path: str | None = None  # JSONL for video_folder
    cache_dir: str = "runs/shapes_codes"
    num_clips: int = 20000
    num_frames: int = 17
    seed: int = 0
    max_text_len: int = 96
    max_num_frames: int = 33  # longest clip the shipped pipeline may generate
    num_workers: int = 0  # data loader processes for pre-tokenization
    motion: str = "exit"  # shapes: "exit" (objects stay inside) | "wrap" (they re-enter: clips of any length)

    def __post_init__(self) -> None:
        check_choice(self.dataset, "data.dataset", ("shapes", "video_folder"))
        require(self.dataset != "video_folder" or bool(self.path), "data.path", "is required for video_folder")
        check_int(self.num_clips, "data.num_clips", 1)
        check_int(self.num_frames, "data.num_frames", 1)
        check_int(self.max_text_len, "data.max_text_len", 2, MAX_TEXT_LEN)
        check_int(self.max_num_frames, "data.max_num_frames", 1, MAX_NUM_FRAMES)
        check_int(self.seed, "data.seed", 0, MAX_SEED)
        check_int(self.num_workers, "data.num_workers", 0, MAX_NUM_WORKERS)
        check_output_path(self.cache_dir, "data.cache_dir", folder=True)
        check_motion(self.motion, self.dataset)


@dataclass
class ARTrainConfig:
    steps: int = 1000
    tokenizer: str = "shapes-tokenizer"  # shipped asset name or a folder
    caption_dropout: float = 0.1
    text_weight: float = 0.1
    mtp_weight: float = 0.3
    scale_weighting: str = "scale"  # "scale": each scale's mean CE counts equally; "token": plain mean
    cfec_max_rate: float = 0.0  # Cross-Frame Error Correction: max share of corrupted codes per sample
    frame_mask_prob: float = 0.0  # Random Frame Mask: share of samples with hidden earlier frames
    frame_mask_ratio: float = 0.5  # ... and the share of earlier frames hidden in those
    # Context drops: a share of samples sees, in every frame, only the newest context_recent_frames earlier frames
    # whole and a random context_keep_ratio of the older frames' tokens (one kept set per sample), as past a
    # bounded KV cache (kv_policy "nacl" keeps kv_recent_frames whole frames and scattered older tokens).
    context_drop_prob: float = 0.0
    context_recent_frames: int = 3
    context_keep_ratio: float = 0.1
    # A share of micro-batches cut to their clips' first short_clip_frames frames, so one cache of long clips trains
    # the model at both lengths (a causal tokenizer's codes of a clip's first frames are the shorter clip's codes)
    short_clip_prob: float = 0.0
    short_clip_frames: int = 17
    elastic: bool = False
    # In-place distillation: the elastic sub-model also fits the full model's (detached) code
    # distribution, KL weighted by this, on top of its own cross-entropy. 0 = cross-entropy only.
    elastic_distill: float = 0.0
    # Pipeline folder whose model starts training (fine-tuning, e.g. to train sub-models longer); its
    # architecture must match the model: section and its codes must come from train.tokenizer.
    init_from: str | None = None
    # Fine-tuning anchor (Learning without Forgetting): the full model also fits the code distribution
    # of a frozen copy of the init_from model, KL weighted by this, so a fine-tune on a small set (e.g.
    # of a sub-model) moves the full model less. 0 = off; > 0 needs train.init_from.
    anchor_weight: float = 0.0
    # "all", or "exit_adapters": only the model's exit adapters (model.exit_adapter_depths) learn, each fitting the
    # full model's code distribution (KL) at its depth; the rest stays exactly the train.init_from model's
    trainable: str = "all"
    # Which KL the exit adapters fit: "forward", KL(full || sub-model), covers every code the full model gives mass;
    # "reverse", KL(sub-model || full), charges mass where the full model has little (mode-seeking)
    exit_kl: str = "forward"
    sample_every: int = 500  # steps between generated sample clips in TensorBoard (0 = none)
    # recompute each transformer block in backward instead of keeping its activations: less memory, about
    # one more forward pass of compute
    activation_checkpointing: bool = False

    def __post_init__(self) -> None:
        check_int(self.steps, "train.steps", 1)
        check_bool(self.activation_checkpointing, "train.activation_checkpointing")
        check_int(self.sample_every, "train.sample_every", 0)
        check_int(self.context_recent_frames, "train.context_recent_frames", 0)
        for name in ("caption_dropout", "short_clip_prob", "cfec_max_rate", "frame_mask_prob", "frame_mask_ratio",
                     "context_drop_prob", "context_keep_ratio"):
            check_float(getattr(self, name), f"train.{name}", 0.0, 1.0)
        check_float(self.text_weight, "train.text_weight", 0.0)
        check_float(self.mtp_weight, "train.mtp_weight", 0.0)
        check_bool(self.elastic, "train.elastic")
        check_float(self.elastic_distill, "train.elastic_distill", 0.0)
        require(self.elastic_distill == 0 or self.elastic, "train.elastic_distill",
                "needs train.elastic (the sub-model that learns from the full model)")
        check_float(self.anchor_weight, "train.anchor_weight", 0.0)
        require(self.anchor_weight == 0 or bool(self.init_from), "train.anchor_weight",
                "needs train.init_from (the model to stay close to)")
        check_choice(self.scale_weighting, "train.scale_weighting", ("scale", "token"))
        check_choice(self.trainable, "train.trainable", ("all", "exit_adapters"))
        check_choice(self.exit_kl, "train.exit_kl", ("forward", "reverse"))
        require(self.exit_kl == "forward" or self.trainable == "exit_adapters", "train.exit_kl",
                "only the exit adapters' distillation reads it: needs train.trainable=exit_adapters")
        if self.trainable == "exit_adapters":
            require(bool(self.init_from), "train.trainable", "exit_adapters needs train.init_from (the trained model)")
            require(not self.elastic and self.anchor_weight == 0, "train.trainable",
                    "exit_adapters trains by distillation alone: set train.elastic=false and train.anchor_weight=0")


def visual_mean(per_token: torch.Tensor, scales: Scales, cfg: ARTrainConfig) -> torch.Tensor:
    """Mean of a (B, T_lat, tokens/frame) loss; with ``scale_weighting="scale"`` each scale counts equally."""
    if cfg.scale_weighting == "token":
        return per_token.mean()
    shapes = scale_shapes(scales)
    weight = torch.cat([torch.full((h * w,), 1.0 / (h * w * len(shapes))) for h, w in shapes]).to(per_token.device)
    return (per_token * weight).sum(-1).mean()


def distill_loss(student: OmniAROutput, teacher: OmniAROutput, scales: Scales,
                 cfg: ARTrainConfig, reverse: bool = False) -> torch.Tensor:
    """KL(teacher || student) of the visual code distributions, the teacher's side detached; ``reverse``:
    KL(student || teacher)."""
    teacher = F.log_softmax(teacher.visual_logits.detach().float(), -1)
    student = F.log_softmax(student.visual_logits.float(), -1)
    if reverse:
        teacher, student = student, teacher
    return visual_mean((teacher.exp() * (teacher - student)).sum(-1), scales, cfg)


def exit_adapter_loss(model: OmniARModel, forward, scales: Scales, cfg: ARTrainConfig,
                      **inputs) -> tuple[OmniAROutput, torch.Tensor, dict[str, float]]:
    """``train.trainable=exit_adapters``: the sum over ``model``'s exit adapter depths of the KL (``train.exit_kl``)
    between the full model and the sub-model at that depth, run through ``forward`` (the engine's); returns the full
    model's output too."""
    with torch.no_grad():
        full = forward(**inputs)
    loss, parts = full.aux_loss.new_zeros(()), {}
    for depth in model.omniar_config.exit_adapter_depths:
        with model.elastic(depth=depth):
            kl = distill_loss(forward(**inputs), full, scales, cfg, reverse=cfg.exit_kl == "reverse")
        parts[f"exit_kl/{depth}"] = kl.item()
        loss = loss + kl
    return full, loss, parts


def ar_loss(out: OmniAROutput, targets: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
            scales: Scales, cfg: ARTrainConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """Visual + text (+ multi-token) cross-entropy + MoE auxiliary loss. ``targets`` (B, T_lat, tokens/frame).
    ``ids`` None (a text encoder's states): no text loss."""
    logits = out.visual_logits.float()
    ce = F.cross_entropy(logits.flatten(0, 2), targets.flatten(), reduction="none").view(targets.shape)
    visual = visual_mean(ce, scales, cfg)
    if ids is None:  # the prompt came as encoder states: no text tokens of the model's vocabulary to predict
        return visual + out.aux_loss, {"visual_ce": visual.item(), "aux": float(out.aux_loss.detach())}

    def text_ce(text_logits: torch.Tensor, shift: int) -> torch.Tensor:
        valid = mask[:, shift:] & mask[:, :-shift]
        loss = F.cross_entropy(text_logits[:, :-shift].flatten(0, 1).float(), ids[:, shift:].flatten(),
                               reduction="none")
        return (loss * valid.flatten()).sum() / valid.sum().clamp_min(1)

    text = text_ce(out.text_logits, 1)
    mtp = torch.zeros((), device=ce.device)
    if out.mtp_logits is not None:
        mtp = sum(text_ce(out.mtp_logits[:, :, j], j + 2) for j in range(out.mtp_logits.shape[2]))
    total = visual + cfg.text_weight * (text + cfg.mtp_weight * mtp) + out.aux_loss
    return total, {"visual_ce": visual.item(), "text_ce": text.item(), "mtp_ce": float(mtp.detach()),
                   "aux": float(out.aux_loss.detach())}


def random_frame_visibility(b: int, t: int, prob: float, ratio: float, g: torch.Generator) -> torch.Tensor | None:
    """(B, T, T) bool: causal over frames, with a random share of earlier frames hidden in some samples."""
    if prob == 0 or t == 1:
        return None
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    hide = (torch.rand(b, t, t, generator=g) < ratio) & (torch.rand(b, 1, 1, generator=g) < prob)
    hide &= ~torch.eye(t, dtype=torch.bool)  # a frame always sees itself
    return causal & ~hide


def random_context_drops(b: int, t: int, per_frame: int, cfg: ARTrainConfig, g: torch.Generator
                         ) -> torch.Tensor | None:
    """(B, T, T * per_frame) bool [query frame, key token], or None: in a ``cfg.context_drop_prob`` share of
    samples, tokens of frames older than ``cfg.context_recent_frames`` before the query frame are hidden unless in
    the sample's kept set (each token kept with probability ``cfg.context_keep_ratio``), so a token once hidden
    stays hidden from every later frame, as an evicted one."""
    if cfg.context_drop_prob == 0 or t <= cfg.context_recent_frames + 1:
        return None
    key_frame = torch.arange(t).repeat_interleave(per_frame)
    old = key_frame[None, :] < torch.arange(t)[:, None] - cfg.context_recent_frames  # (T, T * per_frame)
    kept = torch.rand(b, 1, t * per_frame, generator=g) < cfg.context_keep_ratio
    thinned = torch.rand(b, 1, 1, generator=g) < cfg.context_drop_prob
    return ~(old[None] & thinned & ~kept)


def prepare_batch(batch: dict, tok: VideoTokenizer, text_tok: TextTokenizer, cfg: ARTrainConfig,
                  data_cfg: ARDataConfig, g: torch.Generator, device: torch.device,
                  text_encoder: TextEncoder | None = None):
    """Captions (with dropout) -> the model's text arguments (``text_inputs``: byte ids, or the text encoder's
    states); latents -> (visual inputs, targets), corrupted if CFEC is on."""
    latent, codes = batch["latent"].to(device), batch["codes"]
    if cfg.short_clip_prob and torch.rand((), generator=g) < cfg.short_clip_prob:
        t = tok.num_latent_frames(cfg.short_clip_frames)
        latent, codes = latent[:, :, :t], [c[:, :t] for c in codes]
    b, t = latent.shape[0], latent.shape[2]
    drop = torch.rand(b, generator=g) < cfg.caption_dropout
    captions = [None if d else c for d, c in zip(drop.tolist(), batch["caption"])]
    text = text_inputs(captions, data_cfg.max_text_len, text_tok, text_encoder, device, name="caption")
    num_frames = 1 + tok.config.temporal_compression * (t - 1)
    if cfg.cfec_max_rate > 0:
        rate = (torch.rand(b, generator=g) * cfg.cfec_max_rate).repeat_interleave(t)
        clean, noisy = tok.quantizer.quantize_corrupted(latent.transpose(1, 2).flatten(0, 1), rate, g)
        unflat = [c.unflatten(0, (b, t)) for c in clean], [c.unflatten(0, (b, t)) for c in noisy]
        targets = MultiScaleCodes(unflat[0], tok.scales, num_frames)
        inputs = tok.codes_to_accumulated(MultiScaleCodes(unflat[1], tok.scales, num_frames))
    else:
        targets = MultiScaleCodes([c.to(device) for c in codes], tok.scales, num_frames)
        inputs = tok.codes_to_accumulated(targets)
    visibility = random_frame_visibility(b, t, cfg.frame_mask_prob, cfg.frame_mask_ratio, g)
    per_frame = tokens_per_frame(tok.scales)
    drops = random_context_drops(b, t, per_frame, cfg, g)
    if drops is not None:
        visibility = drops if visibility is None else visibility.repeat_interleave(per_frame, 2) & drops
    return text, inputs, targets.flatten(), visibility.to(device) if visibility is not None else None


def collate(items: list[dict]) -> dict:
    return {"latent": torch.stack([it["latent"] for it in items]),
            "codes": [torch.stack([it["codes"][s] for it in items]) for s in range(len(items[0]["codes"]))],
            "caption": [it["caption"] for it in items]}


SAMPLE_PROMPTS = 3  # the captions of training clips 0..2: the same prompts at every sampling


def sample_clips(tok: VideoTokenizer, text_tok: TextTokenizer, model: OmniARModel, prompts: list[str],
                 num_frames: int, max_text_len: int, text_encoder: TextEncoder | None = None) -> np.ndarray:
    """uint8 (P, T, H, W, 3): one ``num_frames`` clip per prompt from ``model``, the pipeline's defaults, seed 0."""
    pipe = TextToVideoPipeline(tok, text_tok, model, max_text_len, num_frames, text_encoder=text_encoder)
    return pipe(prompts, num_frames=num_frames, seed=0).frames


def check_model_section(section: dict) -> dict:
    """The ``model`` section of an AR config: OmniARConfig fields, none of those derived from the tokenizers or
    the text encoder, without ``text_encoder`` (a folder: :func:`load_text_encoder`)."""
    model_fields = check_keys(section, "model", {f.name for f in fields(OmniARConfig)} | {"text_encoder"})
    derived = {"codebook_size", "code_dim", "scales", "text_vocab_size", "text_embed_dim"} & set(model_fields)
    require(not derived, "model", f"{sorted(derived)} are set from train.tokenizer and the text tokenizer "
            "(text_embed_dim: from model.text_encoder); remove them")
    return {k: v for k, v in model_fields.items() if k != "text_encoder"}


def load_text_encoder(section: dict, max_text_len: int) -> TextEncoder | None:
    """The frozen text encoder of the ``model`` section's ``text_encoder`` folder (None: byte-level text)."""
    path = section.get("text_encoder")
    if path is None:
        return None
    require(isinstance(path, str) and path != "", "model.text_encoder", f"must be a folder path, got {path!r}")
    encoder = TextEncoder.from_pretrained(path, name="model.text_encoder")
    limit = encoder.max_length
    require(limit is None or max_text_len <= limit, "data.max_text_len",
            f"must be at most the text encoder's {limit} positions, got {max_text_len}")
    return encoder


def model_config(model_fields: dict, tok: VideoTokenizer, text_tok: TextTokenizer,
                 text_encoder: TextEncoder | None = None) -> OmniARConfig:
    """The AR model's config: the ``model`` section plus what the video and text tokenizers (and the text
    encoder) fix."""
    return build_model(OmniARConfig, model_fields | dict(
        codebook_size=tok.config.codebook_size, code_dim=tok.config.latent_channels, scales=tuple(tok.scales),
        text_vocab_size=text_tok.vocab_size, text_embed_dim=None if text_encoder is None else text_encoder.hidden_size))


def check_ep_size(ep_size: int, model_cfg: OmniARConfig) -> None:
    """``train.ep_size`` shares out each MoE layer's routed experts evenly."""
    require(model_cfg.num_experts % ep_size == 0, "train.ep_size",
            f"must divide model.num_experts={model_cfg.num_experts}, got {ep_size}")


def full_model_loss(engine: TrainEngine, args: dict, targets: torch.Tensor, scales: Scales, cfg: ARTrainConfig,
                    anchor: OmniARModel | None, elastic_g: torch.Generator):
    """(output, loss, logged parts) of a step that trains the model: its next-token loss on ``args`` (the model's
    keyword arguments), plus the KL to the ``anchor`` model if given, plus, with ``cfg.elastic``, the loss of a
    sub-model drawn with ``elastic_g`` (distilled from the full model's output if ``cfg.elastic_distill``)."""
    ids, mask = args["text_ids"], args["text_mask"]
    out = engine.ds(**args)
    loss, parts = ar_loss(out, targets, ids, mask, scales, cfg)
    if anchor is not None:
        with torch.no_grad():
            reference = anchor(**args)
        kl = distill_loss(out, reference, scales, cfg)
        loss = loss + cfg.anchor_weight * kl
        parts["anchor_kl"] = kl.item()
    parts["loss/full"] = loss.item()
    if cfg.elastic:
        spec = engine.module.sample_elastic(elastic_g)
        if spec != engine.module.active_spec:
            with engine.module.elastic(*spec):
                sub_out = engine.ds(**args)
            sub_loss, sub_parts = ar_loss(sub_out, targets, ids, mask, scales, cfg)
            parts["elastic_visual_ce"] = sub_parts["visual_ce"]
            if cfg.elastic_distill > 0:
                kl = distill_loss(sub_out, out, scales, cfg)
                sub_loss = sub_loss + cfg.elastic_distill * kl
                parts["elastic_kl"] = kl.item()
            parts["loss/elastic"] = sub_loss.item()
            loss = loss + sub_loss
    return out, loss, parts


def run_parts(config: dict):
    """What an AR run's config fixes: the data, engine and train sections, the video tokenizer, the text tokenizer,
    the text encoder (or None) and the model's config."""
    check_sections(config)
    data_cfg = config_from_dict(ARDataConfig, config.get("data", {}), "data")
    engine_cfg, train_cfg = split_train_section(config.get("train", {}), ARTrainConfig)
    model_fields = check_model_section(config.get("model", {}))
    tok = load_video_tokenizer(train_cfg.tokenizer)
    tok.check_num_frames(data_cfg.num_frames, "data.num_frames")
    if train_cfg.short_clip_prob:
        tok.check_num_frames(train_cfg.short_clip_frames, "train.short_clip_frames")
        require(train_cfg.short_clip_frames < data_cfg.num_frames, "train.short_clip_frames",
                f"must be below data.num_frames={data_cfg.num_frames}, got {train_cfg.short_clip_frames}")
    text_tok = TextTokenizer()
    text_encoder = load_text_encoder(config.get("model", {}), data_cfg.max_text_len)
    model_cfg = model_config(model_fields, tok, text_tok, text_encoder)
    check_ep_size(engine_cfg.ep_size, model_cfg)
    if train_cfg.trainable == "exit_adapters":
        require(bool(model_cfg.exit_adapter_depths) and max(model_cfg.exit_adapter_depths) < model_cfg.num_layers,
                "model.exit_adapter_depths", f"must name depths below num_layers={model_cfg.num_layers} for "
                f"train.trainable=exit_adapters, got {list(model_cfg.exit_adapter_depths)}")
    return data_cfg, engine_cfg, train_cfg, tok, text_tok, text_encoder, model_cfg


def save_pipeline(folder: Path, model: OmniARModel, tok: VideoTokenizer, text_tok: TextTokenizer,
                  text_encoder: TextEncoder | None, data_cfg: ARDataConfig) -> None:
    """The run's pipeline folder around ``model`` (moved to the CPU with the tokenizers)."""
    TextToVideoPipeline(tok.cpu(), text_tok, model.cpu(), data_cfg.max_text_len, data_cfg.max_num_frames,
                        vocabulary=shapes_vocabulary() if data_cfg.dataset == "shapes" else None,
                        text_encoder=None if text_encoder is None else text_encoder.cpu()).save_pretrained(folder)


def export_checkpoint(config: dict, checkpoint: str | Path, out: str | Path) -> Path:
    """``omniar export``: the pipeline folder ``out`` of checkpoint ``OUT/checkpoints/step_N`` of the run that
    ``config`` describes (any ZeRO stage and ep_size, on one process): what ``OUT/final`` would hold had the run
    ended at that step."""
    out = check_output_path(out, "out", folder=True)
    data_cfg, _, _, tok, text_tok, text_encoder, model_cfg = run_parts(config)
    state = checkpoint_state_dict(checkpoint)
    model = OmniARModel.from_config_obj(model_cfg)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # e.g. another model section than the run's
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        raise ValueError(f"checkpoint: {checkpoint} does not hold the model of this config (the run's --config "
                         f"and --set?): {' '.join(lines[:2])}") from None
    save_pipeline(out, model, tok, text_tok, text_encoder, data_cfg)
    return out


def load_init_model(model: OmniARModel, model_cfg: OmniARConfig, init_from: str, optional: str | None) -> None:
    """``train.init_from``'s model into ``model``. A folder whose schedule lacks trailing repeats of the latent
    grid that ``model_cfg``'s has (its tokenizer gained full-resolution steps) loads too, every tensor checked:
    each added scale's embedding starts as the grid's."""
    config_file = Path(init_from, "model", "config.json")
    saved = model_cfg.scales
    if config_file.is_file():
        saved = check_scales(json.loads(config_file.read_text()).get("scales"), "train.init_from: its scales")
    ours, added = model_cfg.scales, len(model_cfg.scales) - len(saved)
    grown = added > 0 and ours[:len(saved)] == saved and len(set(ours[len(saved) - 1:])) == 1
    target = OmniARModel.from_config_obj(model_cfg.replace(scales=saved)) if grown else model
    missing = load_init_from(target, init_from, "a pipeline folder (no model/)", "model", optional=optional)
    if not grown:
        return
    state = {name: value for name, value in target.state_dict().items() if name not in missing}
    grid = state["scale_embed.weight"][-1:]
    state["scale_embed.weight"] = torch.cat([state["scale_embed.weight"], grid.expand(added, -1)])
    model.load_state_dict(state, strict=optional is None)


def train(config: dict, progress: bool = True, stop_at: int | None = None) -> Path:
    """Pre-tokenize (once), then train or resume; exports a pipeline folder to ``<out_dir>/final``."""
    data_cfg, engine_cfg, train_cfg, tok, text_tok, text_encoder, model_cfg = run_parts(config)
    end = last_step(train_cfg.steps, stop_at)
    expert_parallel = engine_cfg.ep_size > 1  # then every collective of the MoE layers needs all ranks
    # expert-parallel all-to-alls and ZeRO-3's weight gathers pair up only if all ranks run the same layers
    same_layers = expert_parallel or engine_cfg.zero_stage == 3
    torch.manual_seed(engine_cfg.seed)  # same initial weights on every rank and every resume
    model = OmniARModel.from_config_obj(model_cfg)
    build = partial(OmniARModel.from_config_obj, model_cfg)  # a new model, to load whole weights into
    adapters_only = train_cfg.trainable == "exit_adapters"
    if train_cfg.init_from:  # a model without (these) exit adapters starts them new
        load_init_model(model, model_cfg, train_cfg.init_from, optional="exit_adapters." if adapters_only else None)
    if adapters_only:  # frozen in eval mode: the MoE layers keep no load statistics, so their biases stay put
        model.requires_grad_(False).eval()
        model.exit_adapters.requires_grad_(True)
    # the init_from weights, also on resume (a resumed run reloads only the trained model's state)
    anchor = copy.deepcopy(model).eval().requires_grad_(False) if train_cfg.anchor_weight > 0 else None
    if train_cfg.activation_checkpointing:
        checkpoint_blocks(model.layers)
    with TrainEngine(model, engine_cfg, lr_lambda=cosine_lr(train_cfg.steps, engine_cfg.warmup_steps)) as engine:
        tok.to(engine.device).eval().requires_grad_(False)
        if text_encoder is not None:  # frozen, outside the engine: neither optimized nor checkpointed
            text_encoder.to(engine.device)
        if anchor is not None:
            anchor.to(engine.device)
        if engine.rank == 0:
            source = build_dataset(data_cfg.dataset, data_cfg.path, data_cfg.num_clips, tok.resolution,
                                   data_cfg.num_frames, data_cfg.seed, data_cfg.motion)
            log_skipped(engine, 0, data=source)
            settings = {k: getattr(data_cfg, k) for k in ("dataset", "path", "num_frames", "seed")}
            settings |= motion_source(data_cfg.motion)
            pretokenize(tok, source, data_cfg.cache_dir, data_cfg.num_clips, settings | {"size": tok.resolution},
                        num_workers=data_cfg.num_workers, progress=progress)
            log_skipped(engine, 0, data=source)  # with the files that failed to decode while pre-tokenizing
        engine._barrier()
        data = TokenizedDataset(data_cfg.cache_dir)
        start = engine.resume()
        engine.log_hparams(config)
        # rank 0 logs them; under EP or ZeRO-3 every rank takes part in the collectives they need
        sampling = train_cfg.sample_every and (engine.rank == 0 or same_layers)
        prompts = data.captions[:SAMPLE_PROMPTS] if sampling else []
        if prompts:  # the rows of the "samples" image, top to bottom
            engine.log_text("samples/prompts", "\n\n".join(f"{i}. {p}" for i, p in enumerate(prompts)), start)
        # the first frame and one motion step (one frame for image data): cheap enough to do often
        sample_frames = min(data_cfg.num_frames, 1 + tok.config.temporal_compression)
        loader = step_loader(data, engine_cfg.micro_batch_size, start, end, engine.rank, engine.world_size,
                             collate_fn=collate, accum=engine_cfg.grad_accum_steps)
        bar = tqdm(total=train_cfg.steps, initial=start, disable=not progress or engine.rank != 0, desc="ar")
        step = start
        for micro_batches in loader:
            logging = (step + 1) % engine_cfg.log_every == 0 or step + 1 == end
            rows = []
            for micro, batch in enumerate(micro_batches):
                g = engine.generator(step, micro=micro)
                text, inputs, targets, visibility = prepare_batch(batch, tok, text_tok, train_cfg, data_cfg, g,
                                                                  engine.device, text_encoder)
                args = dict(visual_inputs=inputs, frame_visibility=visibility, **text)
                with engine.autocast():
                    if adapters_only:
                        out, loss, parts = exit_adapter_loss(engine.module, engine.ds, tok.scales, train_cfg, **args)
                    else:
                        elastic_g = engine.generator(step, salt=1, shared=True, micro=micro) if same_layers else g
                        out, loss, parts = full_model_loss(engine, args, targets, tok.scales, train_cfg, anchor,
                                                           elastic_g)
                # the step's last micro-batch, and the optimizer stepped: balance from the load of all its micro-batches
                if engine.backward_step(loss) and not adapters_only:
                    engine.module.update_router_biases()
                if logging:
                    rows.append({"loss": loss.item(), **parts} | {
                        f"router/{i}/{key}": value for i, stats in enumerate(out.router_stats)
                        for key, value in stats.to_dict().items() if isinstance(value, (int, float))})
            step += 1
            bar.update(1)
            if logging:
                scalars = mean_scalars(rows)
                mask = text["text_mask"]
                engine.log_step(scalars, step, samples=mask.shape[0] * len(micro_batches),
                                tokens=(mask.numel() + targets.numel()) * len(micro_batches))
                # exit-adapter runs log no visual cross-entropy
                bar.set_postfix({name: f"{scalars[key]:.3f}" for name, key in (("loss", "loss"), ("vis", "visual_ce"))
                                 if key in scalars})
            if prompts and (step % train_cfg.sample_every == 0 or step == train_cfg.steps):
                with engine.paused(engine.module):
                    whole = engine.whole_module(build)  # ZeRO-3: a copy on rank 0 only
                    if whole is not None:
                        engine.log_filmstrips("samples", sample_clips(tok, text_tok, whole, prompts, sample_frames,
                                                                      data_cfg.max_text_len, text_encoder), step)
            if engine.checkpoint_due(step, end):  # SIGTERM: checkpoint saved; rerun the command to resume
                break
        bar.close()
        final = Path(engine_cfg.out_dir) / "final"
        if step == train_cfg.steps:
            model = engine.whole_module(build)  # ZeRO-3: the partitions gathered onto rank 0 (a collective)
            if expert_parallel:  # the whole model, every layer's experts gathered (a collective)
                state = gathered_state_dict(model)
                if engine.rank == 0:
                    model = build()
                    model.load_state_dict(state)
            if engine.rank == 0:
                save_pipeline(final, model, tok, text_tok, text_encoder, data_cfg)
    return final


add_cli_arguments, cli_main = config_cli("configs/ar_shapes.yaml", train, "pipeline")
