"""Expert parallelism (``train.ep_size``) on 2 CPU processes (gloo): with the same weights and batch, the
forward output, loss and every parameter's gradient equal the single-process run, also when every token goes
to one rank's experts (the other receives no rows); an AR run stopped early (``stop_at``) and resumed ends
bitwise equal to an uninterrupted one, at ZeRO-0 and ZeRO-2; its export holds every expert and loads on one
process.

Both ranks run all scenarios in one launch (:data:`WORKER`, env rendezvous like the ``deepspeed`` launcher),
the single-process references run here."""


import pytest
import torch
import torch.nn.functional as F
import yaml
from _train_helpers import assert_bitwise_equal, run_two_ranks, tiny_ar_config, tiny_config, weights

from omniar.backbone import MoELayer, OmniARConfig, OmniARModel
from omniar.tokenizers import VideoTokenizer
from omniar.train.engine import EngineConfig, TrainEngine, load_checkpoint_file

MODEL = dict(text_vocab_size=40, codebook_size=16, code_dim=4, scales=(1, 2), hidden_size=32, num_layers=2,
             num_heads=2, num_kv_heads=1, num_experts=4, top_k=2, expert_hidden_size=16, router_z_loss_coef=1e-3)
ROUTINGS = {"spread": None, "rank1_only": [0.0, 0.0, 10.0, 10.0]}  # selection bias: experts 2, 3 live on rank 1

WORKER = r'''
import os, sys
import torch
import yaml
sys.path.insert(0, os.environ["TESTS"])
from test_expert_parallel import MODEL, ROUTINGS, batch, loss_of, model_for
from omniar.train import ar
from omniar.train.engine import EngineConfig, TrainEngine

out, rank = sys.argv[1], int(os.environ["RANK"])
for routing in ROUTINGS:
    model = model_for(routing)
    engine = TrainEngine(model, EngineConfig(out_dir=f"{out}/engine-{routing}", ep_size=2, micro_batch_size=1))
    ids, visual, targets = batch(slice(rank, rank + 1))
    result = engine.ds(ids, None, visual)
    loss = loss_of(result, targets)
    engine.ds.backward(loss)  # DeepSpeed reduces: experts over their expert-data-parallel group only
    torch.save({"logits": result.visual_logits.detach(), "loss": loss.detach(),
                "grads": {n: p.grad for n, p in model.named_parameters()},
                "norm": engine._grad_norm_stage0()},  # what ZeRO-0 clips with and logs under expert parallelism
               f"{out}/{routing}-{rank}.pt")
for zero_stage in (0, 2):  # 2: DeepSpeed partitions the experts' optimizer groups over expert-data-parallel ranks
    config = yaml.safe_load(open(f"{out}/ar.yaml"))
    config["train"].update(zero_stage=zero_stage, out_dir=f"{out}/reference-zero{zero_stage}")
    ar.train(config, progress=False)
    config["train"]["out_dir"] = f"{out}/run-zero{zero_stage}"
    ar.train(config, progress=False, stop_at=2)  # stops with a checkpoint after step 2 ...
    ar.train(config, progress=False)  # ... and the same command resumes from it
torch.distributed.barrier()
torch.distributed.destroy_process_group()  # else gloo's threads may abort the exit of a rank left waiting
'''


def model_for(routing: str) -> OmniARModel:
    torch.manual_seed(0)
    model = OmniARModel.from_config_obj(OmniARConfig(**MODEL))
    if ROUTINGS[routing] is not None:
        for layer in model.modules():
            if isinstance(layer, MoELayer):
                layer.selection_bias.copy_(torch.tensor(ROUTINGS[routing]))
    return model


def batch(rows: slice):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, MODEL["text_vocab_size"], (2, 6), generator=g)
    visual = [torch.randn(2, 2, MODEL["code_dim"], n, n, generator=g) for n in MODEL["scales"]]
    targets = torch.randint(0, MODEL["codebook_size"], (2, 2, 5), generator=g)
    return ids[rows], [v[rows] for v in visual], targets[rows]


def loss_of(out, targets: torch.Tensor) -> torch.Tensor:
    """A per-sample mean (the two-sample batch's loss is the mean of the ranks'), with the MoE terms."""
    return F.cross_entropy(out.visual_logits.flatten(0, 2), targets.flatten()) + out.aux_loss


def save_tiny_tokenizer(tmp) -> None:
    torch.manual_seed(0)
    VideoTokenizer(**tiny_config("unused", 1)["model"]).save_pretrained(tmp / "tok")


