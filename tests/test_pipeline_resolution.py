"""TextToVideoPipeline at other sizes and aspect ratios (#26): tiny random pipelines at 64x64, 48x80, 128x128 and
96x160 generate clips and images of their size, every KV-cache step equals the teacher-forced full pass, a pair
schedule survives save/load, and a size the pipeline was not built for is refused naming height or width."""

import math

import numpy as np
import pytest
import torch
from test_t2v import cfg_call_matching_the_full_forward

from omniar.backbone import OmniARConfig, OmniARModel
from omniar.generation import TextToVideoPipeline
from omniar.tokenizers import VideoTokenizer
from omniar.tokenizers.text import TextTokenizer

PROMPTS = ["a red circle moves right on a black background", "a blue square moves up on a white background"]
# (height, width): (spatial compression, schedule whose last map is the latent grid)
SIZES = {(64, 64): (8, (1, 2, 4, 8)),
         (48, 80): (8, ((1, 1), (2, 3), (3, 5), (6, 10))),
         (128, 128): (8, (1, 2, 4, 8, 16)),
         (96, 160): (8, ((1, 2), (2, 3), (3, 5), (6, 10), (12, 20)))}


def tiny_pipeline(size) -> TextToVideoPipeline:
    spatial, scales = SIZES[size]
    torch.manual_seed(0)
    tok = VideoTokenizer(channels=(8,) + (16,) * int(math.log2(spatial)), latent_channels=8,
                         temporal_compression=4, spatial_compression=spatial, scales=scales, codebook_size=32)
    text = TextTokenizer()
    model = OmniARModel.from_config_obj(OmniARConfig(
        text_vocab_size=text.vocab_size, codebook_size=32, code_dim=8, scales=scales, hidden_size=32, num_layers=2,
        num_heads=2, num_kv_heads=1, num_experts=4, top_k=2, expert_hidden_size=16, init_std=0.3))
    return TextToVideoPipeline(tok, text, model, max_text_len=64, max_num_frames=9)


@pytest.fixture(scope="module", params=list(SIZES), ids=lambda s: f"{s[0]}x{s[1]}")
def pipe(request):
    return tiny_pipeline(request.param)


def test_kv_cache_steps_equal_the_full_forward(pipe, monkeypatch):
    """Every step of a CFG call (cond and null-prompt rows, 2 latent frames) gives the logits of the teacher-forced
    full pass over the same inputs, whose inputs are the tokenizer's teacher-forcing ones for the sampled codes."""
    out, steps = cfg_call_matching_the_full_forward(pipe, PROMPTS, 5, monkeypatch)
    tok = pipe.video_tokenizer
    height, width = pipe.frame_size
    assert out.frames.shape == (2, 5, height, width, 3) and out.frames.dtype == np.uint8
    assert [tuple(c.shape) for c in out.codes.codes] == [(2, 2, h, w) for h, w in tok.scale_shapes]
    assert steps == [(f, s) for f in range(2) for s in range(len(tok.scale_shapes))]
    assert out.timings["forward_passes"] == 1 + 2 * len(tok.scale_shapes)
    assert out.timings["tokens"] == 2 * 2 * sum(h * w for h, w in tok.scale_shapes)


def test_images_and_explicit_size(pipe):
    """num_frames=1 takes the same path; naming the built size is the same call as leaving it out."""
    height, width = pipe.frame_size
    a = pipe(PROMPTS[0], num_frames=1, seed=3)
    b = pipe(PROMPTS[0], num_frames=1, seed=3, height=height, width=width)
    assert a.frames.shape == (1, 1, height, width, 3)
    assert np.array_equal(a.frames, b.frames)
    assert a.timings["forward_passes"] == 1 + len(pipe.video_tokenizer.scale_shapes)


@pytest.mark.parametrize("kwargs, message", [
    ({"height": 32}, r"^height: must be {h}: this pipeline makes {h}x{w} \(height x width\) frames"),
    ({"width": 32}, r"^width: must be {w}: this pipeline makes {h}x{w}"),
    ({"height": "64"}, r"^height: must be an int"),
    ({"width": 0}, r"^width: must be >= 1"),
])
def test_other_sizes_are_refused_naming_height_or_width(pipe, monkeypatch, kwargs, message):
    monkeypatch.setattr(pipe.model, "forward_text", None)  # refused before any model work
    h, w = pipe.frame_size
    with pytest.raises(ValueError, match=message.format(h=h, w=w)):
        pipe(PROMPTS[0], num_frames=1, **kwargs)


def test_continuation_video_of_another_size_is_refused(pipe):
    h, w = pipe.frame_size
    with pytest.raises(ValueError, match=rf"^video: frames must be {h}x{w}"):
        pipe(PROMPTS[0], num_frames=5, video=torch.zeros(1, 3, 1, h + 8, w))


def test_pair_schedule_pipeline_round_trip(tmp_path):
    pipe = tiny_pipeline((48, 80))
    want = pipe(PROMPTS[0], num_frames=5, seed=1).frames
    loaded = TextToVideoPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "p"))
    assert loaded.model.omniar_config.scales == ((1, 1), (2, 3), (3, 5), (6, 10))
    assert np.array_equal(loaded(PROMPTS[0], num_frames=5, seed=1).frames, want)
