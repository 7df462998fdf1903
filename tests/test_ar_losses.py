"""AR training losses: per-scale weighting of visual terms, the elastic sub-model's in-place distillation and
the fine-tuning anchor to the init_from model, context drops; config errors name the key."""

import pytest
import torch
import torch.nn.functional as F

from omniar.backbone.model import OmniAROutput
from omniar.train.ar import ARDataConfig, ARTrainConfig, distill_loss, random_context_drops, visual_mean

SCALES = (1, 2, 4)  # 21 tokens per frame


def output(visual_logits):
    return OmniAROutput(torch.zeros(1, 1, 1), None, visual_logits, torch.zeros(()), [])


def test_scale_weighting_counts_each_scale_equally_and_token_weighting_each_token():
    loss = torch.zeros(2, 3, 21)
    loss[..., 0] = 1.0  # only the one scale-0 token of each frame is wrong
    assert visual_mean(loss, SCALES, ARTrainConfig(scale_weighting="scale")).item() == pytest.approx(1 / 3)
    assert visual_mean(loss, SCALES, ARTrainConfig(scale_weighting="token")).item() == pytest.approx(1 / 21)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_distillation_is_the_kl_between_the_sub_model_and_the_detached_full_model(reverse):
    torch.manual_seed(0)
    full = torch.randn(2, 3, 21, 16, requires_grad=True)
    sub = torch.randn(2, 3, 21, 16, requires_grad=True)
    cfg = ARTrainConfig(scale_weighting="token")
    assert distill_loss(output(full), output(full), SCALES, cfg, reverse).item() == pytest.approx(0.0, abs=1e-6)
    kl = distill_loss(output(sub), output(full), SCALES, cfg, reverse)
    log_full, log_sub = F.log_softmax(full, -1).flatten(0, 2), F.log_softmax(sub, -1).flatten(0, 2)
    # F.kl_div(input, target) is KL(target || input): forward KL(full || sub), reverse KL(sub || full)
    expected = F.kl_div(*((log_full, log_sub) if reverse else (log_sub, log_full)), log_target=True,
                        reduction="batchmean")
    assert kl.item() == pytest.approx(expected.item(), rel=1e-5) and kl.item() > 0.1
    other = distill_loss(output(sub), output(full), SCALES, cfg, not reverse)
    assert kl.item() != pytest.approx(other.item(), rel=1e-2)  # the two directions differ
    kl.backward()
    assert full.grad is None and sub.grad.abs().sum() > 0  # only the sub-model learns from it


def test_exit_kl_is_checked():
    with pytest.raises(ValueError, match="train.exit_kl"):
        ARTrainConfig(exit_kl="both", trainable="exit_adapters", init_from="x")
    with pytest.raises(ValueError, match="train.exit_kl.*exit_adapters"):
        ARTrainConfig(exit_kl="reverse")


def test_negative_distillation_weight_is_refused():
    with pytest.raises(ValueError, match="train.elastic_distill"):
        ARTrainConfig(elastic_distill=-0.5, elastic=True)


def test_elastic_is_a_bool_and_distillation_needs_it():
    with pytest.raises(ValueError, match="^train.elastic: must be true or false, got 'flase'"):
        ARTrainConfig(elastic="flase")
    with pytest.raises(ValueError, match="^train.elastic_distill: needs train.elastic"):
        ARTrainConfig(elastic_distill=1.0)


@pytest.mark.parametrize("field", ["num_frames", "max_num_frames"])
def test_frame_counts_are_checked_up_front(field):
    with pytest.raises(ValueError, match=f"^data.{field}: must be >= 1"):
        ARDataConfig(**{field: 0})


