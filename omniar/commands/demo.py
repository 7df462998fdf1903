"""``omniar demo``: a Gradio app for text-to-video and the video tokenizer (127.0.0.1:7860 by default).

Nothing a visitor sends becomes a path, a file name or a shell argument: settings are numbers, a
short prompt and a choice from a fixed list; uploads are files Gradio already stored in its own
cache, and every file the app writes gets a name chosen here, in a folder of its own.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import threading
import uuid
from collections import deque
from pathlib import Path

import numpy as np
import torch

from .._checks import check_int, named
from ..data.shapes import HELDOUT, TRAIN_COMBINATIONS, MovingShapes, caption
from ..data.video_io import probe_video, read_video, write_video
from ..generation.pipeline import CALL_DEFAULTS, MAX_PROMPT_CHARS, TextToVideoPipeline
from ..pixels import from_uint8, to_uint8, upscale
from ._device import add_device_arguments, chosen_device, place
from .generate import fit_frames

FPS = 8
DISPLAY_SIDE = 256  # clips are 32-64 px: nearest-neighbour upscaling keeps them crisp instead of browser-blurred
MAX_RECONSTRUCT_FRAMES = 17
MAX_UPLOAD_PIXELS = 1920 * 1080  # uploads are centre-cropped and resized to the tokenizer's few pixels
KEEP_OUTPUTS = 64  # files written here; Gradio copies each into its cache before the next request needs room

# pipeline argument -> the label of its control, so error messages name what the visitor sees
LABELS = {"prompt": "Prompt", "num_frames": "Frames", "guidance_scale": "Guidance", "temperature": "Temperature",
          "top_k": "Top-k", "top_p": "Top-p", "seed": "Seed", "elastic": "Sub-model", "file": "Video or image",
          "start": "Start from"}


def example_prompts() -> tuple[list[str], list[str]]:
    """(seen, held-out) Moving Shapes captions: combinations the model trained on, and ones it never saw."""
    seen = [caption(*TRAIN_COMBINATIONS[i], template=i % 4) for i in (0, 31, 62, 93)]
    held_out = [caption(*combo) for combo in HELDOUT[:4]]
    return seen, held_out


def elastic_choices(config) -> dict[str, dict | None]:
    """Sub-models the elastic training covers, by label: full, half depth, half the experts with top-1, both."""
    full = f"full ({config.num_layers} layers, {config.num_experts} experts, top-{config.top_k})"
    choices: dict[str, dict | None] = {full: None}
    depth, experts = max(1, config.num_layers // 2), max(1, config.num_experts // 2)
    layers = f"{depth} layer{'s' if depth > 1 else ''}"
    if depth < config.num_layers:
        choices[layers] = {"depth": depth}
    if experts < config.num_experts:
        choices[f"{experts} experts, top-1"] = {"num_experts": experts, "top_k": 1}
    if depth < config.num_layers and experts < config.num_experts:
        choices[f"{layers}, {experts} experts, top-1"] = {"depth": depth, "num_experts": experts, "top_k": 1}
    return choices


def _error(err: ValueError):
    """``ValueError("num_frames: ...")`` -> ``gr.Error("Frames (num_frames): ...")``."""
    import gradio as gr

    name, sep, detail = str(err).partition(": ")
    if sep and name in LABELS:
        return gr.Error(f"{LABELS[name]} ({name}): {detail}")
    return gr.Error(str(err))


def _whole(value, name: str) -> int:
    """Browsers may send 17 as 17.0: accept whole floats, reject everything else by name."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"{name}: must be a whole number, got {value!r}")


def _upscale(frames: np.ndarray) -> np.ndarray:
    """Nearest-neighbour upscale (..., H, W, 3) by the integer factor that reaches DISPLAY_SIDE."""
    return upscale(frames, max(1, math.ceil(DISPLAY_SIDE / frames.shape[-2])))


def _pixels(tok) -> str:
    """The tokenizer's frame size for a label: ``64 px`` when square, else ``48x80 px`` (height x width)."""
    height, width = tok.frame_size
    return f"{height} px" if height == width else f"{height}x{width} px"


