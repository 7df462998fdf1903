"""Unsupervised domain adaptation on DeepSpeed: ``omniar train uda --method bipc|dann|source_only``.

BiPC: the backbone keeps its pre-trained head beside a new task head, and the two calibrate each other on
the unlabelled target domain (losses in :mod:`omniar.uda.losses`):

* CPA aligns source and target pre-trained-head probabilities on pairs the task head's pseudo-labels
  match, and keeps the source pre-trained head consistent with the class-relationship matrix;
* CGI sharpens the task head on the target, weighted by how much it agrees with the pre-trained
  head's calibrated view of the task classes (it trains the task head only).

Total: label-smoothed source CE (or the focal loss, the reference's choice on VisDA) + ramp(progress) *
(1.0 CPA + 0.25 CGI). Baselines in the same trainer: ``source_only`` (CE on the source only) and ``dann``
(domain discriminator behind gradient reversal). The target is evaluated after every epoch (accuracy, or
VisDA's mean per-class accuracy); the best and the last epoch are both returned.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset
from tqdm.auto import tqdm

from .._checks import check_choice, check_float, check_int, require
from .._pretrained import write_file_atomically
from ..data.skipped import log_skipped
from ..train.engine import EngineConfig, TrainEngine, config_from_dict
from .losses import REGULARISER_MEANS, GradientReversal, cgi_loss, cpa_loss, focal_loss, ramp
from .model import C_GRID, BiPCModel, calibrated_class_probs, check_c_grid, create_backbone, relationship_matrix

METHODS = ("source_only", "dann", "bipc")
METRICS = ("accuracy", "mean_class_accuracy")
CLASSIFIER_LOSSES = ("cross_entropy", "focal")


class UDAModel(nn.Module):
    """The BiPC model plus, for DANN, a domain discriminator (tllib's layout, narrower)."""

    def __init__(self, model: BiPCModel, method: str, hidden: int = 256):
        super().__init__()
        self.model = model
        dim = model.backbone.num_features
        self.discriminator = nn.Sequential(
            nn.Linear(dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
            nn.Linear(hidden, 1)) if method == "dann" else None

    def forward(self, x: torch.Tensor, detach_task_input: bool = False):
        return self.model(x, detach_task_input)


# -------------------------------------------------------------------- data
def cache_dataset(dataset: Dataset, num_workers: int = 0, batch_size: int = 256) -> TensorDataset:
    """Materialise (image, label) items once (rendering is slower than training on them); keeps ``classes``."""
    xs, ys = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, num_workers=num_workers):
        xs.append(x)
        ys.append(y)
    cached = TensorDataset(torch.cat(xs), torch.cat(ys))
    cached.classes = list(dataset.classes)
    return cached


class _SeededItems(Dataset):
    """Item ``(i, seed)``: item i of ``data``, its random augmentation (torchvision draws from the
    global torch RNG) drawn from ``seed``; the caller's RNG state is left as it was."""

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.data[index]


class _StepBatches(Sampler[list[tuple[int, int]]]):
    """Batch of step k = a random draw without replacement, with one augmentation seed per item, from
    the engine's generator for step k: a resumed run sees exactly the batches an uninterrupted one
    would have, augmented the same way."""

    def __init__(self, n: int, batch_size: int, start: int, total: int, engine: TrainEngine, salt: int):
        self.n, self.bs, self.start, self.total, self.engine, self.salt = n, batch_size, start, total, engine, salt

    def __len__(self) -> int:
        return self.total - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.total):
            gen = self.engine.generator(step, self.salt)
            perm = torch.randperm(self.n, generator=gen)[: self.bs]
            seeds = torch.randint(0, 2**62, (self.bs,), generator=gen)
            yield list(zip(perm.tolist(), seeds.tolist()))


def _loader(data: Dataset, batch_size: int, start: int, total: int, engine: TrainEngine, salt: int,
            num_workers: int) -> Iterator:
    sampler = _StepBatches(len(data), min(batch_size, len(data)), start, total, engine, salt)
    return iter(DataLoader(_SeededItems(data), batch_sampler=sampler, num_workers=num_workers))


