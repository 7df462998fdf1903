"""Video file round trips (mp4 through decord and through the PyAV fallback, gif), atomic writes, errors."""

import os
import sys

import numpy as np
import pytest

from omniar.data.video_io import mp4_writer, read_video, video_fps, video_info, write_video


def moving_square(t=24, h=40, w=48):
    """A red 10x10 square sliding right one pixel per frame over black."""
    frames = np.zeros((t, h, w, 3), np.uint8)
    for i in range(t):
        frames[i, 10:20, i:i + 10] = (220, 40, 40)
    return frames


@pytest.fixture
def mp4(tmp_path):
    return write_video(tmp_path / "a.mp4", moving_square(), fps=12)


@pytest.fixture
def no_decord(monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` now raises ImportError


def test_mp4_round_trip(mp4):
    frames = moving_square()
    assert video_info(mp4) == (24, pytest.approx(12, abs=0.01)) and video_fps(mp4) == pytest.approx(12, abs=0.01)
    back = read_video(mp4)
    assert back.shape == frames.shape and back.dtype == np.uint8
    err = np.abs(back.astype(int) - frames.astype(int))
    assert err.mean() < 2 and np.percentile(err, 99) < 40  # H.264 is lossy: close, not exact
    assert np.array_equal(read_video(mp4, [5, 0, 23]), back[[5, 0, 23]])  # order kept


def test_pyav_fallback_matches_decord(mp4, no_decord):
    with pytest.raises(ImportError):
        import decord  # noqa: F401
    assert video_info(mp4) == (24, pytest.approx(12, abs=0.01))
    back = read_video(mp4)
    assert back.shape == (24, 40, 48, 3)
    assert np.abs(back.astype(int) - moving_square().astype(int)).mean() < 2
    assert np.array_equal(read_video(mp4, [3, 1]), back[[3, 1]])
    with pytest.raises(ValueError, match="indices"):
        read_video(mp4, [24])


def test_float_frames_are_scaled_from_unit_range(tmp_path):
    frames = moving_square(6)
    back = read_video(write_video(tmp_path / "f.mp4", frames.astype(np.float32) / 255, fps=6))
    assert np.abs(back.astype(int) - frames.astype(int)).mean() < 2


def test_gif_round_trip_is_exact_for_few_colours(tmp_path):
    frames = moving_square(6)
    back = read_video(write_video(tmp_path / "a.gif", frames, fps=5))
    assert np.array_equal(back, frames)


def test_odd_sides_are_padded_for_h264(tmp_path):
    frames = np.full((3, 7, 9, 3), 128, np.uint8)
    back = read_video(write_video(tmp_path / "odd.mp4", frames))
    assert back.shape == (3, 8, 10, 3)
    assert np.abs(back.astype(int) - 128).max() <= 3


def test_written_file_has_a_normal_new_file_mode(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_video(tmp_path / "a.gif", np.zeros((2, 8, 8, 3), np.uint8))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("where", ["encoder", "stream"])
def test_write_is_atomic(tmp_path, monkeypatch, where):
    import av

    path = write_video(tmp_path / "a.mp4", moving_square(4))
    before = path.read_bytes()
    if where == "encoder":  # dies after the temporary file holds a few frames
        real, count = av.VideoFrame.from_ndarray, iter(range(100))

        def broken(*args, **kwargs):
            if next(count) == 5:
                raise RuntimeError("encoder died")
            return real(*args, **kwargs)

        monkeypatch.setattr(av.VideoFrame, "from_ndarray", broken)
        with pytest.raises(RuntimeError, match="encoder died"):
            write_video(path, moving_square(8))
    else:  # what streams the frames dies midway (a generation that fails)
        with pytest.raises(RuntimeError, match="generation died"):
            with mp4_writer(path) as write:
                write(moving_square(8))
                raise RuntimeError("generation died")
    assert path.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.mp4"]  # and no temp file is left


def test_mp4_writer_streams_what_write_video_writes(tmp_path):
    frames = moving_square(9)
    with mp4_writer(tmp_path / "stream.mp4", fps=8) as write:
        assert not (tmp_path / "stream.mp4").exists()  # only once complete
        for start in range(0, 9, 4):
            write(frames[start:start + 4])
        with pytest.raises(ValueError, match="frames: must keep the first frames' size 40x48, got 8x8"):
            write(frames[:1, :8, :8])
    streamed = read_video(tmp_path / "stream.mp4")
    assert streamed.shape == frames.shape
    assert np.abs(streamed.astype(int) - read_video(write_video(tmp_path / "whole.mp4", frames))).mean() < 1
    with pytest.raises(ValueError, match="frames: none were written"):
        with mp4_writer(tmp_path / "empty.mp4"):
            pass
    assert not (tmp_path / "empty.mp4").exists()
    with pytest.raises(ValueError, match="path: must end in .mp4"):
        with mp4_writer(tmp_path / "x.gif"):
            pass


def test_errors_name_the_argument(tmp_path, mp4):
    with pytest.raises(ValueError, match="frames"):
        write_video(tmp_path / "x.mp4", np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="frames"):
        write_video(tmp_path / "x.mp4", np.full((2, 8, 8, 3), 2.0))  # floats must be in [0, 1]
    with pytest.raises(ValueError, match="path"):
        write_video(tmp_path / "x.avi", moving_square(2))
    with pytest.raises(ValueError, match="fps"):
        write_video(tmp_path / "x.mp4", moving_square(2), fps=0)
    with pytest.raises(ValueError, match="path.*not found"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(ValueError, match="path.*empty"):
        read_video(tmp_path / "empty.mp4")
    (tmp_path / "junk.mp4").write_bytes(b"not a video" * 20)
    with pytest.raises(ValueError, match="path.*cannot decode"):
        video_info(tmp_path / "junk.mp4")
    with pytest.raises(ValueError, match="indices"):
        read_video(mp4, [0, 24])
    with pytest.raises(ValueError, match="indices"):
        read_video(mp4, [])
