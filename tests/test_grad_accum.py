"""Gradient accumulation (``train.grad_accum_steps``): a step of k micro-batches equals one step of their union,
``train.steps``, the LR schedule and checkpoints count optimizer steps, a non-finite micro-batch skips its whole
step, and a run stopped between steps and resumed ends bitwise equal to an uninterrupted one."""

import copy

import pytest
import torch
from _train_helpers import assert_bitwise_equal, tiny_config, weights

from omniar.train.common import StepBatchSampler
from omniar.train.engine import EngineConfig, TrainEngine, load_checkpoint_file


def run(tmp_path, model, x, zero_stage, accum, steps=3):
    """``steps`` optimizer steps on the batch ``x`` split into ``accum`` micro-batches; the engine's module."""
    config = EngineConfig(out_dir=str(tmp_path), zero_stage=zero_stage, lr=0.1, grad_accum_steps=accum,
                          micro_batch_size=len(x) // accum, warmup_steps=10)
    with TrainEngine(model, config) as engine:
        for _ in range(steps):
            for micro in x.chunk(accum):
                engine.backward(engine.ds(micro).pow(2).mean())
            assert engine.step()
        assert engine.scheduler.last_epoch == engine.ds.global_steps == steps  # optimizer steps
        assert engine.lr == pytest.approx(0.1 * (steps + 1) / 10)
        return engine.module


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_accumulated_step_equals_one_step_of_the_union(tmp_path, zero_stage):
    torch.manual_seed(0)
    model, x = torch.nn.Linear(4, 3), torch.randn(8, 4)
    whole = run(tmp_path / "whole", copy.deepcopy(model), x, zero_stage, accum=1)
    accumulated = run(tmp_path / "accum", model, x, zero_stage, accum=4)
    for a, b in zip(whole.parameters(), accumulated.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("zero_stage", [0, 2])
@pytest.mark.parametrize("bad_micro", [0, 1])
def test_a_non_finite_micro_batch_skips_its_whole_step(tmp_path, zero_stage, bad_micro):
    torch.manual_seed(0)
    x = torch.randn(4, 4)
    config = EngineConfig(out_dir=str(tmp_path), zero_stage=zero_stage, lr=0.1, grad_accum_steps=2,
                          micro_batch_size=2, warmup_steps=10)
    with TrainEngine(torch.nn.Linear(4, 1), config) as engine:
        before = [p.detach().clone() for p in engine.module.parameters()]
        for micro, rows in enumerate(x.chunk(2)):
            loss = engine.ds(rows).pow(2).mean()
            engine.backward(loss * float("nan") if micro == bad_micro else loss)
        assert engine.step() is False and engine.skipped_steps == 1
        assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
        assert engine.lr == pytest.approx(0.1 * 2 / 10)  # the schedule still counts the step
        for rows in x.chunk(2):  # the next step starts clean: no gradient of the skipped one is left
            engine.backward(engine.ds(rows).pow(2).mean())
        assert engine.step() is True
        step_two = [p.detach().clone() for p in engine.module.parameters()]
    reference = torch.nn.Linear(4, 1)
    reference.load_state_dict(dict(zip(["weight", "bias"], before)))
    opt = torch.optim.AdamW(reference.parameters(), lr=0.1 * 2 / 10, betas=(0.9, 0.99), weight_decay=0.0)
    reference(x).pow(2).mean().backward()
    torch.nn.utils.clip_grad_norm_(reference.parameters(), 1.0)
    opt.step()
    for a, b in zip(reference.parameters(), step_two):
        assert torch.allclose(a, b, atol=1e-6)


def test_step_without_all_micro_batches_is_an_error(tmp_path):
    config = EngineConfig(out_dir=str(tmp_path), grad_accum_steps=2, micro_batch_size=1)
    with TrainEngine(torch.nn.Linear(2, 1), config) as engine:
        engine.backward(engine.ds(torch.ones(1, 2)).sum())
        with pytest.raises(RuntimeError, match="step\\(\\) after 1 backward\\(\\) calls; train.grad_accum_steps is 2"):
            engine.step()
    with pytest.raises(ValueError, match="train.grad_accum_steps: must be >= 1, got 0"):
        EngineConfig(out_dir=str(tmp_path), grad_accum_steps=0)


def test_micro_batches_of_a_step_are_the_clips_of_one_big_batch():
    accum = list(StepBatchSampler(100, 2, start_step=1, total_steps=3, accum=3))
    whole = list(StepBatchSampler(100, 6, start_step=1, total_steps=3))
    assert len(accum) == 6 and [sum(accum[3 * i:3 * i + 3], []) for i in range(2)] == whole


def test_tokenizer_stop_and_resume_with_accumulation_is_bitwise_equal(tmp_path):
    from omniar.train.tokenizer import train

    def config(out):
        return tiny_config(out, 5, save_every=2, micro_batch_size=1, grad_accum_steps=2, sample_every=0)

    reference = weights(train(config(tmp_path / "reference"), progress=False))
    run = tmp_path / "run"
    train(config(run), progress=False, stop_at=3)  # stops with a checkpoint after optimizer step 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000002", "step_00000003"]
    final = train(config(run), progress=False)
    assert_bitwise_equal(reference, weights(final))
    states = load_checkpoint_file(run / "checkpoints" / "step_00000005" / "mp_rank_00_model_states.pt")
    assert states["global_steps"] == 5 and states["lr_scheduler"]["last_epoch"] == 5  # optimizer steps
