"""Crash safety: SIGKILL a training run in the middle of a step and in the middle of a checkpoint write,
rerun the same command, and the final weights are bitwise equal to an uninterrupted run (CPU); a
``.tmp-step_*`` directory left by a kill is never loaded. Tokenizer and AR trainers in one process, and a
2-process ZeRO-2 run (gloo) where one rank is killed. (SIGTERM: see test_train_tokenizer.py.)

The kill points are reached deterministically by running the CLI through a driver script that wraps
production functions; the resumed runs go through the same driver with no kill point set, where the
wrappers only pass through (and record which checkpoint resume loaded)."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from _train_helpers import (ROOT, assert_bitwise_equal, free_port, subprocess_env, tiny_ar_config, tiny_config,
                            weights)

from omniar.tokenizers import VideoTokenizer

DRIVER = r'''
"""``python driver.py <omniar CLI args>``. CRASH_AT=<kind>:<step> makes rank CRASH_RANK (default 0) write
CRASH_MARKER ("<pid> <what>") and hang at that point, for the test to SIGKILL it there:
  step:K    in step K, after the backward pass, before the optimizer step
  write:K   saving step K: the first file DeepSpeed writes into .tmp-step_K is left half written
  rename:K  saving step K: DeepSpeed has written .tmp-step_K, just before it is renamed to step_K
