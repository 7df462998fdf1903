"""Byte-level UTF-8 text tokenizer with the special tokens the AR model needs.

Ids 0..255 are bytes; then ``pad``, ``bos``, ``eos``, ``bov`` (begin of video)
and ``null`` (the empty prompt of classifier-free guidance). Optionally the
vocabulary of a Hugging Face ``tokenizer.json`` replaces the bytes, with the
specials appended after it.
"""

from __future__ import annotations

import json
import numbers
import os
from pathlib import Path

import torch

from .._checks import check_bool, check_int, check_text, require
from .._pretrained import read_json

SPECIALS = ("pad", "bos", "eos", "bov", "null")


class TextTokenizer:
    """``encode`` / ``decode`` / ``batch_encode`` over bytes (default) or a ``tokenizer.json`` vocabulary.

    Byte ids are 0..255 and the specials ``pad_id=256``, ``bos_id=257``, ``eos_id=258``, ``bov_id=259``,
    ``null_id=260`` (``vocab_size=261``); with a ``tokenizer.json`` the specials follow its vocabulary.
    A text longer than ``max_length`` raises unless ``truncate=True``: silently cut prompts would
    condition the model on something else than asked.
    """

    def __init__(self, tokenizer_json: str | os.PathLike | None = None):
        self._hf = None
        self._hf_json: str | None = None
        base = 256
        if tokenizer_json is not None:
            from tokenizers import Tokenizer

            path = Path(tokenizer_json)
            require(path.is_file(), "tokenizer_json", f"file not found: {path}")
            self._hf_json = path.read_text()
            try:
                self._hf = Tokenizer.from_str(self._hf_json)
            except Exception as err:  # the Rust library raises a bare Exception
                raise ValueError(f"tokenizer_json: {path} is not a valid tokenizer.json ({err})") from err
            # Length is handled here (max_length/truncate); a padding/truncation setting saved in the
            # file would otherwise pad or cut silently.
            self._hf.no_padding()
            self._hf.no_truncation()
            base = self._hf.get_vocab_size(with_added_tokens=True)
        self._base = base
        self.pad_id, self.bos_id, self.eos_id, self.bov_id, self.null_id = range(base, base + len(SPECIALS))

    @property
    def vocab_size(self) -> int:
        return self._base + len(SPECIALS)

    @classmethod
    def from_tokenizer_json(cls, path: str | os.PathLike) -> "TextTokenizer":
        """Use the vocabulary of a Hugging Face ``tokenizer.json`` (e.g. a BPE) instead of bytes."""
        return cls(path)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True, max_length: int | None = None,
               truncate: bool = False, name: str = "text") -> list[int]:
        """Ids of ``text``; longer than ``max_length`` raises (naming ``name``) unless ``truncate``."""
        check_text(text, name)
        body = self._hf.encode(text, add_special_tokens=False).ids if self._hf else list(text.encode("utf-8"))
        ids = ([self.bos_id] if add_bos else []) + body + ([self.eos_id] if add_eos else [])
        check_bool(truncate, "truncate")
        if max_length is not None:
            check_int(max_length, "max_length", 1)
            if len(ids) > max_length:
                require(truncate, name, f"is too long: {len(ids)} tokens, at most {max_length} fit")
                ids = ids[:max_length]
        return ids

    def decode(self, ids: list[int] | torch.Tensor, skip_special: bool = True) -> str:
        """Text of ``ids``; invalid UTF-8 is replaced, specials dropped (or shown as ``<name>``)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        require(all(isinstance(i, numbers.Integral) and 0 <= i < self.vocab_size for i in ids), "ids",
                f"must be ints in [0, {self.vocab_size})")
        ids = [int(i) for i in ids]
        out, body = [], []

        def flush() -> None:
            if body:
                out.append(self._hf.decode(body) if self._hf else bytes(body).decode("utf-8", errors="replace"))
                body.clear()

        for i in ids:
            if i < self._base:
                body.append(i)
                continue
            flush()
            if not skip_special:
                out.append(f"<{SPECIALS[i - self._base]}>")
        flush()
        return "".join(out)

    def null_prompt(self) -> list[int]:
        """The prompt used for the unconditional branch of classifier-free guidance."""
        return [self.bos_id, self.null_id, self.eos_id]

    def batch_encode(self, texts: list[str | None], max_length: int, truncate: bool = False, name: str = "texts"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids right-padded to exactly ``max_length`` (B, max_length) and a bool mask (True = real token).
        A ``None`` entry stands for the null prompt; errors name ``name``."""
        require(isinstance(texts, (list, tuple)) and len(texts) > 0
                and all(t is None or isinstance(t, str) for t in texts), name,
                "must be a non-empty list of str (or None for the null prompt)")
        check_int(max_length, "max_length", 1)
        ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            enc = self.null_prompt() if text is None else self.encode(text, max_length=max_length, truncate=truncate,
                                                                      name=name)
            require(len(enc) <= max_length, "max_length", f"must be >= {len(enc)} to hold the null prompt")
            ids[row, :len(enc)] = torch.tensor(enc, dtype=torch.long)
        return ids, ids != self.pad_id

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "text_tokenizer.json").write_text(json.dumps(
            {"type": "hf" if self._hf else "bytes", "specials": list(SPECIALS)}, indent=2) + "\n")
        if self._hf_json is not None:
            (folder / "tokenizer.json").write_text(self._hf_json)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike) -> "TextTokenizer":
        folder = Path(folder)
        config_file = folder / "text_tokenizer.json"
        config = read_json(config_file, "folder")
        require(config.get("specials") == list(SPECIALS), "folder", f"{config_file} has other special tokens")
        require(config.get("type") in ("bytes", "hf"), "folder", f"{config_file}: unknown type {config.get('type')!r}")
        if config["type"] == "bytes":
            return cls()
        require((folder / "tokenizer.json").is_file(), "folder", f"{config_file} names type 'hf' but "
                                                                 f"{folder / 'tokenizer.json'} is missing")
        return cls(folder / "tokenizer.json")
