"""Moving Shapes' wrapping motion (#27): the object re-enters at the opposite edge, so clips of any length show it
in every frame; the default exit motion is unchanged, bit for bit; ``data.motion`` reaches the trainers' data."""

import hashlib
from dataclasses import replace

import numpy as np
import pytest
import torch

from omniar.data.shapes import (ALL_COMBINATIONS, BACKGROUNDS, COLORS, DIRECTIONS, SHAPES, MovingShapes, ShapeClip,
                                render, sample_clip)
from omniar.train import ar, tokenizer
from omniar.train.ar import ARDataConfig
from omniar.train.common import VideoDataConfig, load_yaml
from _train_helpers import ROOT, TINY_CONFIG

# sha256 of the items and clips below, computed with omniar/data/shapes.py as it was before the motion option.
DEFAULT_CLIPS = "1259742d16679fe38186c3b499f9c64b0a8c85f7d6634de975a590523759a46a"


def test_default_clips_are_unchanged():
    digest = hashlib.sha256()
    for seed, size, frames in ((0, 64, 17), (1, 64, 33), (2, (48, 80), 9), (5, 32, 5)):
        data = MovingShapes("train", 6, size, frames, seed=seed)
        for i in range(len(data)):
            item = data[i]
            digest.update(item["video"].numpy().tobytes())
            digest.update(item["caption"].encode())
    rng = np.random.default_rng(11)
    for combination in ALL_COMBINATIONS[::10]:
        digest.update(render(sample_clip(rng, combination, 64, 29), 64, 29).tobytes())
    assert digest.hexdigest() == DEFAULT_CLIPS


def object_mass(frames: np.ndarray, clip: ShapeClip) -> np.ndarray:
    """Per frame, the object's area in pixels read back from the colours (anti-aliased pixels count in part)."""
    fg, bg = (np.asarray(c, np.float64) for c in (COLORS[clip.color], BACKGROUNDS[clip.background]))
    channel = np.argmax(np.abs(fg - bg))  # the channel that tells them apart best
    return ((frames[..., channel] - bg[channel]) / (fg[channel] - bg[channel])).sum((1, 2))


AREA = {"circle": np.pi / 4, "square": 1.0, "triangle": np.sqrt(3) / 4}  # x diameter^2


@pytest.mark.parametrize("size", [64, (48, 80)])
def test_a_wrapped_object_shows_its_whole_area_in_every_frame_of_a_long_clip(size):
    data = MovingShapes("all", 24, size, 129, seed=4, motion="wrap")
    clips = [data.clip(i)[0] for i in range(len(data))]
    assert {c.direction for c in clips} == set(DIRECTIONS) and {c.shape for c in clips} == set(SHAPES)
    for i, clip in enumerate(clips):
        assert data[i]["video"].shape[1] == 129
        # every clip crosses an edge: at least 1.5 px/frame x 128 frames, more than the canvas along the motion
        assert clip.speed * 128 > max(np.atleast_1d(size)), clip
        mass = object_mass(render(clip, size, 129), clip)
        assert abs(mass[0] / (AREA[clip.shape] * clip.diameter ** 2) - 1) < 0.05, clip
        # a straight edge moves in quarter-pixel steps (4 x 4 supersampling), so the area read back varies by up
        # to one strip of d / 4 px^2, as without wrapping; an edge that cut the object off would cost up to half
        assert mass.max() - mass.min() <= clip.diameter / 4 + 1, (clip, mass.min(), mass.max())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_an_object_straddling_an_edge_is_drawn_on_both_sides(shape, direction):
    """Centred 2.25 px before an edge, it is the object drawn half a canvas away (fully inside), rolled by half a
    canvas: both parts, nothing lost (dyadic positions keep the sub-pixel samples exact)."""
    vertical = direction in ("up", "down")
    axis = 0 if vertical else 1
    centre, across = 61.75, 30.5
    inside = (across, centre - 32) if vertical else (centre - 32, across)
    straddling = (across, centre) if vertical else (centre, across)
    reference = ShapeClip("red", shape, direction, "black", 14.5, 2.0, inside)
    wrapped = replace(reference, start=straddling, motion="wrap")
    frame = render(wrapped, 64, 1)[0]
    assert np.array_equal(frame, np.roll(render(reference, 64, 1)[0], 32, axis=axis))
    lines = frame.max(axis=(1 - axis, 2))  # brightest value of each row (vertical) or column
    assert lines[0] > 0 and lines[-1] > 0 and lines[20] == 0