@torch.no_grad()
def evaluate(model: BiPCModel, data: Dataset, device: torch.device, metric: str = "accuracy",
             batch_size: int = 256, num_workers: int = 0) -> float:
    """Task-head ``metric`` (%) on a labelled dataset: ``accuracy``, or ``mean_class_accuracy`` (the
    mean over the classes present of each class's accuracy: VisDA's reporting)."""
    check_choice(metric, "metric", METRICS)
    was_training = model.training
    model.eval()
    correct, total = torch.zeros(len(data.classes)), torch.zeros(len(data.classes))
    for x, y in DataLoader(data, batch_size=batch_size, num_workers=num_workers):
        hit = (model(x.to(device))[0].argmax(1).cpu() == y).float()
        correct.index_add_(0, y, hit)
        total.index_add_(0, y, torch.ones_like(hit))
    model.train(was_training)
    if metric == "accuracy":
        return 100.0 * correct.sum().item() / total.sum().item()
    present = total > 0
    return 100.0 * (correct[present] / total[present]).mean().item()


@torch.no_grad()
def pretrained_head_probs(model: BiPCModel, data: Dataset, device: torch.device, limit: int | None = None,
                          logit_scale: float = 1.0, seed: int = 0, num_workers: int = 0
                          ) -> tuple[np.ndarray, np.ndarray]:
    """softmax(``logit_scale`` x pre-trained-head logits) and labels of ``limit`` random items of ``data``
    (default: all)."""
    was_training = model.training
    model.eval()
    idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:limit].tolist()
    probs, labels = [], []
    for x, y in DataLoader(torch.utils.data.Subset(data, idx), batch_size=256, num_workers=num_workers):
        probs.append((model(x.to(device))[1].float() * logit_scale).softmax(1).cpu())
        labels.append(y)
    model.train(was_training)
    return torch.cat(probs).double().numpy(), torch.cat(labels).numpy()


def load_or_learn_relation(model: BiPCModel, source: Dataset, num_classes: int, cache: Path,
                           device: torch.device, cfg: UDAConfig) -> torch.Tensor:
    """The (C, K) relationship matrix: read from ``cache`` (.npy) if there, else learned once from
    ``source`` with ``cfg``'s ``relation_*`` settings and cached."""
    if cache.is_file():
        relation = np.load(cache, allow_pickle=False)
        require(relation.shape == (num_classes, model.num_pretrained_classes), "relation_cache",
                f"{cache} holds shape {relation.shape}, expected {(num_classes, model.num_pretrained_classes)}")
    else:
        probs, labels = pretrained_head_probs(model, source, device, cfg.relation_max_samples,
                                              cfg.relation_logit_scale, cfg.seed, cfg.num_workers)
        relation = relationship_matrix(probs, labels, num_classes, cfg.seed, cfg.relation_c_grid)
        cache.parent.mkdir(parents=True, exist_ok=True)

        def save(tmp: Path) -> None:
            with tmp.open("wb") as f:  # a file object: np.save would append .npy to the temporary name
                np.save(f, relation, allow_pickle=False)

        write_file_atomically(cache, save)
    return torch.as_tensor(relation, dtype=torch.float32, device=device)


def check_domains(source: Dataset, target: Dataset) -> int:
    """Both domains non-empty with the same class list; returns the number of classes."""
    for name, data in (("source", source), ("target", target)):
        require(len(data) > 0, name, "domain is empty")
        classes = getattr(data, "classes", None)
        require(classes is not None and len(classes) >= 2, name,
                "needs a `classes` list of at least two class names")
    require(list(source.classes) == list(target.classes), "target",
            f"classes differ from the source's: {list(target.classes)} vs {list(source.classes)}")
    return len(source.classes)


