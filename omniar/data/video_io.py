"""Reading and writing video files: decord first (fast, random access), PyAV as the fallback reader;
mp4 (H.264 through PyAV) and gif (Pillow) writers that write atomically."""

from __future__ import annotations

import numbers
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .._checks import check_int, check_output_path, normal_file_mode, require


def _as_uint8(frames) -> np.ndarray:
    """uint8 (T, H, W, 3), or floats in [0, 1] (scaled here: the diffusers convention) -> uint8."""
    frames = np.asarray(frames)
    require(frames.ndim == 4 and frames.shape[-1] == 3, "frames", f"must be (T, H, W, 3), got {frames.shape}")
    require(frames.shape[0] >= 1, "frames", "must hold at least one frame")
    if frames.dtype == np.uint8:
        return frames
    require(np.issubdtype(frames.dtype, np.floating), "frames", f"must be uint8 or float, got {frames.dtype}")
    require(bool(np.isfinite(frames).all()) and frames.min() >= 0 and frames.max() <= 1, "frames",
            "float frames must be finite and lie in [0, 1]")
    return np.rint(frames * 255).astype(np.uint8)


def _write_gif(path: Path, frames: np.ndarray, fps: int) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)


@contextmanager
def mp4_writer(path: str | os.PathLike, fps: int = 8):
    """Write an H.264 / yuv420p mp4 frame by frame: yields ``write(frames)`` (uint8 (t, H, W, 3) or floats in
    [0, 1], the same H and W each call). Only the encoder's few frames are held. The file appears at ``path``
    when the block completes, never partly written; odd sides are padded by one edge pixel (yuv420p)."""
    import av

    path = check_video_path(path)
    require(path.suffix.lower() == ".mp4", "path", f"must end in .mp4, got {path.name!r}")
    check_fps(fps)
    with _atomic_output(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = None

        def write(frames) -> None:
            nonlocal stream
            frames = _as_uint8(frames)
            _, h, w, _ = frames.shape
            frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
            if stream is None:
                stream = container.add_stream("libx264", rate=fps)
                stream.width, stream.height = frames.shape[2], frames.shape[1]
                stream.pix_fmt = "yuv420p"
                stream.options = {"crf": "12"}  # near-lossless: round trips stay within a few grey levels
            require((stream.height, stream.width) == frames.shape[1:3], "frames",
                    f"must keep the first frames' size {stream.height}x{stream.width}, got {h}x{w}")
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))

        yield write
        require(stream is not None, "frames", "none were written")
        container.mux(stream.encode())  # flush the frames the encoder still holds


