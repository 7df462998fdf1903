"""TextTokenizer: byte ids and specials, round trips, padding/masks, length policy, save/load, tokenizer.json."""

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from omniar.tokenizers.text import TextTokenizer


@pytest.fixture
def tok():
    return TextTokenizer()


@pytest.fixture
def bpe_json(tmp_path):
    """A tiny byte-level BPE tokenizer.json trained here; it asks for padding and truncation."""
    hf = Tokenizer(models.BPE(unk_token=None))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    hf.train_from_iterator(["a red circle moves right on a black background"] * 20, trainer)
    hf.enable_padding(length=64)
    hf.enable_truncation(max_length=4)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    return path


def test_ids_and_specials(tok):
    assert tok.vocab_size == 261
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.bov_id, tok.null_id) == (256, 257, 258, 259, 260)
    assert tok.encode("Hi") == [257, 72, 105, 258]
    assert tok.encode("Hi", add_bos=False, add_eos=False) == [72, 105]
    assert tok.encode("") == [257, 258]
    assert tok.null_prompt() == [257, 260, 258]


def test_unicode_round_trip_and_invalid_utf8(tok):
    text = "a red ∘ moves → 🎥"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) + 2
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids)) == text and tok.decode(np.array(ids)) == text
    assert tok.decode([257, 0xE2, 0x86, 259, 104, 258], skip_special=False) == "<bos>\ufffd<bov>h<eos>"
    assert tok.decode([0xFF, 104]) == "\ufffdh"


def test_batch_encode_pads_right_and_masks(tok):
    ids, mask = tok.batch_encode(["ab", None, "abcd"], max_length=8)
    assert ids.dtype == torch.long and mask.dtype == torch.bool and ids.shape == mask.shape == (3, 8)
    assert ids[0].tolist() == [257, 97, 98, 258] + [256] * 4
    assert ids[1].tolist() == tok.null_prompt() + [256] * 5
    assert mask.sum(1).tolist() == [4, 3, 6]
    assert torch.equal(mask, ids != 256)


def test_length_policy_raises_unless_truncating(tok):
    with pytest.raises(ValueError, match="^text: is too long: 8 tokens, at most 4 fit"):
        tok.encode("abcdef", max_length=4)
    assert tok.encode("abcdef", max_length=4, truncate=True) == [257, 97, 98, 99]
    with pytest.raises(ValueError, match="^caption: is too long: 8 tokens, at most 4 fit"):
        tok.batch_encode(["ok", "abcdef"], max_length=4, name="caption")  # errors name the caller's argument
    ids, _ = tok.batch_encode(["abcdef"], max_length=4, truncate=True)
    assert ids.tolist() == [[257, 97, 98, 99]]


def test_argument_errors(tok):
    for call, name in [(lambda: tok.encode(3), "text"), (lambda: tok.encode("a", max_length=0), "max_length"),
                       (lambda: tok.batch_encode([], 4), "texts"), (lambda: tok.batch_encode("ab", 4), "texts"),
                       (lambda: tok.batch_encode(["a", 1], 4), "texts"), (lambda: tok.batch_encode(["a"], 0), "max_length"),
                       (lambda: tok.batch_encode([None], 2), "max_length"), (lambda: tok.decode([261]), "ids"),
                       (lambda: tok.decode([-1]), "ids"), (lambda: tok.decode([1.0]), "ids"),
                       (lambda: tok.encode("abc", max_length=2, truncate="no"), "truncate")]:
        with pytest.raises(ValueError, match=name):
            call()


def test_save_and_load(tok, tmp_path):
    tok.save_pretrained(tmp_path / "t")
    back = TextTokenizer.from_pretrained(tmp_path / "t")
    assert back.vocab_size == tok.vocab_size and back.encode("héllo") == tok.encode("héllo")
    with pytest.raises(ValueError, match="folder"):
        TextTokenizer.from_pretrained(tmp_path)
    config = tmp_path / "t" / "text_tokenizer.json"
    config.write_text(json.dumps({"type": "bytes", "specials": ["pad", "bos"]}))
    with pytest.raises(ValueError, match="folder.*special"):
        TextTokenizer.from_pretrained(tmp_path / "t")


def test_tokenizer_json_vocabulary(bpe_json, tmp_path):
    tok = TextTokenizer.from_tokenizer_json(bpe_json)
    base = Tokenizer.from_file(str(bpe_json)).get_vocab_size()
    assert 256 < base <= 300 and tok.vocab_size == base + 5 and tok.null_id == base + 4
    text = "a red circle moves right"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert all(i < base for i in ids[1:-1]) and len(ids) - 2 < len(text)  # merges make it shorter than bytes
    assert tok.decode(ids) == text  # the file's padding and truncation settings are ignored
    ids_b, mask = tok.batch_encode([text, None], max_length=32)
    assert ids_b[0, :len(ids)].tolist() == ids and (ids_b[~mask] == tok.pad_id).all()
    tok.save_pretrained(tmp_path / "saved")
    assert TextTokenizer.from_pretrained(tmp_path / "saved").encode(text) == ids
    (tmp_path / "saved" / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="^folder.*tokenizer.json"):
        TextTokenizer.from_pretrained(tmp_path / "saved")
    (tmp_path / "broken.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer_json"):
        TextTokenizer.from_tokenizer_json(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="tokenizer_json"):
        TextTokenizer.from_tokenizer_json(tmp_path / "missing.json")
