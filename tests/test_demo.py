"""The Gradio demo through ``gradio_client`` against a launched app (tiny random pipeline, loopback only)."""

import av
import numpy as np
import pytest
import torch
from PIL import Image

from omniar.cli import build_parser
from omniar.data.shapes import MovingShapes
from omniar.data.video_io import read_video, write_video
from test_t2v import PROMPT, tiny_pipeline

gradio_client = pytest.importorskip("gradio_client")
demo = pytest.importorskip("omniar.demo")

FULL = "full (2 layers, 4 experts, top-2)"
# prompt, num_frames, guidance, temperature, top_k, top_p, seed, sub-model: the /generate argument order
SETTINGS = (PROMPT, 5, 3.0, 1.0, 0, 1.0, 0, FULL)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def client(pipe):
    app = demo.launch(pipe, port=None, block=False)
    try:
        assert app.local_url.startswith("http://127.0.0.1:")
        yield gradio_client.Client(app.local_url, verbose=False)
    finally:
        app.close()


def _downscale(frames: np.ndarray, side: int) -> np.ndarray:
    step = frames.shape[-2] // side  # the app upscales by an integer factor, nearest-neighbour
    return frames[..., step // 2::step, step // 2::step, :]


def test_cli_defaults_are_loopback_without_share():
    args = build_parser().parse_args(["demo"])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)


def test_generate_returns_playable_mp4_and_previews(client, pipe):
    path, previews, stats = client.predict(*SETTINGS, api_name="/generate")
    with av.open(path) as container:  # what browsers play: H.264 in mp4, yuv420p
        stream = container.streams.video[0]
        assert (container.format.name.split(",")[0], stream.codec_context.name, stream.format.name) == (
            "mov", "h264", "yuv420p")
    frames = _downscale(read_video(path), 32)
    expected = pipe(PROMPT, num_frames=5, seed=0).frames[0]
    assert frames.shape == (5, 32, 32, 3)
    assert np.abs(frames.astype(int) - expected).mean() < 4  # H.264 at crf 12 is near-lossless
    # one preview of frame 0 per scale, coarse to fine; the finest is frame 0 itself (png: lossless)
    assert [p["caption"] for p in previews] == [f"scales <= {n}x{n}" for n in (1, 2, 4, 8)]
    images = [_downscale(np.asarray(Image.open(p["image"]).convert("RGB")), 32) for p in previews]
    assert np.abs(images[-1].astype(int) - expected[0]).max() <= 1
    assert not np.array_equal(images[0], images[-1])
    assert "tokens/s" in stats and "9 forward passes" in stats


def test_elastic_sub_model_changes_the_result(client):
    full, _, _ = client.predict(*SETTINGS, api_name="/generate")
    small, _, stats = client.predict(*SETTINGS[:-1], "1 layer", api_name="/generate")
    assert not np.array_equal(read_video(full), read_video(small))


@pytest.mark.parametrize("index, value, message", [
    (1, 6, "Frames (num_frames): must be 1 + 4 * k"),
    (1, 5.5, "Frames (num_frames): must be a whole number"),
    (0, "   ", "Prompt (prompt): must not be empty"),
    (0, [PROMPT] * 8, "Prompt (prompt): must be a string"),
    (5, 0.0, "Top-p (top_p): must be > 0.0"),
    (4, -1, "Top-k (top_k): must be >= 0"),
    (2, -1.0, "Guidance (guidance_scale): must be >= 0.0"),
    (3, "hot", "Temperature (temperature): must be a number"),
    (6, -3, "Seed (seed): "),
    (7, "9 layers", "Sub-model (elastic): must be one of"),
])
def test_bad_setting_returns_error_naming_it(client, index, value, message):
    settings = list(SETTINGS)
    settings[index] = value
    with pytest.raises(gradio_client.exceptions.AppError) as info:
        client.predict(*settings, api_name="/generate")
    assert message in str(info.value)


def test_tokenizer_tab_reconstructs_per_scale(client, tmp_path):
    clip = MovingShapes("all", 1, 48, 6, seed=0)[0]["video"]  # 6 frames at 48 px: cropped to 5, resized to 32
    frames = clip.add(1).mul(127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    write_video(tmp_path / "clip.mp4", frames)
    strips, path, table = client.predict(gradio_client.handle_file(str(tmp_path / "clip.mp4")),
                                         api_name="/reconstruct")
    assert [s["caption"] for s in strips] == [f"scales <= {n}x{n}" for n in (1, 2, 4, 8)]
    assert read_video(path).shape[0] == 5 and table.startswith("5 frame(s) at 32 px")
    assert table.count("| ") >= 4 * 2

    Image.fromarray(frames[0]).save(tmp_path / "frame.png")
    _, path, table = client.predict(gradio_client.handle_file(str(tmp_path / "frame.png")),
                                    api_name="/reconstruct")
    assert read_video(path).shape[0] == 1 and table.startswith("1 frame(s)")


def test_tokenizer_tab_rejects_unreadable_upload(client, tmp_path):
    (tmp_path / "broken.mp4").write_bytes(b"not a video" * 100)
    with pytest.raises(gradio_client.exceptions.AppError) as info:
        client.predict(gradio_client.handle_file(str(tmp_path / "broken.mp4")), api_name="/reconstruct")
    assert "Video or image" in str(info.value)


def test_oversized_upload_is_refused_from_its_header(tmp_path, monkeypatch):
    from omniar import demo

    Image.new("RGB", (64, 48)).save(tmp_path / "small.png")
    assert demo._load_media(str(tmp_path / "small.png"), 17).shape == (1, 48, 64, 3)
    write_video(tmp_path / "clip.mp4", np.zeros((3, 48, 64, 3), np.uint8))
    monkeypatch.setattr(demo, "MAX_UPLOAD_PIXELS", 64 * 48 - 1)
    monkeypatch.setattr(demo, "read_video", lambda *a: pytest.fail("decoded before the size check"))
    for name in ("small.png", "clip.mp4"):
        with pytest.raises(ValueError, match="file: 64x48 frames are larger than the demo takes"):
            demo._load_media(str(tmp_path / name), 17)


def test_oversized_upload_is_reported_as_too_large_not_unreadable(pipe, tmp_path, monkeypatch):
    import gradio as gr

    from omniar import demo

    Image.new("RGB", (64, 48)).save(tmp_path / "big.png")
    monkeypatch.setattr(demo, "MAX_UPLOAD_PIXELS", 64 * 48 - 1)
    with pytest.raises(gr.Error) as info:
        demo.Demo(pipe).reconstruct(str(tmp_path / "big.png"))
    assert info.value.message.startswith("Video or image (file): 64x48 frames are larger than the demo takes")
