"""Train a tokenizer's per-frame refiner on DeepSpeed: ``omniar train refiner --config configs/refiner_shapes.yaml``.

The tokenizer (``train.tokenizer``) stays frozen, so every code, and every AR model trained on
them, stays valid. Its plain decodes of ``train.num_clips`` clips are computed once and cached
beside the run (fp16 frames, written atomically); each step fits the refiner
(:class:`~omniar.tokenizers.causal3d.FrameRefiner`, MSE) to a batch of cached frames drawn by a
generator seeded by the step, so a resumed run sees exactly the batches of an uninterrupted one.
Exports the tokenizer with its refiner to ``<out_dir>/final``. The ``model`` section sets the new
refiner's ``refiner_blocks``, ``refiner_channels`` (default: the base's) and ``refiner_norm`` (default: true).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .._checks import check_int, require
from .._pretrained import weights_sha256, write_file_atomically
from ..eval.metrics import psnr
from ..tokenizers import VideoTokenizer
from .ar import load_video_tokenizer
from .common import config_cli, split_train_section
from .engine import TrainEngine, config_from_dict, cosine_lr
from .tokenizer import TokenizerDataConfig, build_dataset


@dataclass
class RefinerTrainConfig:
    tokenizer: str = "shapes-tokenizer"  # folder, or the name of a packaged asset
    steps: int = 800
    num_clips: int = 192  # clips decoded once into the frame cache

    def __post_init__(self) -> None:
        check_int(self.steps, "train.steps", 1)
        check_int(self.num_clips, "train.num_clips", 1)


def cache_decoded_frames(tok: VideoTokenizer, data_cfg: TokenizerDataConfig, num_clips: int, cache: Path,
                         progress: bool) -> None:
    """Unless ``cache`` exists: write ``{"decoded", "real"}`` frames (N, 3, H, W) fp16 of the first
    ``num_clips`` clips, decoded by ``tok``."""
    if cache.is_file():
        return
    dataset = build_dataset(data_cfg)
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
    require(isinstance(config, dict), "config", "must be a mapping with model/data/train sections")
    data_cfg = config_from_dict(TokenizerDataConfig, config.get("data", {}), "data")
    engine_cfg, train_cfg = split_train_section(config.get("train", {}), RefinerTrainConfig)
    # a new refiner gets the norm unless told otherwise, even on a base whose old refiner had none
    refiner_cfg = {"refiner_norm": True} | dict(config.get("model", {}))
    require(set(refiner_cfg) <= {"refiner_blocks", "refiner_channels", "refiner_norm"}, "model",
            f"takes only refiner_blocks, refiner_channels and refiner_norm, got {sorted(refiner_cfg)}")
    require(int(refiner_cfg.get("refiner_blocks", 0)) >= 1, "model.refiner_blocks", "must be >= 1")
    base = load_video_tokenizer(train_cfg.tokenizer)
    base.refiner = None  # a new refiner replaces any earlier one, and learns from plain decodes
    require(base.resolution == data_cfg.size, "data.size", f"must equal the tokenizer resolution {base.resolution}")
    base.check_num_frames(data_cfg.num_frames, "data.num_frames")
    torch.manual_seed(engine_cfg.seed)  # same initial refiner on every rank and every resume
    tok = VideoTokenizer(**{k: v for k, v in base.config.items() if not k.startswith("_")} | refiner_cfg)
    tok.load_state_dict(base.state_dict(), strict=False)  # everything but the new refiner
    tok.eval().requires_grad_(False)
    engine = TrainEngine(tok.refiner.requires_grad_(True).train(), engine_cfg,
                         lr_lambda=cosine_lr(train_cfg.steps, engine_cfg.warmup_steps))
    tok.to(engine.device)
    out = Path(engine_cfg.out_dir)
    # keyed by everything the frames depend on: another tokenizer or data never reuses them
    source = {k: v for k, v in asdict(data_cfg).items() if k != "num_workers"}
    key = weights_sha256(base, extra=[source, train_cfg.num_clips])[:16]
    cache = out / f"decoded_{train_cfg.num_clips}x{data_cfg.num_frames}_{key}.safetensors"
    if engine.rank == 0:
        cache_decoded_frames(base.to(engine.device).eval(), data_cfg, train_cfg.num_clips, cache, progress)
    engine._barrier()
    frames = load_file(cache)
    start = engine.resume()
    end = train_cfg.steps if stop_at is None else min(check_int(stop_at, "stop_at", 1), train_cfg.steps)
    bar = tqdm(total=train_cfg.steps, initial=start, disable=not progress or engine.rank != 0, desc="refiner")
    step = start
    while step < end:
        idx = torch.randint(0, len(frames["decoded"]), (engine_cfg.micro_batch_size,), generator=engine.generator(step))
        x, y = (frames[k][idx].to(engine.device).float() for k in ("decoded", "real"))
        with engine.autocast():
            refined = engine.ds(x).float()
            loss = F.mse_loss(refined, y)
        engine.backward_step(loss)
        step += 1
        bar.update(1)
        if step % engine_cfg.log_every == 0 or step == train_cfg.steps:
            before, after = psnr(x, y).mean().item(), psnr(refined.detach().clamp(-1, 1), y).mean().item()
            engine.log_scalars({"loss": loss.item(), "psnr": after, "psnr_gain": after - before, "lr": engine.lr,
                                "skipped_steps": engine.skipped_steps}, step)
            bar.set_postfix(loss=f"{loss.item():.5f}", gain=f"{after - before:+.2f} dB")
        if engine.checkpoint_due(step, end):  # SIGTERM: checkpoint saved; rerun the command to resume
            break
    bar.close()
    final = out / "final"
    if engine.rank == 0 and step == train_cfg.steps:
        tok.cpu().eval().save_pretrained(final)
    engine.close()
    return final


add_cli_arguments, cli_main = config_cli("configs/refiner_shapes.yaml", train, "tokenizer weights")
