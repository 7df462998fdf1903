"""A thin DeepSpeed training engine shared by every omniar trainer.

One CPU process works without a launcher (gloo is initialised here); under the
``deepspeed`` launcher the same code runs data-parallel with ZeRO stage 0-3
(optionally offloading the optimizer state and, at stage 3, the weights to CPU
memory), and with ``ep_size`` > 1 each MoE layer's routed experts are sharded
over expert-parallel groups of that many ranks (DeepSpeed's ``ep_size_<n>``
groups; see docs/scaling.md).
Checkpoints are written atomically: DeepSpeed writes into a hidden temporary
tag directory which is renamed to ``step_XXXXXXXX`` only once every rank has
finished, so a crash mid-write never leaves a directory that resume would pick.
Trainers draw all randomness of step k from :meth:`TrainEngine.generator`, so a
resumed run repeats exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import pickle
import re
import shutil
import signal
import threading
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .._checks import check_bool, check_choice, check_float, check_int, check_keys, check_output_path, require
from ..backbone.moe import MoELayer
from ..limits import MAX_MICRO_BATCH_SIZE, MAX_SEED

_STEP_DIR = re.compile(r"^step_(\d{8})$")


@dataclass
class EngineConfig:
    """Optimisation and bookkeeping settings common to all trainers."""

    out_dir: str = "runs/default"
    zero_stage: int = 0
    offload_optimizer: bool = False  # ZeRO 1-3: optimizer state and step in CPU memory (DeepSpeed's offload_optimizer)
    offload_param: bool = False  # ZeRO-3: the weight partitions in CPU memory too (DeepSpeed's offload_param)
    ep_size: int = 1  # expert parallelism: ranks that share out each MoE layer's routed experts
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    grad_clip: float = 1.0
    micro_batch_size: int = 8  # per process and micro-batch
    grad_accum_steps: int = 1  # micro-batches per optimizer step; train.steps counts optimizer steps
    warmup_steps: int = 0
    seed: int = 0
    precision: str = "fp32"  # "bf16": torch.autocast with fp32 master weights
    log_every: int = 10
    save_every: int = 500
    keep_checkpoints: int = 2
    max_bad_steps: int = 10  # consecutive non-finite losses before the run stops
    deepspeed_config: str | None = None  # a DeepSpeed JSON merged into omniar's (--deepspeed-config)

    def __post_init__(self) -> None:
        check_output_path(self.out_dir, "train.out_dir", folder=True)
        check_int(self.zero_stage, "train.zero_stage", 0, 3)
        check_int(self.ep_size, "train.ep_size", 1)
        # DeepSpeed partitions only its own AutoEP MoE layers at stage 3, not expert-parallel layers like omniar's
        require(self.zero_stage < 3 or self.ep_size == 1, "train.zero_stage",
                f"3 does not combine with train.ep_size > 1 (got {self.ep_size}); set train.zero_stage to 0-2 to keep "
                "expert parallelism, or train.ep_size to 1 to partition everything with ZeRO-3")
        check_bool(self.offload_optimizer, "train.offload_optimizer")
        check_bool(self.offload_param, "train.offload_param")
        require(not self.offload_optimizer or self.zero_stage >= 1, "train.offload_optimizer",
                "needs train.zero_stage 1-3 (ZeRO keeps the optimizer state it offloads)")
        require(not self.offload_param or self.zero_stage == 3, "train.offload_param",
                f"needs train.zero_stage 3 (only ZeRO-3 partitions the weights), got {self.zero_stage}")
        check_float(self.lr, "train.lr", 0.0, low_inclusive=False)
        check_float(self.weight_decay, "train.weight_decay", 0.0)
        check_float(self.grad_clip, "train.grad_clip", 0.0)
        check_int(self.micro_batch_size, "train.micro_batch_size", 1, MAX_MICRO_BATCH_SIZE)
        check_int(self.grad_accum_steps, "train.grad_accum_steps", 1)
        check_int(self.warmup_steps, "train.warmup_steps", 0)
        check_int(self.seed, "train.seed", 0, MAX_SEED)
        check_choice(self.precision, "train.precision", ("fp32", "bf16"))
        check_int(self.log_every, "train.log_every", 1)
        check_int(self.save_every, "train.save_every", 1)
        check_int(self.keep_checkpoints, "train.keep_checkpoints", 1)
        check_int(self.max_bad_steps, "train.max_bad_steps", 1)
        require(isinstance(self.betas, (list, tuple)) and len(self.betas) == 2, "train.betas",
                f"must be two numbers in [0, 1), got {self.betas!r}")
        self.betas = tuple(check_float(b, "train.betas", 0.0, 1.0, high_inclusive=False) for b in self.betas)
        if self.deepspeed_config is not None:  # a conflict is refused before any work (the launcher sets WORLD_SIZE)
            self.ds_config(int(os.environ.get("WORLD_SIZE", "1")))

    def ds_config(self, world_size: int, clip: bool = True) -> dict:
        """DeepSpeed's config: what omniar must set, merged with ``deepspeed_config``'s other settings (a key set
        in both must have omniar's value). ``clip``: False where the engine clips itself."""
        ours = {
            "train_batch_size": self.micro_batch_size * self.grad_accum_steps * world_size,
            "train_micro_batch_size_per_gpu": self.micro_batch_size,
            "gradient_accumulation_steps": self.grad_accum_steps,
            "gradient_clipping": self.grad_clip if clip else 0.0,
            "zero_optimization": {"stage": self.zero_stage},
            "zero_allow_untested_optimizer": True,  # omniar's own AdamW ...
            "zero_force_ds_cpu_optimizer": False,  # ... also when offloaded: torch's AdamW steps the CPU copy
            "fp16": {"enabled": False},  # train.precision is autocast over fp32 weights
            "bf16": {"enabled": False},
            "steps_per_print": 10**9,
        }
        for key in ("offload_optimizer", "offload_param"):
            if getattr(self, key):
                ours["zero_optimization"][key] = {"device": "cpu"}
        if self.deepspeed_config is None:
            return ours
        user = _load_json(self.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            require(key not in user, "train.deepspeed_config", f"{self.deepspeed_config} sets {key}, but omniar builds "
                    "the optimizer and its LR schedule itself (train.lr, train.betas, train.weight_decay, "
                    "train.warmup_steps)")
        zero = user.get("zero_optimization")
        for key in ("offload_optimizer", "offload_param"):  # the options check the ZeRO stage; the file may tune
            require(not isinstance(zero, dict) or key not in zero or getattr(self, key), "train.deepspeed_config",
                    f"{self.deepspeed_config} sets zero_optimization.{key}; set train.{key}: true instead (the "
                    "file may then add settings such as pin_memory to that section)")
        merged = copy.deepcopy(ours)
        _merge(merged, user, "", self.deepspeed_config)
        return merged


def _load_json(path: str) -> dict:
    """A DeepSpeed config file: a JSON object (``train.deepspeed_config``)."""
    require(isinstance(path, str) and Path(path).is_file(), "train.deepspeed_config", f"file not found: {path!r}")
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"train.deepspeed_config: {path} is not JSON ({err})") from None
    require(isinstance(data, dict), "train.deepspeed_config", f"{path} must hold a JSON object")
    return data


# the option behind each DeepSpeed setting omniar makes (or section, for the keys under it), named when a user's
# config disagrees
_OWNERS = {"train_batch_size": "train.micro_batch_size x train.grad_accum_steps x processes",
           "train_micro_batch_size_per_gpu": "train.micro_batch_size", "gradient_accumulation_steps":
           "train.grad_accum_steps", "gradient_clipping": "train.grad_clip", "zero_optimization.stage":
           "train.zero_stage", "fp16": "train.precision", "bf16": "train.precision",
           "zero_optimization.offload_optimizer": "train.offload_optimizer",
           "zero_optimization.offload_param": "train.offload_param"}


def _merge(ours: dict, theirs: dict, prefix: str, source: str) -> None:
    """Merge ``theirs`` into ``ours`` in place; a key both set to different values is refused, naming it."""
    for key, value in theirs.items():
        path = prefix + key
        if isinstance(value, dict) and isinstance(ours.get(key), dict):
            _merge(ours[key], value, path + ".", source)
            continue
        parts = path.split(".")
        owner = next((_OWNERS[p] for p in (".".join(parts[:n]) for n in range(len(parts), 0, -1)) if p in _OWNERS),
                     "omniar")
        require(key not in ours or ours[key] == value, "train.deepspeed_config",
                f"{source} sets {path} to {value!r}, but omniar sets it to {ours.get(key)!r} ({owner}); "
                "remove it from the file" + ("" if owner == "omniar" else f" or set {owner.split(' ')[0]}"))
        ours[key] = value


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses; the last good checkpoint is intact."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds a pickled object outside the allowlist: it was refused before it ran."""


def _allowed_globals() -> list:
    """The classes DeepSpeed's checkpoint files hold besides tensors and plain containers (ZeRO 1-2's
    optimizer files), as found by ``torch.serialization.get_unsafe_globals_in_checkpoint``."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def load_checkpoint_file(path, map_location=None, mmap: bool = False):
    """``torch.load(weights_only=True)`` with :func:`_allowed_globals`: any other global in the pickle
    (e.g. a ``__reduce__`` that calls ``os.system``) raises :class:`UnsafeCheckpointError` before it runs."""
    try:
        with torch.serialization.safe_globals(_allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        raise UnsafeCheckpointError(
            f"checkpoint: {path} holds {found.group(1) if found else 'an object'}, which no omniar checkpoint "
            "holds (tampered?); refused without running it") from None


class _AllowlistLoads:
    """A DeepSpeed checkpoint engine whose ``load`` (DeepSpeed's is ``weights_only=False``) goes through
    :func:`load_checkpoint_file`; everything else is the wrapped engine's."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def load(self, path: str, map_location=None):
        return load_checkpoint_file(path, map_location)


def init_distributed() -> None:
    """Initialise torch.distributed through DeepSpeed; a lone process becomes rank 0 of 1."""
    import deepspeed

    if dist.is_initialized():
        return
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    # port 0: the store binds a free port itself (a port picked beforehand can be taken before it binds); only a
    # lone process can use it, a launcher of several ranks sets MASTER_PORT
    os.environ.setdefault("MASTER_PORT", "0")
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")


def shard_experts(model: nn.Module, ep_size: int):
    """Shard every MoE layer's routed experts over DeepSpeed's expert-parallel groups of ``ep_size`` ranks
    (``deepspeed.utils.groups``, as ``deepspeed.moe`` creates them: consecutive ranks share out the experts,
    the ranks holding the same experts form the expert-data-parallel group that reduces their gradients).
    Returns this rank's expert-parallel group and its rank in its expert-data-parallel group."""
    from deepspeed.utils import groups

    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    require(bool(layers), "train.ep_size", f"is {ep_size}, but this model has no MoE layers to shard")
    groups._create_expert_and_data_parallel(ep_size)
    name = f"ep_size_{ep_size}"
    for layer in layers:
        layer.shard_experts(groups._get_expert_parallel_group(name), name)
    return groups._get_expert_parallel_group(name), groups._get_expert_data_parallel_rank(name)


@contextlib.contextmanager
def _expert_params_recognised():
    """DeepSpeed switches its expert handling on (``has_moe_layers``: expert gradients reduced over the
    expert-data-parallel group only, ZeRO partitions per expert group, an optimizer file per expert-parallel
    rank) only when it finds its own MoE classes in the model (an isinstance check). omniar's layer marks its
    experts as ``deepspeed.moe`` does (``allreduce=False``); inside this block those marks switch it on too."""
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.runtime.engine import DeepSpeedEngine

    real = DeepSpeedEngine._configure_distributed_model

    def configure(engine, model):
        real(engine, model)
        engine.has_moe_layers = engine.has_moe_layers or any(is_moe_param(p) for p in model.parameters())

    DeepSpeedEngine._configure_distributed_model = configure
    try:
        yield
    finally:
        DeepSpeedEngine._configure_distributed_model = real


class TrainEngine:
    """DeepSpeed engine + atomic checkpoints + TensorBoard (scalars, throughput, grad norm, hparams,
    preview images) + non-finite-loss guard.

    A context manager: leaving the ``with`` block, also by an exception, closes the TensorBoard writer
    and gives SIGTERM back its default action."""

    def __init__(self, model: nn.Module, config: EngineConfig,
                 optimizer_factory: Callable[[nn.Module], torch.optim.Optimizer] | None = None,
                 lr_lambda: Callable[[int], float] | None = None):
        import deepspeed

        init_distributed()
        self.config = config
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest conv kernels
        model = model.to(self.device)
        params = [p for p in model.parameters() if p.requires_grad]
        self._ep_group, self._ep_data_rank = None, 0
        if config.ep_size > 1:
            from deepspeed.moe.utils import configure_moe_param_groups

            require(self.world_size % config.ep_size == 0, "train.ep_size",
                    f"must divide the number of processes ({self.world_size}), got {config.ep_size}")
            require(optimizer_factory is None, "train.ep_size", "> 1 needs the engine's own optimizer")
            self._ep_group, self._ep_data_rank = shard_experts(model, config.ep_size)
            # ZeRO needs the expert parameters in their own groups, named after their process group
            params = configure_moe_param_groups([p for p in model.parameters() if p.requires_grad])
        # DeepSpeed's ZeRO-0 clipping takes the mean of the ranks' local gradient norms: with expert parallelism
        # that is not the norm over all experts (ZeRO-1/2's is), so the step would differ from one process's
        self._clips_itself = self._ep_group is not None and config.zero_stage == 0
        if optimizer_factory is not None:
            optimizer = optimizer_factory(model)
        else:
            optimizer = torch.optim.AdamW(params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
        self._torch_optimizer = optimizer  # the one DeepSpeed's (ZeRO) optimizer steps: step() skips through it
        if lr_lambda is None:
            warm = config.warmup_steps
            lr_lambda = lambda step: min(1.0, (step + 1) / warm) if warm else 1.0  # noqa: E731
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        # ZeRO-0 under expert parallelism clips in step() instead
        ds_config = config.ds_config(self.world_size, clip=not self._clips_itself)
        with _expert_params_recognised():
            self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.ds.checkpoint_engine = _AllowlistLoads(self.ds.checkpoint_engine)
        self.out_dir = Path(config.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.bad_steps = 0
        self.skipped_steps = 0
        self._micro = 0  # backward() calls in the current optimizer step
        self._spoiled = False  # a micro-batch of the current step had a non-finite loss
        self._grad_norm: torch.Tensor | float = float("nan")
        self._clock = (time.perf_counter(), 0)  # throughput since (time, step); resume() restarts it
        self.stop_requested = False  # set by SIGTERM: trainers save a checkpoint and return
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)
        self._writer = None
        if self.rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(self.out_dir / "tb"))

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True

    def should_stop(self) -> bool:
        """True once any rank received SIGTERM (all ranks agree, so they checkpoint together)."""
        flag = torch.tensor(float(self.stop_requested), device=self.device)
        if self.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    # ---------------------------------------------------------------- stepping
    @property
    def module(self) -> nn.Module:
        return self.ds.module

    def generator(self, step: int, salt: int = 0, shared: bool = False, micro: int = 0) -> torch.Generator:
        """CPU generator seeded by (seed, step, micro-batch, rank, salt): the randomness of micro-batch ``micro``
        of one step, resumable; ``shared``: rank 0's on every rank (draws that all ranks must agree on)."""
        g = torch.Generator()
        rank = 0 if shared else self.rank
        index = step * self.config.grad_accum_steps + micro
        # modulo the generator's seed range: large seeds would overflow it
        g.manual_seed((((self.config.seed * 1_000_003 + index) * 1009 + rank) * 7919 + salt) % (MAX_SEED + 1))
        return g

    def autocast(self):
        """Mixed precision context for the forward pass (no-op in fp32)."""
        if self.config.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward_step(self, loss: torch.Tensor) -> bool:
        """:meth:`backward` of a micro-batch, and after the step's last one :meth:`step`; True once that step
        was taken (False before it and for a skipped step)."""
        self.backward(loss)
        return self._micro == self.config.grad_accum_steps and self.step()

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one of the ``grad_accum_steps`` micro-batches of a step (DeepSpeed divides the loss by
        their number; the last one reduces the gradients). A non-finite loss on any rank spoils the step, which
        :meth:`step` then skips; its backward still runs, so every rank and ZeRO stage communicates as usual."""
        finite = torch.tensor(float(torch.isfinite(loss.detach()).all()), device=self.device)
        if self.world_size > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        self._spoiled |= not bool(finite)
        self._micro += 1
        self.ds.set_gradient_accumulation_boundary(self._micro == self.config.grad_accum_steps)
        self.ds.backward(loss)

    def step(self) -> bool:
        """The optimizer step after ``grad_accum_steps`` :meth:`backward` calls. A spoiled step changes no weight
        and no optimizer state and returns False; ``max_bad_steps`` in a row raise :class:`NonFiniteLossError`.
        The LR schedule advances either way: step k always runs at the schedule's rate of step k."""
        if self._micro != self.config.grad_accum_steps:
            raise RuntimeError(f"step() after {self._micro} backward() calls; train.grad_accum_steps is "
                               f"{self.config.grad_accum_steps}")
        self._micro, spoiled, self._spoiled = 0, self._spoiled, False
        if spoiled:
            self.bad_steps += 1
            self.skipped_steps += 1
            if self.bad_steps >= self.config.max_bad_steps:
                raise NonFiniteLossError(f"{self.bad_steps} consecutive non-finite losses; stopping. "
                                         f"The last good checkpoint in {self.ckpt_dir} is intact.")
            self._skip_step()
            self._grad_norm = float("nan")
            return False
        self.bad_steps = 0
        # ZeRO's optimizer keeps the global norm before clipping; stage 0's clipping discards it, so the
        # (already all-reduced) gradients are measured here, before the step clips and clears them
        stage0 = None if self.config.zero_stage else self._grad_norm_stage0()
        if self._clips_itself and self.config.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.module.parameters(), self.config.grad_clip, stage0)
        self.ds.step()
        self._grad_norm = stage0 if stage0 is not None else self.ds.get_global_grad_norm()
        return True

    def _skip_step(self) -> None:
        """DeepSpeed's step with the optimizer's own update left out: its bookkeeping (gradients cleared, ZeRO's
        buffers reset) runs as after any step, the weights and the optimizer state stay."""
        real, epoch = self._torch_optimizer.step, self.scheduler.last_epoch
        self._torch_optimizer.step = lambda *args, **kwargs: None
        try:
            with warnings.catch_warnings():  # torch warns of a schedule stepped without the optimizer: deliberate
                warnings.filterwarnings("ignore", r".*lr_scheduler\.step\(\)")
                self.ds.step()
                if self.scheduler.last_epoch == epoch:  # ZeRO-1/2 skip a non-finite gradient without the schedule
                    self.scheduler.step()
        finally:
            self._torch_optimizer.step = real

    def _grad_norm_stage0(self) -> torch.Tensor:
        """Norm of the reduced gradients; the squares of the expert shards' are summed over the expert-parallel
        group (each of its ranks holds other experts)."""
        from deepspeed.moe.utils import split_params_grads_into_shared_and_expert_params

        dense, experts = split_params_grads_into_shared_and_expert_params(list(self.module.parameters()))
        norm = torch.nn.utils.get_total_norm(dense)
        if self._ep_group is None:
            return norm
        experts = torch.nn.utils.get_total_norm(experts) ** 2
        dist.all_reduce(experts, group=self._ep_group)
        return (norm ** 2 + experts).sqrt()

    def whole_module(self, build: Callable[[], nn.Module]) -> nn.Module | None:
        """The trained module with every weight whole, for generation and export. Below ZeRO-3 the engine's
        module. Under ZeRO-3 a collective (every rank calls): DeepSpeed gathers the partitions one layer at a time
        into rank 0's memory, where ``build()`` (a module of the same architecture, built without touching the
        global RNG) takes them; the other ranks get None. A new module, not the engine's: ZeRO-3's hooks would
        re-partition the engine's after each layer, and its generation would need every rank."""
        if self.config.zero_stage < 3:
            return self.module
        state = self.ds._zero3_consolidated_16bit_state_dict()  # the weights as trained (fp32 here)
        if self.rank != 0:
            return None
        with torch.random.fork_rng(devices=[]):
            module = build()
        module.load_state_dict(state)
        return module.to(self.device).train(self.module.training)

    @property
    def grad_norm(self) -> float:
        """Global gradient norm of the last step, before clipping (NaN after a skipped step)."""
        return float(self._grad_norm)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def log_scalars(self, scalars: dict[str, float], step: int) -> None:
        if self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(key, float(value), step)

    def log_step(self, scalars: dict[str, float], step: int, samples: int, tokens: int | None = None) -> None:
        """Log a trainer's ``scalars`` after ``step`` with the engine's own: lr, skipped steps, grad norm and
        the throughput since the last call (or the resume), ``samples``/``tokens`` being one rank's per step."""
        now, (since, last) = time.perf_counter(), self._clock
        rate = (step - last) * self.world_size / max(now - since, 1e-9)
        scalars = scalars | {"lr": self.lr, "skipped_steps": self.skipped_steps, "grad_norm": self.grad_norm,
                             "throughput/samples_per_s": samples * rate}
        if tokens is not None:
            scalars["throughput/tokens_per_s"] = tokens * rate
        self.log_scalars(scalars, step)
        self._clock = (now, step)

    @contextlib.contextmanager
    def paused(self, module: nn.Module):
        """Work beside training (previews, evaluation): ``module`` in eval mode under ``no_grad``, each of its
        submodules back in its own mode afterwards (frozen parts stay in eval mode), and the time spent left
        out of the throughput."""
        start, modes = time.perf_counter(), [(m, m.training) for m in module.modules()]
        try:
            with torch.no_grad():
                yield module.eval()
        finally:
            for m, training in modes:
                m.train(training)
            self._clock = (self._clock[0] + time.perf_counter() - start, self._clock[1])

    def log_hparams(self, config: dict) -> None:
        """The run's config as TensorBoard hparams (sections flattened to ``section.key``; lists and None as
        text), tied to the ``loss`` scalar."""
        if self._writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        def flat(values: dict, prefix: str = "") -> dict:
            out = {}
            for key, value in values.items():
                if isinstance(value, dict):
                    out |= flat(value, f"{prefix}{key}.")
                else:
                    out[prefix + key] = value if isinstance(value, (bool, int, float, str)) else str(value)
            return out

        for summary in hparams(flat(config), {"loss": None}):  # into this run (add_hparams would start another)
            self._writer.file_writer.add_summary(summary)

    def log_filmstrips(self, tag: str, frames: torch.Tensor | np.ndarray, step: int) -> None:
        """uint8 frames (rows, T, H, W, 3) as one image: a row per clip, time from left to right."""
        if self._writer is not None:
            r, t, h, w, c = frames.shape
            image = torch.as_tensor(frames).cpu().permute(0, 2, 1, 3, 4).reshape(r * h, t * w, c)
            self._writer.add_image(tag, image.numpy(), step, dataformats="HWC")

    def log_text(self, tag: str, text: str, step: int) -> None:
        if self._writer is not None:
            self._writer.add_text(tag, text, step)

    # ------------------------------------------------------------- checkpoints
    def checkpoint_due(self, step: int, last: int) -> bool:
        """Save after ``step`` if it is a save step, the last step, or SIGTERM came; True means stop now."""
        stop = self.should_stop()
        if step % self.config.save_every == 0 or step == last or stop:
            self.save(step)
        return stop

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.ckpt_dir.is_dir():
            return []
        return sorted(p for p in self.ckpt_dir.iterdir() if p.is_dir() and _STEP_DIR.match(p.name))

    def save(self, step: int) -> Path:
        """Atomically save the full training state after ``step`` steps."""
        tmp_tag, tag = f".tmp-step_{step:08d}", f"step_{step:08d}"
        if self.rank == 0 and (self.ckpt_dir / tmp_tag).exists():
            shutil.rmtree(self.ckpt_dir / tmp_tag)
        self._barrier()
        self.ds.save_checkpoint(str(self.ckpt_dir), tag=tmp_tag,
                                client_state={"step": step, "ep_size": self.config.ep_size}, save_latest=False)
        if self._ep_group is not None and self._ep_data_rank == 0:
            from deepspeed.moe.utils import is_moe_param

            # DeepSpeed's model file holds rank 0's experts only (it finds no MoE class of its own to split out)
            torch.save({n: p.detach().cpu() for n, p in self.module.named_parameters() if is_moe_param(p)},
                       self.ckpt_dir / tmp_tag / self._expert_shard_name())
        self._barrier()
        final = self.ckpt_dir / tag
        if self.rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(self.ckpt_dir / tmp_tag, final)
            for old in self.checkpoints()[:-self.config.keep_checkpoints]:
                shutil.rmtree(old)
        self._barrier()
        return final

    def resume(self) -> int:
        """Load the newest complete checkpoint; return the number of steps already done (0 if none).
        The throughput clock starts here."""
        step = self._load_newest()
        self._clock = (time.perf_counter(), step)
        return step

    def _load_newest(self) -> int:
        found = self.checkpoints()
        if not found:
            return 0
        newest = found[-1]
        # DeepSpeed looks for other files under another ZeRO stage (FileNotFoundError): refuse first
        states = load_checkpoint_file(_checked_model_states(newest), "cpu", mmap=True)
        stage = _zero_stage(states)
        require(stage == self.config.zero_stage, "train.zero_stage", f"is {self.config.zero_stage}, but {newest} "
                f"was written with ZeRO stage {stage}; set it back to resume, or train into a new --out")
        ep_size = states.get("ep_size", 1)
        require(ep_size == self.config.ep_size, "train.ep_size", f"is {self.config.ep_size}, but {newest} was "
                f"written with ep_size {ep_size}; set it back to resume, or train into a new --out")
        try:
            _, client = self.ds.load_checkpoint(str(self.ckpt_dir), tag=newest.name)
        except UnsafeCheckpointError:
            raise
        except (RuntimeError, KeyError, ValueError) as e:  # e.g. a model changed since the checkpoint
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            more = f" (+{len(lines) - 3} more lines)" if len(lines) > 3 else ""
            raise ValueError(f"checkpoint: {newest} does not match this model/optimizer: "
                             f"{' '.join(lines[:3])}{more}") from None
        require(client is not None and "step" in client, "checkpoint", f"{newest} has no step record")
        if self._ep_group is not None:
            shard = newest / self._expert_shard_name()
            require(shard.is_file(), "checkpoint", f"{shard} is missing; move {newest} aside to resume from the "
                    "previous checkpoint")
            from deepspeed.moe.utils import is_moe_param

            saved = load_checkpoint_file(shard, "cpu")
            experts = {name: p for name, p in self.module.named_parameters() if is_moe_param(p)}
            require(saved.keys() == experts.keys(), "checkpoint", f"{shard} does not hold this model's experts")
            with torch.no_grad():
                for name, p in experts.items():
                    p.copy_(saved[name])
        return int(client["step"])

    def _expert_shard_name(self) -> str:
        return f"expert_shard_ep{dist.get_rank(self._ep_group):03d}.pt"

    def _barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def __enter__(self) -> "TrainEngine":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _checked_model_states(folder: Path) -> Path:
    """The model-states file of checkpoint ``folder``, once every ``*.pt`` file there passed its CRC check."""
    for path in sorted(folder.rglob("*.pt")):  # torch.save files are zip archives with CRCs
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile) as e:
            raise ValueError(f"checkpoint: {path} is truncated or corrupt ({e}); move {folder} aside to "
                             "resume from the previous checkpoint") from None
        require(bad is None, "checkpoint", f"{path}: entry {bad!r} fails its CRC check (tampered or "
                f"corrupt); move {folder} aside to resume from the previous checkpoint")
    names = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")  # ZeRO 0-2, ZeRO-3
    model_states = next((folder / name for name in names if (folder / name).is_file()), folder / names[0])
    require(model_states.is_file(), "checkpoint", f"{model_states} is missing; move {folder} aside to resume "
            "from the previous checkpoint")
    return model_states