# ----------------------------------------------------------------- trainer
@dataclass
class UDAConfig:
    method: str = "bipc"
    backbone: str = "resnet50"
    weights: str | None = None  # local timm weights; their classifier is the kept "pre-trained head"
    pretrained_classes: int | None = None  # size of that head if not the timm default (1000)
    epochs: int = 10
    steps_per_epoch: int | None = None  # default: one pass over the source
    batch_size: int = 32  # per domain
    lr: float = 1e-3  # backbone (tllib's DANN default); heads (task, discriminator) get head_lr_mult x
    head_lr_mult: float = 10.0
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    classifier_loss: str = "cross_entropy"  # or "focal" (the reference's choice on VisDA)
    metric: str = "accuracy"  # or "mean_class_accuracy" (VisDA's reporting)
    cpa_weight: float = 1.0
    cgi_weight: float = 0.25
    cpa_regulariser_mean: str = "batch"  # the reference's scale; "classes": the class-balanced mean
    ramp_gamma: float = 1.0  # BiPC's trade-off ramp; DANN's reversal weight always uses 10
    relation_cache: str | None = None  # default: OUT_DIR/relationship.npy
    # The relationship matrix is learned from softmax(scale x pre-trained logits). The reference uses 0.884,
    # a temperature fitted for torchvision's ImageNet ResNet-50: right for those weights only.
    relation_logit_scale: float = 1.0
    relation_c_grid: tuple[float, ...] = C_GRID  # the logistic regression's C values tried
    relation_max_samples: int | None = None  # source items it is learned from; default: all
    relation_augmented: bool = False  # the CLI learns it from un-augmented source images, as the reference
    seed: int = 0
    num_workers: int = 0
    zero_stage: int = 0
    precision: str = "fp32"
    out_dir: str = "runs/uda"

    def __post_init__(self) -> None:
        check_choice(self.method, "method", METHODS)
        check_int(self.epochs, "epochs", 1)
        if self.steps_per_epoch is not None:
            check_int(self.steps_per_epoch, "steps_per_epoch", 1)
        if self.pretrained_classes is not None:
            check_int(self.pretrained_classes, "pretrained_classes", 2)
        check_int(self.batch_size, "batch_size", 2)
        check_float(self.lr, "lr", 0.0, low_inclusive=False)
        check_float(self.head_lr_mult, "head_lr_mult", 0.0, low_inclusive=False)
        check_float(self.weight_decay, "weight_decay", 0.0)
        check_float(self.label_smoothing, "label_smoothing", 0.0, 1.0, high_inclusive=False)
        check_choice(self.classifier_loss, "classifier_loss", CLASSIFIER_LOSSES)
        check_choice(self.metric, "metric", METRICS)
        check_float(self.cpa_weight, "cpa_weight", 0.0)
        check_float(self.cgi_weight, "cgi_weight", 0.0)
        check_choice(self.cpa_regulariser_mean, "cpa_regulariser_mean", REGULARISER_MEANS)
        check_float(self.ramp_gamma, "ramp_gamma", 0.0, low_inclusive=False)
        check_float(self.relation_logit_scale, "relation_logit_scale", 0.0, low_inclusive=False)
        self.relation_c_grid = check_c_grid(self.relation_c_grid, "relation_c_grid")
        if self.relation_max_samples is not None:
            check_int(self.relation_max_samples, "relation_max_samples", 2)
        require(isinstance(self.relation_augmented, bool), "relation_augmented",
                f"must be true or false, got {self.relation_augmented!r}")
        check_int(self.seed, "seed", 0)
        check_int(self.num_workers, "num_workers", 0)


