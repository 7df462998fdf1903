"""``TextEncoder``: a frozen pretrained text encoder (``transformers`` T5 or CLIP) and its tokenizer.

Its last hidden states, projected by the model's ``text_proj`` (``OmniARConfig.text_embed_dim``), take the
place of the byte-level text embedding. ``transformers`` is an optional extra (``pip install 'omniar[text]'``):
it is imported only when an encoder is loaded or built.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .._checks import check_int, check_text, require

# config.json "model_type" -> the transformers class loaded for it (a fixed table: a folder never names the class)
ENCODER_CLASSES = {"t5": "T5EncoderModel", "clip_text_model": "CLIPTextModel", "clip": "CLIPTextModel"}
EXTRA_HINT = "needs the transformers package: pip install 'omniar[text]'"


def _transformers(name: str):
    try:
        import transformers
    except ImportError:
        raise ValueError(f"{name}: a pretrained text encoder {EXTRA_HINT}") from None
    return transformers


class TextEncoder(nn.Module):
    """A frozen ``T5EncoderModel`` or ``CLIPTextModel`` with its tokenizer.

    :meth:`encode` turns prompts (None: the empty prompt, the unconditional branch of classifier-free
    guidance and of caption dropout) into right-padded last hidden states (B, L, :attr:`hidden_size`) and
    a bool mask (True = a real token). The weights never train: no gradients, and ``train()`` keeps dropout off.
    """

    def __init__(self, encoder: nn.Module, tokenizer) -> None:
        transformers = _transformers("encoder")
        require(isinstance(encoder, (transformers.T5EncoderModel, transformers.CLIPTextModel)), "encoder",
                f"must be a transformers T5EncoderModel or CLIPTextModel, got {type(encoder).__name__}")
        require(isinstance(tokenizer, transformers.PreTrainedTokenizerBase), "tokenizer",
                f"must be a transformers tokenizer, got {type(tokenizer).__name__}")
        require(len(tokenizer) <= encoder.config.vocab_size, "tokenizer",
                f"has {len(tokenizer)} tokens, more than the encoder's vocab_size {encoder.config.vocab_size}")
        require(tokenizer.pad_token_id is not None, "tokenizer", "has no pad token")
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "right"  # the backbone's text prefix is right-padded
        empty = self.tokenizer("")["input_ids"]
        require(len(empty) > 0, "tokenizer", "gives no token for the empty prompt (the unconditional branch); "
                "it must add at least an end-of-text token")

    def train(self, mode: bool = True) -> "TextEncoder":
        return super().train(False)  # frozen: dropout stays off whatever the caller's mode

    @property
    def hidden_size(self) -> int:
        """Width of the states (``OmniARConfig.text_embed_dim`` of a model trained on them)."""
        return self.encoder.config.hidden_size if hasattr(self.encoder.config, "hidden_size") \
            else self.encoder.config.d_model

    @property
    def max_length(self) -> int | None:
        """The most tokens the encoder takes (CLIP's position table); None: no limit (T5's relative positions)."""
        return getattr(self.encoder.config, "max_position_embeddings", None)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    # ------------------------------------------------------------ persistence
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, name: str = "path") -> "TextEncoder":
        """Load a local folder holding a T5 (encoder-only or full) or CLIP (text or full) model in safetensors
        and its tokenizer; nothing is downloaded. Missing or mis-shaped weights are a ValueError naming ``name``."""
        transformers = _transformers(name)
        folder = Path(path)
        config_file = folder / "config.json"
        require(config_file.is_file(), name, f"{config_file} not found (a text encoder folder holds config.json, "
                "model.safetensors and its tokenizer)")
        try:
            model_type = json.loads(config_file.read_text()).get("model_type")
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
            raise ValueError(f"{name}: {config_file} is not a JSON object ({err})") from None
        require(model_type in ENCODER_CLASSES, name,
                f"{config_file}: model_type {model_type!r} is not one of {sorted(ENCODER_CLASSES)}")
        try:
            # use_safetensors: never a pickle; local_files_only: never the network
            encoder, info = getattr(transformers, ENCODER_CLASSES[model_type]).from_pretrained(
                folder, use_safetensors=True, local_files_only=True, output_loading_info=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, EnvironmentError) as err:
            raise ValueError(f"{name}: cannot load a text encoder from {folder} ({err})") from None
        # transformers fills missing tensors with random values, with only a log line; unexpected ones
        # are fine (the decoder of a full T5, the vision tower of a full CLIP)
        bad = sorted(info["missing_keys"]) + sorted(str(k) for k in info["mismatched_keys"])
        require(not bad, name, f"{folder}: missing or mis-shaped tensors {bad[:5]}")
        return cls(encoder, tokenizer)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the encoder (safetensors) and its tokenizer to one folder, as :meth:`from_pretrained` reads it."""
        self.encoder.save_pretrained(path)
        self.tokenizer.save_pretrained(path)

    # -------------------------------------------------------------- encoding
    def tokenize(self, prompts: list[str | None], max_length: int, name: str = "prompt"
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mask)`` (B, max_length), right-padded; a prompt over ``max_length`` tokens raises (naming
        ``name``): a silently cut prompt would condition on something else than asked."""
        check_int(max_length, "max_length", 1, self.max_length)
        texts = ["" if p is None else check_text(p, name) for p in prompts]
        longest = max(len(ids) for ids in self.tokenizer(texts)["input_ids"])
        require(longest <= max_length, name, f"is too long: {longest} tokens, at most {max_length} fit")
        batch = self.tokenizer(texts, padding="max_length", max_length=max_length, return_tensors="pt")
        return batch["input_ids"], batch["attention_mask"].bool()

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states (B, L, hidden_size) of :meth:`tokenize`'s output, in float32."""
        out = self.encoder(input_ids=ids.to(self.device), attention_mask=mask.to(self.device, torch.long))
        return out.last_hidden_state.float()

    def encode(self, prompts: list[str | None], max_length: int, name: str = "prompt"
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(states, mask)``: :meth:`forward` of :meth:`tokenize` (the mask on the encoder's device)."""
        ids, mask = self.tokenize(prompts, max_length, name)
        return self(ids, mask), mask.to(self.device)
