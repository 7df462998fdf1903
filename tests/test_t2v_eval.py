"""omniar eval t2v pieces: which prompts are judged, and the tokenizer reference (real clips encoded + decoded)."""

import pytest
import torch

from omniar import assets
from omniar.data.shapes import HELDOUT, TRAIN_COMBINATIONS
from omniar.eval.t2v import eval_combinations, load_classifier, tokenizer_reference


class _Stub:
    """encode/decode stand-ins: a perfect tokenizer, or one that returns a grey clip."""

    resolution = 64
    device = torch.device("cpu")

    def __init__(self, perfect: bool):
        self.perfect = perfect

    def encode(self, video):
        return video

    def decode(self, video):
        return video if self.perfect else torch.zeros_like(video)


@pytest.mark.skipif("shapes-classifier" not in assets.available(), reason="classifier not shipped")
def test_tokenizer_reference_of_a_perfect_tokenizer_is_full_adherence():
    classifier = load_classifier()
    perfect = tokenizer_reference(_Stub(True), classifier, 16)
    assert perfect["all"] == 1.0
    grey = tokenizer_reference(_Stub(False), classifier, 16)
    assert grey["all"] < 0.5
    assert grey["frechet"] > 10 * perfect["frechet"]


@pytest.mark.skipif("shapes-classifier" not in assets.available(), reason="classifier not shipped")
def test_evaluate_windows_judges_frames_of_the_same_clips():
    """A stand-in pipeline returns the real clips with the second half grey: the first window is judged right,
    the last one wrong, and every window comes from one generation."""
    from types import SimpleNamespace

    from omniar.eval.t2v import evaluate_split, evaluate_windows, real_clips
    from omniar.pixels import to_uint8

    calls = []

    def pipe(prompts, num_frames, seed, **kwargs):
        calls.append(kwargs)
        combos = eval_combinations("seen", 8, 0)[seed:seed + len(prompts)]
        clips = real_clips(combos, num_frames, 64, seed=1)
        clips[:, :, num_frames // 2:] = 0
        return SimpleNamespace(frames=to_uint8(clips).permute(0, 2, 3, 4, 1).numpy())

    pipe.video_tokenizer = _Stub(True)
    classifier = load_classifier()
    windows = {"first": slice(0, 8), "last": slice(-8, None)}
    got = evaluate_windows(pipe, classifier, "seen", 8, windows, num_frames=17, batch=4, kv_budget=7)
    assert len(calls) == 2 and calls[0] == {"kv_budget": 7}  # 8 clips in batches of 4, once for both windows
    assert got["first"]["all"] == 1.0 and got["last"]["all"] < 0.5
    assert evaluate_split(pipe, classifier, "seen", 8, batch=4)["all"] < 1.0


def test_eval_combinations_repeat_none_before_all_are_used():
    seen = eval_combinations("seen", 64, 0)
    assert len(set(seen)) == 64 and set(seen) <= set(TRAIN_COMBINATIONS)
    assert eval_combinations("seen", 64, 0) == seen and eval_combinations("seen", 64, 1) != seen
    held = eval_combinations("heldout", 24, 0)
    assert held[:12] == list(HELDOUT) and held[12:] == list(HELDOUT)
    with pytest.raises(ValueError, match="^split"):  # a typo must not report the seen prompts as another split
        eval_combinations("heldou", 2, 0)


def test_each_seed_samples_with_its_own_seeds():
    """Held-out prompts come in a fixed order, so only the sampling seeds make another draw of them."""
    from types import SimpleNamespace

    from omniar.eval.t2v import generate

    used = []

    def pipe(prompts, num_frames, seed):
        used.append(seed)
        return SimpleNamespace(frames=torch.zeros(len(prompts), num_frames, 8, 8, 3, dtype=torch.uint8).numpy())

    combos = eval_combinations("heldout", 8, 0)
    for seed in (0, 1, 2):
        assert generate(pipe, combos, 1, batch=4, seed=seed).shape == (8, 3, 1, 8, 8)
    assert used == [0, 4, 8, 12, 16, 20]  # seed 0 keeps the draws recorded before --seed existed


@pytest.mark.parametrize("option, value, message", [("--batch", "0", "--batch: must be >= "),
                                                    ("--clips", "1", "--clips: must be >= "),
                                                    ("--seed", "-1", "--seed: must be >= "),
                                                    ("--device", "tpu", "device: must be cpu or cuda[:N]")])
def test_cli_refuses_bad_options_before_any_work(capsys, monkeypatch, option, value, message):
    from omniar.cli import main
    from omniar.generation import TextToVideoPipeline

    monkeypatch.setattr(TextToVideoPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["eval", "t2v", option, value, "--out", "unused.json"]) == 2
    assert f"omniar: error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("place, message", [
    ("FILE/report.json", "out: cannot write FILE/report.json: FILE is not a folder"),
    ("WORK", "out: WORK exists and is not a file"),
])
def test_bad_out_fails_before_any_work(tmp_path, capsys, monkeypatch, place, message):
    from omniar.cli import main
    from omniar.generation import TextToVideoPipeline

    monkeypatch.setattr(TextToVideoPipeline, "from_pretrained", lambda *a: pytest.fail("work before the check"))
    (tmp_path / "file").write_text("x")
    paths = {"FILE": str(tmp_path / "file"), "WORK": str(tmp_path)}
    for key, path in paths.items():
        place, message = place.replace(key, path), message.replace(key, path)
    assert main(["eval", "t2v", "--clips", "2", "--out", place]) == 2
    assert capsys.readouterr().err == f"omniar: error: {message}\n"