def _optimizer(cfg: UDAConfig):
    def make(module: UDAModel) -> torch.optim.Optimizer:
        backbone = [p for p in module.model.backbone.parameters() if p.requires_grad]
        heads = [p for n, p in module.named_parameters() if p.requires_grad and not n.startswith("model.backbone.")]
        return torch.optim.SGD([{"params": backbone, "lr": cfg.lr},
                                {"params": heads, "lr": cfg.lr * cfg.head_lr_mult}],
                               lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    return make


def train_uda(cfg: UDAConfig, source: Dataset, target: Dataset, target_eval: Dataset | None = None,
              progress: bool = False, relation_source: Dataset | None = None) -> dict:
    """Adapt from labelled ``source`` to unlabelled ``target``; the labels of ``target_eval`` (default:
    ``target``) are read only to report ``cfg.metric``. BiPC learns the relationship matrix from
    ``relation_source`` (default: ``source``; the CLI passes the un-augmented source images).
    Resumes from ``cfg.out_dir``'s newest checkpoint.

    Returns ``{"per_epoch": [acc %], "best": acc, "best_epoch": e (1-based), "last": acc}``; after a
    SIGTERM (checkpoint saved; rerun to resume) ``{"per_epoch": [...], "stopped_at": step}``.
    """
    num_classes = check_domains(source, target)
    torch.manual_seed(cfg.seed)
    backbone = create_backbone(cfg.backbone, cfg.weights, cfg.pretrained_classes)
    module = UDAModel(BiPCModel(backbone, num_classes), cfg.method)
    per_epoch = cfg.steps_per_epoch or max(1, len(source) // cfg.batch_size)
    total = per_epoch * cfg.epochs
    with TrainEngine(
            module, EngineConfig(out_dir=cfg.out_dir, zero_stage=cfg.zero_stage, lr=cfg.lr, grad_clip=0.0,
                                 micro_batch_size=cfg.batch_size, seed=cfg.seed, precision=cfg.precision,
                                 log_every=per_epoch, save_every=per_epoch),
            optimizer_factory=_optimizer(cfg), lr_lambda=lambda step: (1 + 3e-4 * step) ** -0.75) as engine:
        model, dev, out = engine.module.model, engine.device, Path(cfg.out_dir)
        relation = None
        if cfg.method == "bipc":
            cache = Path(cfg.relation_cache) if cfg.relation_cache else out / "relationship.npy"
            relation = load_or_learn_relation(model, relation_source if relation_source is not None else source,
                                              num_classes, cache, dev, cfg)
        start = engine.resume()
        engine.log_hparams(asdict(cfg))
        log_skipped(engine, start, source=source, target=target)
        history_file = out / "history.json"
        history = json.loads(history_file.read_text())[: start // per_epoch] \
            if start and history_file.is_file() else []
        src = _loader(source, cfg.batch_size, start, total, engine, 1, cfg.num_workers)
        tgt = _loader(target, cfg.batch_size, start, total, engine, 2, cfg.num_workers) \
            if cfg.method != "source_only" else None
        bar = tqdm(range(start, total), initial=start, total=total, desc=f"uda {cfg.method}",
                   disable=not progress or engine.rank != 0)
        done = start
        for step in bar:
            xs, ys = (t.to(dev) for t in next(src))
            scalars = {}
            with engine.autocast():
                if cfg.method == "source_only":
                    task_s = engine.ds(xs)[0]
                elif cfg.method == "dann":
                    xt = next(tgt)[0].to(dev)
                    task, _, feats = engine.ds(torch.cat([xs, xt]))  # one batch, as DANN does
                    task_s = task[: len(xs)]
                    domain = engine.module.discriminator(GradientReversal.apply(feats, ramp(step / total, 10.0)))
                    is_source = torch.cat([torch.ones(len(xs)), torch.zeros(len(xt))]).to(dev)
                    scalars["domain"] = F.binary_cross_entropy_with_logits(domain.squeeze(1).float(), is_source)
                else:  # bipc: separate source and target passes, the task head reads detached target features
                    xt = next(tgt)[0].to(dev)
                    task_s, pre_s, _ = engine.ds(xs)
                    task_t, pre_t, _ = engine.ds(xt, detach_task_input=True)
                    pre_s, pre_t, task_t = pre_s.float(), pre_t.float(), task_t.float()
                    with torch.no_grad():
                        q = calibrated_class_probs(relation, pre_t.softmax(1))
                    lam = ramp(step / total, cfg.ramp_gamma)
                    scalars["cpa"] = lam * cfg.cpa_weight * cpa_loss(pre_s, pre_t, ys, task_t.softmax(1), relation,
                                                                     cfg.cpa_regulariser_mean)
                    scalars["cgi"] = lam * cfg.cgi_weight * cgi_loss(task_t, q)
                if cfg.classifier_loss == "focal":
                    scalars["focal"] = focal_loss(task_s.float(), ys, cfg.label_smoothing)
                else:
                    scalars["ce"] = F.cross_entropy(task_s.float(), ys, label_smoothing=cfg.label_smoothing)
            loss = sum(scalars.values())
            engine.backward_step(loss)
            done = step + 1
            if done % per_epoch == 0:
                with engine.paused(model):
                    history.append(evaluate(model, target_eval if target_eval is not None else target, dev,
                                            cfg.metric, num_workers=cfg.num_workers))
                engine.log_step({"target_acc": history[-1], "loss": loss.item(),
                                 **{k: v.item() for k, v in scalars.items()}}, done,
                                samples=len(xs) + (len(xt) if tgt is not None else 0))
                if engine.rank == 0:
                    write_file_atomically(history_file, lambda tmp: tmp.write_text(json.dumps(history)))
                bar.set_postfix(epoch=len(history), target_acc=f"{history[-1]:.2f}")
            if engine.checkpoint_due(done, total):  # save_every = per_epoch: after each epoch, or on SIGTERM
                break
        log_skipped(engine, done, source=source, target=target)
    if done < total:
        return {"per_epoch": history, "stopped_at": done}
    best = int(np.argmax(history))
    return {"per_epoch": history, "best": history[best], "best_epoch": best + 1, "last": history[-1]}


# ---------------------------------------------------------------- pretrain
def pretrain_backbone(backbone: str, dataset: Dataset, out_file: str | Path, epochs: int = 3,
                      batch_size: int = 128, lr: float = 0.05, seed: int = 0) -> Path:
    """Train ``backbone`` with its own classifier on ``dataset`` and save the state dict as safetensors
    for ``weights=``: the offline stand-in for ImageNet weights (its head becomes the pre-trained head).
    A plain single-process loop: it runs once per benchmark, before any UDA run."""
    from safetensors.torch import save_file

    check_int(epochs, "epochs", 1)
    check_int(batch_size, "batch_size", 2)
    require(len(dataset) >= batch_size, "dataset", f"needs at least batch_size={batch_size} items")
    torch.manual_seed(seed)
    model = create_backbone(backbone, num_classes=len(dataset.classes))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * (len(dataset) // batch_size))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            loss = F.cross_entropy(model(x), y, label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    write_file_atomically(out_file, lambda tmp: save_file(state, str(tmp)))
    return out_file


# --------------------------------------------------------------------- CLI
_FLAGS = ("method", "backbone", "weights", "pretrained_classes", "epochs", "steps_per_epoch", "batch_size", "lr",
          "seed", "num_workers", "zero_stage", "precision")


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, help="labelled source domain: ImageFolder dir or 'path label' list")
    parser.add_argument("--target", required=True, help="unlabelled target domain (its labels only score epochs)")
    parser.add_argument("--config", default=None, help="YAML of UDAConfig fields (e.g. configs/uda_office31.yaml); "
                                                       "flags below override it")
    parser.add_argument("--method", choices=METHODS, default=None, help="default: bipc")
    parser.add_argument("--backbone", default=None, help="timm model, e.g. resnet50, vit_base_patch16_224, "
                                                         "swin_tiny_patch4_window7_224, convnext_tiny")
    parser.add_argument("--weights", default=None, help="local timm weights file (nothing is downloaded)")
    parser.add_argument("--pretrained-classes", type=int, default=None, help="head size in --weights if not 1000")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--no-augment", action="store_true", help="no random crop/flip on the training images")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--steps-per-epoch", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="per domain")
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--num-workers", type=int, default=None)
    parser.add_argument("--zero-stage", type=int, default=None)
    parser.add_argument("--precision", choices=("fp32", "bf16"), default=None)
    parser.add_argument("--out", default=None, help="run directory (checkpoints, TensorBoard, relationship.npy)")


def cli_main(args: argparse.Namespace) -> int:
    import timm

    from ..train.common import load_yaml
    from .data import image_transform, load_domain

    values = load_yaml(args.config, "--config") if args.config else {}
    values.update({k: getattr(args, k) for k in _FLAGS if getattr(args, k) is not None})
    if args.out is not None:
        values["out_dir"] = args.out
    cfg = config_from_dict(UDAConfig, values, "--config")
    require(timm.is_model(cfg.backbone), "--backbone", f"unknown timm model {cfg.backbone!r}")
    norm = timm.models.get_pretrained_cfg(cfg.backbone)  # the mean/std its weights were trained with
    norm = dict(mean=norm.mean, std=norm.std) if norm is not None else {}
    source, target = (load_domain(getattr(args, flag), args.image_size, f"--{flag}", augment=not args.no_augment,
                                  **norm) for flag in ("source", "target"))
    plain = image_transform(args.image_size, **norm)
    result = train_uda(cfg, source, target, target.with_transform(plain), progress=True,
                       relation_source=source if cfg.relation_augmented else source.with_transform(plain))
    if "stopped_at" in result:
        print(f"uda: stopped with a checkpoint after step {result['stopped_at']}; rerun the command to resume")
        return 0
    print(json.dumps({"method": cfg.method, "last_epoch_acc": result["last"], "best_epoch_acc": result["best"],
                      "best_epoch": result["best_epoch"], "per_epoch": result["per_epoch"]}))
    return 0
