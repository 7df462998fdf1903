"""The Gradio demo through ``gradio_client`` against a launched app (tiny random pipeline, loopback only)."""

import av
import numpy as np
import pytest
import torch
from PIL import Image

from omniar.cli import build_parser
from omniar.data.shapes import MovingShapes
from omniar.data.video_io import read_video, write_video
from omniar.generation.pipeline import CALL_DEFAULTS
from omniar.pixels import to_uint8
from omniar.tokenizers import VideoTokenizer
from test_t2v import PROMPT, TOK, tiny_pipeline

gradio_client = pytest.importorskip("gradio_client")
demo = pytest.importorskip("omniar.commands.demo")

FULL = "full (2 layers, 4 experts, top-2)"
# prompt, num_frames, guidance, temperature, top_k, top_p, seed, sub-model: the /generate argument order
# the demo's inputs at a bare pipe() call's sampling defaults (guidance, temperature, top_k, top_p, seed), which the
# tests compare its clips with
SETTINGS = (PROMPT, 5, *(CALL_DEFAULTS[k] for k in ("guidance_scale", "temperature", "top_k", "top_p", "seed")), FULL)


@pytest.fixture(scope="module")
def pipe():
    # fp32 decode: the previews (fp32 decode_latent) are compared with the clip's frames
    return tiny_pipeline().to(decode_dtype=torch.float32)


@pytest.fixture(scope="module")
def client(pipe):
    app = demo.launch(pipe, port=None, block=False)
    try:
        assert app.local_url.startswith("http://127.0.0.1:")
        yield gradio_client.Client(app.local_url, verbose=False)
    finally:
        app.close()


def _to_frames(video: torch.Tensor) -> np.ndarray:
    return to_uint8(video).permute(0, 2, 3, 4, 1).numpy()


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


def test_first_preview_reads_the_tokenizers_code_maps():
    """A tokenizer with preview_code_maps: the 1x1 preview is the first frame of the clip's own 1x1 decode."""
    pipe = tiny_pipeline()
    tok = VideoTokenizer(**TOK, coarse_codes=8, preview_decoder=True, preview_code_maps=True)
    with torch.no_grad():
        tok.preview_code_map.normal_()
    pipe.video_tokenizer = tok
    pipe.to(decode_dtype=torch.float32)
    kwargs = dict(num_frames=5, guidance_scale=3.0, temperature=1.0, top_k=0, top_p=1.0, seed=0)
    out, previews = demo.Demo(pipe)._generate(PROMPT, None, kwargs, None)
    first = _downscale(previews[0][0], 32)
    expected = _to_frames(tok.decode_partial(out.codes, 0))[0, 0]
    assert np.abs(first.astype(int) - expected).max() <= 1
    with torch.no_grad():
        tok.preview_code_map.zero_()
    assert np.abs(first.astype(int) - _to_frames(tok.decode_partial(out.codes, 0))[0, 0]).max() > 8  # maps read


