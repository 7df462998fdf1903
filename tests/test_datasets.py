"""The seeded datasets follow the map-style protocol that Subset, samplers and plain iteration rely on."""

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from omniar.data import MovingShapes
from omniar.uda.data import PrintedCharacters


@pytest.fixture(scope="module", params=["shapes", "chars"])
def dataset(request):
    if request.param == "shapes":
        return MovingShapes("train", 3, 32, 5, seed=1)
    return PrintedCharacters("digits", 3, seed=1)


def first(item):
    return item["video"] if isinstance(item, dict) else item[0]


def test_integer_like_and_negative_indices(dataset):
    reference = first(dataset[1])
    for index in (np.int64(1), torch.tensor(1), -2):
        assert torch.equal(first(dataset[index]), reference)
    assert torch.equal(first(Subset(dataset, np.array([2, 1]))[1]), reference)


def test_out_of_range_raises_index_error_so_iteration_ends(dataset):
    for index in (3, -4):
        with pytest.raises(IndexError):
            dataset[index]
    assert len(list(dataset)) == 3
    with pytest.raises(TypeError, match="index"):
        dataset[1.0]


def test_printed_characters_rejects_a_negative_seed():
    with pytest.raises(ValueError, match="seed"):
        PrintedCharacters("digits", 3, seed=-1)
