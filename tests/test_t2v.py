"""TextToVideoPipeline: determinism, save/load, image path, continuation, CFG, elastic, errors, tiny train->generate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _train_helpers import ROOT, tiny_ar_config
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from omniar.backbone import OmniARConfig, OmniARModel
from omniar.backbone.layout import scale_offsets
from omniar.data.shapes import MovingShapes
from omniar.generation import TextToVideoPipeline
from omniar.generation.pipeline import DECODE_CHUNK_FRAMES, convert_frames
from omniar.pixels import to_uint8
from omniar.tokenizers import VideoTokenizer, causal3d
from omniar.tokenizers.text import TextTokenizer

PROMPT = "a red circle moves right on a black background"
TOK = dict(channels=(8, 16, 16), latent_channels=8, temporal_compression=4, spatial_compression=4,
           scales=(1, 2, 4, 8), codebook_size=32)


def tiny_pipeline(seed=0):
    torch.manual_seed(seed)
    tok = VideoTokenizer(**TOK)
    text = TextTokenizer()
    model = OmniARModel.from_config_obj(OmniARConfig(
        text_vocab_size=text.vocab_size, codebook_size=32, code_dim=8, scales=(1, 2, 4, 8), hidden_size=32,
        num_layers=2, num_heads=2, num_kv_heads=1, num_experts=4, top_k=2, expert_hidden_size=16,
        init_std=0.3))  # large weights: the prompt visibly changes the random model's output
    return TextToVideoPipeline(tok, text, model, max_text_len=64, max_num_frames=17)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def test_output_shape_and_seed_determinism(pipe):
    a = pipe(PROMPT, num_frames=9, seed=1)
    b = pipe(PROMPT, num_frames=9, seed=1)
    c = pipe(PROMPT, num_frames=9, seed=2)
    assert a.frames.shape == (1, 9, 32, 32, 3) and a.frames.dtype == np.uint8
    assert np.array_equal(a.frames, b.frames)
    assert not np.array_equal(a.frames, c.frames)
    # one forward for the prompt, then one per (frame, scale): next-scale prediction
    assert a.timings["forward_passes"] == 1 + 3 * 4


def test_generation_samples_a_scale_with_its_own_codes_only_from_them():
    """With ``coarse_codes`` the first scale has 4 codes: the model's logits over the other 28 are masked."""
    torch.manual_seed(0)
    tok = VideoTokenizer(**TOK, global_context=True, coarse_codes=4)
    full = tiny_pipeline()
    pipe = TextToVideoPipeline(tok, full.text_tokenizer, full.model, max_text_len=64, max_num_frames=17)
    codes = pipe([PROMPT] * 4, num_frames=9, temperature=2.0, seed=0).codes
    assert int(codes.codes[0].max()) < 4
    assert int(codes.codes[1].max()) >= 4  # finer scales draw from all 32 (flat, hot logits)
    unmasked = full([PROMPT] * 4, num_frames=9, temperature=2.0, seed=0).codes
    assert int(unmasked.codes[0].max()) >= 4  # the same model without the mask does draw them


def test_image_path(pipe):
    out = pipe([PROMPT, "a blue square moves up on a white background"], num_frames=1, seed=0)
    assert out.frames.shape == (2, 1, 32, 32, 3)
    assert out.codes.num_latent_frames == 1


def test_save_load_roundtrip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    assert {p.name for p in (tmp_path / "p").iterdir()} == {"model_index.json", "video_tokenizer",
                                                            "text_tokenizer", "model"}
    loaded = TextToVideoPipeline.from_pretrained(tmp_path / "p")
    assert np.array_equal(pipe(PROMPT, num_frames=5, seed=3).frames, loaded(PROMPT, num_frames=5, seed=3).frames)


def test_continuation_keeps_given_frames(pipe):
    video = MovingShapes("all", 1, 32, 5, seed=0)[0]["video"][None]
    out = pipe(PROMPT, num_frames=9, video=video, seed=0)
    given = to_uint8(video).permute(0, 2, 3, 4, 1).numpy()
    assert out.frames.shape[1] == 9
    assert np.array_equal(out.frames[:, :5], given)
    assert out.timings["tokens"] == 1 * (3 - 2) * 85  # only the last latent frame is sampled


