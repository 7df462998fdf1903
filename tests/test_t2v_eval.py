"""omniar eval t2v pieces: which prompts are judged, and the tokenizer reference (real clips encoded + decoded)."""

import pytest
import torch

from omniar import assets
from omniar.data.shapes import HELDOUT, TRAIN_COMBINATIONS
from omniar.eval.t2v import eval_combinations, load_classifier, tokenizer_reference


class _Stub:
    """encode/decode stand-ins: a perfect tokenizer, or one that returns a grey clip."""

    resolution = 64

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


def test_eval_combinations_repeat_none_before_all_are_used():
    seen = eval_combinations("seen", 64, 0)
    assert len(set(seen)) == 64 and set(seen) <= set(TRAIN_COMBINATIONS)
    assert eval_combinations("seen", 64, 0) == seen and eval_combinations("seen", 64, 1) != seen
    held = eval_combinations("heldout", 24, 0)
    assert held[:12] == list(HELDOUT) and held[12:] == list(HELDOUT)
    with pytest.raises(ValueError, match="^split"):  # a typo must not report the seen prompts as another split
        eval_combinations("heldou", 2, 0)


@pytest.mark.parametrize("option, value", [("--batch", "0"), ("--clips", "1")])
def test_cli_refuses_bad_counts_before_any_work(capsys, monkeypatch, option, value):
    from omniar.cli import main
    from omniar.generation import TextToVideoPipeline

    monkeypatch.setattr(TextToVideoPipeline, "from_pretrained", lambda *a, **k: pytest.fail("loaded a model"))
    assert main(["eval", "t2v", option, value]) == 2
    assert f"omniar: error: {option}: must be >= " in capsys.readouterr().err
