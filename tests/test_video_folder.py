"""VideoFolderDataset: clip sampling and frame-rate resampling (checked on decoded pixels), resize/crop,
JSONL paths, errors (bad files and lines in detail: test_bad_data.py)."""

import json

import numpy as np
import pytest
import torch

from omniar.data.skipped import DataWarning
from omniar.data.video_folder import VideoFolderDataset, clip_indices, resize_center_crop
from omniar.data.video_io import write_video

LEVEL = 8  # grey level step per frame: frame i is a flat image of grey 8 * i


def counter_video(path, t=24, fps=8):
    """Frame i is flat grey LEVEL * i, so a decoded frame tells which source frame it was."""
    frames = np.repeat((np.arange(t, dtype=np.uint8) * LEVEL)[:, None, None, None], 3, axis=-1)
    return write_video(path, np.broadcast_to(frames, (t, 40, 48, 3)), fps=fps)


def source_frames(video: torch.Tensor) -> list[int]:
    """Source frame indices of a (3, T, H, W) clip in [-1, 1] made from a counter video."""
    grey = (video.mean(dim=(0, 2, 3)) + 1) * 127.5
    return [round(g) for g in (grey / LEVEL).tolist()]


def write_jsonl(path, entries):
    path.write_text("\n".join(json.dumps(e) for e in entries) + "\n")
    return path


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "clips").mkdir()
    counter_video(tmp_path / "clips" / "a.mp4", t=24, fps=8)
    counter_video(tmp_path / "b.mp4", t=30, fps=16)
    write_jsonl(tmp_path / "data.jsonl", [{"video": "clips/a.mp4", "caption": "one"},
                                          {"video": str(tmp_path / "b.mp4"), "caption": "two"}])
    return tmp_path


def test_clip_indices():
    assert clip_indices(10, 30.0, 5, None, 0.0) == [0, 1, 2, 3, 4]
    assert clip_indices(10, 30.0, 5, None, 1.0) == [5, 6, 7, 8, 9]
    assert clip_indices(11, 30.0, 5, None, 0.5) == [3, 4, 5, 6, 7]
    assert clip_indices(30, 30.0, 4, 15.0, 0.0) == [0, 2, 4, 6]  # half the rate: every second frame
    assert clip_indices(30, 10.0, 4, 20.0, 0.0) == [0, 1, 1, 2]  # twice the rate: frames repeat
    assert clip_indices(20, 8.0, 3, 3.0, 0.5) == [7, 10, 12]  # 8/3 apart; starts 0..13: the middle
    assert clip_indices(5, 0.0, 3, 15.0, 0.0) == [0, 1, 2]  # unknown source rate: keep consecutive frames
    with pytest.raises(ValueError, match="video.*needs 7"):
        clip_indices(6, 30.0, 4, 15.0, 0.0)
    with pytest.raises(ValueError, match="start"):
        clip_indices(10, 30.0, 4, None, 1.5)


def test_resize_center_crop():
    frames = np.zeros((2, 40, 80, 3), np.uint8)
    frames[:, :, 20:60] = 255  # the centre square survives the crop
    out = resize_center_crop(frames, 16)
    assert out.shape == (3, 2, 16, 16) and out.dtype == torch.float32
    assert torch.allclose(out[:, :, :, 1:-1], torch.ones(1))  # antialiasing blurs only the outer columns
    tall = resize_center_crop(np.zeros((1, 90, 30, 3), np.uint8), 24)  # short side scaled up to 24
    assert tall.shape == (3, 1, 24, 24) and torch.allclose(tall, -torch.ones(1))


def test_resize_center_crop_to_height_and_width():
    frames = np.zeros((1, 40, 80, 3), np.uint8)
    frames[:, 10:30, 20:60] = 255  # a centred 20 x 40 block
    whole = resize_center_crop(frames, (20, 40))  # same aspect: the whole frame, halved
    assert whole.shape == (3, 1, 20, 40)
    assert torch.allclose(whole[:, :, 6:14, 11:29], torch.ones(1)) and torch.allclose(whole[:, :, :4], -torch.ones(1))
    strip = resize_center_crop(frames, (16, 48))  # wider than the frame: scaled to 24 x 48, rows 4..20 kept
    assert strip.shape == (3, 1, 16, 48) and torch.allclose(strip[:, :, 4:12, 15:33], torch.ones(1))
    assert torch.equal(resize_center_crop(frames, (24, 24)), resize_center_crop(frames, 24))  # a square pair = int