@pytest.mark.parametrize("change, message", [
    ({"trian": {"lr": 5}}, r"^config: unknown keys \['trian'\]"),
    ({"model": {"num_layer": 12}}, r"^model: unknown keys \['num_layer'\]"),
    ({"model": {"codebook_size": 8}}, r"^model: \['codebook_size'\] are set from train.tokenizer"),
    ({"train": {"tokenizer": "no-such-tokenizer"}}, r"^train.tokenizer: must be a tokenizer folder or one of"),
    ({"data": {"num_frames": 10}}, r"^data.num_frames: must be 1 \+ 4 \* k"),
    ({"train": {"steps": 2}, "stop_at": 0}, r"^stop_at: must be >= 1"),
])
def test_config_errors_name_the_key_before_training(tmp_path, change, message):
    from _train_helpers import tiny_ar_config

    from omniar.train.ar import train

    config = tiny_ar_config(tmp_path, 8, out_dir=str(tmp_path / "run"))
    config["train"]["tokenizer"] = "shapes-tokenizer"
    stop_at = change.pop("stop_at", None)
    for section, values in change.items():
        config.setdefault(section, {}).update(values)
    with pytest.raises(ValueError, match=message):
        train(config, progress=False, stop_at=stop_at)
    assert not (tmp_path / "run").exists()


def test_distillation_weight_changes_training(tmp_path):
    from _train_helpers import tiny_ar_config
    from test_t2v import tiny_pipeline

    from omniar.backbone import OmniARModel
    from omniar.train.ar import train

    tiny_pipeline().video_tokenizer.save_pretrained(tmp_path / "tok")

    def run(name, distill):
        config = tiny_ar_config(tmp_path, 8, out_dir=str(tmp_path / name), steps=2, micro_batch_size=4,
                                elastic=True, elastic_distill=distill)
        config["model"]["elastic_depth_prob"] = 0.0  # a 1-layer sub-model in every step
        return dict(OmniARModel.from_pretrained(train(config, progress=False) / "model").named_parameters())

    plain, distilled = run("plain", 0.0), run("distilled", 1.0)
    assert any(not torch.equal(plain[k], distilled[k]) for k in plain)


def test_anchor_weight_needs_init_from_and_a_non_negative_value():
    with pytest.raises(ValueError, match="train.anchor_weight: needs train.init_from"):
        ARTrainConfig(anchor_weight=1.0)
    with pytest.raises(ValueError, match="train.anchor_weight"):
        ARTrainConfig(anchor_weight=-1.0, init_from="runs/base")


def test_anchor_keeps_a_fine_tune_closer_to_its_init_from_model(tmp_path):
    """train.anchor_weight: the KL to the frozen init_from model pulls the full model back, so the same
    fine-tune (same data, seeds, learning rate) ends with code distributions nearer the start's."""
    from _train_helpers import tiny_ar_config
    from test_t2v import tiny_pipeline

    from omniar.backbone import OmniARModel
    from omniar.tokenizers.text import TextTokenizer
    from omniar.train.ar import ARDataConfig, collate, prepare_batch, train
    from omniar.train.common import load_video_tokenizer
    from omniar.train.pretokenize import TokenizedDataset

    tiny_pipeline().video_tokenizer.save_pretrained(tmp_path / "tok")

    def run(name, steps, **train_overrides):
        config = tiny_ar_config(tmp_path, 16, out_dir=str(tmp_path / name), steps=steps, micro_batch_size=4,
                                **train_overrides)
        return OmniARModel.from_pretrained(train(config, progress=False) / "model").eval()

    start = run("base", 2)
    data = TokenizedDataset(tmp_path / "codes")
    text, inputs, _, _ = prepare_batch(collate([data[i] for i in range(16)]),
                                       load_video_tokenizer(str(tmp_path / "tok")), TextTokenizer(),
                                       ARTrainConfig(caption_dropout=0.0), ARDataConfig(),
                                       torch.Generator(), torch.device("cpu"))

    @torch.no_grad()
    def drift(model):
        return distill_loss(model(visual_inputs=inputs, **text), start(visual_inputs=inputs, **text),
                            start.omniar_config.scales, ARTrainConfig()).item()

    tuned = dict(steps=10, init_from=str(tmp_path / "base" / "final"), lr=1e-2, warmup_steps=0)
    plain, anchored = drift(run("plain", **tuned)), drift(run("anchored", **tuned, anchor_weight=100.0))
    assert anchored < 0.5 * plain, (anchored, plain)