def _to_uint8(pixels: torch.Tensor) -> np.ndarray:
    """(B, 3, T, H, W) in [-1, 1] -> uint8 (B, T, H, W, 3), rounded like the pipeline's frames."""
    return to_uint8(pixels).permute(0, 2, 3, 4, 1).cpu().numpy()


class _OutputFiles:
    """Fresh, app-chosen file names in a private folder; only the newest KEEP_OUTPUTS are kept."""

    def __init__(self):
        self._dir = tempfile.TemporaryDirectory(prefix="omniar-demo-")
        self.folder = Path(self._dir.name)
        self._files: deque[Path] = deque()
        self._lock = threading.Lock()

    def new(self, suffix: str) -> Path:
        path = self.folder / f"{uuid.uuid4().hex}{suffix}"
        with self._lock:
            self._files.append(path)
            while len(self._files) > KEEP_OUTPUTS:
                self._files.popleft().unlink(missing_ok=True)
        return path


class UploadTooLarge(ValueError):
    """An upload readable but too large: its own message, not "cannot read it"."""


def _check_upload_size(width: int, height: int) -> None:
    """Refuse huge frames from their headers, before any pixel is decoded."""
    if width * height > MAX_UPLOAD_PIXELS:
        raise UploadTooLarge(f"file: {width}x{height} frames are larger than the demo takes "
                             f"({MAX_UPLOAD_PIXELS} pixels)")


