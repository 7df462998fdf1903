"""ZeRO-3 (``train.zero_stage: 3``) and CPU offload (``train.offload_optimizer``, ``train.offload_param``): from the
same initial weights, the losses, every parameter's gradient and the weights after a few steps equal ZeRO-0's
(fp32 tolerance), on one process (also offloaded, also with activation checkpointing) and on 2 gloo processes
(each with half the batch); an AR run (elastic, previews) stopped early and resumed under ZeRO-3 ends bitwise
equal to an uninterrupted one; the AR and tokenizer exports are bit for bit DeepSpeed's own gather of the last
checkpoint (``zero_to_fp32``), and so is ``omniar export`` of it; option errors name the option.

Every weight is partitioned (``stage3_param_persistence_threshold: 0``): by default DeepSpeed keeps small
weights whole on every rank, which would leave the tiny test model's partitioning untested."""

import json

import pytest
import torch
import torch.nn.functional as F
import yaml
from _train_helpers import assert_bitwise_equal, run_two_ranks, tiny_ar_config, tiny_config, weights

from omniar.backbone import OmniARConfig, OmniARModel
from omniar.tokenizers import VideoTokenizer
from omniar.train.common import checkpoint_blocks
from omniar.train.engine import EngineConfig, TrainEngine

MODEL = dict(text_vocab_size=40, codebook_size=16, code_dim=4, scales=(1, 2), hidden_size=32, num_layers=2,
             num_heads=2, num_kv_heads=1, num_experts=4, top_k=2, expert_hidden_size=16, router_z_loss_coef=1e-3)
STEPS = 3
ALL_PARTITIONED = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}

WORKER = r'''
import os, sys
import torch
import yaml
sys.path.insert(0, os.environ["TESTS"])
from test_zero3 import engine_steps
from omniar.train import ar

out, rank = sys.argv[1], int(os.environ["RANK"])
torch.save(engine_steps(f"{out}/engine", 3, rows=slice(2 * rank, 2 * rank + 2), ds_json=f"{out}/ds.json"),
           f"{out}/engine-{rank}.pt")
config = yaml.safe_load(open(f"{out}/ar.yaml"))
for name, stop_at in (("reference", None), ("run", 2)):  # elastic sub-models and previews, under ZeRO-3
    config["train"]["out_dir"] = f"{out}/{name}"
    if stop_at:
        ar.train(config, progress=False, stop_at=stop_at)  # stops with a checkpoint after step 2 ...
    ar.train(config, progress=False)  # ... and the same command resumes from it
torch.distributed.barrier()
torch.distributed.destroy_process_group()
# the work is saved; skip the interpreter's teardown, where a leftover native thread intermittently aborts the
# rank ("terminate called without an active exception", exit 134) after everything passed
sys.stdout.flush()
os._exit(0)
'''


def batch(rows: slice = slice(None)):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, MODEL["text_vocab_size"], (4, 6), generator=g)
    visual = [torch.randn(4, 2, MODEL["code_dim"], n, n, generator=g) for n in MODEL["scales"]]
    targets = torch.randint(0, MODEL["codebook_size"], (4, 2, 5), generator=g)
    return ids[rows], [v[rows] for v in visual], targets[rows]


def engine_steps(out_dir, zero_stage, rows=slice(None), ds_json=None, activation_checkpointing=False,
                 **options) -> dict:
    """``STEPS`` optimizer steps of the tiny model on ``rows`` of the batch: each step's loss (the mean over
    ranks) and full gradients, and the whole weights after the last (rank 0; DeepSpeed's own gather under ZeRO-3)."""
    from deepspeed.utils import safe_get_full_grad

    torch.manual_seed(0)
    model = OmniARModel.from_config_obj(OmniARConfig(**MODEL))
    if activation_checkpointing:  # the blocks recomputed in backward: ZeRO-3 gathers their weights again
        checkpoint_blocks(model.layers)
    ids, visual, targets = batch(rows)
    config = EngineConfig(out_dir=str(out_dir), zero_stage=zero_stage, lr=1e-2, micro_batch_size=len(ids),
                          deepspeed_config=ds_json, **options)
    losses, grads = [], []
    with TrainEngine(model, config) as engine:
        for _ in range(STEPS):
            out = engine.ds(ids, None, visual)
            loss = F.cross_entropy(out.visual_logits.flatten(0, 2), targets.flatten()) + out.aux_loss
            engine.backward(loss)
            # safe_get_full_grad: DeepSpeed's gathered gradient of a partitioned weight (a collective)
            grads.append({n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()})
            mean = loss.detach().clone()
            if engine.world_size > 1:
                torch.distributed.all_reduce(mean)
            losses.append(float(mean) / engine.world_size)
            assert engine.step()
        whole = engine.whole_module(lambda: OmniARModel.from_config_obj(OmniARConfig(**MODEL)))
        state = None if whole is None else {k: v.detach().clone() for k, v in whole.state_dict().items()}
    return {"losses": losses, "grads": grads, "state": state}


