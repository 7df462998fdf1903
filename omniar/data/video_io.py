"""Reading and writing video files: decord first (fast, random access), PyAV as the fallback reader;
mp4 (H.264 through PyAV) and gif (Pillow) writers that write atomically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .._checks import check_int, require


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


def write_video(path: str | os.PathLike, frames, fps: int = 8) -> Path:
    """Write ``frames`` to ``.mp4`` (H.264, yuv420p) or ``.gif``; the file appears only when complete."""
    path = Path(path)
    require(path.suffix.lower() in (".mp4", ".gif"), "path", f"must end in .mp4 or .gif, got {path.name!r}")
    check_int(fps, "fps", 1, 240)
    frames = _as_uint8(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    if path.suffix.lower() == ".gif":
        from PIL import Image

        images = [Image.fromarray(f) for f in frames]
        images[0].save(tmp, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    else:
        import av

        t, h, w, _ = frames.shape
        if h % 2 or w % 2:  # yuv420p needs even sides
            frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        with av.open(str(tmp), mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "12"}
            for frame in frames:
                container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
            container.mux(stream.encode())
    os.replace(tmp, path)
    return path


def _check_readable(path: Path) -> None:
    require(path.is_file(), "path", f"file not found: {path}")
    require(path.stat().st_size > 0, "path", f"empty file: {path}")


def video_info(path: str | os.PathLike) -> tuple[int, float]:
    """(frame count, frames per second) of a video file."""
    path = Path(path)
    _check_readable(path)
    try:
        import decord

        reader = decord.VideoReader(str(path))
        return len(reader), float(reader.get_avg_fps())
    except Exception:  # decord missing or unable: PyAV decodes what FFmpeg can
        import av

        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            count = stream.frames or sum(1 for _ in container.decode(stream))
            return count, float(stream.average_rate or 0.0)


def read_video(path: str | os.PathLike, indices: list[int] | None = None) -> np.ndarray:
    """Frames ``indices`` (default all) of a video file as uint8 (T, H, W, 3)."""
    path = Path(path)
    _check_readable(path)
    try:
        import decord

        reader = decord.VideoReader(str(path))
        idx = list(range(len(reader))) if indices is None else list(indices)
        return reader.get_batch(idx).asnumpy()
    except Exception:
        import av

        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        require(len(frames) > 0, "path", f"no decodable video frames in {path}")
        idx = range(len(frames)) if indices is None else indices
        return np.stack([frames[i] for i in idx])
