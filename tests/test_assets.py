"""Shipped assets: names resolve to folders, the tokenizer is the default pipeline's component."""

import pytest
import torch

from omniar import assets
from omniar.tokenizers import VideoTokenizer


def test_names_resolve_and_the_tokenizer_is_stored_once():
    names = assets.available()
    assert {"shapes-tokenizer", "shapes-t2v", "shapes-classifier"} <= set(names)
    for name in names:
        assert assets.path(name).is_dir()
    tok = assets.path("shapes-tokenizer")
    assert tok == assets.path("shapes-t2v") / "video_tokenizer"
    assert not (tok.parents[1] / "shapes-tokenizer").exists()  # no second copy in the package
    state = VideoTokenizer.from_pretrained(str(tok)).state_dict()
    assert state and all(torch.isfinite(v.float()).all() for v in state.values())


@pytest.mark.parametrize("name", ["", "nope", "shapes-t2v/model", "../assets", "_x", None])
def test_unknown_names_are_refused_naming_the_argument(name):
    with pytest.raises(ValueError, match=r"^name: no shipped asset"):
        assets.path(name)
