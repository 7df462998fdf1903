"""Video files: write/read round trip (mp4, gif), clip sampling, frame-rate resampling, JSONL dataset, errors."""

import json

import numpy as np
import pytest
import torch

from omniar.data.video_folder import VideoFolderDataset, clip_indices, resize_center_crop
from omniar.data.video_io import read_video, video_info, write_video


def moving_square(t=24, h=40, w=48):
    frames = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        frames[i, 10:20, i:i + 10] = (220, 40, 40)
    return frames


def test_mp4_round_trip(tmp_path):
    frames = moving_square()
    path = write_video(tmp_path / "a.mp4", frames, fps=12)
    assert path.is_file() and not list(tmp_path.glob(".*tmp*"))
    count, fps = video_info(path)
    assert count == 24 and fps == pytest.approx(12, abs=0.1)
    back = read_video(path)
    assert back.shape == frames.shape
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 4  # H.264 is lossy, but close
    sub = read_video(path, [0, 5, 23])
    assert np.array_equal(sub, back[[0, 5, 23]])


def test_gif_and_float_frames(tmp_path):
    frames = moving_square(6).astype(np.float32) / 255
    path = write_video(tmp_path / "a.gif", frames, fps=5)
    back = read_video(path)
    assert back.shape == (6, 40, 48, 3)


def test_clip_indices_and_fps_resampling():
    assert clip_indices(10, 30.0, 5, None, 0.0) == [0, 1, 2, 3, 4]
    assert clip_indices(10, 30.0, 5, None, 1.0) == [5, 6, 7, 8, 9]
    # 30 fps source, 15 fps clip: every second frame
    assert clip_indices(30, 30.0, 4, 15.0, 0.0) == [0, 2, 4, 6]
    with pytest.raises(ValueError, match="video"):
        clip_indices(4, 30.0, 5, None, 0.0)


def test_resize_center_crop():
    frames = np.zeros((2, 40, 80, 3), np.uint8)
    frames[:, :, 20:60] = 255  # the centre square survives the crop
    out = resize_center_crop(frames, 16)
    assert out.shape == (3, 2, 16, 16)
    assert out.min() >= -1 and out.max() <= 1
    assert torch.allclose(out[:, :, 4:12, 4:12], torch.ones(1))


def test_jsonl_dataset(tmp_path):
    (tmp_path / "clips").mkdir()
    write_video(tmp_path / "clips" / "a.mp4", moving_square(24), fps=8)
    write_video(tmp_path / "clips" / "b.mp4", moving_square(30), fps=8)
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n".join(json.dumps(e) for e in [{"video": "clips/a.mp4", "caption": "one"},
                                                        {"video": str(tmp_path / "clips" / "b.mp4"),
                                                         "caption": "two"}]) + "\n")
    ds = VideoFolderDataset(jsonl, num_frames=9, size=32, sample="start")
    assert len(ds) == 2
    item = ds[1]
    assert item["video"].shape == (3, 9, 32, 32) and item["caption"] == "two"
    a, b = VideoFolderDataset(jsonl, 9, 32, seed=3)[0], VideoFolderDataset(jsonl, 9, 32, seed=3)[0]
    assert torch.equal(a["video"], b["video"])  # random sampling is seeded


def test_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="path"):
        VideoFolderDataset(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"video": "a.mp4", "caption": "x"}\nnot json\n')
    with pytest.raises(ValueError, match=":2"):
        VideoFolderDataset(bad)
    with pytest.raises(ValueError, match="sample"):
        VideoFolderDataset(bad, sample="middle")
    with pytest.raises(ValueError, match="frames"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="path"):
        write_video(tmp_path / "x.avi", moving_square(2))
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        read_video(tmp_path / "empty.mp4")