def assert_close(expected: dict, actual: dict, atol: float) -> None:
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.allclose(expected[key], actual[key], rtol=1e-4, atol=atol), key


def assert_same_training(reference: dict, run: dict) -> None:
    assert run["losses"] == pytest.approx(reference["losses"], rel=1e-6)
    for expected, actual in zip(reference["grads"], run["grads"]):
        assert_close(expected, actual, atol=1e-6)
    # Adam divides by the gradients' root mean square: rounding in ZeRO's flat partitions grows a little
    assert_close(reference["state"], run["state"], atol=1e-5)


@pytest.fixture(scope="module")
def ds_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("ds") / "ds.json"
    path.write_text(json.dumps(ALL_PARTITIONED))
    return str(path)


@pytest.fixture(scope="module")
def zero0(tmp_path_factory, ds_json):
    """The single-process ZeRO-0 reference on the whole batch."""
    return engine_steps(tmp_path_factory.mktemp("zero0"), 0, ds_json=ds_json)


@pytest.mark.parametrize("options", [{}, {"offload_optimizer": True, "offload_param": True},
                                     {"activation_checkpointing": True}])
def test_one_process_zero3_trains_as_zero0(tmp_path, zero0, ds_json, options):
    run = engine_steps(tmp_path, 3, ds_json=ds_json, **options)
    assert_same_training(zero0, run)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Both ranks through :data:`WORKER`; its folder."""
    tmp = tmp_path_factory.mktemp("zero3")
    torch.manual_seed(0)
    VideoTokenizer(**tiny_config("unused", 1)["model"]).save_pretrained(tmp / "tok")
    (tmp / "ds.json").write_text(json.dumps(ALL_PARTITIONED))
    config = tiny_ar_config(tmp, 8, steps=4, save_every=100, log_every=1, micro_batch_size=1, sample_every=2,
                            zero_stage=3, deepspeed_config=str(tmp / "ds.json"))
    (tmp / "ar.yaml").write_text(yaml.safe_dump(config))
    (tmp / "worker.py").write_text(WORKER)
    run_two_ranks(tmp / "worker.py", tmp, timeout=600)
    return tmp


def test_two_processes_zero3_train_as_one_process_zero0(two_ranks, zero0):
    ranks = [torch.load(two_ranks / f"engine-{r}.pt") for r in range(2)]
    assert ranks[1]["state"] is None  # gathered onto rank 0 only
    assert_same_training(zero0, ranks[0])
    for a, b in zip(ranks[0]["grads"], ranks[1]["grads"]):  # every rank sees the whole reduced gradient
        assert_bitwise_equal(a, b)


def test_ar_stop_and_resume_under_zero3_is_bitwise_equal(two_ranks):
    run = two_ranks / "run"
    assert_bitwise_equal(weights(two_ranks / "reference" / "final"), weights(run / "final"))
    files = {p.name for p in (run / "checkpoints" / "step_00000004").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= files


def test_ar_export_under_zero3_is_the_checkpoint(two_ranks):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from omniar.generation import TextToVideoPipeline

    exported = {k.split(":", 1)[1]: v for k, v in weights(two_ranks / "run" / "final").items()
                if k.startswith("model/")}
    # DeepSpeed's own offline gather of the last checkpoint: its fp32 partitions and rank 0's buffers, the
    # state a ZeRO-0 run at these weights exports
    saved = get_fp32_state_dict_from_zero_checkpoint(str(two_ranks / "run" / "checkpoints"), tag="step_00000004")
    assert saved.keys() == exported.keys()
    for name, value in saved.items():
        assert torch.equal(exported[name], value), name
    pipe = TextToVideoPipeline.from_pretrained(two_ranks / "run" / "final")
    assert pipe("a red circle moves right on a black background", num_frames=1, seed=0).frames.shape[1] == 1


def test_changing_zero_stage_to_or_from_3_is_refused_on_resume(two_ranks, tmp_path):
    def engine(out_dir, zero_stage):
        return TrainEngine(OmniARModel.from_config_obj(OmniARConfig(**MODEL)),
                           EngineConfig(out_dir=str(out_dir), zero_stage=zero_stage))

    with engine(two_ranks / "run", 2) as stage2:
        with pytest.raises(ValueError, match=r"train.zero_stage: is 2, but .*step_00000004 was written with ZeRO "
                                             r"stage 3"):
            stage2.resume()  # refused before anything loads
    with engine(tmp_path, 0) as stage0:
        stage0.save(1)
    with engine(tmp_path, 3) as stage3:
        with pytest.raises(ValueError, match=r"train.zero_stage: is 3, but .*step_00000001 was written with ZeRO "
                                             r"stage 0"):
            stage3.resume()


def test_option_errors_name_the_options(tmp_path):
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"offload_param": {"device": "cpu"}}}))
    cases = [
        (dict(zero_stage=3, ep_size=2), r"train.zero_stage: 3 does not combine with train.ep_size > 1 \(got 2\); "
                                        r"set train.zero_stage to 0-2 .* or train.ep_size to 1"),
        (dict(zero_stage=4), "train.zero_stage: must be <= 3, got 4"),
        (dict(zero_stage=2, offload_param=True), "train.offload_param: needs train.zero_stage 3 .*, got 2"),
        (dict(zero_stage=0, offload_optimizer=True), "train.offload_optimizer: needs train.zero_stage 1-3"),
        (dict(zero_stage=3, offload_param="yes"), "train.offload_param: must be"),
        (dict(zero_stage=3, deepspeed_config=str(tmp_path / "ds.json")),
         "train.deepspeed_config: .* sets zero_optimization.offload_param; set train.offload_param: true instead"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            EngineConfig(out_dir=str(tmp_path), **options)
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"offload_param": {"device": "nvme"}}}))
    with pytest.raises(ValueError, match=r"sets zero_optimization.offload_param.device to 'nvme', but omniar sets it "
                                         r"to 'cpu' \(train.offload_param\)"):
        EngineConfig(out_dir=str(tmp_path), zero_stage=3, offload_param=True, deepspeed_config=str(tmp_path / "ds.json"))
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"offload_param": {"pin_memory": True}}}))
    config = EngineConfig(out_dir=str(tmp_path), zero_stage=3, offload_param=True,
                          deepspeed_config=str(tmp_path / "ds.json"))
    assert config.ds_config(1)["zero_optimization"]["offload_param"] == {"device": "cpu", "pin_memory": True}


def test_tokenizer_trains_under_zero3_and_exports_the_checkpoint(tmp_path, ds_json):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from omniar.train.tokenizer import train

    # previews every step: the model gathered onto rank 0 each time
    final = train(tiny_config(tmp_path, 2, zero_stage=3, micro_batch_size=1, sample_every=1,
                              deepspeed_config=ds_json), progress=False)
    exported = {k.split(":", 1)[1]: v for k, v in weights(final).items()}
    saved = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "checkpoints"), tag="step_00000002")
    assert saved.keys() == exported.keys()
    for name, value in saved.items():
        assert torch.equal(exported[name], value), name


def test_refiner_refuses_zero3():
    from omniar.train import refiner

    with pytest.raises(ValueError, match="train.zero_stage: 3 is not supported by omniar train refiner"):
        refiner.train({"train": {"zero_stage": 3}}, progress=False)


def test_omniar_export_of_a_zero3_checkpoint_is_the_run_s_final(two_ranks, tmp_path, capsys):
    from omniar import cli

    run = two_ranks / "run"
    # the run folder: its newest checkpoint, step 4, the last step
    assert cli.main(["export", str(run), "--config", str(two_ranks / "ar.yaml"), "--out", str(tmp_path / "4")]) == 0
    assert "step_00000004" in capsys.readouterr().out
    assert_bitwise_equal(weights(run / "final"), weights(tmp_path / "4"))
    for name in ("model/config.json", "model_index.json"):
        assert (run / "final" / name).read_text() == (tmp_path / "4" / name).read_text()
    cli.main(["export", str(run / "checkpoints" / "step_00000002"), "--config", str(two_ranks / "ar.yaml"),
              "--out", str(tmp_path / "2")])  # from the middle of the run
    middle = weights(tmp_path / "2")
    assert middle.keys() == weights(run / "final").keys() and not all(
        torch.equal(value, weights(run / "final")[key]) for key, value in middle.items())
    capsys.readouterr()
    assert cli.main(["export", str(run / "checkpoints"), "--config", str(two_ranks / "ar.yaml"),
                     "--out", str(tmp_path / "x")]) == 2
    assert "checkpoint: must be a checkpoint folder OUT/checkpoints/step_NNNNNNNN" in capsys.readouterr().err
    assert cli.main(["export", str(run), "--config", str(two_ranks / "ar.yaml"), "--set", "model.hidden_size=32",
                     "--out", str(tmp_path / "x")]) == 2
    assert "does not hold the model of this config (the run's --config and --set?)" in capsys.readouterr().err