@contextmanager
def _atomic_output(path: Path):
    """A temporary path beside ``path`` that becomes ``path`` only if the block completes (no partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix.lower()}", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, normal_file_mode())  # mkstemp makes it owner-only
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # the writer failed: leave no partial file behind
            os.remove(tmp)


def check_video_path(path: str | os.PathLike, name: str = "path") -> Path:
    """A path :func:`write_video` can write (``.mp4`` or ``.gif``, in a writable place), checked before any work."""
    path = check_output_path(path, name)
    require(path.suffix.lower() in (".mp4", ".gif"), name, f"must end in .mp4 or .gif, got {path.name!r}")
    return path


def check_fps(fps, name: str = "fps") -> int:
    """A frame rate :func:`write_video` takes, checked before any work."""
    return check_int(fps, name, 1, 240)


def write_video(path: str | os.PathLike, frames, fps: int = 8) -> Path:
    """Write ``frames`` (uint8 (T, H, W, 3) or floats in [0, 1]) to ``.mp4`` or ``.gif``; returns the path.

    The file appears only once complete (temp file in the same folder, then rename).
    mp4 is H.264/yuv420p: lossy, and an odd height or width is padded by one edge pixel.
    gif stores runs of identical frames once (Pillow sums their durations): playback is the
    same, but reading it back gives fewer frames.
    """
    path = check_video_path(path)
    check_fps(fps)
    frames = _as_uint8(frames)
    if path.suffix.lower() == ".gif":
        with _atomic_output(path) as tmp:
            _write_gif(tmp, frames, fps)
    else:
        with mp4_writer(path, fps) as write:
            write(frames)
    return path


def _readable(path: str | os.PathLike) -> Path:
    path = Path(path)
    require(path.is_file(), "path", f"file not found: {path}")
    require(path.stat().st_size > 0, "path", f"empty file: {path}")
    return path


def _decord_reader(path: Path):
    """A decord reader, or None when decord is missing or cannot open the file (PyAV then tries)."""
    try:
        import decord

        return decord.VideoReader(str(path))
    except Exception:
        return None


def _check_indices(indices, count: int) -> list[int]:
    if indices is None:
        require(count > 0, "path", "has no decodable video frames")
        return list(range(count))
    indices = list(indices)
    require(len(indices) > 0 and all(isinstance(i, numbers.Integral) for i in indices), "indices",
            "must be a non-empty list of ints")
    require(all(0 <= i < count for i in indices), "indices", f"must lie in [0, {count}) (the video's frame count)")
    return [int(i) for i in indices]


@contextmanager
def _pyav_open(path: Path):
    """An open PyAV container; files FFmpeg cannot read raise ``ValueError`` naming ``path``."""
    import av

    try:
        with av.open(str(path)) as container:
            require(len(container.streams.video) > 0, "path", f"has no video stream: {path}")
            yield container
    except av.FFmpegError as err:
        raise ValueError(f"path: cannot decode {path}: {err}") from err


def _pyav_frames(path: Path, last: int | None) -> list[np.ndarray]:
    """Decoded frames 0..``last`` (all when None): decoding stops early for a clip near the start."""
    frames = []
    with _pyav_open(path) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if last is not None and len(frames) > last:
                break
    return frames


def video_info(path: str | os.PathLike) -> tuple[int, float]:
    """(frame count, frames per second) of a video file; fps is 0.0 when the container does not say."""
    path = _readable(path)
    reader = _decord_reader(path)
    if reader is not None:
        return len(reader), float(reader.get_avg_fps())
    with _pyav_open(path) as container:
        stream = container.streams.video[0]
        count = stream.frames or sum(1 for _ in container.decode(stream))
        return count, float(stream.average_rate or 0.0)


@dataclass(frozen=True)
class VideoProbe:
    """What a video file's headers say; ``pix_fmt`` is FFmpeg's stored pixel format (None if unknown)."""

    num_frames: int
    fps: float
    width: int
    height: int
    pix_fmt: str | None

    @property
    def grayscale(self) -> bool:
        """No colour channels stored (gray, gray + alpha, 1-bit); decoding would repeat one channel."""
        return (self.pix_fmt or "").startswith(("gray", "ya", "mono"))


def probe_video(path: str | os.PathLike) -> VideoProbe:
    """Frame count, rate, size and pixel format of a video file, read without decoding its frames
    (except the frame count of a container that does not store it). Bad files raise ``ValueError``."""
    path = _readable(path)
    with _pyav_open(path) as container:
        ctx = container.streams.video[0].codec_context
        width, height, pix_fmt = ctx.width, ctx.height, ctx.pix_fmt
    return VideoProbe(*video_info(path), width, height, pix_fmt)


def video_fps(path: str | os.PathLike) -> float:
    """Average frames per second of a video file (0.0 when unknown)."""
    return video_info(path)[1]


def read_video(path: str | os.PathLike, indices: list[int] | None = None) -> np.ndarray:
    """Frames ``indices`` (default all, in the given order) of a video file as uint8 (T, H, W, 3)."""
    path = _readable(path)
    reader = _decord_reader(path)
    if reader is not None:
        idx = _check_indices(indices, len(reader))
        try:
            return reader.get_batch(idx).asnumpy()
        except Exception:  # a stream decord opens but cannot decode: PyAV's FFmpeg may still manage
            pass
    # Types and signs are checked before decoding, the upper bound against the frames decoded.
    last = None if indices is None else max(_check_indices(indices, np.iinfo(np.int64).max))
    frames = _pyav_frames(path, last)
    idx = _check_indices(indices, len(frames))
    return np.stack([frames[i] for i in idx])