def test_cfg_changes_output(pipe):
    off = pipe(PROMPT, num_frames=5, guidance_scale=1.0, seed=0)
    on = pipe(PROMPT, num_frames=5, guidance_scale=5.0, seed=0)
    assert not np.array_equal(off.frames, on.frames)
    # guidance 0 is the unconditional branch alone: the prompt no longer matters
    other = "a green triangle moves up on a white background"
    assert np.array_equal(pipe(PROMPT, num_frames=5, guidance_scale=0.0, seed=0).frames,
                          pipe(other, num_frames=5, guidance_scale=0.0, seed=0).frames)
    assert not np.array_equal(pipe(PROMPT, num_frames=5, guidance_scale=1.0, seed=0).frames,
                              pipe(other, num_frames=5, guidance_scale=1.0, seed=0).frames)


def test_elastic_submodel_and_callback(pipe):
    seen = []
    out = pipe(PROMPT, num_frames=5, seed=0, elastic={"depth": 1}, callback=lambda d: seen.append(
        (d["frame"], d["scale"], tuple(d["codes"].shape))))
    assert seen == [(f, s, (1, n, n)) for f in range(2) for s, n in enumerate((1, 2, 4, 8))]
    full = pipe(PROMPT, num_frames=5, seed=0)
    assert not np.array_equal(out.frames, full.frames)


@torch.no_grad()
def cfg_call_matching_the_full_forward(pipe, prompts, num_frames, monkeypatch):
    """A CFG call (guidance 3, seed 0) whose every step (cond and null-prompt rows) is checked: its inputs are the
    tokenizer's teacher-forcing inputs for the sampled codes (one step rule for generation and training), its
    logits those of the teacher-forced full pass over the same inputs. Returns the output and the (frame, scale)
    of each step."""
    steps, forward_scale = [], pipe.model.forward_scale

    def record(inputs, frame, scale, cache, *args, **kwargs):
        logits = forward_scale(inputs, frame, scale, cache, *args, **kwargs)
        steps.append((frame, scale, inputs.clone(), logits.clone()))
        return logits

    monkeypatch.setattr(pipe.model, "forward_scale", record)
    out = pipe(prompts, num_frames=num_frames, guidance_scale=3.0, seed=0)
    tok, b = pipe.video_tokenizer, len(prompts)
    teacher = tok.codes_to_accumulated(out.codes)
    for f, s, inputs, _ in steps:
        assert torch.allclose(inputs[:b], teacher[s][:, f], atol=1e-6) and torch.equal(inputs[:b], inputs[b:]), (f, s)
    ids, mask = pipe.text_tokenizer.batch_encode(prompts + [None] * b, pipe.max_text_len)
    vis = [torch.stack([x for _, s2, x, _ in steps if s2 == s], dim=1) for s in range(len(tok.scales))]
    full = pipe.model(ids, mask, vis).visual_logits
    offsets = scale_offsets(tok.scales) + [tok.tokens_per_frame]
    for f, s, _, logits in steps:
        assert (logits - full[:, f, offsets[s]:offsets[s + 1]]).abs().max() < 1e-4, (f, s)
    return out, [(f, s) for f, s, _, _ in steps]


def test_cached_steps_equal_the_full_forward_with_cfg_across_frames(pipe, monkeypatch):
    """Every step of a CFG call over 3 latent frames gives the logits of the teacher-forced full pass: the
    preallocated cache attends exactly like it."""
    prompts = [PROMPT, "a blue square moves up on a white background"]
    _, steps = cfg_call_matching_the_full_forward(pipe, prompts, 9, monkeypatch)
    assert steps == [(f, s) for f in range(3) for s in range(len(pipe.video_tokenizer.scales))]


