"""omniar eval t2v pieces: the tokenizer reference judges reconstructions of real clips against their prompts."""

import pytest
import torch

from omniar import assets
from omniar.eval.t2v import load_classifier, tokenizer_reference

pytestmark = pytest.mark.skipif("shapes-classifier" not in assets.available(), reason="classifier not shipped")


class _Stub:
    """encode/decode stand-ins: a perfect tokenizer, or one that returns a grey clip."""

    resolution = 64

    def __init__(self, perfect: bool):
        self.perfect = perfect

    def encode(self, video):
        return video

    def decode(self, video):
        return video if self.perfect else torch.zeros_like(video)


def test_tokenizer_reference_of_a_perfect_tokenizer_is_full_adherence():
    classifier = load_classifier()
    perfect = tokenizer_reference(_Stub(True), classifier, 16)
    assert perfect["all"] == 1.0
    grey = tokenizer_reference(_Stub(False), classifier, 16)
    assert grey["all"] < 0.5
    assert grey["frechet"] > 10 * perfect["frechet"]
