"""Pre-tokenization cache: its items equal the tokenizer's own codes, a rerun reuses it, and a cache
made from another data source or another encoder is refused rather than silently reused."""

import pytest
import torch

from omniar.data.shapes import MovingShapes
from omniar.tokenizers import VideoTokenizer
from omniar.train.pretokenize import TokenizedDataset, encoder_fingerprint, pretokenize

TOK = dict(channels=(8, 16, 16), latent_channels=8, temporal_compression=4, spatial_compression=4,
           scales=(1, 2, 4, 8), codebook_size=32)
SOURCE = {"dataset": "shapes", "path": None, "num_frames": 5, "seed": 0, "size": 32}


def shapes(seed=0):
    return MovingShapes("train", 5, 32, 5, seed=seed)


@pytest.fixture
def tok():
    torch.manual_seed(0)
    return VideoTokenizer(**TOK).eval()


def test_cache_holds_the_tokenizers_codes_and_a_rerun_reuses_it(tok, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        out = pretokenize(tok, shapes(), tmp_path, 5, SOURCE, shard_size=2, batch_size=2, progress=False)
    finally:
        os.umask(old)
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o644}  # shared caches stay readable
    data = TokenizedDataset(out)
    assert len(data) == 5 and len(list(out.glob("shard_*.safetensors"))) == 3
    for i in (0, 4):
        codes = tok.encode(shapes()[i]["video"][None]).codes
        for s, c in enumerate(data[i]["codes"]):
            assert torch.equal(c, codes[s][0])
        assert data[i]["caption"] == shapes()[i]["caption"]
    mtime = (out / "shard_00002.safetensors").stat().st_mtime_ns
    pretokenize(tok, shapes(), tmp_path, 5, dict(SOURCE), shard_size=2, batch_size=2, progress=False)
    assert (out / "shard_00002.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("change, differ", [
    ({"seed": 1}, "source"), ({"num_frames": 9}, "source"), ({"dataset": "video_folder"}, "source")])
def test_cache_from_another_source_is_refused(tok, tmp_path, change, differ):
    pretokenize(tok, shapes(), tmp_path, 5, SOURCE, progress=False)
    with pytest.raises(ValueError, match=rf"out_dir.*other settings \({differ} differ\)"):
        pretokenize(tok, shapes(), tmp_path, 5, SOURCE | change, progress=False)


def test_retrained_encoder_invalidates_the_cache_but_a_retrained_decoder_does_not(tok, tmp_path):
    pretokenize(tok, shapes(), tmp_path, 5, SOURCE, progress=False)
    before = encoder_fingerprint(tok)
    with torch.no_grad():
        next(tok.decoder.parameters()).add_(0.1)
    assert encoder_fingerprint(tok) == before
    pretokenize(tok, shapes(), tmp_path, 5, SOURCE, progress=False)
    with torch.no_grad():
        next(tok.encoder.parameters()).add_(0.1)
    assert encoder_fingerprint(tok) != before
    with pytest.raises(ValueError, match=r"out_dir.*\(encoder_sha256 differ\)"):
        pretokenize(tok, shapes(), tmp_path, 5, SOURCE, progress=False)


def test_source_must_be_a_dict(tok, tmp_path):
    with pytest.raises(ValueError, match="source"):
        pretokenize(tok, shapes(), tmp_path, 5, "shapes", progress=False)
