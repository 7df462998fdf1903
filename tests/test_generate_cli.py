"""``omniar generate``: formats, --batch, the printed paths, and one-line errors with exit code 2."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from omniar.cli import main
from omniar.data.video_io import read_video
from omniar.commands.generate import output_paths
from test_t2v import PROMPT, tiny_pipeline

OTHER = "a blue square moves up on a white background"


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


@pytest.fixture(scope="module")
def model_dir(pipe, tmp_path_factory):
    return str(pipe.save_pretrained(tmp_path_factory.mktemp("cli") / "pipe"))


def generate(model_dir, *args):
    return main(["generate", "--model", model_dir, "--num-frames", "5", *map(str, args)])


def test_mp4_prints_where_it_wrote(model_dir, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    assert generate(model_dir, "--prompt", PROMPT, "--out", out) == 0
    assert f"wrote {out} (" in capsys.readouterr().out
    assert read_video(out).shape == (5, 32, 32, 3)


def test_format_flag_adds_the_suffix(model_dir, tmp_path, capsys):
    assert generate(model_dir, "--prompt", PROMPT, "--out", tmp_path / "clip", "--format", "gif") == 0
    assert (tmp_path / "clip.gif").is_file() and f"wrote {tmp_path / 'clip.gif'}" in capsys.readouterr().out


def test_batch_png_frames_equal_single_runs(pipe, model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"# two prompts\n{PROMPT}\n\n  {OTHER}  \n")
    assert generate(model_dir, "--batch", prompts, "--out", tmp_path / "run", "--format", "png-frames") == 0
    captured = capsys.readouterr()
    assert "prompts" in captured.err  # the batch progress bar
    for i, prompt in enumerate((PROMPT, OTHER)):
        folder = tmp_path / f"run_{i:03d}"
        assert f"wrote {folder} (" in captured.out
        frames = np.stack([np.asarray(Image.open(folder / f"frame_{t:03d}.png")) for t in range(5)])
        assert sorted(p.name for p in folder.iterdir()) == [f"frame_{t:03d}.png" for t in range(5)]
        assert np.array_equal(frames, pipe(prompt, num_frames=5, seed=0).frames[0])  # png is lossless
    assert not (tmp_path / "run_002").exists()


@pytest.mark.parametrize("args, message", [
    (["--prompt", PROMPT, "--num-frames", "6"], "num_frames: must be 1 + 4 * k"),
    (["--prompt", PROMPT, "--top-p", "0"], "top_p: must be > 0.0"),
    (["--prompt", " "], "prompt: must not be empty"),
    (["--prompt", PROMPT, "--out", "OUT/x.mp4", "--format", "gif"], "format: gif conflicts with --out 'x.mp4'"),
    (["--batch", "OUT/missing.txt"], "batch: file not found"),
    (["--batch", "OUT/empty.txt"], "batch: "),
    (["--prompt", PROMPT, "--out", "..", "--format", "png-frames"], "out: must end in a file or folder name, got '..'"),
    (["--prompt", PROMPT, "--out", "OUT/empty.txt/x.mp4"], "out: cannot write"),
    (["--prompt", PROMPT, "--fps", "0"], "fps: must be >= 1"),
    (["--prompt", PROMPT, "--fps", "100000"], "fps: must be <= 240"),
    (["--prompt", "a\udcffb"], "prompt: is not valid text"),  # what bash's $'a\xffb' becomes in sys.argv
    (["--prompt", "a\ud800b"], "prompt: is not valid text"),
    (["--prompt", PROMPT, "--model", "OUT/nope"], "model: "),
    (["--prompt", PROMPT, "--device", "mps", "--model", "OUT/nope"], "device: must be cpu or cuda[:N], got 'mps'"),
    (["--prompt", PROMPT, "--experts-top-k", "9"], "experts_top_k: must be <= num_experts=4"),
    (["--prompt", PROMPT, "--num-experts", "1"], "num_experts: must be >= the model's top_k=2 unless a smaller "
                                                 "experts_top_k is given"),
])
def test_bad_input_exits_2_with_one_line(model_dir, tmp_path, capsys, args, message):
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    args = [a.replace("OUT", str(tmp_path)) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "x.mp4")]
    assert generate(model_dir, *args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("omniar: error: ") and message in err and "\n" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]  # nothing written


@pytest.mark.parametrize("flags, setting", [(["--decode-dtype", "float32"], {"decode_dtype": torch.float32}),
                                           (["--dtype", "bfloat16"], {"dtype": torch.bfloat16})])
def test_precision_flags_reach_the_pipeline(model_dir, tmp_path, flags, setting):
    """The written frames are those of the pipeline moved to the flags' setting (png is lossless)."""
    from omniar.generation.pipeline import TextToVideoPipeline

    out = tmp_path / "x.png"
    assert generate(model_dir, "--prompt", PROMPT, "--num-frames", 1, "--out", out, *flags) == 0
    want = TextToVideoPipeline.from_pretrained(model_dir).to(**setting)(PROMPT, num_frames=1, seed=0).frames[0, 0]
    assert np.array_equal(np.asarray(Image.open(out)), want)