@pytest.mark.parametrize("kwargs, name", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": "x" * 10_000}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"num_frames": 4}, "num_frames"),
    ({"num_frames": 21}, "num_frames"),
    ({"num_frames": 0}, "num_frames"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"temperature": float("nan")}, "temperature"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"elastic": {"depth": 9}}, r"elastic\['depth'\]"),
    ({"elastic": {"top_k": 99}}, r"elastic\['top_k'\]: must be <= num_experts=4"),  # not the sampling top_k
    ({"elastic": {"num_experts": 1}}, r"elastic\['num_experts'\]: must be >= the model's top_k=2"),
    ({"elastic": {"width": 2}}, "elastic"),
    ({"prompt": "a\ud800b"}, "^prompt: is not valid text"),  # a lone surrogate cannot be encoded
    ({"prompt": [PROMPT, "a\udcffb"]}, "^prompt: is not valid text"),
    ({"callback": 5}, "^callback: must be callable"),
])
def test_bad_arguments_name_the_argument(pipe, kwargs, name):
    args = {"prompt": PROMPT, **kwargs}
    with pytest.raises(ValueError, match=name):
        pipe(args.pop("prompt"), **args)


def test_limits_refuse_before_any_work(pipe, monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("work started before the limits were checked")

    monkeypatch.setattr(pipe.model, "new_cache", no_work)
    monkeypatch.setattr(pipe.video_tokenizer, "encode", no_work)
    too_many = [PROMPT] * (pipe.max_batch_size + 1)
    with pytest.raises(ValueError, match=f"prompt: {len(too_many)} prompts exceed .*max_batch_size=16"):
        pipe(too_many)
    with pytest.raises(ValueError, match=f"num_frames: must be <= {pipe.max_num_frames}"):
        pipe(PROMPT, num_frames=pipe.max_num_frames + 4)
    with pytest.raises(ValueError, match="prompt: must be at most 1000 characters"):
        pipe("x" * 10_000)
    big = torch.zeros(1, 3, 5, 128, 128)
    with pytest.raises(ValueError, match="video"):
        pipe(PROMPT, video=big)
    with pytest.raises(ValueError, match=r"elastic\['top_k'\]"):
        pipe(PROMPT, num_frames=9, video=torch.zeros(1, 3, 5, 32, 32), elastic={"top_k": 99})


def test_seed_none_leaves_the_global_rng_alone(pipe):
    torch.manual_seed(123)
    want = torch.rand(4)
    torch.manual_seed(123)
    pipe(PROMPT, num_frames=1, seed=None)
    assert torch.equal(torch.rand(4), want)


def test_prompt_too_long_for_model(pipe):
    with pytest.raises(ValueError, match="prompt"):
        pipe("y" * 200)  # under the character limit, over the model's 64 text positions


def test_tiny_train_then_generate(tmp_path):
    from omniar.train.ar import train

    tiny_pipeline().video_tokenizer.save_pretrained(tmp_path / "tok")
    config = tiny_ar_config(tmp_path, 64, out_dir=str(tmp_path / "run"), steps=30, log_every=5, save_every=15)
    final = train(config, progress=False)
    pipe = TextToVideoPipeline.from_pretrained(final)
    out = pipe(PROMPT, num_frames=9, seed=0)
    assert out.frames.shape == (1, 9, 32, 32, 3)


def test_ar_training_starts_from_init_from(tmp_path):
    """train.init_from: the run starts at the given pipeline's weights (a near-zero learning rate keeps
    them; ignored, the run would sit at its fresh initialisation); another architecture is refused."""
    from omniar.train.ar import train

    tiny_pipeline().video_tokenizer.save_pretrained(tmp_path / "tok")

    def run(name, steps, **train_overrides):
        return tiny_ar_config(tmp_path, 16, out_dir=str(tmp_path / name), steps=steps, micro_batch_size=4,
                              **train_overrides)

    def params(final):  # parameters only: the router's balancing biases move whatever the learning rate
        return dict(OmniARModel.from_pretrained(final / "model").named_parameters())

    base = train(run("base", 3), progress=False)
    tuned = train(run("tuned", 1, init_from=str(base), lr=1e-9, warmup_steps=0), progress=False)
    want, got = params(base), params(tuned)
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)

    with pytest.raises(ValueError, match="train.init_from: .* is not a pipeline folder"):
        train(run("bad", 1, init_from=str(tmp_path / "tok")), progress=False)
    other = run("wide", 1, init_from=str(base))
    other["model"]["hidden_size"] = 32
    with pytest.raises(ValueError, match="train.init_from: .*has shape"):
        train(other, progress=False)


