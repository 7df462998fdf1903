"""Helpers shared by the training tests (test_train_tokenizer.py, test_crash_resume.py, test_t2v.py)."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from omniar.train.common import load_yaml

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tokenizer_tiny.yaml"


def tiny_config(out_dir, steps, **train_overrides):
    """configs/tokenizer_tiny.yaml writing to ``out_dir`` for ``steps`` steps, logging every step."""
    config = load_yaml(TINY_CONFIG)
    config["train"].update(out_dir=str(out_dir), steps=steps, log_every=1, **train_overrides)
    return config


def tiny_ar_config(tmp_path, num_clips, **train_overrides):
    """configs/ar_tiny.yaml on the tokenizer saved at ``tmp_path/tok``, its codes cached in ``tmp_path/codes``."""
    config = load_yaml(ROOT / "configs" / "ar_tiny.yaml")
    config["data"].update(cache_dir=str(tmp_path / "codes"), num_clips=num_clips, max_num_frames=9)
    config["train"].update(tokenizer=str(tmp_path / "tok"), **train_overrides)
    return config


def weights(final_dir):
    """Every tensor of every ``*.safetensors`` file under an exported folder, keyed by file and name."""
    out = {}
    for f in sorted(Path(final_dir).rglob("*.safetensors")):
        rel = f.relative_to(final_dir).as_posix()
        out.update({f"{rel}:{key}": value for key, value in load_file(f).items()})
    return out


def assert_bitwise_equal(expected: dict, actual: dict) -> None:
    assert expected, "no weights found"
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def free_port() -> int:
    """A port free now, for the ranks of one launch to meet on (a lone process binds port 0 itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra) -> dict:
    """Environment for a training subprocess: a fresh process group, one thread per process.

    Drops the rendezvous variables an in-process run of this pytest session exported."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_two_ranks(script: Path, folder: Path, timeout: float) -> None:
    """``python script folder`` as ranks 0 and 1 of one process group (env rendezvous, gloo on CPU); both must
    exit 0, else the assertion shows the end of each rank's output."""
    env = subprocess_env(PYTHONPATH=str(ROOT), TESTS=str(ROOT / "tests"), CUDA_VISIBLE_DEVICES="",
                         WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [subprocess.Popen([sys.executable, str(script), str(folder)], cwd=ROOT,
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
