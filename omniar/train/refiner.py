"""Train a tokenizer's per-frame refiner on DeepSpeed: ``omniar train refiner --config configs/refiner_shapes.yaml``.

The tokenizer (``train.tokenizer``) stays frozen, so every code, and every AR model trained on
them, stays valid. Its plain decodes of ``train.num_clips`` clips are computed once and cached
beside the run (fp16 frames, written atomically); each step fits the refiner
(:class:`~omniar.tokenizers.causal3d.FrameRefiner`, MSE) to a batch of cached frames drawn by a
generator seeded by the step, so a resumed run sees exactly the batches of an uninterrupted one.
Exports the tokenizer with its refiner to ``<out_dir>/final``. The ``model`` section sets the new
refiner's ``refiner_blocks``, ``refiner_channels``, ``refiner_scale`` (default: the base's), ``refiner_norm``
(default: true) and ``refiner_fold_time`` (then a sample is one latent frame's frames, folded); ``train.finetune``
instead continues the base's own refiner.

``train.adv_weight`` > 0 adds an adversarial term, as VQGAN does for its decoder: a conditional patch
critic (:class:`PatchCritic`) learns to tell (decoded, real) frame pairs from (decoded, refined) ones
with the hinge loss, and the refiner's adversarial loss is scaled by VQGAN's adaptive weight (the ratio
of the MSE and adversarial gradient norms at the refiner's last layer) times ``adv_weight``. MSE alone
averages over the sharp frames a blurred decode could have come from; the critic rewards picking one.
The critic trains from step 0, the refiner sees it from ``train.adv_start``; it is not exported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from .._checks import check_bool, check_float, check_int, require
from .._pretrained import weights_sha256, write_file_atomically
from ..eval.metrics import psnr
from ..tokenizers import VideoTokenizer
from ..tokenizers.causal3d import fold_time
from .common import (VideoDataConfig, build_dataset, build_model, check_sections, config_cli, last_step,
                     load_video_tokenizer, mean_scalars, motion_source, split_train_section)
from .engine import TrainEngine, config_from_dict, cosine_lr


@dataclass
class RefinerTrainConfig:
    tokenizer: str = "shapes-tokenizer"  # folder, or the name of a packaged asset
    steps: int = 800
    num_clips: int = 192  # clips decoded once into the frame cache
    finetune: bool = False  # continue the base's refiner (the model section may only restate it)
    adv_weight: float = 0.0  # > 0: adversarial term with a patch critic (see the module docstring)
    adv_start: int = 0  # steps before the refiner sees the critic (which trains from step 0)
    critic_channels: int = 32

    def __post_init__(self) -> None:
        check_int(self.steps, "train.steps", 1)
        check_int(self.num_clips, "train.num_clips", 1)
        check_bool(self.finetune, "train.finetune")
        check_float(self.adv_weight, "train.adv_weight", 0.0)
        check_int(self.adv_start, "train.adv_start", 0)
        check_int(self.critic_channels, "train.critic_channels", 1)


class PatchCritic(nn.Module):
    """Conditional patch discriminator: a (decoded, candidate) frame pair -> one logit per patch
    (three stride-2 convolutions: an 8x8 grid of 38-pixel receptive fields on a 64x64 frame).
    Conditioning on the decoded frame makes it judge "a sharp frame this decode came from", not any
    sharp frame, so drawing a sharp but different shape does not please it."""

    def __init__(self, image_channels: int = 3, channels: int = 32):
        super().__init__()
        widths = (2 * image_channels, channels, 2 * channels, 4 * channels)
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip(widths, widths[1:])):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1),
                       nn.GroupNorm(8, c_out) if i else nn.Identity(), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers, nn.Conv2d(widths[-1], 1, 3, padding=1))

    def forward(self, decoded: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([decoded, candidate], dim=1))


class RefinerObjective(nn.Module):
    """The trained modules (refiner, optional critic) and the loss of one step, so that one DeepSpeed
    engine, one optimizer and one atomic checkpoint hold both. The refiner's adversarial term reads the
    critic through detached weights and the critic's loss reads detached refined frames, so one backward
    pass gives each module only its own gradient."""

    def __init__(self, refiner: nn.Module, critic: PatchCritic | None):
        super().__init__()
        self.refiner, self.critic = refiner, critic

    def forward(self, decoded: torch.Tensor, real: torch.Tensor, adv_weight: float = 0.0
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(loss, terms)``: MSE, plus (with a critic) the critic's hinge loss and ``adv_weight`` x
        adaptive weight x the refiner's adversarial loss. ``terms`` holds ``refined`` and each term."""
        refined = self.refiner(decoded).float()
        mse = F.mse_loss(refined, real)
        terms = {"refined": refined, "mse": mse}
        if self.critic is None:
            return mse, terms
        frozen = {name: p.detach() for name, p in self.critic.named_parameters()}
        adv = -torch.func.functional_call(self.critic, frozen, (decoded, refined)).float().mean()
        critic = (F.relu(1 - self.critic(decoded, real).float()).mean()
                  + F.relu(1 + self.critic(decoded, refined.detach()).float()).mean())
        terms |= {"adv": adv, "critic": critic}
        loss = mse + critic
        if adv_weight > 0:
            last = self.refiner.conv_out.weight
            g_mse, g_adv = (torch.autograd.grad(t, last, retain_graph=True)[0] for t in (mse, adv))
            scale = (g_mse.norm() / (g_adv.norm() + 1e-4)).clamp(max=1e4).detach()
            terms["adv_scale"] = scale
            loss = loss + adv_weight * scale * adv
        return loss, terms