def test_init_from_a_model_before_its_tokenizer_repeated_the_latent_grid(tmp_path):
    """A tokenizer that gained a repeat of its latent grid (same weights, one scale more): a model trained on the
    old schedule starts the new run as it was, the added scale's embedding a copy of the grid's."""
    import shutil

    from omniar.train.ar import train

    tok = tiny_pipeline().video_tokenizer
    tok.save_pretrained(tmp_path / "tok")
    base = train(tiny_ar_config(tmp_path, 16, out_dir=str(tmp_path / "base"), steps=2, micro_batch_size=4),
                 progress=False)
    shutil.copytree(tmp_path / "tok", tmp_path / "tok2")
    config = json.loads((tmp_path / "tok2" / "config.json").read_text())
    config["scales"] = list(tok.scales) + [tok.scales[-1]]
    (tmp_path / "tok2" / "config.json").write_text(json.dumps(config))
    run = tiny_ar_config(tmp_path, 16, out_dir=str(tmp_path / "grown"), steps=1, micro_batch_size=4,
                         init_from=str(base), lr=1e-9, warmup_steps=0)
    run["train"]["tokenizer"], run["data"]["cache_dir"] = str(tmp_path / "tok2"), str(tmp_path / "codes2")
    want = dict(OmniARModel.from_pretrained(base / "model").named_parameters())
    got = dict(OmniARModel.from_pretrained(train(run, progress=False) / "model").named_parameters())
    assert got.keys() == want.keys()
    for name in want:
        expect = want[name]
        if name == "scale_embed.weight":
            assert got[name].shape[0] == len(tok.scales) + 1
            expect = torch.cat([expect, expect[-1:]])
        assert torch.allclose(got[name], expect, atol=1e-6), name


def test_exit_adapter_training_leaves_the_model_exact(tmp_path):
    """train.trainable=exit_adapters: only the adapters learn (their KL to the full model falls), every other
    tensor, router balancing biases included, stays the init_from model's; the saved pipeline runs them."""
    from omniar.train.ar import train
    from omniar.train.common import load_yaml

    tiny_pipeline().video_tokenizer.save_pretrained(tmp_path / "tok")
    # the base run also trains with context drops beside the Random Frame Mask (per-token and per-frame visibility)
    base = train(tiny_ar_config(tmp_path, 16, out_dir=str(tmp_path / "base"), steps=3, micro_batch_size=4,
                                frame_mask_prob=1.0, context_drop_prob=1.0, context_recent_frames=0), progress=False)
    # every step on the same 16 clips, no random corruption: the logged KL falls only if the adapter learns
    config = tiny_ar_config(tmp_path, 16, out_dir=str(tmp_path / "exit"), steps=8, micro_batch_size=16,
                            log_every=1, warmup_steps=0, init_from=str(base), trainable="exit_adapters",
                            elastic=False, caption_dropout=0.0, cfec_max_rate=0.0, frame_mask_prob=0.0)
    config["model"]["exit_adapter_depths"] = [1]
    final = train(config, progress=False)
    want, got = (OmniARModel.from_pretrained(f / "model").state_dict() for f in (base, final))
    assert set(got) - set(want) == {k for k in got if k.startswith("exit_adapters.1.")}
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert got["exit_adapters.1.down.weight"].abs().sum() > 0
    acc = EventAccumulator(str(tmp_path / "exit" / "tb"), size_guidance={"scalars": 0})
    kl = [event.value for event in acc.Reload().Scalars("exit_kl/1")]
    assert len(kl) == 8 and kl[-1] < 0.9 * kl[0]
    pipe = TextToVideoPipeline.from_pretrained(final)
    assert pipe.model.omniar_config.exit_adapter_depths == (1,)
    # an exit block that attends (model.exit_adapter_attention) trains the same way and generates
    config["train"]["out_dir"] = str(tmp_path / "block")
    config["model"]["exit_adapter_attention"] = True
    block = train(config, progress=False)
    got = OmniARModel.from_pretrained(block / "model").state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert min(got[f"exit_adapters.1.{k}.weight"].abs().sum() for k in ("attn.o_proj", "ffn.w_out")) > 0
    acc = EventAccumulator(str(tmp_path / "block" / "tb"), size_guidance={"scalars": 0})
    kl = [event.value for event in acc.Reload().Scalars("exit_kl/1")]
    assert kl[-1] < 0.9 * kl[0]
    frames = TextToVideoPipeline.from_pretrained(block)(PROMPT, num_frames=5, elastic={"depth": 1}, seed=0).frames
    assert frames.shape[:2] == (1, 5)

    config["train"]["out_dir"] = str(tmp_path / "bad")
    config["model"]["exit_adapter_attention"] = False
    config["model"]["exit_adapter_depths"] = [2]  # the full depth: the adapter would change the full model
    with pytest.raises(ValueError, match="model.exit_adapter_depths: must name depths below num_layers=2"):
        train(config, progress=False)
    with pytest.raises(ValueError, match="train.trainable: exit_adapters needs train.init_from"):
        train(load_yaml(ROOT / "configs" / "ar_tiny.yaml") | {"train": {"trainable": "exit_adapters"}},
              progress=False)


