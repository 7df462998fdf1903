"""Trainer options from the command line: a bad --out, --config or --set value is one line naming the option
(exit 2) before any work, never a traceback or a message about something else."""

import os

import pytest

from omniar.cli import main

from test_cli_properties import ROOT

TOKENIZER = ["train", "tokenizer", "--config", str(ROOT / "configs/tokenizer_tiny.yaml")]
AR = ["train", "ar", "--config", str(ROOT / "configs/ar_tiny.yaml")]


@pytest.fixture(autouse=True)
def no_training(monkeypatch):
    """A check that is missing lets the engine start: fail at once instead of training."""
    def started(*args, **kwargs):
        raise AssertionError("the engine started")

    for trainer in ("tokenizer", "ar", "refiner"):
        monkeypatch.setattr(f"omniar.train.{trainer}.TrainEngine", started)


@pytest.mark.parametrize("argv, message", [
    (TOKENIZER + ["--out", "FILE/run"], "out: cannot write FILE/run: FILE is not a folder"),
    (TOKENIZER + ["--out", "FILE"], "out: FILE exists and is not a folder"),
    (TOKENIZER + ["--set", "train.out_dir=FILE/run"], "train.out_dir: cannot write"),
    (AR + ["--out", "WORK/run", "--set", "data.cache_dir=FILE"], "data.cache_dir: FILE exists and is not a folder"),
    (TOKENIZER + ["--set", "train.lr=[1"], "train.lr: '[1' is not valid YAML (expected ',' or ']'"),
    (TOKENIZER + ["--set", "train=5"], "train: must be a section of key: value settings, got 5"),
    (TOKENIZER + ["--set", "train=5", "--set", "train.lr=1"], "train.lr: 'train' is not a section"),
    (TOKENIZER + ["--set", "train.betas=5"], "train.betas: must be two numbers in [0, 1), got 5"),
    (TOKENIZER + ["--set", "train.betas=[2,3]"], "train.betas: must be < 1.0, got 2.0"),
    (TOKENIZER + ["--set", "train.betas=[a,b]"], "train.betas: must be a number, got 'a'"),
    (TOKENIZER + ["--set", "model.channels=[a,b,c]"], "model.channels: must be an int, got 'a'"),
    (TOKENIZER + ["--set", "model.channels=[32.9,8,8]"], "model.channels: must be an int, got 32.9"),
    (AR + ["--set", "model.hidden_size=[a]"], "model.hidden_size: must be an int"),
    (TOKENIZER + ["--config", "BINARY"], "config: BINARY is not UTF-8 text"),
    (TOKENIZER + ["--set", f"train.seed={2**64}"], f"train.seed: must be <= {2**64 - 1}"),
    (TOKENIZER + ["--set", "train.micro_batch_size=100000000"], "train.micro_batch_size: must be <= 4096"),
    (TOKENIZER + ["--set", "data.num_workers=100000"], "data.num_workers: must be <= 64"),
    (AR + ["--set", "data.num_workers=100000"], "data.num_workers: must be <= 64"),
])
def test_bad_option_is_one_line_naming_it(tmp_path, capsys, argv, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "binary").write_bytes(bytes(range(256)))
    paths = {"FILE": tmp_path / "file", "BINARY": tmp_path / "binary", "WORK": tmp_path}
    for key, path in paths.items():
        argv, message = [a.replace(key, str(path)) for a in argv], message.replace(key, str(path))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"omniar: error: {message}") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["binary", "file"]  # nothing written


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_out_is_refused(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert main(TOKENIZER + ["--out", str(locked / "run")]) == 2
    assert f"out: cannot write {locked / 'run'}: {locked} is not writable" in capsys.readouterr().err
