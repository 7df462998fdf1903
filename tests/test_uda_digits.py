"""The offline digits domains: printed (rendered from local fonts) and handwritten (scikit-learn)."""

import pytest
import torch

from omniar.uda.data import ALNUM, HandwrittenDigits, PrintedCharacters, font_files


def test_printed_characters_are_seeded_balanced_images():
    data = PrintedCharacters("digits", num_samples=20, seed=3)
    x, y = data[13]
    assert x.shape == (3, 32, 32) and x.min() >= -1 and x.max() <= 1 and y == 3
    assert torch.equal(x, PrintedCharacters("digits", 20, seed=3)[13][0])  # item = f(seed, index)
    assert not torch.equal(x, PrintedCharacters("digits", 20, seed=4)[13][0])
    assert [data[i][1] for i in range(20)] == list(range(10)) * 2
    alnum = PrintedCharacters("alnum", 62, augment=False)
    assert len(alnum.classes) == len(ALNUM) == 62 and alnum[61][1] == 61
    assert len(font_files()) >= 1


def test_handwritten_digits():
    data = HandwrittenDigits()
    x, y = data[0]
    assert len(data) == 1797 and x.shape == (3, 32, 32) and 0 <= y <= 9
    assert data.classes == PrintedCharacters("digits", 10).classes


def test_bad_arguments():
    with pytest.raises(ValueError, match="charset"):
        PrintedCharacters("greek")
    with pytest.raises(ValueError, match="num_samples"):
        PrintedCharacters("digits", num_samples=0)