@pytest.mark.parametrize("clips, calls", [(1, [(1, DECODE_CHUNK_FRAMES)] * 5),
                                          (4, [(4, DECODE_CHUNK_FRAMES), (1, DECODE_CHUNK_FRAMES)])])
def test_pipeline_decodes_decode_batch_size_clips_and_chunks_of_latent_frames(pipe, monkeypatch, clips, calls):
    seen, decode = [], pipe.video_tokenizer.decode_latent
    monkeypatch.setattr(pipe.video_tokenizer, "decode_latent", lambda latent, chunk_size=None, dtype=None: (
        seen.append((latent.shape[0], chunk_size)), decode(latent, chunk_size, dtype))[1])
    monkeypatch.setattr(pipe, "decode_batch_size", clips)
    monkeypatch.setattr(pipe, "_decode_dtype", torch.float32)  # batched = per clip up to fp32 conv blocking
    out = pipe([PROMPT] * 5, num_frames=9, seed=0)
    assert seen == calls
    assert out.frames.shape == (5, 9, 32, 32, 3)
    monkeypatch.undo()
    alone = np.concatenate([convert_frames(pipe.video_tokenizer.decode(clip, chunk_size=1), "uint8")
                            for clip in out.codes.split()])
    assert np.abs(alone.astype(np.int16) - out.frames).max() <= 1  # equal up to conv blocking
    for bad in (0, 65, 2.0):  # 65: over omniar.limits.MAX_BATCH_SIZE
        with pytest.raises(ValueError, match="decode_batch_size"):
            pipe.decode_batch_size = bad