def test_default_out_is_not_the_shipped_record():
    from omniar.cli import build_parser

    assert build_parser().parse_args(["eval", "t2v"]).out == "t2v_eval.json"  # in the working directory


def test_collapse_count_flags_smears_not_objects():
    from omniar.eval.t2v import COLLAPSE_FRACTION, object_fraction, real_clips

    combos = eval_combinations("seen", 12, 0)
    real = real_clips(combos, 9, 64, seed=1)
    assert object_fraction(real, combos).max() < 0.1  # a real object covers under 8 % of a frame
    smeared = real.clone()
    smeared[3, :, 4, :40] = 0.3  # a grey band over 62 % of one frame of clip 3 (on either background)
    frac = object_fraction(smeared, combos)
    assert frac[3] > COLLAPSE_FRACTION and (frac[torch.arange(12) != 3] < 0.1).all()


def test_cli_scores_half_depth_at_the_defaults_and_at_its_temperature(tmp_path, monkeypatch):
    """Every row but half_depth_tuned samples at the defaults; retention is each half-depth row over full/seen."""
    import json
    from types import SimpleNamespace

    from omniar.cli import main
    from omniar.commands import eval_t2v

    cfg = SimpleNamespace(num_layers=6, num_experts=8, top_k=2)
    placed = []
    pipe = SimpleNamespace(model=SimpleNamespace(omniar_config=cfg), video_tokenizer=SimpleNamespace(resolution=64),
                           to=lambda *a: placed.append(a))
    monkeypatch.setattr(eval_t2v.TextToVideoPipeline, "from_pretrained", lambda *a: pipe)
    monkeypatch.setattr(eval_t2v, "load_classifier", lambda *a: None)
    monkeypatch.setattr(eval_t2v, "real_vs_real", lambda *a: 1.0)
    calls = []

    def row(rate):
        return {"all": rate, "frechet": 2.0, "collapsed": 0} | dict.fromkeys(eval_t2v.KEYS, rate)

    def evaluate_split(pipe, classifier, split, n, batch, seed, progress, **kwargs):
        calls.append((split, kwargs))
        return row(0.8 if "elastic" not in kwargs else 0.4 if "temperature" in kwargs else 0.2)

    monkeypatch.setattr(eval_t2v, "evaluate_split", evaluate_split)
    monkeypatch.setattr(eval_t2v, "tokenizer_reference", lambda *a, **k: row(1.0))
    out = tmp_path / "report.json"
    assert main(["eval", "t2v", "--clips", "2", "--half-depth-temperature", "0.4", "--out", str(out), "--device", "cpu",
                 "--decode-dtype", "float32"]) == 0
    assert placed == [(torch.device("cpu"), torch.float32, torch.float32)]
    assert calls == [("seen", {}), ("heldout", {}), ("seen", {"elastic": {"depth": 3}}),
                     ("seen", {"elastic": {"depth": 3}, "temperature": 0.4}),
                     ("seen", {"elastic": {"num_experts": 4}}), ("seen", {"elastic": {"top_k": 1}})]
    report = json.loads(out.read_text())
    assert report["half_depth_tuned_settings"] == {"temperature": 0.4}
    assert report["settings"].startswith("defaults: 17 frames, guidance 3.0, top_k 0, top_p 1.0, temperature 1.0, ")
    assert report["half_depth_retention"] == pytest.approx(0.25)
    assert report["half_depth_tuned_retention"] == pytest.approx(0.5)

def test_cli_refuses_a_non_positive_half_depth_temperature(capsys, monkeypatch):
    from omniar.cli import main
    from omniar.generation import TextToVideoPipeline

    monkeypatch.setattr(TextToVideoPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["eval", "t2v", "--half-depth-temperature", "0"]) == 2
    assert "omniar: error: --half-depth-temperature: must be > 0" in capsys.readouterr().err