def test_previews_of_a_preview_codes_tokenizer_read_the_sketch_of_the_generated_frame():
    """The AR model samples no preview codes: the demo sketches the first frame it generated, and its previews
    are that frame's coarse prefixes with those preview codes."""
    pipe = tiny_pipeline()
    tok = VideoTokenizer(**TOK, fold_time=True, preview_decoder=True, preview_codes=(4, 6, 6))
    side = tok.resolution
    tok.preview_palette.fit(torch.rand(8, 3, 5, side, side) * 2 - 1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in tok.preview_palette.patches:
            p.normal_()
    pipe.video_tokenizer = tok
    pipe.to(decode_dtype=torch.float32)
    kwargs = dict(num_frames=5, guidance_scale=3.0, temperature=1.0, top_k=0, top_p=1.0, seed=0)
    out, previews = demo.Demo(pipe)._generate(PROMPT, None, kwargs, None)
    first = out.codes.split()[0].first_frame()
    plain = _to_frames(tok.decode_partial(first, 0))[0, 0]
    frame = torch.from_numpy(out.frames[:1, :1]).permute(0, 4, 1, 2, 3)  # (1, 3, 1, H, W) uint8
    first.previews = tok.preview_palette.encode(frame / 127.5 - 1)
    for s in range(3):
        expected = _to_frames(tok.decode_partial(first, s))[0, 0]
        assert np.abs(_downscale(previews[s][0], 32).astype(int) - expected).max() <= 1
    assert np.abs(_downscale(previews[0][0], 32).astype(int) - plain).max() > 8  # the patches were read


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
    frames = to_uint8(clip).permute(1, 2, 3, 0).numpy()
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
    from omniar.commands import demo

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

    from omniar.commands import demo

    Image.new("RGB", (64, 48)).save(tmp_path / "big.png")
    monkeypatch.setattr(demo, "MAX_UPLOAD_PIXELS", 64 * 48 - 1)
    with pytest.raises(gr.Error) as info:
        demo.Demo(pipe).reconstruct(str(tmp_path / "big.png"))
    assert info.value.message.startswith("Video or image (file): 64x48 frames are larger than the demo takes")


@pytest.mark.parametrize("device, message", [("foo", "device: must be cpu or cuda[:N], got 'foo'"),
                                             ("mps", "device: must be cpu or cuda[:N], got 'mps'"),
                                             ("cuda:99", "device: 'cuda:99': ")])
def test_bad_device_is_one_line_before_loading(capsys, monkeypatch, device, message):
    from omniar.cli import main
    from omniar.generation.pipeline import TextToVideoPipeline

    monkeypatch.setattr(TextToVideoPipeline, "from_pretrained", lambda *a: pytest.fail("loaded before the check"))
    assert main(["demo", "--device", device]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"omniar: error: {message}") and err.count("\n") == 1, err


def test_bad_model_names_the_option(tmp_path, capsys):
    from omniar.cli import main

    assert main(["demo", "--device", "cpu", "--model", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.startswith(f"omniar: error: model: {tmp_path / 'nope'}")


def test_lone_surrogate_prompt_names_the_prompt(client):
    """JSON may escape a lone surrogate ("\\ud800"), which no client library sends: plain HTTP."""
    import json
    import urllib.request

    url = f"{client.src.rstrip('/')}/gradio_api/call/generate"
    body = json.dumps({"data": ["a\ud800b", *SETTINGS[1:]]}).encode()  # ensure_ascii: the escape, not UTF-8
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        event_id = json.load(response)["event_id"]
    with urllib.request.urlopen(f"{url}/{event_id}", timeout=60) as response:
        assert "Prompt (prompt): is not valid text" in response.read().decode()


def test_every_route_to_the_model_respects_the_queue_limit(pipe, monkeypatch):
    """Plain HTTP, as a script would send it: 8 requests at once to each route of a --max-queue 2 app."""
    import json
    import threading
    import time
    import urllib.error
    import urllib.request

    calls = []
    original = demo.Demo._generate

    def slow(self, *args):  # long enough that the 8 requests overlap
        calls.append(1)
        time.sleep(0.5)
        return original(self, *args)

    monkeypatch.setattr(demo.Demo, "_generate", slow)
    app = demo.launch(pipe, port=None, max_queue=2, block=False)
    api = f"{app.local_url.rstrip('/')}/gradio_api"
    events = []  # an accepted /call/ POST returns at once; its work goes on in the queue

    def post(route: str, codes: list) -> None:
        request = urllib.request.Request(f"{api}/{route}/generate",
                                         data=json.dumps({"data": list(SETTINGS)}).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                codes.append(response.status)
                events.append(json.loads(response.read())["event_id"])
        except urllib.error.HTTPError as err:
            codes.append(err.code)

    def burst(route: str) -> list:
        codes = []
        threads = [threading.Thread(target=post, args=(route, codes)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return sorted(codes)

    try:
        assert burst("run") == [404] * 8 and not calls  # the route that skipped the queue is closed
        codes = burst("call")  # joins the queue: at most 2 waiting (+ the one running), the rest turned away
        assert codes.count(503) >= 5 and set(codes) == {200, 503}, codes
        # every accepted request runs to the end (and none is still generating when the app closes: a torch call
        # left running in a worker thread aborted the interpreter at exit)
        for event in events:
            with urllib.request.urlopen(f"{api}/call/generate/{event}", timeout=120) as response:
                assert b"event: complete" in response.read()
        assert len(calls) == len(events) == codes.count(200)
    finally:
        app.close()
