"""Property-based tests of the ``omniar`` CLI: any argument list either works (exit 0, output written)
or fails with one error line naming the argument (exit 2) — never a traceback, never a hang."""

import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from omniar.cli import main

ROOT = Path(__file__).resolve().parents[1]

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


PLACES = ["fresh", "under_a_file", "existing_folder"]


def out_path(tmp_path: Path, name: str, suffix: str, place: str) -> tuple[Path, str]:
    """(fresh work folder, --out): ``name + suffix`` in it, under a file in it, or an existing folder of it."""
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    (work / "file").write_text("x")
    if place == "under_a_file":
        return work, str(work / "file" / f"{name}{suffix}")
    if place == "existing_folder":
        (work / f"{name}{suffix}").mkdir()
    return work, str(work / name) + suffix  # a trailing "/" kept, as a shell passes it


def written(path: Path) -> bool:
    """A non-empty file, or a folder (png-frames) holding only non-empty frame_*.png files."""
    if path.is_dir():
        files = list(path.iterdir())
        return bool(files) and all(f.name.startswith("frame_") and f.suffix == ".png" and f.stat().st_size
                                   for f in files)
    return path.is_file() and path.stat().st_size > 0


def named_argument(err: str) -> str | None:
    """The argument an error line names: ``omniar: error: NAME: ...`` or argparse's ``argument --NAME``."""
    m = re.search(r"argument --([\w-]+)", err) or re.search(r"omniar: error: ([\w ().]+?):", err)
    return m.group(1).replace("-", "_") if m else None


@SETTINGS
@given(prompt=st.text(max_size=40) | st.just("a\udcffb"), options=st.dictionaries(  # and bash's $'a\xffb'
    st.sampled_from(["--num-frames", "--guidance-scale", "--top-k", "--top-p", "--temperature", "--seed",
                     "--depth", "--num-experts", "--experts-top-k", "--fps", "--format"]),
    NUMBER_TEXT | st.sampled_from(["mp4", "gif", "png-frames", "avi"]), max_size=4),
    suffix=st.sampled_from([".mp4", ".gif", ".txt", "", "/"]), place=st.sampled_from(PLACES))
def test_generate_works_or_names_the_argument(model_dir, tmp_path, capsys, prompt, options, suffix, place):
    work, out = out_path(tmp_path, "o", suffix, place)
    argv = ["generate", "--model", str(model_dir), "--prompt", prompt, "--out", out]
    for key, value in options.items():
        argv += [key, value]
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse: unknown choice or not a number
        code = exit_.code
    err = capsys.readouterr().err
    event(f"exit {code}")
    if code == 0:
        assert "error" not in err and place != "under_a_file"
        # a video goes into a folder --out as t2v.mp4 / t2v.gif; otherwise --out's .mp4/.gif suffix sets the
        # format, or the format's suffix is appended to the name
        fmt = options.get("--format")
        into_folder = fmt != "png-frames" and (suffix == "/" or place == "existing_folder")
        if not into_folder:
            fmt = fmt or {".mp4": "mp4", ".gif": "gif"}.get(suffix)
        ext = {"mp4": ".mp4", "gif": ".gif", "png-frames": ""}[fmt or "mp4"]
        if into_folder:
            expected = Path(out) / f"t2v{ext}"
        else:
            expected = work / (("o.txt" if suffix == ".txt" else "o") + ext)
        assert written(expected), (argv, sorted(work.rglob("*")))
    else:
        assert code == 2, err
        assert "Traceback" not in err and named_argument(err) in ARGUMENTS | {"experts_top_k", "model"}, err


@SETTINGS
@given(model=st.sampled_from(["tiny", "missing", "empty"]), seed=NUMBER_TEXT,
       suffix=st.sampled_from([".mp4", ".gif", ".txt", ""]), place=st.sampled_from(PLACES))
def test_reconstruct_works_or_names_the_argument(tmp_path, capsys, tiny_tokenizer_dir, model, seed, suffix, place):
    work, out = out_path(tmp_path, "r", suffix, place)
    folder = {"tiny": tiny_tokenizer_dir, "missing": work / "nope", "empty": work}[model]
    try:
        code = main(["reconstruct", "--model", str(folder), "--seed", seed, "--out", out])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    event(f"exit {code}")
    if code == 0:
        assert written(Path(out)) and Path(out).is_file(), sorted(work.rglob("*"))
    else:
        assert code == 2 and "Traceback" not in err, err
        assert named_argument(err) in {"seed", "out", "model"}, err


