"""``--deepspeed-config FILE`` (``train.deepspeed_config``): the user's DeepSpeed JSON is merged with what omniar
sets; a key that omniar sets to another value is refused, naming the key and the option behind it."""

import json
import re

import pytest
import torch
from _train_helpers import ROOT

from omniar.cli import main
from omniar.train.engine import EngineConfig, TrainEngine


def config_file(tmp_path, settings: dict) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(settings))
    return str(path)


def test_user_settings_reach_deepspeed_merged_with_omniars(tmp_path):
    path = config_file(tmp_path, {"zero_optimization": {"stage": 2, "reduce_bucket_size": 12345},
                                  "train_micro_batch_size_per_gpu": 2, "wall_clock_breakdown": True})
    config = EngineConfig(out_dir=str(tmp_path / "run"), zero_stage=2, micro_batch_size=2, deepspeed_config=path)
    with TrainEngine(torch.nn.Linear(2, 1), config) as engine:
        assert engine.ds.zero_optimization_stage() == 2 and engine.ds.wall_clock_breakdown()
        assert engine.ds._config.zero_config.reduce_bucket_size == 12345
        assert engine.ds.train_micro_batch_size_per_gpu() == 2 and engine.ds.gradient_clipping() == 1.0


@pytest.mark.parametrize("settings, message", [
    ({"zero_optimization": {"stage": 3}}, "sets zero_optimization.stage to 3, but omniar sets it to 0 "
                                          "(train.zero_stage); remove it from the file or set train.zero_stage"),
    ({"train_micro_batch_size_per_gpu": 4}, "sets train_micro_batch_size_per_gpu to 4, but omniar sets it to 8 "
                                            "(train.micro_batch_size)"),
    ({"train_batch_size": 64}, "sets train_batch_size to 64, but omniar sets it to 8 (train.micro_batch_size x "
                               "train.grad_accum_steps x processes)"),
    ({"gradient_accumulation_steps": 2}, "sets gradient_accumulation_steps to 2, but omniar sets it to 1 "
                                         "(train.grad_accum_steps)"),
    ({"bf16": {"enabled": True}}, "sets bf16.enabled to True, but omniar sets it to False (train.precision)"),
    ({"optimizer": {"type": "Adam"}}, "sets optimizer, but omniar builds the optimizer and its LR schedule itself"),
])
def test_a_conflicting_key_is_refused_naming_it(tmp_path, settings, message):
    path = config_file(tmp_path, settings)
    with pytest.raises(ValueError, match="^" + re.escape(f"train.deepspeed_config: {path} {message}")):
        EngineConfig(out_dir=str(tmp_path / "run"), deepspeed_config=path)  # refused before any work


def test_cli_flag_is_one_line_naming_the_key(tmp_path, capsys):
    path = config_file(tmp_path, {"gradient_clipping": 5.0})
    argv = ["train", "tokenizer", "--config", str(ROOT / "configs/tokenizer_tiny.yaml"), "--out", str(tmp_path / "run"),
            "--deepspeed-config", path]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"omniar: error: train.deepspeed_config: {path} sets gradient_clipping to 5.0, but omniar "
                          "sets it to 1.0 (train.grad_clip)") and err.count("\n") == 1, err
    for bad, message in (("missing.json", "file not found"), ("bad.json", "is not JSON"), ("list.json", "JSON object")):
        (tmp_path / "bad.json").write_text("{")
        (tmp_path / "list.json").write_text("[]")
        assert main(argv[:-1] + [str(tmp_path / bad)]) == 2
        assert message in capsys.readouterr().err
