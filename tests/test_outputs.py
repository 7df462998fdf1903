"""Outputs as users reach for them: diffusers' output types and generator, export_to_video, image formats,
--gif, --upscale, warnings for words the model never saw, defaults in --help, and a fast ``omniar --help``."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from omniar.cli import main
from omniar.data.shapes import vocabulary
from omniar.data.video_io import read_video
from omniar.generation import TextToVideoPipeline
from test_t2v import PROMPT, tiny_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def uint8(pipe):
    return pipe(PROMPT, num_frames=5, seed=3).frames


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    pipe = tiny_pipeline()
    pipe.vocabulary = tuple(vocabulary())
    return str(pipe.save_pretrained(tmp_path_factory.mktemp("outputs") / "pipe"))


def test_output_types_hold_the_same_pixels(pipe, uint8):
    as_np = pipe(PROMPT, num_frames=5, seed=3, output_type="np").frames
    as_pt = pipe(PROMPT, num_frames=5, seed=3, output_type="pt").frames
    as_pil = pipe(PROMPT, num_frames=5, seed=3, output_type="pil").frames
    assert as_np.dtype == np.float32 and as_np.shape == uint8.shape and 0 <= as_np.min() <= as_np.max() <= 1
    assert np.array_equal((as_np * 255).astype(np.uint8), uint8)  # diffusers' own conversion is exact
    assert isinstance(as_pt, torch.Tensor) and as_pt.shape == (1, 5, 3, 32, 32)
    assert torch.equal(as_pt.permute(0, 1, 3, 4, 2).mul(255).round().to(torch.uint8), torch.from_numpy(uint8))
    assert len(as_pil) == 1 and len(as_pil[0]) == 5 and all(im.mode == "RGB" for im in as_pil[0])
    assert np.array_equal(np.stack([np.asarray(im) for im in as_pil[0]]), uint8[0])


def test_generator_replaces_seed(pipe, uint8):
    same = pipe(PROMPT, num_frames=5, generator=torch.Generator().manual_seed(3)).frames
    assert np.array_equal(same, uint8)
    generator = torch.Generator().manual_seed(3)
    first, second = (pipe(PROMPT, num_frames=5, generator=generator).frames for _ in range(2))
    assert not np.array_equal(first, second)  # the generator advances, as in diffusers


@pytest.mark.parametrize("kwargs, message", [
    ({"output_type": "latent"}, "output_type: must be one of"),
    ({"generator": 3}, "generator: must be None or a CPU torch.Generator"),
])
def test_bad_output_arguments_are_named(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(PROMPT, num_frames=1, **kwargs)


@pytest.mark.parametrize("output_type", ["np", "pil"])
def test_export_to_video_writes_the_clip(pipe, uint8, output_type, tmp_path):
    from diffusers.utils import export_to_video

    frames = pipe(PROMPT, num_frames=5, seed=3, output_type=output_type).frames
    path = export_to_video(frames[0], str(tmp_path / "clip.mp4"), fps=8, quality=10, macro_block_size=1)
    back = read_video(path)
    assert back.shape == uint8[0].shape
    # H.264 blurs the tiny model's noise, but keeps each frame's colour (a uint8 clip would come back inverted)
    assert np.abs(back.mean((1, 2)) - uint8[0].mean((1, 2))).max() < 3


def test_vocabulary_is_saved_and_names_unknown_words(pipe, model_dir):
    loaded = TextToVideoPipeline.from_pretrained(model_dir)
    assert loaded.vocabulary == tuple(vocabulary())
    assert loaded.unknown_words("A cat jumps over a RED circle, orange cat") == ["cat", "jumps", "orange"]
    assert loaded.unknown_words(PROMPT) == []
    assert pipe.unknown_words("a cat") == []  # no vocabulary recorded: nothing to warn about
    assert TextToVideoPipeline.from_pretrained().unknown_words("a cat jumps") == ["cat", "jumps"]  # shipped


def test_bad_vocabulary_in_a_folder_is_refused(model_dir, tmp_path):
    import json
    import shutil

    folder = shutil.copytree(model_dir, tmp_path / "pipe")
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(index | {"vocabulary": ["two words"]}))
    with pytest.raises(ValueError, match="model_index.json: vocabulary: must be None or a list"):
        TextToVideoPipeline.from_pretrained(folder)


def generate(model_dir, *args):
    return main(["generate", "--model", model_dir, *map(str, args)])


@pytest.mark.parametrize("suffix, fmt", [(".png", "PNG"), (".jpg", "JPEG"), (".webp", "WEBP")])
def test_one_frame_to_an_image_suffix_writes_that_image(model_dir, tmp_path, capsys, suffix, fmt):
    out = tmp_path / f"x{suffix}"
    assert generate(model_dir, "--prompt", PROMPT, "--num-frames", 1, "--out", out) == 0
    assert f"wrote {out} (" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # not x.png.mp4
    with Image.open(out) as image:
        assert image.format == fmt and image.size == (32, 32)


def test_image_format_needs_one_frame(model_dir, tmp_path, capsys):
    assert generate(model_dir, "--prompt", PROMPT, "--num-frames", 5, "--out", tmp_path / "x.png") == 2
    assert "omniar: error: out: png holds one image: add --num-frames 1" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_gif_flag_and_upscale(model_dir, tmp_path):
    assert generate(model_dir, "--prompt", PROMPT, "--num-frames", 5, "--out", tmp_path / "clip", "--gif",
                    "--upscale", 3) == 0
    frames = read_video(tmp_path / "clip.gif")
    assert frames.shape[1:] == (96, 96, 3)
    assert np.array_equal(frames[:, ::3, ::3].repeat(3, 1).repeat(3, 2), frames)  # nearest: 3x3 blocks


def test_bad_upscale_is_named_before_any_work(model_dir, tmp_path, capsys):
    assert generate(model_dir, "--prompt", PROMPT, "--upscale", 0, "--out", tmp_path / "x.mp4") == 2
    assert "omniar: error: upscale: must be >= 1, got 0" in capsys.readouterr().err


def test_unknown_words_are_warned_about(model_dir, tmp_path, capsys):
    assert generate(model_dir, "--prompt", "a cat jumps", "--num-frames", 1, "--out", tmp_path / "x.png") == 0
    err = capsys.readouterr().err
    assert "omniar: warning: prompt: the model does not know 'cat', 'jumps'; it knows: a background black" in err
    assert generate(model_dir, "--prompt", PROMPT, "--num-frames", 1, "--out", tmp_path / "y.png") == 0
    assert "warning" not in capsys.readouterr().err


def test_demo_warns_about_unknown_words(model_dir):
    demo = pytest.importorskip("omniar.commands.demo")
    app = demo.Demo(TextToVideoPipeline.from_pretrained(model_dir))
    *_, stats = app.generate("a cat jumps", 1, 3.0, 1.0, 0, 1.0, 0, next(iter(app.elastic)))
    assert stats.startswith("**Unknown words:** cat, jumps. The model knows: a background black")
    *_, stats = app.generate(PROMPT, 1, 3.0, 1.0, 0, 1.0, 0, next(iter(app.elastic)))
    assert "Unknown" not in stats


def test_demo_example_clip_reconstructs(model_dir):
    demo = pytest.importorskip("omniar.commands.demo")
    app = demo.Demo(TextToVideoPipeline.from_pretrained(model_dir))
    clip = app.example_clip()
    assert read_video(clip).shape == (17, 32, 32, 3)
    strips, video, table = app.reconstruct(clip)
    assert len(strips) == 4 and "17 frame(s)" in table


@pytest.mark.parametrize("command", [["generate"], ["eval", "t2v"], ["train", "classifier"], ["reconstruct"]])
def test_help_shows_defaults(command, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    expected = {"generate": "(default: 3.0)", "eval": "(default: 64)", "train": "(default: 1500)",
                "reconstruct": "(default: outputs/reconstruction.mp4)"}[command[0]]
    assert expected in text


def test_top_level_help_imports_no_subcommand():
    code = ("import sys; from omniar.cli import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
            "print(sorted(m for m in ('torch', 'numpy', 'omniar.generation', 'omniar.train') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("[]")