@pytest.mark.parametrize("out, fmt", [("", None), (".", "png-frames"), ("/", "png-frames"), ("..", "png-frames"),
                                      ("clips/..", "png-frames")])
def test_out_without_a_name_is_refused(out, fmt):
    with pytest.raises(ValueError, match="^out: must end in a file or folder name"):
        output_paths(out, fmt, None)


def test_a_folder_out_gets_the_video_inside(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert generate(model_dir, "--prompt", PROMPT, "--out", "new/") == 0
    assert generate(model_dir, "--prompt", PROMPT, "--out", "new", "--format", "gif") == 0  # now it exists
    assert generate(model_dir, "--prompt", PROMPT, "--out", ".") == 0
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["new", "t2v.gif", "t2v.mp4", "t2v.mp4"]
    assert output_paths("new", None, 2)[1] == [Path("new/t2v_000.mp4"), Path("new/t2v_001.mp4")]


@pytest.mark.parametrize("bad, message", [("x" * 2000, "prompt: must be at most 1000 characters"),
                                          ("x" * 500, "prompt: is too long: 502 tokens")])
def test_bad_prompt_in_batch_fails_before_any_clip(model_dir, tmp_path, capsys, monkeypatch, bad, message):
    from omniar.generation.pipeline import TextToVideoPipeline

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"{PROMPT}\n{bad}\n")
    monkeypatch.setattr(TextToVideoPipeline, "__call__", lambda *a, **k: pytest.fail("generated before the check"))
    assert generate(model_dir, "--batch", prompts, "--out", tmp_path / "run.gif") == 2
    assert f"batch: prompt 2: {message}" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt"]


def test_bad_fps_fails_before_generating(model_dir, tmp_path, monkeypatch):
    from omniar.generation.pipeline import TextToVideoPipeline

    monkeypatch.setattr(TextToVideoPipeline, "__call__", lambda *a, **k: pytest.fail("generated before the check"))
    assert generate(model_dir, "--prompt", PROMPT, "--fps", "0", "--out", tmp_path / "x.mp4") == 2


def test_unknown_format_is_a_usage_error(model_dir):
    with pytest.raises(SystemExit) as exit_info:
        generate(model_dir, "--prompt", PROMPT, "--format", "avi")
    assert exit_info.value.code == 2


def test_sampling_defaults_are_the_pipelines():
    """``omniar generate`` samples like a bare ``pipe(prompt)`` call: its defaults are the pipeline's own."""
    import inspect

    from omniar.cli import build_parser
    from omniar.generation import TextToVideoPipeline

    args = build_parser().parse_args(["generate", "--prompt", PROMPT, "--out", "x.mp4"])
    params = inspect.signature(TextToVideoPipeline.__call__).parameters
    for name in ("num_frames", "guidance_scale", "guidance_schedule", "top_k", "top_p", "temperature", "seed"):
        assert getattr(args, name) == params[name].default, name