def test_decode_dtype_bf16_keeps_codes_and_stays_close():
    """``decode_dtype=bf16`` (the CPU default) decodes under bf16 autocast: the codes are the fp32 call's
    exactly (generation keeps the fp32 tokenizer), the frames within 3 % of the uint8 range on average and
    10 % at worst (a random tiny tokenizer; the shipped one: the next test)."""
    pipe = tiny_pipeline()
    assert pipe.decode_dtype == torch.bfloat16
    want = pipe.to(decode_dtype=torch.float32)([PROMPT] * 2, num_frames=9, seed=0)
    got = pipe.to(decode_dtype=torch.bfloat16)([PROMPT] * 2, num_frames=9, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(want.codes.codes, got.codes.codes))
    diff = np.abs(want.frames.astype(np.int16) - got.frames.astype(np.int16))
    assert diff.mean() < 0.03 * 255 and diff.max() < 0.1 * 255, (diff.mean(), diff.max())
    assert not np.array_equal(want.frames, got.frames)  # the decoder really ran in bf16
    assert next(pipe.video_tokenizer.parameters()).dtype == torch.float32
    back = pipe.to(decode_dtype=torch.float32)([PROMPT] * 2, num_frames=9, seed=0)
    assert np.array_equal(back.frames, want.frames)
    for bad in ("bf16", torch.int8, torch.float64):
        with pytest.raises(ValueError, match="decode_dtype"):
            pipe.to(decode_dtype=bad)


def test_shipped_bf16_decode_within_40_db_of_fp32():
    """The shipped pipeline's default (bf16) decode: codes identical to the fp32 call's, frames at PSNR >= 40 dB
    from the fp32 frames (measured about 64 dB; the tokenizer's own reconstruction error is about 30 dB)."""
    pipe = TextToVideoPipeline.from_pretrained()
    got = pipe([PROMPT] * 2, num_frames=9, seed=0)
    want = pipe.to(decode_dtype=torch.float32)([PROMPT] * 2, num_frames=9, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(want.codes.codes, got.codes.codes))
    mse = ((want.frames.astype(np.float64) - got.frames) ** 2).mean()
    assert 10 * np.log10(255 ** 2 / max(mse, 1e-12)) >= 40, mse
    assert mse > 0  # the default really decoded in bf16


@pytest.mark.skipif(causal3d._kernels() is None, reason="no C compiler or no AVX-512 BF16")
def test_shipped_bf16_decode_with_the_decoders_kernels_is_as_near_fp32_as_torchs(monkeypatch):
    """The decoder's C kernels (GroupNorm + SiLU in one pass, Winograd convs) keep the shipped tokenizer's bf16
    decode within 1 dB (PSNR against the fp32 decode) of torch's bf16 ops on the same codes."""
    pipe = TextToVideoPipeline.from_pretrained()
    tok = pipe.video_tokenizer
    codes = pipe([PROMPT] * 2, num_frames=9, seed=0).codes
    fp32 = tok.decode(codes)
    kernels = tok.decode(codes, dtype=torch.bfloat16)
    monkeypatch.setattr(causal3d, "_kernels", lambda: None)
    torchs = tok.decode(codes, dtype=torch.bfloat16)
    psnr = lambda v: float(10 * torch.log10(4 / (v - fp32).square().mean()))  # noqa: E731 (frames in [-1, 1])
    assert psnr(kernels) >= psnr(torchs) - 1, (psnr(kernels), psnr(torchs))


def test_tokenizer_decode_dtype():
    """``VideoTokenizer.decode(dtype=)``: bf16 computes under autocast and hands back the latent's fp32 frames;
    the tokenizer's own dtype is the plain decode, bit for bit; other dtypes are refused, naming dtype."""
    pipe = tiny_pipeline()
    tok, codes = pipe.video_tokenizer, pipe([PROMPT], num_frames=5, seed=0).codes
    plain = tok.decode(codes, chunk_size=1)
    assert torch.equal(tok.decode(codes, chunk_size=1, dtype=torch.float32), plain)
    low = tok.decode(codes, chunk_size=1, dtype=torch.bfloat16)
    assert low.dtype == torch.float32 and not torch.equal(low, plain) and (low - plain).abs().max() < 0.1
    for bad in (torch.float64, "bf16"):
        with pytest.raises(ValueError, match="dtype"):
            tok.decode(codes, dtype=bad)