def _load_media(path: str, max_frames: int) -> np.ndarray:
    """An uploaded image or video -> uint8 (T, H, W, 3), at most ``max_frames`` frames."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            if getattr(image, "n_frames", 1) == 1:  # animated gifs / webps go through the video reader
                _check_upload_size(*image.size)
                return np.asarray(image.convert("RGB"))[None]
    except UnidentifiedImageError:
        pass
    probe = probe_video(path)
    _check_upload_size(probe.width, probe.height)
    return read_video(path, list(range(min(probe.num_frames, max_frames))))


class Demo:
    """The app's two handlers around one pipeline, and the Blocks layout that wires them."""

    def __init__(self, pipe: TextToVideoPipeline):
        self.pipe = pipe
        self.elastic = elastic_choices(pipe.model.omniar_config)
        self.outputs = _OutputFiles()
        # model.elastic() switches the shared model's active sub-model: model work runs one request at a
        # time, whatever the queue's concurrency
        self._lock = threading.Lock()

    # ------------------------------------------------------------- handlers
    def generate(self, prompt, num_frames, guidance_scale, temperature, top_k, top_p, seed, sub_model,
                 progress=None, start=None):
        """-> (mp4 path, first-frame previews one per scale, timing text). Raises ``gr.Error`` on bad input.
        ``start``: an uploaded video or image (a path, or Gradio's file data) whose first 1 + tau k frames are
        continued."""
        try:
            if not isinstance(prompt, str):  # the pipeline would take a list as a batch: one clip per request
                raise ValueError(f"prompt: must be a string, got {type(prompt).__name__}")
            kwargs = dict(num_frames=_whole(num_frames, "num_frames"), guidance_scale=guidance_scale,
                          temperature=temperature, top_k=_whole(top_k, "top_k"), top_p=top_p,
                          seed=_whole(seed, "seed"))
            if not isinstance(sub_model, str) or sub_model not in self.elastic:
                raise ValueError(f"elastic: must be one of {list(self.elastic)}, got {sub_model!r}")
            if start is not None:
                kwargs["video"] = self._start_frames(start, kwargs["num_frames"])
            with self._lock:
                out, previews = self._generate(prompt, self.elastic[sub_model], kwargs, progress)
        except ValueError as err:
            raise _error(err) from err
        path = self.outputs.new(".mp4")
        write_video(path, _upscale(out.frames[0]), fps=FPS)
        t = out.timings
        stats = (f"**{t['generate_s']:.2f} s** generation ({t['forward_passes']} forward passes) + "
                 f"{t['decode_s']:.2f} s decoding · **{t['tokens_per_s']:.0f} tokens/s** · "
                 f"{out.frames.shape[1]} frames of {out.frames.shape[3]}x{out.frames.shape[2]}")
        unknown = self.pipe.unknown_words(prompt)
        if unknown:  # the model ignores these or makes something up: say so beside the clip
            stats = (f"**Unknown words:** {', '.join(unknown)}. The model knows: "
                     f"{' '.join(self.pipe.vocabulary)}\n\n{stats}")
        return str(path), previews, stats

    def _start_frames(self, start, num_frames) -> torch.Tensor:
        """An uploaded start -> (1, 3, 1 + tau k, R, R): its longest such start shorter than ``num_frames``."""
        from PIL import Image

        path = start.get("path") if isinstance(start, dict) else start  # preprocess=False: Gradio's file data
        if not isinstance(path, str) or not isinstance(num_frames, int) or num_frames < 2:
            raise ValueError("start: upload a video or an image and ask for more than one frame")
        try:
            frames = _load_media(path, num_frames - 1)
        except UploadTooLarge as err:
            raise ValueError(f"start: {str(err).partition(': ')[2]}") from err
        except (ValueError, OSError, Image.DecompressionBombError) as err:
            raise ValueError(f"start: cannot read it as a video or an image ({err})") from err
        tau = self.pipe.video_tokenizer.config.temporal_compression
        return fit_frames(frames[:1 + (len(frames) - 1) // tau * tau], self.pipe.video_tokenizer.resolution)

    def _generate(self, prompt, elastic, kwargs, progress):
        tok = self.pipe.video_tokenizer

        def on_scale(step: dict) -> None:  # called only once the pipeline has validated num_frames
            total = tok.num_latent_frames(kwargs["num_frames"]) * len(tok.scales)
            progress((step["frame"] * len(tok.scales) + step["scale"] + 1, total), desc="generating")

        out = self.pipe(prompt, elastic=elastic, callback=None if progress is None else on_scale, **kwargs)
        # The causal decoder decodes frame 0 alone exactly as in the full clip: its coarse prefixes, then all scales.
        first = out.codes.split()[0].first_frame()
        with torch.no_grad():
            if tok.preview_palette is not None:  # the AR model samples no preview codes: sketch the frame it made
                first.previews = tok.preview_palette.encode(from_uint8(torch.from_numpy(out.frames[:1, :1])).permute(
                    0, 4, 1, 2, 3))
            images = _to_uint8(torch.cat(tok.decode_previews(first)))[:, 0]
        previews = [(_upscale(img), f"scales <= {name}") for img, name in zip(images, tok.scale_names)]
        return out, previews

    def reconstruct(self, file):
        """Uploaded video or image -> (reconstruction per scale as frame strips, mp4 of the finest, PSNR text)."""
        import gradio as gr
        from PIL import Image

        from ..eval.metrics import psnr

        if not file:
            raise gr.Error(f"{LABELS['file']}: upload a video or an image first")
        tok = self.pipe.video_tokenizer
        try:
            frames = _load_media(file, MAX_RECONSTRUCT_FRAMES)
        except UploadTooLarge as err:
            raise _error(err) from err
        except (ValueError, OSError, Image.DecompressionBombError) as err:
            raise gr.Error(f"{LABELS['file']}: cannot read it as a video or an image ({err})") from err
        tau = tok.config.temporal_compression
        frames = frames[:1 + (len(frames) - 1) // tau * tau]  # the causal layout takes 1 + tau * k frames
        video = fit_frames(frames, tok.resolution)
        with self._lock, torch.no_grad():
            codes = tok.encode(video.to(tok.device))
            recs = [rec.float().cpu() for rec in tok.decode_previews(codes)]
        strips, lines = [], []
        for name, rec in zip(tok.scale_names, recs):
            strip = _to_uint8(rec)[0][:: max(1, len(frames) // 4)][:5]  # up to 5 frames, evenly spread
            strips.append((_upscale(np.concatenate(list(strip), axis=1)), f"scales <= {name}"))
            lines.append(f"| {name} | {psnr(rec, video).item():.2f} |")
        path = self.outputs.new(".mp4")
        write_video(path, _upscale(_to_uint8(recs[-1])[0]), fps=FPS)
        table = "\n".join([f"{len(frames)} frame(s) at {_pixels(tok)}\n", "| up to scale | PSNR dB |", "|---|---|",
                           *lines])
        return strips, str(path), table

    def example_clip(self) -> str:
        """A held-out Moving Shapes clip as an mp4 for the Tokenizer tab's one-click example (written once)."""
        path = self.outputs.folder / "example_clip.mp4"  # outside the rotation of KEEP_OUTPUTS
        if not path.exists():
            video = MovingShapes("heldout", 1, self.pipe.video_tokenizer.resolution, MAX_RECONSTRUCT_FRAMES)[0]
            write_video(path, to_uint8(video["video"]).permute(1, 2, 3, 0).numpy(), fps=FPS)
        return str(path)

    # --------------------------------------------------------------- layout
    def build(self, concurrency: int = 1, max_queue: int = 32):
        """The Blocks app, queued: ``concurrency`` requests at a time, at most ``max_queue`` waiting. Model work
        still runs one request at a time; more concurrency only overlaps the rest (reading uploads, writing mp4s)."""
        import gradio as gr

        pipe, tok = self.pipe, self.pipe.video_tokenizer
        seen, held_out = example_prompts()
        tau = tok.config.temporal_compression
        with gr.Blocks(title="omniar", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
            gr.Markdown("# omniar: text-to-video by next-frame, next-scale prediction\n"
                        "Describe a Moving Shapes clip: a colour, a shape, a direction and a background.")
            with gr.Tab("Text to video"):
                with gr.Row():
                    with gr.Column():
                        prompt = gr.Textbox(label=LABELS["prompt"], value=seen[0], lines=2,
                                            max_length=MAX_PROMPT_CHARS, elem_id="prompt")
                        gr.Examples([[p] for p in seen], inputs=[prompt], label="Seen in training")
                        gr.Examples([[p] for p in held_out], inputs=[prompt], label="Held-out combinations")
                        with gr.Accordion("Settings", open=False):
                            frames = gr.Slider(1, pipe.max_num_frames,
                                               value=min(CALL_DEFAULTS["num_frames"], pipe.max_num_frames), step=tau,
                                               label=LABELS["num_frames"], info=f"1 + {tau}k; 1 = image")
                            guidance = gr.Slider(0, 10, value=CALL_DEFAULTS["guidance_scale"], step=0.5,
                                                 label=LABELS["guidance_scale"],
                                                 info="classifier-free guidance; 1 = off")
                            temperature = gr.Slider(0, 2, value=CALL_DEFAULTS["temperature"], step=0.05,
                                                    label=LABELS["temperature"], info="0 = greedy")
                            top_k = gr.Slider(0, tok.config.codebook_size, value=CALL_DEFAULTS["top_k"], step=1,
                                              label=LABELS["top_k"], info="0 = off")
                            top_p = gr.Slider(0.05, 1.0, value=CALL_DEFAULTS["top_p"], step=0.05, label=LABELS["top_p"])
                            seed = gr.Number(CALL_DEFAULTS["seed"], precision=0, minimum=0, label=LABELS["seed"])
                            sub_model = gr.Dropdown(list(self.elastic), value=next(iter(self.elastic)),
                                                    label=LABELS["elastic"], info="elastic sub-model size")
                        button = gr.Button("Generate", variant="primary", elem_id="generate")
                        with gr.Accordion("Start from a video or an image (optional)", open=False):
                            start = gr.File(label=LABELS["start"], file_types=["image", "video"], type="filepath")
                            continue_button = gr.Button("Continue it", elem_id="continue")
                    with gr.Column():
                        video = gr.Video(label="Video", autoplay=True, loop=True, height=400, elem_id="video")
                        stats = gr.Markdown(elem_id="stats")
                previews = gr.Gallery(label="First frame, coarse to fine (one image per scale)",
                                      columns=len(tok.scales), rows=1, height=300, object_fit="contain", format="png")

                def generate(prompt, num_frames, guidance_scale, temperature, top_k, top_p, seed, sub_model,
                             progress=gr.Progress()):
                    return self.generate(prompt, num_frames, guidance_scale, temperature, top_k, top_p, seed,
                                         sub_model, progress)

                def continue_start(prompt, num_frames, guidance_scale, temperature, top_k, top_p, seed, sub_model,
                                   start, progress=gr.Progress()):
                    return self.generate(prompt, num_frames, guidance_scale, temperature, top_k, top_p, seed,
                                         sub_model, progress, start)

                settings = [prompt, frames, guidance, temperature, top_k, top_p, seed, sub_model]
                # preprocess=False: every value reaches our own checks, so even API clients sending
                # out-of-range numbers get a message naming the setting, not a generic bounds error.
                button.click(generate, settings, [video, previews, stats], api_name="generate", preprocess=False,
                             concurrency_id="model")
                # its own route, so /generate keeps its arguments; an upload still has to be in Gradio's cache
                # (checked before any handler, preprocess or not)
                continue_button.click(continue_start, settings + [start], [video, previews, stats],
                                      api_name="continue", preprocess=False, concurrency_id="model")
            with gr.Tab("Tokenizer"):
                gr.Markdown(f"Encode a video or an image with the {_pixels(tok)} multi-scale tokenizer "
                            f"(first {MAX_RECONSTRUCT_FRAMES} frames, centre crop) and decode it from the "
                            "coarsest scale up.")
                with gr.Row():
                    with gr.Column():
                        upload = gr.File(label=LABELS["file"], file_types=["image", "video"], type="filepath")
                        gr.Examples([[self.example_clip()]], inputs=[upload], label="Example: a held-out clip")
                    rec_video = gr.Video(label="Reconstruction (all scales)", autoplay=True, loop=True)
                rec_button = gr.Button("Reconstruct", variant="primary")
                rec_table = gr.Markdown()
                rec_strips = gr.Gallery(label="Reconstruction per scale", columns=1, height="auto",
                                        object_fit="contain", format="png")
                # preprocess stays on: Gradio then only accepts files from its own upload cache
                rec_button.click(self.reconstruct, [upload], [rec_strips, rec_video, rec_table],
                                 api_name="reconstruct", concurrency_id="model")
        # api_open=False: the direct routes (/gradio_api/run/..., /api/...) would run an event without
        # entering the queue, so neither max_size nor the concurrency limit would hold for them
        app.queue(max_size=max_queue, default_concurrency_limit=concurrency, api_open=False)
        return app


# ------------------------------------------------------------------------------ command line
def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    parser.add_argument("--model", default=None, help="pipeline folder (default: the embedded shapes-t2v)")
    parser.add_argument("--concurrency", type=int, default=1,
                        help="requests the queue runs at once; model work still runs one at a time, so more only "
                             "overlaps reading uploads and writing videos with it")
    parser.add_argument("--max-queue", type=int, default=32, help="requests allowed to wait; more are turned away")
    add_device_arguments(parser, gpu_first=True)


def launch(pipe: TextToVideoPipeline, host: str = "127.0.0.1", port: int | None = 7860, share: bool = False,
           concurrency: int = 1, max_queue: int = 32, block: bool = True):
    """Build and start the app; with ``block=False`` it returns the running app (``.local_url``, ``.close()``)."""
    check_int(concurrency, "concurrency", 1, 64)
    check_int(max_queue, "max_queue", 1, 10_000)
    if port is not None:
        check_int(port, "port", 1, 65535)
    app = Demo(pipe).build(concurrency, max_queue)
    app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
               max_file_size="25mb", quiet=not block, footer_links=["api"])
    return app


def cli_main(args: argparse.Namespace) -> int:
    device = chosen_device(args)
    with named("model"):
        pipe = TextToVideoPipeline.from_pretrained(args.model)
    place(pipe, device, args)
    launch(pipe, args.host, args.port, args.share, args.concurrency, args.max_queue)
    return 0
