"""Resume from a damaged or mismatched training checkpoint: a ValueError naming the file / tensor."""

import shutil
import zipfile
from pathlib import Path

import pytest

from omniar.train.common import load_yaml
from omniar.train.tokenizer import train

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
