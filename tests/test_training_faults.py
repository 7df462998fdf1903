"""Training faults: a damaged or mismatched checkpoint is a ValueError naming the file / tensor; a
non-finite loss skips its step, too many in a row stop the run with the last checkpoint intact (and the
engine closed); bad options fail before the engine starts."""

import os
import shutil
import signal
import zipfile
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from omniar.train.common import load_yaml
from omniar.train.common import split_train_section
from omniar.train.engine import EngineConfig, NonFiniteLossError, TrainEngine
from omniar.train.tokenizer import TokenizerTrainConfig, train

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tokenizer_tiny.yaml"


def config_for(out_dir, steps=2, **model):
    config = load_yaml(TINY_CONFIG)
    config["model"].update(model)
    config["train"].update(out_dir=str(out_dir), steps=steps, save_every=1, micro_batch_size=1, log_every=1)
    return config


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "run"
    train(config_for(out), progress=False)
    return out


def damaged_copy(run_dir, tmp_path, damage):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    newest = out / "checkpoints" / "step_00000002"
    model_file = next(newest.rglob("*model_states.pt"))
    damage(model_file)
    return out, model_file


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_stored_bytes(path):
    """Change bytes inside the largest stored entry (a tensor's data) without touching the zip structure."""
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.file_size // 2
    data[start:start + 8] = bytes(255 - b for b in data[start:start + 8])
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [(truncate, "is truncated or corrupt"),
                                             (flip_stored_bytes, "fails its CRC check")])
def test_damaged_checkpoint_names_the_file(run_dir, tmp_path, damage, message):
    out, model_file = damaged_copy(run_dir, tmp_path, damage)
    with pytest.raises(ValueError, match=rf"^checkpoint: {model_file}.*{message}.*move .*step_00000002 aside"):
        train(config_for(out, steps=3), progress=False)


def test_checkpoint_of_another_model_names_the_tensor(run_dir, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    with pytest.raises(ValueError, match=r"^checkpoint: .*step_00000002 does not match .*size mismatch for encoder"):
        train(config_for(out, steps=3, channels=[8, 16, 32]), progress=False)


def test_non_finite_loss_skips_the_step_and_too_many_stop(tmp_path):
    torch.manual_seed(0)
    engine = TrainEngine(torch.nn.Linear(4, 1), EngineConfig(out_dir=str(tmp_path), max_bad_steps=2, lr=0.1))
    x = torch.randn(8, 4)
    before = [p.detach().clone() for p in engine.module.parameters()]
    assert engine.backward_step(engine.ds(x).sum() * float("nan")) is False
    assert engine.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))  # no update at all
    assert engine.backward_step(engine.ds(x).pow(2).mean()) is True
    assert not all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    assert engine.backward_step(engine.ds(x).sum() * float("inf")) is False  # the count of bad steps in a row
    with pytest.raises(NonFiniteLossError, match=f"2 consecutive non-finite losses.*{tmp_path}.* is intact"):
        engine.backward_step(engine.ds(x).sum() * float("nan"))
    assert engine.skipped_steps == 3
    engine.close()


def test_nan_run_stops_with_last_checkpoint_intact_and_resumable(tmp_path, monkeypatch):
    original = TrainEngine.backward_step
    calls = []

    def nan_from_step_3(self, loss):
        calls.append(len(calls) + 1)
        return original(self, loss * float("nan") if len(calls) >= 3 else loss)

    monkeypatch.setattr(TrainEngine, "backward_step", nan_from_step_3)
    config = config_for(tmp_path / "run", steps=6)
    config["train"].update(save_every=2, max_bad_steps=2)
    with pytest.raises(NonFiniteLossError):
        train(config, progress=False)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the engine was closed: kill works again
    assert len(calls) == 4  # steps 3 and 4 were non-finite: stopped before step 5
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step_00000002"]
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    assert [e.value for e in acc.Scalars("skipped_steps")] == [0, 0, 1]  # logged at steps 1, 2, 3
    monkeypatch.setattr(TrainEngine, "backward_step", original)
    assert (train(config, progress=False) / "config.json").is_file()  # resumes from step 2 and finishes


def test_old_grad_accum_key_is_refused():
    """The removed ``train.grad_accum`` (it counted micro-batches as steps) is refused, not silently taken for
    ``train.grad_accum_steps``."""
    with pytest.raises(ValueError, match=r"^train: unknown keys \['grad_accum'\]"):
        split_train_section({"grad_accum": 2}, TokenizerTrainConfig)


def test_bad_stop_at_fails_before_the_engine_starts(tmp_path):
    with pytest.raises(ValueError, match="^stop_at: must be >= 1"):
        train(config_for(tmp_path / "run"), progress=False, stop_at=0)
    assert not (tmp_path / "run").exists()


class _RunsACommand:
    """What a hostile checkpoint holds: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_with_a_pickled_command_is_refused_without_running_it(run_dir, tmp_path):
    out, model_file = damaged_copy(run_dir, tmp_path, lambda path: None)
    marker = tmp_path / "ran"
    states = torch.load(model_file, weights_only=True)
    torch.save(states | {"step": _RunsACommand(marker)}, model_file)  # a valid zip: the CRCs pass
    with pytest.raises(ValueError, match=rf"^checkpoint: {model_file} holds posix.system, .*refused without running"):
        train(config_for(out, steps=3), progress=False)
    assert not marker.exists()


@pytest.mark.parametrize("stage", [1, 2])
def test_resume_under_another_zero_stage_is_refused(run_dir, tmp_path, stage):
    out = tmp_path / "run"
    shutil.copytree(run_dir, out)
    config = config_for(out, steps=3)
    config["train"]["zero_stage"] = stage
    with pytest.raises(ValueError, match=rf"^train.zero_stage: is {stage}, but .*step_00000002 was written with "
                                         "ZeRO stage 0; set it back"):
        train(config, progress=False)