@pytest.fixture(scope="module")
def ep_run(tmp_path_factory):
    """Both ranks through :data:`WORKER`; its folder."""
    tmp = tmp_path_factory.mktemp("ep")
    save_tiny_tokenizer(tmp)
    config = tiny_ar_config(tmp, 8, steps=4, save_every=100, log_every=1, micro_batch_size=1, ep_size=2)
    (tmp / "ar.yaml").write_text(yaml.safe_dump(config))
    (tmp / "worker.py").write_text(WORKER)
    run_two_ranks(tmp / "worker.py", tmp, timeout=300)
    return tmp


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_forward_loss_and_gradients_equal_single_process(ep_run, routing):
    model = model_for(routing)
    ids, visual, targets = batch(slice(None))
    out = model(ids, None, visual)
    loss_of(out, targets).backward()  # the batch's mean = the mean of the ranks' losses
    ranks = [torch.load(ep_run / f"{routing}-{r}.pt") for r in range(2)]
    assert torch.allclose(torch.cat([r["logits"] for r in ranks]), out.visual_logits, atol=1e-5)
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss_of(out, targets), atol=1e-6)
    for name, p in model.named_parameters():
        if name.endswith(("ffn.w_in", "ffn.w_out")):  # rank r holds experts 2r, 2r + 1
            ep_grad = torch.cat([r["grads"][name] for r in ranks])
        else:  # replicated: all-reduced, the same on both ranks
            assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name
            ep_grad = ranks[0]["grads"][name]
        expected = torch.zeros_like(p) if p.grad is None else p.grad  # DeepSpeed fills unused ones with zeros
        assert torch.allclose(ep_grad, expected, atol=1e-6, rtol=1e-4), name
    norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
    assert torch.allclose(ranks[0]["norm"], norm) and torch.allclose(ranks[1]["norm"], norm)
    if routing == "rank1_only":  # rank 0's experts got no rows, and did not hang
        assert ranks[0]["grads"]["layers.0.ffn.w_in"].abs().sum() == 0
        assert ranks[1]["grads"]["layers.0.ffn.w_in"].abs().sum() > 0


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_stop_and_resume_is_bitwise_equal_and_checkpoints_hold_each_shard(ep_run, zero_stage):
    run = ep_run / f"run-zero{zero_stage}"
    assert_bitwise_equal(weights(ep_run / f"reference-zero{zero_stage}" / "final"), weights(run / "final"))
    assert {p.name for p in (run / "checkpoints").iterdir() if p.is_dir()} == {"step_00000002", "step_00000004"}
    for step in ("step_00000002", "step_00000004"):
        files = {p.name for p in (run / "checkpoints" / step).iterdir()}
        assert {"expert_shard_ep000.pt", "expert_shard_ep001.pt"} <= files


def test_export_gathers_every_expert_and_loads_on_one_process(ep_run):
    from omniar.generation import TextToVideoPipeline

    run = ep_run / "run-zero0"
    pipe = TextToVideoPipeline.from_pretrained(run / "final")
    shards = [load_checkpoint_file(run / "checkpoints" / "step_00000004" / f"expert_shard_ep00{r}.pt")
              for r in range(2)]
    state = pipe.model.state_dict()
    for name in shards[0]:
        assert torch.equal(state[name], torch.cat([s[name] for s in shards])), name
    assert pipe("a red circle moves right on a black background", num_frames=1, seed=0).frames.shape[1] == 1


def test_ep_size_errors_name_the_option(ep_run, tmp_path):
    with TrainEngine(model_for("spread"), EngineConfig(out_dir=str(ep_run / "run-zero0"))) as engine:
        with pytest.raises(ValueError, match=r"train.ep_size: is 1, but .*step_00000004 was written with ep_size 2"):
            engine.resume()  # refused before anything loads
    with pytest.raises(ValueError, match="train.ep_size: must be >= 1"):
        EngineConfig(out_dir=str(tmp_path), ep_size=0)
    with pytest.raises(ValueError, match=r"train.ep_size: must divide the number of processes \(1\), got 2"):
        TrainEngine(model_for("spread"), EngineConfig(out_dir=str(tmp_path), ep_size=2))
    from omniar.train import ar

    save_tiny_tokenizer(tmp_path)
    config = tiny_ar_config(tmp_path, 8, ep_size=3, out_dir=str(tmp_path / "run"))
    with pytest.raises(ValueError, match="train.ep_size: must divide model.num_experts=4, got 3"):
        ar.train(config, progress=False)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_omniar_export_gathers_the_expert_shards_of_a_checkpoint(ep_run, tmp_path, zero_stage):
    from omniar.train.ar import export_checkpoint

    run = ep_run / f"run-zero{zero_stage}"
    config = yaml.safe_load((ep_run / "ar.yaml").read_text())
    export_checkpoint(config, run / "checkpoints" / "step_00000004", tmp_path / "out")  # on one process
    assert_bitwise_equal(weights(run / "final"), weights(tmp_path / "out"))