def test_items_at_height_and_width(folder):
    ds = VideoFolderDataset(folder, num_frames=5, size=(24, 32), sample="start")  # sources are 40 x 48
    assert ds[0]["video"].shape == (3, 5, 24, 32) and source_frames(ds[0]["video"]) == list(range(5))
    with pytest.warns(DataWarning, match="40x48 frames .*needs at least 48x40"), pytest.raises(ValueError):
        VideoFolderDataset(folder, num_frames=5, size=(48, 40))  # taller than the sources: would upscale


def test_items_relative_and_absolute_paths(folder):
    ds = VideoFolderDataset(folder / "data.jsonl", num_frames=9, size=32, sample="start")
    assert len(ds) == 2
    a, b = ds[0], ds[1]
    assert a["caption"] == "one" and b["caption"] == "two"
    assert a["video"].shape == b["video"].shape == (3, 9, 32, 32)
    assert a["video"].min() >= -1 and a["video"].max() <= 1
    assert source_frames(a["video"]) == list(range(9))
    assert [item["caption"] for item in ds] == ["one", "two"]  # iteration stops at the end


def test_sampling_positions_and_seed(folder):
    center = VideoFolderDataset(folder, num_frames=9, size=16, sample="center")[0]  # a folder finds its JSONL
    assert source_frames(center["video"]) == list(range(8, 17))  # starts 0..15 possible: the middle one
    starts = {source_frames(VideoFolderDataset(folder, 5, 16, seed=s)[0]["video"])[0] for s in range(6)}
    assert len(starts) > 1 and all(0 <= s <= 19 for s in starts)
    same = [source_frames(VideoFolderDataset(folder, 5, 16, seed=3)[0]["video"]) for _ in range(2)]
    assert same[0] == same[1] and same[0] == list(range(same[0][0], same[0][0] + 5))


def test_fps_resampling_on_decoded_frames(folder):
    ds = VideoFolderDataset(folder, num_frames=6, size=16, fps=8, sample="start")
    assert source_frames(ds[1]["video"]) == [0, 2, 4, 6, 8, 10]  # 16 fps source at 8 fps
    assert source_frames(ds[0]["video"]) == list(range(6))  # already 8 fps
    with pytest.warns(DataWarning, match="b.mp4: video: has 30 frames"):  # 30 frames at 16 fps hold < 2 s
        short = VideoFolderDataset(folder, num_frames=16, size=16, fps=8)
    assert len(short) == 1 and short.skipped.counts == {"too_short": 1}


def test_argument_errors(folder, tmp_path):
    jsonl = folder / "data.jsonl"
    for kwargs, name in [({"num_frames": 0}, "num_frames"), ({"size": 4}, "size"), ({"size": (4, 48)}, "size"),
                         ({"size": (48, 48, 3)}, "size"), ({"size": "48x80"}, "size"), ({"fps": 0}, "fps"),
                         ({"sample": "middle"}, "sample"), ({"seed": -1}, "seed")]:
        with pytest.raises(ValueError, match=name):
            VideoFolderDataset(jsonl, **kwargs)


def test_jsonl_errors(tmp_path):
    with pytest.raises(ValueError, match="root_or_jsonl.*not found"):
        VideoFolderDataset(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="root_or_jsonl.*exactly one"):
        VideoFolderDataset(tmp_path)  # a folder without a JSONL
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"video": "a.mp4", "caption": "x"}])
    bad.write_text(bad.read_text() + "not json\n")
    # every line bad (line 1's video does not exist): the error names the JSONL and its first problems
    with pytest.warns(DataWarning), pytest.raises(ValueError, match="bad.jsonl lists no usable videos.*"
                                                                    "line 2: not valid JSON.*a.mp4: video not found"):
        VideoFolderDataset(bad)
    write_jsonl(bad, [{"video": "a.mp4"}])
    with pytest.warns(DataWarning), pytest.raises(ValueError, match="'video' and 'caption'"):
        VideoFolderDataset(bad)
    bad.write_text("\n\n")
    with pytest.raises(ValueError, match="root_or_jsonl: .*bad.jsonl lists no usable videos$"):
        VideoFolderDataset(bad)


def test_missing_video_fails_naming_the_file(tmp_path):
    with pytest.warns(DataWarning), pytest.raises(ValueError, match="root_or_jsonl.*gone.mp4: video not found"):
        VideoFolderDataset(write_jsonl(tmp_path / "d.jsonl", [{"video": "gone.mp4", "caption": "x"}]))
