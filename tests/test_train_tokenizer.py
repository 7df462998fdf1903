"""Tokenizer training on DeepSpeed: loss goes down (1 and 2 processes), atomic checkpoints, exact resume,
SIGTERM saves and exits cleanly."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from _train_helpers import ROOT, TINY_CONFIG, assert_bitwise_equal, subprocess_env, tiny_config, weights
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from omniar.data.shapes import MovingShapes
from omniar.tokenizers import VideoTokenizer
from omniar.train.common import apply_overrides, load_yaml
from omniar.train.tokenizer import edge_weights, object_weights, reconstruction_loss, train


def losses(run_dir):
    acc = EventAccumulator(str(Path(run_dir) / "tb"))
    acc.Reload()
    return [e.value for e in acc.Scalars("loss")]


def reconstruction_mse(model):
    ds = MovingShapes("heldout", 8, 32, 9, seed=99)
    video = torch.stack([ds[i]["video"] for i in range(8)])
    with torch.no_grad():
        return torch.nn.functional.mse_loss(model.eval()(video).reconstruction, video).item()


def assert_learned(config, final):
    torch.manual_seed(config["train"].get("seed", 0))  # the trainer's initial weights
    before = reconstruction_mse(VideoTokenizer(**config["model"]))
    after = reconstruction_mse(VideoTokenizer.from_pretrained(final))
    assert after < 0.7 * before, (before, after)


def test_single_process_loss_goes_down_and_checkpoints_atomically(tmp_path):
    config = tiny_config(tmp_path / "run", 100, save_every=50)
    final = train(config, progress=False)
    assert len(losses(tmp_path / "run")) == 100
    assert_learned(config, final)
    ckpts = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert ckpts == ["step_00000050", "step_00000100"]  # keeps the newest two, no temporary directories
    assert (final / "config.json").is_file()


def test_resume_matches_uninterrupted_run(tmp_path):
    straight = weights(train(tiny_config(tmp_path / "a", 12, save_every=6), progress=False))
    train(tiny_config(tmp_path / "b", 12, save_every=6), progress=False, stop_at=6)
    assert not (tmp_path / "b" / "final").exists()
    # A half-written checkpoint (crash during save) must never be picked up.
    partial = tmp_path / "b" / "checkpoints" / ".tmp-step_00000009"
    partial.mkdir()
    (partial / "garbage.pt").write_bytes(b"\0" * 10)
    resumed = weights(train(tiny_config(tmp_path / "b", 12, save_every=6), progress=False))
    assert_bitwise_equal(straight, resumed)


def test_overrides_and_unknown_keys():
    config = apply_overrides({"train": {"lr": 1.0}}, ["train.lr=0.5", "model.codebook_size=8"])
    assert config == {"train": {"lr": 0.5}, "model": {"codebook_size": 8}}
    with pytest.raises(ValueError, match="--set"):
        apply_overrides({}, ["train.lr"])
    bad = tiny_config("/tmp/unused", 1)
    bad["train"]["learning_rate"] = 1.0
    with pytest.raises(ValueError, match="unknown keys"):
        train(bad, progress=False)
    typo = apply_overrides(tiny_config("/tmp/unused", 1), ["trian.lr=5"])
    with pytest.raises(ValueError, match=r"^config: unknown keys \['trian'\]"):
        train(typo, progress=False)
    typo = apply_overrides(tiny_config("/tmp/unused", 1), ["model.chanels=[8, 16]"])
    with pytest.raises(ValueError, match=r"^model: unknown keys \['chanels'\]"):
        train(typo, progress=False)


@pytest.mark.skipif(shutil.which("deepspeed", path=os.path.dirname(sys.executable)) is None,
                    reason="deepspeed launcher not installed")
def test_two_process_zero2_training(tmp_path):
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [launcher, "--num_gpus", "2", "--master_port", "29731", "--module", "omniar.cli", "train", "tokenizer",
           "--config", str(TINY_CONFIG), "--out", str(tmp_path / "run"), "--steps", "100",
           "--set", "train.zero_stage=2", "--set", "train.log_every=1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert len(losses(tmp_path / "run")) == 100
    assert_learned(load_yaml(TINY_CONFIG), tmp_path / "run" / "final")


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path):
    run = tmp_path / "run"
    env = subprocess_env()
    base = [sys.executable, "-m", "omniar.cli", "train", "tokenizer", "--config", str(TINY_CONFIG), "--out", str(run)]
    proc = subprocess.Popen(base + ["--steps", "100000", "--set", "train.save_every=100000"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "tb").is_dir():
        time.sleep(0.5)
    time.sleep(5)  # a few training steps
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    ckpts = [p.name for p in (run / "checkpoints").iterdir()]
    assert len(ckpts) == 1 and ckpts[0].startswith("step_") and ckpts[0] != "step_00000000"
    assert not (run / "final").exists()
    done = int(ckpts[0].split("_")[1])
    # Resuming with a schedule that ends a few steps later finishes and exports.
    rc = subprocess.run(base + ["--steps", str(done + 3)], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
    assert rc.returncode == 0, rc.stderr[-2000:]
    assert (run / "final" / "config.json").is_file()


def test_decoder_only_fine_tuning_keeps_every_code(tmp_path):
    base = train(tiny_config(tmp_path / "base", 2), progress=False)
    config = tiny_config(tmp_path / "ft", 3, trainable="decoder", init_from=str(base))
    tuned = train(config, progress=False)
    before, after = VideoTokenizer.from_pretrained(base), VideoTokenizer.from_pretrained(tuned)
    after_state = after.state_dict()
    for key, value in before.state_dict().items():  # encoder, codebook (EMA buffers) and refinement: untouched
        assert torch.equal(value, after_state[key]) == (not key.startswith("decoder.")), key
    video = torch.stack([MovingShapes("heldout", 2, 32, 9, seed=5)[i]["video"] for i in range(2)])
    assert all(torch.equal(a, b) for a, b in zip(before.encode(video).codes, after.encode(video).codes))
    with pytest.raises(ValueError, match="train.trainable: 'decoder' needs train.init_from"):
        train(tiny_config(tmp_path / "bad", 1, trainable="decoder"), progress=False)


def test_a_new_preview_decoder_starts_as_a_copy_of_the_decoder(tmp_path):
    base_config = tiny_config(tmp_path / "base", 2)
    base_config["model"] |= {"global_context": True, "positions": True}
    base = train(base_config, progress=False)
    # one step at a rate too small to move a weight: what the preview decoder and its position map started from
    config = tiny_config(tmp_path / "ft", 1, trainable="decoder", init_from=str(base), truncate_prob=1.0, lr=1e-12)
    config["model"] = base_config["model"] | {"preview_decoder": True, "preview_positions": True}
    tuned = VideoTokenizer.from_pretrained(train(config, progress=False))
    for copy, source in ((tuned.preview_net, tuned.decoder), (tuned.preview_position_map, tuned.position_map)):
        for k, v in copy.state_dict().items():
            torch.testing.assert_close(v, source.state_dict()[k], rtol=0, atol=1e-9)
    for k, v in VideoTokenizer.from_pretrained(base).state_dict().items():
        torch.testing.assert_close(tuned.state_dict()[k], v, rtol=0, atol=1e-9)


def test_preview_codes_are_fitted_then_trained_with_the_preview_decoder_alone(tmp_path):
    base_config = tiny_config(tmp_path / "base", 2)
    base_config["model"] |= {"refiner_blocks": 1, "refiner_channels": 8}
    base = train(base_config, progress=False)
    config = tiny_config(tmp_path / "ft", 3, trainable="preview", init_from=str(base), truncate_prob=1.0,
                         context_lr_scale=10.0, preview_fit_clips=8)
    config["model"] = base_config["model"] | {"preview_decoder": True, "preview_codes": [4, 6, 6]}
    before, after = VideoTokenizer.from_pretrained(base), VideoTokenizer.from_pretrained(train(config, progress=False))
    after_state = after.state_dict()
    for key, value in before.state_dict().items():  # encoder, codebook, decoder, refiner: untouched
        assert torch.equal(value, after_state[key]), key
    palette = after.preview_palette
    assert all(palette.centroids(s).abs().sum(1).gt(0).all() for s in range(3))  # fitted before the first step
    assert all(p.any() for p in palette.patches)  # the patches (zero at the start) learnt
    bad = tiny_config(tmp_path / "bad", 1, trainable="preview", init_from=str(base), truncate_prob=1.0,
                      preview_fit_clips=17)
    bad["model"], bad["data"]["num_samples"] = config["model"], 16
    with pytest.raises(ValueError, match="train.preview_fit_clips: must be <= 16"):
        train(bad, progress=False)


def test_preview_only_fine_tuning_moves_the_preview_decoder_alone(tmp_path):
    base_config = tiny_config(tmp_path / "base", 2)
    base_config["model"] |= {"preview_decoder": True, "refiner_blocks": 1, "refiner_channels": 8,
                             "global_context": True, "positions": True, "coarse_codes": 8}
    base = train(base_config, progress=False)
    # the preview decoder gains its own position map, started as a copy of the shared one, and code maps (zero)
    config = tiny_config(tmp_path / "ft", 3, trainable="preview", init_from=str(base), truncate_prob=1.0,
                         context_lr_scale=10.0)
    config["model"] = base_config["model"] | {"preview_positions": True, "preview_code_maps": True}
    before, after = VideoTokenizer.from_pretrained(base), VideoTokenizer.from_pretrained(train(config, progress=False))
    after_state = after.state_dict()
    for key, value in before.state_dict().items():  # encoder, codebook, decoder, refiner, shared map: untouched
        assert torch.equal(value, after_state[key]) == (not key.startswith("preview_net.")), key
    for key, value in before.position_map.state_dict().items():  # the copy has moved from where it started
        assert not torch.equal(value, after.preview_position_map.state_dict()[key]), key
    assert after.preview_code_map.any()  # the maps of the codes that clips truncated to the first scale used
    logged = EventAccumulator(str(tmp_path / "ft" / "tb")).Reload().Tags()["scalars"]
    assert "preview_psnr" in logged and "psnr" not in logged  # PSNR of the previews; no full clip to log
    with pytest.raises(ValueError, match="train.truncate_prob: must be 1 with train.trainable=preview"):
        train(tiny_config(tmp_path / "bad", 1, trainable="preview", init_from=str(base), truncate_prob=0.5),
              progress=False)
    with pytest.raises(ValueError, match="train.trainable: 'preview' needs model.preview_decoder=true"):
        train(tiny_config(tmp_path / "bad", 1, trainable="preview", init_from=str(base), truncate_prob=1.0),
              progress=False)


def test_init_from_is_checked_against_the_model_section(tmp_path):
    """As the shipped tokenizer: a refiner without the norm, so fine-tuning it needs model.refiner_norm=false."""
    torch.manual_seed(0)
    model = load_yaml(TINY_CONFIG)["model"] | {"refiner_blocks": 1, "refiner_channels": 8}
    VideoTokenizer(**model, refiner_norm=False).save_pretrained(tmp_path / "base")
    config = tiny_config(tmp_path / "ft", 1, trainable="decoder", init_from=str(tmp_path / "base"))
    config["model"].update(refiner_blocks=1, refiner_channels=8)
    with pytest.raises(ValueError, match=r"^train.init_from: .* lacks 2 tensor\(s\) .*refiner.norm_out"):
        train(config, progress=False)
    config["model"]["refiner_norm"] = False
    assert (train(config, progress=False) / "config.json").is_file()
    with pytest.raises(ValueError, match="^train.init_from: .*nope is not a tokenizer folder"):
        train(tiny_config(tmp_path / "bad", 1, init_from=str(tmp_path / "nope")), progress=False)


def test_edge_weights_mark_one_pixel_either_side_of_an_edge():
    video = -torch.ones(1, 3, 2, 8, 16)
    video[..., 10:] = 1.0  # a full-range step between columns 9 and 10, in every frame
    w = edge_weights(video, 4.0)
    assert w.shape == (1, 1, 2, 8, 16)
    assert torch.equal(w[..., 8:12], torch.full_like(w[..., 8:12], 5.0))  # the step's two pixels, dilated by 1
    assert torch.equal(w[..., :8], torch.ones_like(w[..., :8])) and torch.equal(w[..., 12:], torch.ones_like(w[..., 12:]))
    assert torch.equal(edge_weights(torch.zeros(1, 3, 1, 8, 8), 4.0), torch.ones(1, 1, 1, 8, 8))


def test_edge_weighted_loss_counts_errors_at_edges_more(tmp_path):
    video = -torch.ones(1, 3, 1, 8, 16)
    video[..., 10:] = 1.0
    at_edge, in_flat = video.clone(), video.clone()
    at_edge[..., 3, 10] += 0.5
    in_flat[..., 3, 2] += 0.5
    plain = reconstruction_loss(at_edge, video, 1.0, 0.0)
    assert plain == pytest.approx(float(F.mse_loss(at_edge, video) + F.l1_loss(at_edge, video)))
    assert plain == pytest.approx(float(reconstruction_loss(in_flat, video, 1.0, 0.0)))
    assert reconstruction_loss(at_edge, video, 1.0, 4.0) > 2 * reconstruction_loss(in_flat, video, 1.0, 4.0)
    with pytest.raises(ValueError, match="train.edge_weight"):
        train(tiny_config(tmp_path, 1, edge_weight=-1.0), progress=False)


def test_object_weights_mark_pixels_away_from_the_frame_background(tmp_path):
    video = -torch.ones(2, 3, 2, 8, 8)  # black background
    video[0, 0, :, 2:4, 2:4] = 1.0  # a red square in clip 0
    video[1] = 1.0  # clip 1: white background with a half-range grey object
    video[1, :, 1, 5:7, 0:3] = 0.0
    w = object_weights(video, 4.0)
    assert w.shape == (2, 1, 2, 8, 8)
    expected = torch.ones_like(w)
    expected[0, :, :, 2:4, 2:4] = 5.0
    expected[1, :, 1, 5:7, 0:3] = 3.0
    assert torch.equal(w, expected)
    at_object, on_background = video.clone(), video.clone()
    at_object[0, 1, 0, 2, 2] += 0.5
    on_background[0, 1, 0, 6, 6] += 0.5
    assert reconstruction_loss(at_object, video, 1.0, 0.0) == pytest.approx(
        float(reconstruction_loss(on_background, video, 1.0, 0.0)))
    assert reconstruction_loss(at_object, video, 1.0, 0.0, 4.0) == pytest.approx(
        5 * float(reconstruction_loss(on_background, video, 1.0, 0.0, 4.0)))
    with pytest.raises(ValueError, match="train.preview_grad: trains the encoder"):
        train(tiny_config(tmp_path, 1, preview_grad=True, trainable="decoder", init_from=str(tmp_path)),
              progress=False)
    with pytest.raises(ValueError, match="train.object_weight"):
        train(tiny_config(tmp_path, 1, object_weight=-1.0), progress=False)


def test_object_weight_per_clip_equals_each_clip_weighted_alone(tmp_path):
    gen = torch.Generator().manual_seed(0)
    video = -torch.ones(2, 3, 2, 8, 8)
    video[:, 0, :, 2:4, 2:4] = 1.0  # a red square on black in both clips
    rec = video + 0.3 * torch.randn(video.shape, generator=gen)
    both = reconstruction_loss(rec, video, 1.0, 0.0, torch.tensor([4.0, 30.0]))
    alone = [reconstruction_loss(rec[i:i + 1], video[i:i + 1], 1.0, 0.0, w) for i, w in ((0, 4.0), (1, 30.0))]
    assert both == pytest.approx(float(sum(alone) / 2))
    assert alone[0] != pytest.approx(float(alone[1]))  # the strengths do weigh the clips differently
    with pytest.raises(ValueError, match="train.preview_object_weight"):
        train(tiny_config(tmp_path, 1, preview_object_weight=-1.0), progress=False)
    with pytest.raises(ValueError, match="train.soft_preview_prob: needs train.preview_grad"):
        train(tiny_config(tmp_path, 1, soft_preview_prob=0.5), progress=False)


def test_context_lr_scale_speeds_only_the_zero_started_modules(tmp_path):
    def config(out, scale):
        c = tiny_config(out, 1, context_lr_scale=scale)
        c["model"].update(global_context=True, positions=True)
        return c

    torch.manual_seed(config(tmp_path, 1.0)["train"].get("seed", 0))  # the trainer's initial weights
    start = VideoTokenizer(**config(tmp_path, 1.0)["model"]).state_dict()
    plain, fast = (weights(train(config(tmp_path / name, scale), progress=False)) for name, scale in (("a", 1.0),
                                                                                                      ("b", 10.0)))
    fresh = [k for k in plain if k.split(":")[1].startswith(("encoder.context.", "position_map."))]
    assert len(fresh) == 8  # the context's projection (weight, bias); the position map's convs (proj, key, basis, mix)
    moving = set()
    for key in plain:
        if key in fresh:  # one AdamW step of the same gradient at ten times the rate: ten times the move
            init = start[key.split(":")[1]]
            torch.testing.assert_close(fast[key] - init, 10 * (plain[key] - init), rtol=1e-3, atol=1e-9)
            if (plain[key] - init).abs().max() > 0:
                moving.add(key.split(":")[1])
        else:
            assert torch.equal(fast[key], plain[key]), key
    # the zero-started output convs move at once (key and basis only once mix is no longer zero)
    assert {"encoder.context.proj.weight", "position_map.proj.weight", "position_map.mix.weight"} <= moving
    with pytest.raises(ValueError, match="train.context_lr_scale: scales the learning rate"):
        train(tiny_config(tmp_path / "c", 1, context_lr_scale=10.0), progress=False)
    with pytest.raises(ValueError, match="train.context_lr_scale"):
        train(tiny_config(tmp_path / "d", 1, context_lr_scale=0.0), progress=False)


def test_truncation_draws_coarse_prefixes_at_the_given_rate():
    from omniar.train.tokenizer import truncation

    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(truncation(64, 4, 0.0, g()), torch.full((64,), 3))
    all_cut = truncation(4000, 4, 1.0, g())
    assert all_cut.max() == 2 and set(all_cut.tolist()) == {0, 1, 2}
    some = truncation(4000, 4, 0.25, g())
    assert 0.2 < (some < 3).float().mean() < 0.3
    assert torch.equal(some, truncation(4000, 4, 0.25, g()))  # seeded: a resumed step draws the same


def test_fold_time_run_with_truncation_resumes_exactly(tmp_path):
    def config(out):
        c = tiny_config(out, 6, save_every=3, truncate_prob=0.5, preview_grad=True, object_weight=4.0,
                        preview_object_weight=20.0, soft_preview_prob=0.5)
        c["model"]["fold_time"] = True
        return c

    straight = weights(train(config(tmp_path / "a"), progress=False))
    train(config(tmp_path / "b"), progress=False, stop_at=3)
    assert_bitwise_equal(straight, weights(train(config(tmp_path / "b"), progress=False)))