def test_reconstruct_out_under_a_file_names_out(tmp_path, capsys, tiny_tokenizer_dir):
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "r.mp4"
    assert main(["reconstruct", "--model", str(tiny_tokenizer_dir), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"omniar: error: out: cannot write {out}: {tmp_path / 'file'} is not a folder\n"


@pytest.fixture(scope="module")
def tiny_tokenizer_dir(model_dir):
    return model_dir / "video_tokenizer"


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["nosuchcommand"])
    assert exit_.value.code == 2 and "invalid choice: 'nosuchcommand'" in capsys.readouterr().err


# --set values as a hostile user types them: malformed YAML, wrong types, huge numbers, lists of strings
SET_VALUES = st.sampled_from(["0", "1", "-1", "2.5", "1e8", "100000", "18446744073709551616", "nan", "[1", "[2,3]",
                              "[0.5,0.9]", "[a,b]", "[a,b,c]", "[32.9,8,8]", "[1,2,4,8]", "{}", "null", "true",
                              "abc", "5", "''"])
TRAINERS = {  # config, the --set keys tried (a whole section and a misspelled key among them)
    "tokenizer": ("configs/tokenizer_tiny.yaml",
                  ["train", "train.lr", "train.betas", "train.seed", "train.zero_stage", "train.micro_batch_size",
                   "train.steps", "train.lr_typo", "data.num_workers", "data.size", "data.num_frames",
                   "model.channels", "model.scales", "model.codebook_size", "model.latent_channels"]),
    "ar": ("configs/ar_tiny.yaml",
           ["train.betas", "train.seed", "train.micro_batch_size", "train.caption_dropout", "data.num_workers",
            "data.cache_dir", "data.num_frames", "data.max_num_frames", "model.hidden_size", "model.num_experts",
            "model", "data"]),
    "refiner": ("configs/refiner_shapes.yaml",
                ["train.lr", "train.num_clips", "train.seed", "model.refiner_blocks", "model.refiner_channels",
                 "model.refiner_norm", "model.refiner_scale", "data.size"]),
}


class _Started(Exception):
    """Raised where the engine would start: every check of the config has passed by then."""


@pytest.fixture
def engine_never_starts(monkeypatch):
    def started(*args, **kwargs):
        raise _Started

    for trainer in TRAINERS:
        monkeypatch.setattr(f"omniar.train.{trainer}.TrainEngine", started)


@SETTINGS
@given(trainer=st.sampled_from(sorted(TRAINERS)), data=st.data(),
       out=st.sampled_from(["fresh", "deep/fresh", "under_a_file", "a_file"]))
def test_trainers_take_set_values_or_name_the_option(engine_never_starts, tmp_path, capsys, trainer, data, out):
    """Any --set values and --out either pass every check (the engine would start) or fail with one line
    naming an option of that trainer (exit 2), before anything is written."""
    config, keys = TRAINERS[trainer]
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    (work / "file").write_text("x")
    out_dir = {"fresh": work / "run", "deep/fresh": work / "a" / "b", "under_a_file": work / "file" / "run",
               "a_file": work / "file"}[out]
    overrides = data.draw(st.dictionaries(st.sampled_from(keys), SET_VALUES, max_size=3))
    argv = ["train", trainer, "--config", str(ROOT / config), "--out", str(out_dir)]
    for key, value in overrides.items():
        value = str(work / "file") if key == "data.cache_dir" and value == "abc" else value  # a cache that is a file
        argv += ["--set", f"{key}={value}"]
    try:
        code = main(argv)
    except _Started:
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    event(f"{trainer}: exit {code}")
    if code == 0:
        assert out in ("fresh", "deep/fresh"), argv
    else:
        assert code == 2 and "Traceback" not in err and "\n" not in err.strip(), err
        # the option itself, or (a misspelled key, a bad section) the section holding it
        assert named_argument(err) in set(keys) | {"model", "data", "train", "out"}, err
    assert sorted(p.name for p in work.iterdir()) == ["file"], argv  # nothing written
