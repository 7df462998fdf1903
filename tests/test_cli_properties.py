"""Property-based tests of the ``omniar`` CLI: any argument list either works (exit 0, output written)
or fails with one error line naming the argument (exit 2) — never a traceback, never a hang."""

import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from omniar.cli import main

from test_t2v import tiny_pipeline

# Hypothesis runs every example in one call of the test, so each example writes into its own fresh folder
# under tmp_path: what an earlier example wrote never counts as this one's output.
SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
NUMBER_TEXT = st.sampled_from(["0", "1", "-1", "2.5", "nan", "inf", "-inf", "1e9", "abc", "", "5", "9", "17"])
ARGUMENTS = {"prompt", "batch", "out", "format", "num_frames", "guidance_scale", "top_k", "top_p", "temperature",
             "seed", "depth", "num_experts", "top_k (experts)", "fps", "elastic"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "pipe"
    tiny_pipeline().save_pretrained(folder)
    return folder


def written(path: Path) -> bool:
    """A non-empty file, or a folder (png-frames) holding only non-empty frame_*.png files."""
    if path.is_dir():
        files = list(path.iterdir())
        return bool(files) and all(f.name.startswith("frame_") and f.suffix == ".png" and f.stat().st_size
                                   for f in files)
    return path.is_file() and path.stat().st_size > 0


def named_argument(err: str) -> str | None:
    """The argument an error line names: ``omniar: error: NAME: ...`` or argparse's ``argument --NAME``."""
    m = re.search(r"argument --([\w-]+)", err) or re.search(r"omniar: error: ([\w ()]+?):", err)
    return m.group(1).replace("-", "_") if m else None


@SETTINGS
@given(prompt=st.text(max_size=40), options=st.dictionaries(
    st.sampled_from(["--num-frames", "--guidance-scale", "--top-k", "--top-p", "--temperature", "--seed",
                     "--depth", "--num-experts", "--experts-top-k", "--fps", "--format"]),
    NUMBER_TEXT | st.sampled_from(["mp4", "gif", "png-frames", "avi"]), max_size=4),
    suffix=st.sampled_from([".mp4", ".gif", ".txt", "", "/"]))
def test_generate_works_or_names_the_argument(model_dir, tmp_path, capsys, prompt, options, suffix):
    out = Path(tempfile.mkdtemp(dir=tmp_path)) / f"o{suffix}"
    argv = ["generate", "--model", str(model_dir), "--prompt", prompt, "--out", str(out)]
    for key, value in options.items():
        argv += [key, value]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse: unknown choice or not a number
        code = exit_.code
    err = capsys.readouterr().err
    event(f"exit {code}")
    if code == 0:
        assert "error" not in err
        # --out's .mp4/.gif suffix sets the format; otherwise the format's suffix is appended to the name
        fmt = options.get("--format") or {".mp4": "mp4", ".gif": "gif"}.get(suffix, "mp4")
        name = "o.txt" if suffix == ".txt" else "o"
        expected = out.parent / (name + {"mp4": ".mp4", "gif": ".gif", "png-frames": ""}[fmt])
        assert written(expected), (argv, sorted(out.parent.rglob("*")))
    else:
        assert code == 2, err
        assert "Traceback" not in err and named_argument(err) in ARGUMENTS | {"experts_top_k"}, err


@SETTINGS
@given(model=st.sampled_from(["tiny", "missing", "empty"]), seed=NUMBER_TEXT,
       suffix=st.sampled_from([".mp4", ".gif", ".txt", ""]))
def test_reconstruct_works_or_names_the_argument(tmp_path, capsys, tiny_tokenizer_dir, model, seed, suffix):
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    out = work / f"r{suffix}"
    folder = {"tiny": tiny_tokenizer_dir, "missing": work / "nope", "empty": work}[model]
    try:
        code = main(["reconstruct", "--model", str(folder), "--seed", seed, "--out", str(out)])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    event(f"exit {code}")
    if code == 0:
        assert written(out) and out.is_file(), sorted(work.rglob("*"))
    else:
        assert code == 2 and "Traceback" not in err, err
        assert named_argument(err) in {"seed", "out", "pretrained_model_name_or_path"}, err


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(model_dir):
    return model_dir / "video_tokenizer"


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["nosuchcommand"])
    assert exit_.value.code == 2 and "invalid choice: 'nosuchcommand'" in capsys.readouterr().err
