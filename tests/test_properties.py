"""Property-based tests of the public API: any input either works or raises ValueError — never an
internal torch error."""

import math

import numpy as np

import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from omniar.tokenizers import VideoTokenizer

from test_t2v import TOK, tiny_pipeline

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tok():
    torch.manual_seed(0)
    return VideoTokenizer(**TOK).eval()


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@SETTINGS
@given(shape=st.lists(st.integers(0, 9), min_size=1, max_size=6),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.int64, torch.bool]),
       fill=st.sampled_from([0.0, 0.5, -1.0, 2.0, math.nan, math.inf]))
def test_encode_never_crashes_inside_torch(tok, shape, dtype, fill):
    video = torch.full(shape, fill if dtype.is_floating_point else 0).to(dtype)
    try:
        tok.encode(video)
    except ValueError as err:
        assert str(err).startswith("video")


@SETTINGS
@example(num_frames=5, guidance=3.0, top_k=0, top_p=1.0, temperature=1.0, prompt="a red circle")
# each argument is valid about half the time, so a fair share of draws must work rather than raise
@given(num_frames=st.sampled_from([1, 5]) | st.integers(-3, 40),
       guidance=st.floats(0, 8) | st.floats(allow_nan=True, allow_infinity=True, width=32),
       top_k=st.integers(0, 40) | st.integers(-2, 100), top_p=st.floats(0.05, 1) | st.floats(-1, 2) | st.just(math.nan),
       temperature=st.floats(0, 3) | st.floats(-1, 3) | st.just(math.nan),
       prompt=st.text(alphabet="abc ", min_size=1, max_size=20) | st.text(max_size=80))
def test_pipeline_arguments_work_or_raise_value_error(pipe, num_frames, guidance, top_k, top_p, temperature, prompt):
    try:
        out = pipe(prompt, num_frames=num_frames, guidance_scale=guidance, top_k=top_k, top_p=top_p,
                   temperature=temperature, seed=0)
    except ValueError as err:
        event("refused")
        assert str(err).split(":")[0] in {"prompt", "num_frames", "num_frames (frames)", "guidance_scale", "top_k",
                                          "top_p", "temperature"}
    else:
        event("generated")
        assert out.frames.shape[:2] == (1, num_frames) and out.frames.dtype == np.uint8


@SETTINGS
@given(batch=st.integers(0, 3), length=st.integers(0, 5), high=st.integers(1, 400),
       dtype=st.sampled_from([torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool, torch.float32]))
def test_model_forward_text_inputs(pipe, batch, length, high, dtype):
    ids = torch.randint(0, high, (batch, length)).to(dtype)
    try:
        out = pipe.model(ids)
    except ValueError as err:
        assert str(err).split(":")[0] in {"text_ids", "text_mask"}
    else:
        assert out.text_logits.shape[:2] == (batch, length)