def test_context_drops_hide_only_older_tokens_and_keep_one_set_per_sample():
    g = torch.Generator().manual_seed(0)
    per_frame, t = 21, 7
    assert random_context_drops(4, t, per_frame, ARTrainConfig(), g) is None  # off by default
    assert random_context_drops(4, 4, per_frame, ARTrainConfig(context_drop_prob=1.0), g) is None  # nothing older
    key_frame = torch.arange(t).repeat_interleave(per_frame)
    recent = key_frame[None, :] >= torch.arange(t)[:, None] - 3  # (T, T * per_frame): the 3 earlier frames and on
    none_kept = random_context_drops(2, t, per_frame, ARTrainConfig(context_drop_prob=1.0, context_keep_ratio=0.0), g)
    assert torch.equal(none_kept, recent.expand(2, -1, -1))
    vis = random_context_drops(64, t, per_frame, ARTrainConfig(context_drop_prob=1.0, context_keep_ratio=0.3), g)
    assert vis[:, recent].all()
    old = ~recent
    share = vis[:, old].float().mean().item()
    assert 0.25 < share < 0.35
    # a token hidden from one frame is hidden from every later one: frame 6 sees a subset of what frame 5 sees
    assert not (vis[:, 6] & ~vis[:, 5] & old[5]).any()
    assert torch.equal(vis[:, 6, old[5]], vis[:, 5, old[5]])
    half = random_context_drops(400, t, per_frame, ARTrainConfig(context_drop_prob=0.5, context_keep_ratio=0.0), g)
    thinned = (~half).flatten(1).any(1).float().mean().item()
    assert 0.4 < thinned < 0.6


@pytest.mark.parametrize("key, value", [("context_drop_prob", 1.5), ("context_keep_ratio", -0.1),
                                        ("context_recent_frames", -1)])
def test_context_drop_settings_are_checked(key, value):
    with pytest.raises(ValueError, match=f"train.{key}"):
        ARTrainConfig(**{key: value})


def test_short_clips_train_on_exactly_the_codes_of_the_clips_first_frames(tmp_path):
    """train.short_clip_prob: a micro-batch cut to its clips' first frames holds the inputs and targets those
    shorter clips give when tokenized alone (the tokenizer is causal), so one long-clip cache trains both."""
    from _train_helpers import tiny_ar_config
    from test_t2v import tiny_pipeline

    from omniar.data.shapes import MovingShapes
    from omniar.tokenizers.text import TextTokenizer
    from omniar.train.ar import ARDataConfig, prepare_batch, train

    tok = tiny_pipeline().video_tokenizer
    clips = MovingShapes("all", 2, 32, 9, seed=0)
    video = torch.stack([clips[i]["video"] for i in range(2)])

    def batch(frames):
        with torch.no_grad():
            latent = tok.encode_latent(video[:, :, :frames])
            return {"latent": latent, "codes": tok.quantize_latent(latent).codes, "caption": ["a", "b"]}

    def prepared(frames, **cfg):
        return prepare_batch(batch(frames), tok, TextTokenizer(), ARTrainConfig(caption_dropout=0.0, **cfg),
                             ARDataConfig(num_frames=9), torch.Generator().manual_seed(0), torch.device("cpu"))

    _, cut_inputs, cut_targets, _ = prepared(9, short_clip_prob=1.0, short_clip_frames=5)
    _, inputs, targets, _ = prepared(5)
    assert cut_targets.shape == targets.shape == (2, 2, 85) and torch.equal(cut_targets, targets)
    for a, b in zip(cut_inputs, inputs):
        torch.testing.assert_close(a, b)
    assert prepared(9, short_clip_frames=5)[2].shape == (2, 3, 85)  # short_clip_prob 0: the whole clips
    tiny_pipeline().video_tokenizer.save_pretrained(tmp_path / "tok")
    for bad, match in ((9, "must be below data.num_frames=9"), (4, "must be 1 \\+ 4")):
        with pytest.raises(ValueError, match=f"train.short_clip_frames: {match}"):
            train(tiny_ar_config(tmp_path, 4, short_clip_prob=0.5, short_clip_frames=bad), progress=False)
    with pytest.raises(ValueError, match="train.short_clip_prob"):
        ARTrainConfig(short_clip_prob=1.5)