@pytest.mark.parametrize("size, period", [(64, 32), (64, 16), ((48, 80), 32)])
def test_wrapping_motion_repeats_after_canvas_over_speed_frames(size, period):
    data = MovingShapes("all", 8, size, 3 * period, seed=9, motion="wrap")
    for i in range(len(data)):
        clip = data.clip(i)[0]
        length = size if isinstance(size, int) else size[1 if clip.direction in ("left", "right") else 0]
        clip = replace(clip, speed=length / period)  # 1.5 to 4 px per frame: exact in binary, as are the periods
        frames = render(clip, size, 3 * period)
        assert not np.array_equal(frames[0], frames[1])
        assert np.array_equal(frames[:-period], frames[period:]), clip


def test_a_mixed_set_draws_exit_and_wrap_items_of_the_plain_sets():
    """Each item of a mixed set is the same item of the exit or of the wrap set (its own draw decides which),
    about half each; its frames limit is exit's; a clip itself is never "mixed"."""
    mixed, exit_, wrap = (MovingShapes("all", 64, 32, 9, seed=3, motion=m) for m in ("mixed", "exit", "wrap"))
    motions = [mixed.clip(i)[0].motion for i in range(64)]
    assert 20 <= motions.count("wrap") <= 44
    assert set(motions[:8]) == {"exit", "wrap"}
    for i in range(8):
        plain = exit_ if motions[i] == "exit" else wrap
        assert mixed.clip(i) == plain.clip(i)
        assert torch.equal(mixed[i]["video"], plain[i]["video"])
    with pytest.raises(ValueError, match="num_frames: too long"):
        MovingShapes(num_frames=129, motion="mixed")
    clip = replace(mixed.clip(0)[0], motion="mixed")
    for call in (lambda: render(clip), lambda: sample_clip(np.random.default_rng(0), ALL_COMBINATIONS[0],
                                                           motion="mixed")):
        with pytest.raises(ValueError, match="^motion: must be one of"):
            call()


def test_exit_motion_still_limits_the_clip_length():
    with pytest.raises(ValueError, match="^num_frames: too long"):
        MovingShapes(num_frames=129)
    MovingShapes(num_frames=129, motion="wrap")


@pytest.mark.parametrize("motion", ["bounce", "", None, "WRAP", ["wrap"]])
def test_a_bad_motion_is_named(motion):
    clip = ShapeClip("red", "circle", "left", "black", 14.0, 2.0, (32.0, 32.0), motion)
    for call in (lambda: MovingShapes(motion=motion), lambda: render(clip),
                 lambda: sample_clip(np.random.default_rng(0), ALL_COMBINATIONS[0], motion=motion)):
        with pytest.raises(ValueError, match="^motion: must be one of"):
            call()
    for config in (VideoDataConfig, ARDataConfig):
        with pytest.raises(ValueError, match="^data.motion: must be one of"):
            config(motion=motion)
        with pytest.raises(ValueError, match="^data.motion: applies to the shapes dataset only"):
            config(dataset="video_folder", path="clips.jsonl", motion="wrap")


class _Reached(Exception):
    pass


def test_data_motion_reaches_the_tokenizer_trainers_dataset(tmp_path, monkeypatch):
    seen = {}

    def log_skipped(engine, step, data):
        seen["data"] = data
        raise _Reached

    monkeypatch.setattr(tokenizer, "log_skipped", log_skipped)
    config = load_yaml(TINY_CONFIG)
    config["data"]["motion"] = "wrap"
    config["train"]["out_dir"] = str(tmp_path / "run")
    with pytest.raises(_Reached):
        tokenizer.train(config, progress=False)
    assert seen["data"].motion == "wrap"


@pytest.mark.parametrize("motion", ["exit", "wrap"])
def test_data_motion_reaches_the_ar_trainers_dataset_and_its_cache_source(tmp_path, monkeypatch, motion):
    seen = {}

    def pretokenize(tok, dataset, cache_dir, num_clips, source, **kwargs):
        seen.update(dataset=dataset, source=source)
        raise _Reached

    monkeypatch.setattr(ar, "pretokenize", pretokenize)
    config = load_yaml(ROOT / "configs" / "ar_tiny.yaml")
    config["data"].update(motion=motion, cache_dir=str(tmp_path / "codes"))
    config["train"]["out_dir"] = str(tmp_path / "run")
    with pytest.raises(_Reached):
        ar.train(config, progress=False)
    assert seen["dataset"].motion == motion
    # a wrap cache is never taken for an exit one; an exit cache made before the option existed stays valid
    assert seen["source"] == {"dataset": "shapes", "path": None, "num_frames": 9, "seed": 0, "size": 64,
                              **({"motion": "wrap"} if motion == "wrap" else {})}
