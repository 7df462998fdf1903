"""``omniar plan`` and the paper-scale AR configs: both build on the meta device (no memory) as valid
``omniar train ar`` configs of the intended sizes; the CLI prints the table, JSON, and one-line errors."""

import json
import subprocess
import sys

import pytest
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from _train_helpers import ROOT, subprocess_env
from omniar.cli import main
from omniar.commands.plan import plan
from omniar.train.common import apply_overrides, load_yaml

CONFIGS = {  # config -> (GPUs it is sized for, intended total parameters)
    "ar_1b.yaml": (8, 0.8e9, 1.5e9),
    "ar_10b.yaml": (64, 8e9, 15e9),
}


def config(name: str, *overrides: str) -> dict:
    return apply_overrides(load_yaml(ROOT / "configs" / name), list(overrides))


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def planned(request):
    gpus, low, high = CONFIGS[request.param]
    return plan(config(request.param), gpus), gpus, low, high, config(request.param)["model"]


def test_paper_configs_have_the_intended_size(planned):
    p, gpus, low, high, model = planned
    assert low <= p["total_params"] <= high
    # SwiGLU experts: w_in (d, 2h) and w_out (h, d) per routed expert of each MoE layer
    moe_layers = model["num_layers"] - model["first_dense_layers"]
    assert p["routed_expert_params"] == moe_layers * model["num_experts"] * 3 * model["hidden_size"] * model[
        "expert_hidden_size"]
    assert p["routed_expert_params"] + p["other_params"] == p["total_params"]
    assert p["active_params"] < p["total_params"] / 4  # top-k routing: most weights idle per token
    assert p["active_params"] > p["other_params"]
    assert p["tokens_per_sample"]["total"] == 96 + 5 * (1 + 4 + 16 + 64)  # shapes-tokenizer, 17 frames
    assert p["tokens_per_step"] == p["tokens_per_sample"]["total"] * p["micro_batch_size"] * gpus


def test_ep_sizes_divide_the_experts_and_save_memory(planned):
    p, gpus = planned[:2]
    rows = p["memory_per_gpu"]
    assert [r["ep_size"] for r in rows][:4] == [1, 2, 4, 8]
    for r in rows:
        assert p["num_experts"] % r["ep_size"] == 0 and gpus % r["ep_size"] == 0
        assert r["experts_per_gpu"] * r["ep_size"] == p["num_experts"]
    # ep_size 1 is DeepSpeed's dense estimate of the whole model (two int() roundings apart)
    _, whole = estimate_zero2_model_states_mem_needs(p["total_params"], num_gpus_per_node=gpus, cpu_offload=False)
    assert abs(rows[0]["zero2_bytes"] - whole) <= 1
    zero2 = [r["zero2_bytes"] for r in rows]
    assert zero2 == sorted(zero2, reverse=True) and zero2[-1] < zero2[0]
    assert all(r["zero3_bytes"] < r["zero2_bytes"] for r in rows)


@pytest.mark.parametrize("overrides, gpus, ep, message", [
    (["model.scales=[1, 2]"], 8, None, "model: ['scales'] are set from train.tokenizer"),
    (["model.hidden_sizee=64"], 8, None, "model: unknown keys ['hidden_sizee']"),
    (["data.num_frames=16"], 8, None, "data.num_frames: must be 1 + 4 * k"),
    (["train.tokenizer=no/such/folder"], 8, None, "train.tokenizer: must be a tokenizer folder"),
    ([], 8, [3], "--ep-size: must divide both model.num_experts=32 and --gpus=8, got 3"),
    ([], 4, [8], "--ep-size: must divide both model.num_experts=32 and --gpus=4, got 8"),
    ([], 0, None, "--gpus:"),
])
def test_plan_refuses_naming_the_setting(overrides, gpus, ep, message):
    with pytest.raises(ValueError) as err:
        plan(config("ar_1b.yaml", *overrides), gpus, ep)
    assert str(err.value).startswith(message)


def test_cli_prints_the_table_and_json(capsys):
    args = ["plan", "--config", str(ROOT / "configs" / "ar_1b.yaml"), "--gpus", "16", "--set", "model.num_layers=4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    header = lines.index(next(line for line in lines if line.split()[:2] == ["ep_size", "experts/GPU"]))
    assert [line.split()[0] for line in lines[header + 1:header + 6]] == ["1", "2", "4", "8", "16"]
    assert "B active per token" in out and "tokens per step: 266,752 = 521 x micro_batch_size 32 x 16 GPUs" in out
    # a fresh process: DeepSpeed's import-time log line must not reach stdout
    out = subprocess.run([sys.executable, "-m", "omniar.cli", *args, "--json", "--ep-size", "4"], cwd=ROOT,
                         env=subprocess_env(), capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    assert [r["ep_size"] for r in result["memory_per_gpu"]] == [4]
    assert result["total_params"] == plan(config("ar_1b.yaml", "model.num_layers=4"), 16)["total_params"]


@pytest.mark.parametrize("content, message", [
    (None, "config: file not found: {path}"),
    ("model: [1, 2", "config: {path} is not valid YAML"),
    ("modell: {}\n", "config: unknown keys ['modell']"),
])
def test_cli_refuses_a_bad_config_naming_it(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    if content is not None:
        path.write_text(content)
    assert main(["plan", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("omniar: error: " + message.format(path=path))