def cache_decoded_frames(tok: VideoTokenizer, data_cfg: VideoDataConfig, num_clips: int, cache: Path,
                         progress: bool) -> None:
    """Unless ``cache`` exists: write ``{"decoded", "real"}`` frames (N, 3, H, W) fp16 of the first
    ``num_clips`` clips, decoded by ``tok``."""
    if cache.is_file():
        return
    dataset = build_dataset(data_cfg.dataset, data_cfg.path, data_cfg.num_samples, data_cfg.size,
                            data_cfg.num_frames, data_cfg.seed, data_cfg.motion)
    check_int(num_clips, "train.num_clips", 1, len(dataset))
    decoded, real = [], []
    for start in tqdm(range(0, num_clips, 4), desc="decode", disable=not progress):
        video = torch.stack([dataset[i]["video"] for i in range(start, min(num_clips, start + 4))])
        rec = tok.decode(tok.encode(video.to(tok.device))).cpu()
        decoded.append(rec.transpose(1, 2).flatten(0, 1).half())
        real.append(video.transpose(1, 2).flatten(0, 1).half())
    frames = {"decoded": torch.cat(decoded).contiguous(), "real": torch.cat(real).contiguous()}
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_file_atomically(cache, lambda tmp: save_file(frames, tmp))


def train(config: dict, progress: bool = True, stop_at: int | None = None) -> Path:
    """Run (or resume) refiner training; returns the exported tokenizer folder."""
    check_sections(config)
    data_cfg = config_from_dict(VideoDataConfig, config.get("data", {}), "data")
    engine_cfg, train_cfg = split_train_section(config.get("train", {}), RefinerTrainConfig)
    # the adversarial weighting differentiates by one weight and runs the critic on detached copies of its weights,
    # neither of which works on ZeRO-3's partitioned weights; the refiner is small enough to train without it
    require(engine_cfg.zero_stage < 3, "train.zero_stage", "3 is not supported by omniar train refiner (a small "
            f"model: use 0-2), got {engine_cfg.zero_stage}")
    end = last_step(train_cfg.steps, stop_at)
    base = load_video_tokenizer(train_cfg.tokenizer)
    refiner_keys = ("refiner_blocks", "refiner_channels", "refiner_norm", "refiner_scale", "refiner_fold_time")
    if train_cfg.finetune:
        require(base.refiner is not None, "train.finetune", f"needs a tokenizer with a refiner; "
                f"{train_cfg.tokenizer} has none")
        refiner_cfg = {k: base.config[k] for k in refiner_keys}
        differ = {k: v for k, v in (config.get("model") or {}).items() if refiner_cfg.get(k) != v}
        require(not differ, "model", f"with train.finetune the base's refiner is continued as it is "
                f"({refiner_cfg}); these keys differ: {differ}")
    else:  # a new refiner gets the norm unless told otherwise, even on a base whose old refiner had none
        refiner_cfg = {"refiner_norm": True} | dict(config.get("model", {}))
        require(set(refiner_cfg) <= set(refiner_keys), "model",
                f"takes only {', '.join(refiner_keys)}, got {sorted(refiner_cfg)}")
        check_int(refiner_cfg.get("refiner_blocks", 0), "model.refiner_blocks", 1)
    start_refiner, base.refiner = base.refiner, None  # the refiner learns from plain decodes
    require(base.resolution == data_cfg.size, "data.size",
            f"must equal the tokenizer resolution {base.resolution}, got {data_cfg.size}")
    base.check_num_frames(data_cfg.num_frames, "data.num_frames")
    torch.manual_seed(engine_cfg.seed)  # same initial refiner on every rank and every resume
    tok = build_model(VideoTokenizer, {k: v for k, v in base.config.items() if not k.startswith("_")} | refiner_cfg)
    tok.load_state_dict(base.state_dict(), strict=False)  # everything but the new refiner
    if train_cfg.finetune:
        tok.refiner.load_state_dict(start_refiner.state_dict())
    tok.eval().requires_grad_(False)
    critic = (PatchCritic(tok.config.in_channels * tok.refiner_fold, train_cfg.critic_channels)
              if train_cfg.adv_weight > 0 else None)
    objective = RefinerObjective(tok.refiner.requires_grad_(True), critic).train()

    def optimizer(module: RefinerObjective) -> torch.optim.Optimizer:
        groups = [{"params": list(module.refiner.parameters())}]
        if module.critic is not None:  # GAN practice: less momentum for the critic
            groups.append({"params": list(module.critic.parameters()), "betas": (0.5, 0.9)})
        return torch.optim.AdamW(groups, lr=engine_cfg.lr, betas=engine_cfg.betas,
                                 weight_decay=engine_cfg.weight_decay)

    with TrainEngine(objective, engine_cfg, optimizer_factory=optimizer,
                     lr_lambda=cosine_lr(train_cfg.steps, engine_cfg.warmup_steps)) as engine:
        tok.to(engine.device)
        out = Path(engine_cfg.out_dir)
        # keyed by everything the frames depend on: another tokenizer or data never reuses them
        source = {k: v for k, v in asdict(data_cfg).items() if k not in ("num_workers", "motion")}
        source |= motion_source(data_cfg.motion)
        key = weights_sha256(base, extra=[source, train_cfg.num_clips])[:16]
        cache = out / f"decoded_{train_cfg.num_clips}x{data_cfg.num_frames}_{key}.safetensors"
        if engine.rank == 0:
            cache_decoded_frames(base.to(engine.device).eval(), data_cfg, train_cfg.num_clips, cache, progress)
        engine._barrier()
        frames = load_file(cache)
        if tok.refiner_fold > 1:  # one sample: a latent frame's decoded frames, folded as the refiner reads them
            frames = {k: fold_time(v.unflatten(0, (-1, data_cfg.num_frames)).transpose(1, 2), tok.refiner_fold)
                      .transpose(1, 2).flatten(0, 1) for k, v in frames.items()}
        start = engine.resume()
        engine.log_hparams(config)
        bar = tqdm(total=train_cfg.steps, initial=start, disable=not progress or engine.rank != 0, desc="refiner")
        step = start
        while step < end:
            logging = (step + 1) % engine_cfg.log_every == 0 or step + 1 == train_cfg.steps
            rows = []
            for micro in range(engine_cfg.grad_accum_steps):
                idx = torch.randint(0, len(frames["decoded"]), (engine_cfg.micro_batch_size,),
                                    generator=engine.generator(step, micro=micro))
                x, y = (frames[k][idx].to(engine.device).float() for k in ("decoded", "real"))
                with engine.autocast():
                    loss, terms = engine.ds(x, y, train_cfg.adv_weight if step >= train_cfg.adv_start else 0.0)
                engine.backward_step(loss)  # the last one also steps
                if logging:
                    refined = terms.pop("refined").detach().clamp(-1, 1)
                    before, after = psnr(x, y).mean().item(), psnr(refined, y).mean().item()
                    rows.append({"loss": loss.item(), "psnr": after, "psnr_gain": after - before}
                                | {k: v.item() for k, v in terms.items()})
            step += 1
            bar.update(1)
            if logging:
                scalars = mean_scalars(rows)
                engine.log_step(scalars, step, samples=x.shape[0] * engine_cfg.grad_accum_steps)  # frames
                bar.set_postfix(loss=f"{scalars['loss']:.5f}", gain=f"{scalars['psnr_gain']:+.2f} dB")
            if engine.checkpoint_due(step, end):  # SIGTERM: checkpoint saved; rerun the command to resume
                break
        bar.close()
        final = out / "final"
        if engine.rank == 0 and step == train_cfg.steps:
            tok.cpu().eval().save_pretrained(final)
    return final


add_cli_arguments, cli_main = config_cli("configs/refiner_shapes.yaml", train, "tokenizer weights")