def _zero_stage(states: dict) -> int | None:
    return (states.get("ds_config") or {}).get("zero_optimization", {}).get("stage")


def checkpoint_state_dict(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The whole trained module's state dict in checkpoint ``folder`` (``OUT/checkpoints/step_N``), on one process:
    ZeRO-3's partitions gathered by DeepSpeed's ``zero_to_fp32``, the expert-parallel shards concatenated. What the
    run would have exported, had it ended there."""
    folder = Path(folder)
    require(_STEP_DIR.match(folder.name) is not None and folder.is_dir(), "checkpoint",
            f"must be a checkpoint folder OUT/checkpoints/step_NNNNNNNN, got {str(folder)!r}")
    states = load_checkpoint_file(_checked_model_states(folder), "cpu")
    if _zero_stage(states) == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        for path in folder.glob("*.pt"):  # zero_to_fp32 loads without an allowlist: every file passes ours first
            load_checkpoint_file(path, "cpu", mmap=True)
        state = get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name)
    else:
        state = dict(states["module"])
    shards = [load_checkpoint_file(path, "cpu") for path in sorted(folder.glob("expert_shard_ep*.pt"))]
    if shards:  # DeepSpeed's module holds expert-parallel rank 0's experts
        state |= {name: torch.cat([shard[name] for shard in shards]) for name in shards[0]}
    return state


def config_from_dict(cls, values: dict, name: str):
    """Build dataclass ``cls`` from a dict, with a clear error for unknown keys."""
    return cls(**check_keys(values, name, cls.__dataclass_fields__))


def cosine_lr(total_steps: int, warmup_steps: int = 0, floor: float = 0.05) -> Callable[[int], float]:
    """Linear warm-up then cosine decay to ``floor`` x the base rate."""
    def fn(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        p = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p))
    return fn