Without CRASH_AT the wrappers only pass through; every run appends {"rank", "start", "loaded"} (the
checkpoint tags that resume loaded) to CRASH_LOG."""
import json
import os
import sys
import time
from pathlib import Path

os.environ["CUDA_VISIBLE_DEVICES"] = ""  # bitwise comparisons: CPU only
import deepspeed.runtime.engine as ds_engine  # noqa: E402
import torch  # noqa: E402

from omniar import cli  # noqa: E402
from omniar.train.engine import TrainEngine  # noqa: E402

kind, _, at = os.environ.get("CRASH_AT", "").partition(":")
assert kind in ("", "step", "write", "rename"), kind
armed = bool(kind) and os.environ.get("RANK", "0") == os.environ.get("CRASH_RANK", "0")
tmp_tag = f".tmp-step_{int(at):08d}" if at else None
real_replace, real_save = os.replace, torch.save
real_resume, real_step = TrainEngine.resume, TrainEngine.step
real_load = ds_engine.DeepSpeedEngine.load_checkpoint
loaded = []


def hang(what):
    marker = Path(os.environ["CRASH_MARKER"])
    part = marker.with_name(marker.name + ".part")
    part.write_text(f"{os.getpid()} {what}")
    real_replace(part, marker)
    time.sleep(3600)
    os._exit(3)


def load_checkpoint(self, load_dir, *args, **kwargs):
    loaded.append(kwargs.get("tag", args[0] if args else None))
    return real_load(self, load_dir, *args, **kwargs)


def resume(self):
    start = real_resume(self)
    with open(os.environ["CRASH_LOG"], "a") as f:
        f.write(json.dumps({"rank": self.rank, "start": start, "loaded": loaded}) + "\n")
    self._crash_step = start
    return start


def step(self):
    self._crash_step += 1
    if armed and kind == "step" and self._crash_step == int(at):
        self.ds.step = lambda *a, **k: hang(f"step {at}: after backward, before the optimizer step")
    return real_step(self)


def save(obj, f, *args, **kwargs):
    real_save(obj, f, *args, **kwargs)
    if armed and kind == "write" and isinstance(f, (str, os.PathLike)) and Path(f).parent.name == tmp_tag:
        data = Path(f).read_bytes()
        Path(f).write_bytes(data[:len(data) // 2])
        hang(f"torn {f}")


def replace(src, dst, *args, **kwargs):
    if armed and kind == "rename" and Path(src).name == tmp_tag:
        hang(f"before renaming {src}")
    return real_replace(src, dst, *args, **kwargs)


ds_engine.DeepSpeedEngine.load_checkpoint = load_checkpoint
TrainEngine.resume, TrainEngine.step = resume, step
torch.save, os.replace = save, replace
sys.exit(cli.main(sys.argv[1:]))
'''


@dataclass
class Crash:
    at: str  # CRASH_AT, e.g. "step:5"
    start: int  # the step this (resumed) run must start from: the newest complete checkpoint
    after: list  # checkpoint folder entries once it is killed
    rank: int = 0  # the rank that hangs
    kill_rank_only: bool = False  # SIGKILL just that rank; the others must then fail on their own


def checkpoint_entries(run: Path) -> list:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.is_dir())


class Launch:
    """One invocation: ``nproc`` rank processes (torch.distributed env rendezvous, gloo) in one new process
    group, so that a kill reaches all of them."""

    def __init__(self, cmd: list, env: dict, nproc: int, out: Path, resume_log: Path, marker: Path):
        self.out, self.resume_log, self.marker, self.procs = out, resume_log, marker, []
        port = str(free_port())
        with open(out, "w") as f:
            for rank in range(nproc):
                rank_env = env if nproc == 1 else {**env, "RANK": str(rank), "LOCAL_RANK": str(rank),
                                                   "WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
                                                   "MASTER_PORT": port}
                group = self.procs[0].pid if rank else 0  # rank 0 starts the group (Popen's process_group: 3.11+)
                self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=rank_env, stdout=f, stderr=subprocess.STDOUT,
                                                   preexec_fn=lambda group=group: os.setpgid(0, group)))

    def output(self) -> str:
        return self.out.read_text()[-4000:]

    def wait(self, timeout: float, procs=None) -> list:
        deadline = time.time() + timeout
        return [p.wait(max(0.1, deadline - time.time())) for p in (procs or self.procs)]

    def kill(self) -> None:
        try:
            os.killpg(self.procs[0].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.wait(30)

    def resumes(self) -> list:
        """What resume did on each rank: {"rank", "start", "loaded": [checkpoint tags]}."""
        return sorted((json.loads(line) for line in self.resume_log.read_text().splitlines()),
                      key=lambda r: r["rank"])


class Trainer:
    """Runs ``omniar train <what> --config <config> --out <run>`` through the driver on ``nproc`` ranks."""

    def __init__(self, tmp: Path, what: str, config: dict, nproc: int = 1):
        self.tmp, self.what, self.nproc = tmp, what, nproc
        self.driver, self.config = tmp / "driver.py", tmp / "config.yaml"
        self.driver.write_text(DRIVER)
        self.config.write_text(yaml.safe_dump(config))
        self.count = 0

    def start(self, run: Path, crash: Crash | None = None, extra_args=()) -> Launch:
        self.count += 1
        name = self.tmp / f"{run.name}-{self.count}"
        log, marker = name.with_suffix(".resume.jsonl"), name.with_suffix(".marker")
        env = subprocess_env(PYTHONPATH=str(ROOT), CRASH_LOG=str(log), CRASH_MARKER=str(marker))
        if crash is not None:
            env.update(CRASH_AT=crash.at, CRASH_RANK=str(crash.rank))
        cmd = [sys.executable, str(self.driver), "train", self.what, "--config", str(self.config), "--out", str(run),
               *extra_args]
        return Launch(cmd, env, self.nproc, name.with_suffix(".out"), log, marker)

    @staticmethod
    def finish(launch: Launch, timeout=300) -> list:
        try:
            rcs = launch.wait(timeout)
        finally:
            launch.kill()
        assert rcs == [0] * len(rcs), launch.output()
        return launch.resumes()

    def crash(self, run: Path, crash: Crash) -> list:
        """Run until the driver reaches the kill point, SIGKILL there; return what resume did."""
        launch = self.start(run, crash)
        try:
            deadline = time.time() + 300
            while not launch.marker.exists():
                assert all(p.poll() is None for p in launch.procs), f"exited before {crash.at}:\n" + launch.output()
                assert time.time() < deadline, f"never reached {crash.at}:\n" + launch.output()
                time.sleep(0.2)
            pid, what = launch.marker.read_text().split(" ", 1)
            assert int(pid) == launch.procs[crash.rank].pid
            if crash.kill_rank_only:
                os.kill(int(pid), signal.SIGKILL)
                others = [p for rank, p in enumerate(launch.procs) if rank != crash.rank]
                rcs = launch.wait(120, others)  # a dead peer: the survivors fail, they do not hang
                assert all(rc != 0 for rc in rcs), launch.output()
        finally:
            launch.kill()
        if what.startswith("torn "):  # the kill left a half-written file: loading it would fail
            with pytest.raises(Exception):
                torch.load(what[len("torn "):], weights_only=False)
        return launch.resumes()


def crash_then_finish(trainer: Trainer, tmp: Path, crashes: list, start: int, final_entries: list,
                      reference_args=()) -> None:
    """Reference run (concurrently) vs the same command killed at each of ``crashes`` and rerun to the end."""
    reference = trainer.start(tmp / "reference", extra_args=reference_args)
    run = tmp / "run"
    try:
        for crash in crashes:
            loaded = trainer.crash(run, crash)
            expect = [f"step_{crash.start:08d}"] if crash.start else []
            assert loaded == [{"rank": r, "start": crash.start, "loaded": expect} for r in range(trainer.nproc)]
            assert checkpoint_entries(run) == crash.after
        loaded = trainer.finish(trainer.start(run))  # rerun the same command
        assert loaded == [{"rank": r, "start": start, "loaded": [f"step_{start:08d}"]} for r in range(trainer.nproc)]
        assert trainer.finish(reference) == [{"rank": r, "start": 0, "loaded": []} for r in range(trainer.nproc)]
    finally:
        reference.kill()
    assert checkpoint_entries(run) == checkpoint_entries(tmp / "reference") == final_entries  # no .tmp-* left
    assert_bitwise_equal(weights(tmp / "reference" / "final"), weights(run / "final"))


def test_tokenizer_sigkill_mid_step_and_mid_checkpoint_write(tmp_path):
    config = tiny_config("unused", 8, save_every=3, micro_batch_size=2)
    config["model"]["ema_decay"] = 0.5  # unused codes die within a few steps: random restarts after the resume
    crash_then_finish(Trainer(tmp_path, "tokenizer", config), tmp_path, [
        Crash("step:5", start=0, after=["step_00000003"]),
        # resumes from step 3, redoes 4-5, is killed while step 6 is half written
        Crash("write:6", start=3, after=[".tmp-step_00000006", "step_00000003"]),
    ], start=3, final_entries=["step_00000006", "step_00000008"])


def test_ar_sigkill_mid_checkpoint_write_and_mid_step(tmp_path):
    """AR: CFEC, frame masks, caption dropout and elastic sub-models draw from the per-step generator."""
    torch.manual_seed(0)
    VideoTokenizer(**tiny_config("unused", 1)["model"]).save_pretrained(tmp_path / "tok")
    config = tiny_ar_config(tmp_path, 16, steps=6, save_every=2, log_every=1, micro_batch_size=2)
    crash_then_finish(Trainer(tmp_path, "ar", config), tmp_path, [
        # .tmp-step_4 is complete, only not renamed yet: it still must not be loaded
        Crash("rename:4", start=0, after=[".tmp-step_00000004", "step_00000002"]),
        Crash("step:5", start=2, after=["step_00000002", "step_00000004"]),
    ], start=4, final_entries=["step_00000004", "step_00000006"],
        reference_args=["--set", f"data.cache_dir={tmp_path / 'codes-reference'}"])  # runs concurrently


def test_two_process_zero2_sigkill_mid_step_and_mid_checkpoint_write(tmp_path):
    config = tiny_config("unused", 6, save_every=2, micro_batch_size=1, zero_stage=2)
    config["model"]["ema_decay"] = 0.5  # random code restarts (broadcast from rank 0) after the resume
    # rank 0 waits for rank 1 in the optimizer step's collectives and must fail once rank 1 is dead
    crash_then_finish(Trainer(tmp_path, "tokenizer", config, nproc=2), tmp_path, [
        Crash("step:3", start=0, after=["step_00000002"], rank=1, kill_rank_only=True),
        Crash("write:4", start=2, after=[".tmp-step_00000004", "step_00000002"], rank=1),  # torn ZeRO shard
    ], start=2, final_entries=["step_00000004", "step_00000006"])