def test_bf16_decode_follows_the_tokenizers_live_weights():
    """No stale copy: after the tokenizer's weights change, the default bf16 decode shows the change (the
    fp32 and bf16 frames of the changed tokenizer stay close, and differ from the unchanged one's)."""
    pipe = tiny_pipeline()
    before = pipe([PROMPT], num_frames=5, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():  # in place, as an optimizer step or load_state_dict changes them
        for p in pipe.video_tokenizer.decoder.parameters():
            p.add_(0.1 * torch.randn_like(p))
    after = pipe([PROMPT], num_frames=5, seed=0)
    exact = pipe.to(decode_dtype=torch.float32)([PROMPT], num_frames=5, seed=0)
    assert all(torch.equal(a, b) for a, b in zip(before.codes.codes, after.codes.codes))
    moved = np.abs(after.frames.astype(np.int16) - before.frames).mean()
    off = np.abs(after.frames.astype(np.int16) - exact.frames).mean()
    assert off < 0.03 * 255 and moved > 4 * off, (moved, off)


@pytest.mark.parametrize("extra", [{}, dict(fold_time=True, refiner_blocks=1, refiner_channels=8)],
                         ids=["3d", "fold-time+refiner"])
def test_kept_bf16_weight_cast_equals_autocasts_own(monkeypatch, extra):
    """The decoder's and refiner's 3D and 2D convs keep their bf16 channels-last weight between decodes (autocast
    would recast it in every call; the convs after an upsampling keep their transposed weight instead) and recast it
    only when the weight changes: frames equal autocast's own cast, bit for bit, before and after an in-place change
    and a load_state_dict."""
    from omniar.tokenizers.causal3d import _KeptCastConv

    torch.manual_seed(0)
    tok = VideoTokenizer(**TOK, **extra).eval()
    codes = tok.encode(torch.rand(1, 3, 5, 32, 32) * 2 - 1)
    nets = [tok.decoder] + ([tok.refiner] if extra else [])
    convs = [m for net in nets for m in net.modules() if isinstance(m, _KeptCastConv)]
    kinds = {type(c).__name__ for c in convs}
    assert kinds == ({"Conv3d", "Conv2d"} if extra else {"Conv3d"}), kinds
    if extra:  # the zero-initialised refiner output would hide its convs
        torch.nn.init.normal_(tok.refiner.conv_out.weight, std=0.1)

    def both():
        kept = tok.decode(codes, chunk_size=1, dtype=torch.bfloat16)
        with monkeypatch.context() as m:
            m.setattr(_KeptCastConv, "_cast_weight", lambda self: self.weight)  # autocast casts it, as before
            own = tok.decode(codes, chunk_size=1, dtype=torch.bfloat16)
        assert torch.equal(kept, own)
        return kept

    def kept(conv):
        return conv.__dict__.get("_cast", conv.__dict__.get("_transposed"))

    first = both()
    casts = [kept(c) for c in convs]
    assert all(w is not None for w in casts)
    assert torch.equal(both(), first) and all(kept(c) is w for c, w in zip(convs, casts))  # not recast
    with torch.no_grad():
        convs[-1].weight.mul_(1.5)
    changed = both()
    assert not torch.equal(changed, first) and convs[-1]._cast is not casts[-1] and convs[0]._cast is casts[0]
    tok.load_state_dict({k: v * 0.5 if k.endswith("weight") else v for k, v in tok.state_dict().items()})
    assert not torch.equal(both(), changed)


def _memory_worker(kind: str, batch: int) -> dict:
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "generation_memory.py"
    out = subprocess.run([sys.executable, str(script), "--worker", kind, str(batch), "1"], check=True,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_decoding_clip_by_clip_keeps_tensor_memory_flat_in_batch_size():
    """Default model, 16 clips (max_batch_size): decoded one at a time they need about what one clip
    needs, while the one-shot decode of the same codes grows with the batch (so the meter can tell).
    Live tensor bytes, not RSS: RSS also counts what the machine's allocator keeps."""
    one = _memory_worker("decode_chunked", 1)["tensor_mib"]
    chunked = _memory_worker("decode_chunked", 16)["tensor_mib"]
    one_shot = _memory_worker("decode_one_shot", 16)["tensor_mib"]
    assert chunked < 1.25 * one, (one, chunked)
    assert one_shot > 2 * chunked, (one_shot, chunked)
