"""``TextToVideoPipeline``: prompt -> KV cache -> per frame, per scale: one forward, CFG, sample -> decode.

A diffusers-style folder holds one subfolder per component (``video_tokenizer/``,
``text_tokenizer/``, ``model/``, and ``text_encoder/`` for a model conditioned on a
pretrained text encoder) and ``model_index.json``. Loading never imports
a class named in a file: the component classes are fixed here.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from .. import __version__, assets
from .._checks import check_choice, check_float, check_int, require
from .._pretrained import read_json, write_folder_atomically
from ..backbone import OmniARModel
from ..backbone.attention import KV_POLICIES, KV_ROPE_MODES, KVBudget
from ..limits import MAX_BATCH_SIZE, MAX_LONG_NUM_FRAMES, MAX_NUM_FRAMES, MAX_SEED, MAX_TEXT_LEN
from ..pixels import to_uint8
from ..backbone.elastic import ElasticSpec, resolve_elastic
from ..backbone.text_encoder import TextEncoder
from ..tokenizers import MultiScaleCodes, VideoTokenizer
from ..tokenizers.text import TextTokenizer
from .sampling import GUIDANCE_SCHEDULES, check_filters, guidance_for_scale, guided_logits, sample

DEFAULT_MODEL = "shapes-t2v"
MAX_PROMPT_CHARS = 1000
OUTPUT_TYPES = ("uint8", "np", "pil", "pt")
# a call with a kv_budget and no kv_policy / kv_rope: chosen by the long-video benchmark's rule (BENCHMARKS.md):
# no arm kept the adherence of the first frames; window kept the most, at the least work
DEFAULT_KV_POLICY = "window"
DEFAULT_KV_ROPE = "extrapolate"
DEFAULT_RANDOM_RATIO = 0.25  # NACL's random share as benchmarked (fixed beforehand, not tuned)
DEFAULT_KV_RECENT_FRAMES = 3  # whole recent frames nacl keeps: picked on the default model (BENCHMARKS.md)
# nacl scores only the tokens of a 17-frame clip before the next frame (with 3 recent frames kept whole: the frame
# before them): +7 of 64 clips kept the prompt at 129 frames on two models against a 33-frame horizon, which was +7
# and +5 against none (BENCHMARKS.md, "A horizon for nacl", "A one-frame horizon")
DEFAULT_KV_HORIZON = 17
# the model's own distribution (`omniar generate`, the demo and `omniar eval t2v` read it from CALL_DEFAULTS)
DEFAULT_TEMPERATURE = 1.0
# latent frames per decoder call: a few at once run as fewer, larger convolutions (decoding 1.03-1.17x faster than
# one at a time, BENCHMARKS.md "Decoding four latent frames a call") for a few MiB a clip, bounded whatever the length
DECODE_CHUNK_FRAMES = 4
# clips per decoder call by default: batch-16 calls decoded 1.05-1.14x faster (two threads) than one clip a call, for
# a bounded block of 4 clips x DECODE_CHUNK_FRAMES latent frames (BENCHMARKS.md "Four clips a decoder call")
DECODE_BATCH_SIZE = 4


@dataclass
class TextToVideoOutput:
    """``frames`` by ``output_type``: ``"uint8"`` numpy uint8 (B, T, H, W, 3); ``"np"`` float32 (B, T, H, W, 3)
    in [0, 1]; ``"pil"`` a list (per clip) of lists of PIL images; ``"pt"`` torch float32 (B, T, 3, H, W) in
    [0, 1]. The last three are diffusers' conventions, so ``diffusers.utils.export_to_video(frames[0])`` works."""

    frames: np.ndarray | list | torch.Tensor
    codes: MultiScaleCodes
    timings: dict = field(default_factory=dict)


def words(text: str) -> list[str]:
    """The lower-cased words of a prompt, as a vocabulary check sees them."""
    return re.findall(r"[^\W\d_]+", text.lower())


def convert_frames(pixels: torch.Tensor, output_type: str):
    """(B, 3, T, H, W) in [-1, 1] -> frames of ``output_type`` (see :class:`TextToVideoOutput`)."""
    frames = to_uint8(pixels).permute(0, 2, 3, 4, 1)  # every type holds exactly the uint8 values
    if output_type == "uint8":
        return frames.numpy()
    if output_type == "pil":
        from PIL import Image

        return [[Image.fromarray(frame) for frame in clip] for clip in frames.numpy()]
    unit = frames.float().div(255)
    return unit.numpy() if output_type == "np" else unit.permute(0, 1, 4, 2, 3).contiguous()


def _check_limits(max_text_len: int, max_num_frames: int, max_batch_size: int) -> tuple[int, int, int]:
    """A pipeline's limits, bounded by :mod:`omniar.limits` (a folder's model_index.json must not lift them)."""
    return (check_int(max_text_len, "max_text_len", 2, MAX_TEXT_LEN),
            check_int(max_num_frames, "max_num_frames", 1, MAX_NUM_FRAMES),
            check_int(max_batch_size, "max_batch_size", 1, MAX_BATCH_SIZE))


def _check_vocabulary(vocabulary) -> tuple[str, ...] | None:
    """A pipeline's vocabulary as a sorted tuple of distinct words, or None (a model that records none)."""
    if vocabulary is None:
        return None
    require(isinstance(vocabulary, (list, tuple)) and all(isinstance(w, str) and words(w) == [w] for w in vocabulary),
            "vocabulary", "must be None or a list of lower-case words")
    return tuple(sorted(set(vocabulary)))


def text_inputs(prompts: list[str | None], max_text_len: int, text_tokenizer: TextTokenizer,
                text_encoder: TextEncoder | None, device: torch.device, name: str = "prompt") -> dict:
    """The model's text arguments for ``prompts`` padded to ``max_text_len``, on ``device``: ``text_ids`` and
    ``text_mask`` from the byte-level tokenizer, or with a text encoder ``text_ids=None``, its ``text_mask`` and
    states ``text_embeds``. None is the empty prompt (the unconditional branch of guidance and of caption dropout):
    the null prompt, or the encoder's states of ""."""
    if text_encoder is None:
        ids, mask = text_tokenizer.batch_encode(prompts, max_text_len, name=name)
        return {"text_ids": ids.to(device), "text_mask": mask.to(device)}
    states, mask = text_encoder.encode(prompts, max_text_len, name=name)
    return {"text_ids": None, "text_mask": mask.to(device), "text_embeds": states.to(device)}


def _check_text_encoder(text_encoder: TextEncoder | None, text_embed_dim: int | None,
                        max_text_len: int) -> TextEncoder | None:
    """A pipeline's text encoder: the one its model was trained on (``text_embed_dim``), or None for a byte-level
    model."""
    require(text_encoder is None or isinstance(text_encoder, TextEncoder), "text_encoder",
            f"must be None or a TextEncoder, got {type(text_encoder).__name__}")
    if text_encoder is None:
        require(text_embed_dim is None, "text_encoder", f"is missing: the model was trained on a text encoder's "
                f"states (text_embed_dim={text_embed_dim}) and cannot read byte-level prompts; pass the encoder it "
                "was trained with (a pipeline folder keeps it in text_encoder/)")
        return None
    require(text_embed_dim is not None, "text_encoder", "the model reads byte-level text (text_embed_dim=None), "
            "not a text encoder's states: train a model with one (model.text_encoder, docs/text_encoder.md)")
    require(text_encoder.hidden_size == text_embed_dim, "text_encoder",
            f"gives {text_encoder.hidden_size}-wide states, the model reads {text_embed_dim} (text_embed_dim)")
    limit = text_encoder.max_length
    require(limit is None or max_text_len <= limit, "max_text_len",
            f"must be at most the text encoder's {limit} positions, got {max_text_len}")
    return text_encoder


class TextToVideoPipeline:
    """Text-to-video (and text-to-image: ``num_frames=1``) with the unified AR model.

    Components: ``video_tokenizer`` (:class:`VideoTokenizer`), ``text_tokenizer``
    (:class:`TextTokenizer`), ``model`` (:class:`OmniARModel`). ``max_text_len`` is
    the fixed padded prompt length the model was trained with; ``max_num_frames``
    the longest clip it may generate; ``max_batch_size`` the most prompts per call; ``vocabulary`` the
    words of its training captions (None when unknown), for :meth:`unknown_words`. ``text_encoder``
    (:class:`omniar.backbone.text_encoder.TextEncoder`, frozen) is the pretrained T5 / CLIP encoder of a model
    trained on its states (``text_embed_dim`` set); such a model needs it, and a byte-level model refuses it.
    Limits are checked before anything is allocated; clips are decoded ``decode_batch_size`` at a
    time (default ``DECODE_BATCH_SIZE``), up to ``DECODE_CHUNK_FRAMES`` latent frames at a time (measured memory bound:
    ``benchmarks/generation_memory.py``, BENCHMARKS.md), in :attr:`decode_dtype` (bf16 on the CPU).
    """

    def __init__(self, video_tokenizer: VideoTokenizer, text_tokenizer: TextTokenizer, model: OmniARModel,
                 max_text_len: int = 96, max_num_frames: int = 33, max_batch_size: int = 16,
                 vocabulary: list[str] | tuple[str, ...] | None = None, text_encoder: TextEncoder | None = None):
        require(isinstance(video_tokenizer, VideoTokenizer), "video_tokenizer", "must be a VideoTokenizer")
        require(isinstance(text_tokenizer, TextTokenizer), "text_tokenizer", "must be a TextTokenizer")
        require(isinstance(model, OmniARModel), "model", "must be an OmniARModel")
        mc, tc = model.omniar_config, video_tokenizer.config
        require(mc.scales == video_tokenizer.scales and mc.codebook_size == tc.codebook_size
                and mc.code_dim == tc.latent_channels, "model",
                "scales / codebook_size / code_dim must match the video tokenizer")
        require(mc.text_vocab_size == text_tokenizer.vocab_size, "model",
                f"text_vocab_size {mc.text_vocab_size} != text tokenizer vocab {text_tokenizer.vocab_size}")
        self.video_tokenizer, self.text_tokenizer, self.model = video_tokenizer.eval(), text_tokenizer, model.eval()
        self.max_text_len, self.max_num_frames, self.max_batch_size = _check_limits(
            max_text_len, max_num_frames, max_batch_size)
        self.text_encoder = _check_text_encoder(text_encoder, mc.text_embed_dim, self.max_text_len)
        self.decode_dtype = None  # bf16 on the CPU (see the property)
        self.decode_batch_size = DECODE_BATCH_SIZE
        self.vocabulary = _check_vocabulary(vocabulary)

    # ------------------------------------------------------------ persistence
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None) -> "TextToVideoPipeline":
        """Load a pipeline folder; no argument loads the embedded default model."""
        folder = Path(path) if path is not None else assets.path(DEFAULT_MODEL)
        index_file = folder / "model_index.json"
        index = read_json(index_file, "path")
        require(index.get("_class_name") == cls.__name__, "path", f"{index_file} is not a {cls.__name__}")
        limits = {key: index.get(key) for key in ("max_text_len", "max_num_frames", "max_batch_size")}
        for key, value in limits.items():
            require(value is not None, "path", f"{index_file} lacks {key!r}")
        try:  # before any component is loaded
            _check_limits(**limits)
            vocabulary = _check_vocabulary(index.get("vocabulary"))
        except ValueError as err:
            raise ValueError(f"path: {index_file}: {err}") from None
        text_encoder = (TextEncoder.from_pretrained(folder / "text_encoder", name="path")
                        if "text_encoder" in index else None)
        return cls(VideoTokenizer.from_pretrained(str(folder / "video_tokenizer")),
                   TextTokenizer.from_pretrained(folder / "text_tokenizer"),
                   OmniARModel.from_pretrained(str(folder / "model")),
                   **limits, vocabulary=vocabulary, text_encoder=text_encoder)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write the pipeline folder atomically (aside, then swapped in)."""
        return write_folder_atomically(path, self._write_folder)

    def _write_folder(self, folder: Path) -> None:
        self.video_tokenizer.save_pretrained(folder / "video_tokenizer")
        self.text_tokenizer.save_pretrained(folder / "text_tokenizer")
        self.model.save_pretrained(folder / "model")
        if self.text_encoder is not None:
            self.text_encoder.save_pretrained(folder / "text_encoder")
        index = {"_class_name": type(self).__name__, "omniar_version": __version__,
                 "max_text_len": self.max_text_len, "max_num_frames": self.max_num_frames,
                 "max_batch_size": self.max_batch_size,
                 **({"vocabulary": list(self.vocabulary)} if self.vocabulary is not None else {}),
                 "video_tokenizer": ["omniar.tokenizers", "VideoTokenizer"],
                 "text_tokenizer": ["omniar.tokenizers", "TextTokenizer"],
                 "model": ["omniar.backbone", "OmniARModel"],
                 **({"text_encoder": ["omniar.backbone.text_encoder", "TextEncoder"]}
                    if self.text_encoder is not None else {})}
        (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
           decode_dtype: torch.dtype | None = None) -> "TextToVideoPipeline":
        """Move the model (optionally cast: ``dtype``, e.g. bf16) and the tokenizer (kept fp32: generation
        accumulates its codebook entries, so the codes do not depend on ``decode_dtype``). ``decode_dtype``
        sets :attr:`decode_dtype` (``torch.float32``: exact fp32 decode); None keeps what was set."""
        require(dtype is None or (isinstance(dtype, torch.dtype) and dtype.is_floating_point), "dtype",
                f"must be None or a floating torch.dtype, got {dtype!r}")
        if decode_dtype is not None:
            self.decode_dtype = decode_dtype  # checked before anything moves
        self.model.to(device, dtype)
        self.video_tokenizer.to(device)
        if self.text_encoder is not None:
            self.text_encoder.to(device)  # in its own dtype: its states are projected in the model's
        return self

    @property
    def decode_dtype(self) -> torch.dtype:
        """The dtype the frames are decoded in, under ``torch.autocast`` from the tokenizer's live fp32 weights
        (:meth:`VideoTokenizer.autocast`); the codes never depend on it. Unset (None, the default): bf16 on the
        CPU, where it decodes about 2.6x faster and passed the precision rule (BENCHMARKS.md), and fp32
        elsewhere. ``torch.float32`` decodes exactly in fp32, as the equivalence tests do."""
        if self._decode_dtype is not None:
            return self._decode_dtype
        return torch.bfloat16 if self.video_tokenizer.device.type == "cpu" else self.video_tokenizer.dtype

    @decode_dtype.setter
    def decode_dtype(self, value: torch.dtype | None) -> None:
        require(value is None or value in (torch.float32, torch.bfloat16, torch.float16), "decode_dtype",
                f"must be None, torch.float32, torch.bfloat16 or torch.float16, got {value!r}")
        self._decode_dtype = value

    @property
    def decode_batch_size(self) -> int:
        """Clips per decoder call (default ``DECODE_BATCH_SIZE``); 1 needs the least memory. A clip's frames
        depend on it only by the convolutions' rounding (within 2 of 255 levels in bf16)."""
        return self._decode_batch_size

    @decode_batch_size.setter
    def decode_batch_size(self, value: int) -> None:
        self._decode_batch_size = check_int(value, "decode_batch_size", 1, MAX_BATCH_SIZE)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------- validation
    def check_prompts(self, prompt: str | list[str]) -> list[str]:
        """The prompts of a call as a list, or a ``ValueError`` naming ``prompt``: lets a caller with many
        calls (``omniar generate --batch``) check every prompt before any work."""
        prompts = self._prompt_list(prompt)
        if self.text_encoder is None:  # too long?
            self.text_tokenizer.batch_encode(prompts, self.max_text_len, name="prompt")
        else:
            self.text_encoder.tokenize(prompts, self.max_text_len, name="prompt")
        return prompts

    def _prompt_list(self, prompt: str | list[str]) -> list[str]:
        """:meth:`check_prompts` but the length in tokens, which a call checks as it encodes them."""
        prompts = [prompt] if isinstance(prompt, str) else prompt
        require(isinstance(prompts, (list, tuple)) and len(prompts) > 0
                and all(isinstance(p, str) for p in prompts), "prompt", "must be a string or a list of strings")
        require(len(prompts) <= self.max_batch_size, "prompt",
                f"{len(prompts)} prompts exceed the pipeline's max_batch_size={self.max_batch_size}")
        for p in prompts:
            require(p.strip() != "", "prompt", "must not be empty")
            require(len(p) <= MAX_PROMPT_CHARS, "prompt", f"must be at most {MAX_PROMPT_CHARS} characters, "
                    f"got {len(p)}")
        return list(prompts)

    def unknown_words(self, prompt: str) -> list[str]:
        """Words of ``prompt`` that no training caption used, in order of appearance (none when the
        folder records no vocabulary): the model ignores them or makes something up."""
        if self.vocabulary is None:
            return []
        return list(dict.fromkeys(w for w in words(prompt) if w not in self.vocabulary))

    @property
    def frame_size(self) -> tuple[int, int]:
        """``(height, width)`` of the frames: the tokenizer's, which its scale schedule fixes."""
        return self.video_tokenizer.frame_size

    def cache_tokens(self, num_frames: int | None = None) -> int:
        """Visual tokens each layer's KV cache holds for a clip of ``num_frames`` (default: the pipeline's
        ``max_num_frames``), the unit of ``kv_budget``: half of the default is the budget long clips are run at."""
        num_frames = self.max_num_frames if num_frames is None else check_int(num_frames, "num_frames", 1)
        tok = self.video_tokenizer
        return tok.num_latent_frames(num_frames) * tok.tokens_per_frame

    def check_size(self, height: int | None = None, width: int | None = None) -> tuple[int, int]:
        """``(height, width)`` of a call (None: :attr:`frame_size`), or a ``ValueError`` naming the one that differs.
        Only the built size is accepted: the AR model's sequence layout and positions are those of its scale
        schedule, whose last map is the tokenizer's latent grid, so another size needs a tokenizer and a model
        trained for it (docs/own_data.md), not a resized input."""
        size = self.frame_size
        for value, built, name in ((height, size[0], "height"), (width, size[1], "width")):
            if value is not None:
                check_int(value, name, 1)
                require(value == built, name,
                        f"must be {built}: this pipeline makes {size[0]}x{size[1]} (height x width) frames, the size "
                        f"its scale schedule {self.video_tokenizer.scales} was trained for; got {value}. Another "
                        "size needs a tokenizer and a model trained for it (docs/own_data.md)")
        return size

    def _check_call(self, prompt, num_frames, guidance_scale, guidance_schedule, top_k, top_p, temperature, seed,
                    video, elastic, callback, output_type, generator, kv_budget, kv_policy, random_ratio, kv_rope,
                    kv_recent_frames, kv_horizon, on_frames) -> list[str]:
        prompts = self._prompt_list(prompt)
        check_choice(output_type, "output_type", OUTPUT_TYPES)
        require(generator is None or (isinstance(generator, torch.Generator) and generator.device.type == "cpu"),
                "generator", "must be None or a CPU torch.Generator (sampling runs on the CPU on every device)")
        for fn, name in ((callback, "callback"), (on_frames, "on_frames")):
            require(fn is None or callable(fn), name, f"must be callable or None, got {type(fn).__name__}")
        self.video_tokenizer.check_num_frames(num_frames, "num_frames")
        if kv_budget is None:
            require(kv_policy in (None, "none"), "kv_policy", f"{kv_policy!r} needs a kv_budget")
            check_int(num_frames, "num_frames", 1, self.max_num_frames)
        else:
            check_int(kv_budget, "kv_budget", 1)
            check_choice(kv_policy, "kv_policy", (None,) + KV_POLICIES[1:])
            check_int(num_frames, "num_frames", 1, MAX_LONG_NUM_FRAMES)
        check_float(random_ratio, "random_ratio", 0.0, 1.0)
        check_choice(kv_rope, "kv_rope", (None,) + KV_ROPE_MODES)
        check_int(kv_recent_frames, "kv_recent_frames", 1)
        if kv_horizon is not None:
            check_int(kv_horizon, "kv_horizon", 1 + self.video_tokenizer.config.temporal_compression)
        check_float(guidance_scale, "guidance_scale", 0.0)
        check_choice(guidance_schedule, "guidance_schedule", GUIDANCE_SCHEDULES)
        check_filters(top_k, top_p)
        check_float(temperature, "temperature", 0.0)
        if seed is not None:
            check_int(seed, "seed", 0, MAX_SEED)
        require(elastic is None or (isinstance(elastic, dict) and set(elastic) <= set(ElasticSpec._fields)),
                "elastic", "must be None or a dict with keys depth / num_experts / top_k")
        if elastic:  # "elastic['top_k']": the call has a sampling top_k too
            resolve_elastic(self.model.omniar_config, *(elastic.get(k) for k in ElasticSpec._fields),
                            names=tuple(f"elastic[{k!r}]" for k in ElasticSpec._fields))
        if video is not None:
            self.video_tokenizer.check_video(video, "video")
            require(video.shape[0] == len(prompts), "video", f"batch {video.shape[0]} != {len(prompts)} prompts")
            require(video.shape[2] < num_frames, "video", f"has {video.shape[2]} frames; num_frames={num_frames} "
                    "must be larger to continue it")
        return prompts

    # ------------------------------------------------------------- generation
    @torch.no_grad()
    def __call__(self, prompt: str | list[str], num_frames: int = 17, guidance_scale: float = 3.0,
                 guidance_schedule: str = "constant", top_k: int = 0, top_p: float = 1.0,
                 temperature: float = DEFAULT_TEMPERATURE, seed: int | None = 0, video: torch.Tensor | None = None,
                 elastic: dict | None = None, callback: Callable[[dict], None] | None = None,
                 progress: bool = False, output_type: str = "uint8",
                 generator: torch.Generator | None = None, kv_budget: int | None = None,
                 kv_policy: str | None = None, random_ratio: float = DEFAULT_RANDOM_RATIO, kv_rope: str | None = None,
                 kv_recent_frames: int = DEFAULT_KV_RECENT_FRAMES, kv_horizon: int | None = DEFAULT_KV_HORIZON,
                 on_frames: Callable | None = None, height: int | None = None,
                 width: int | None = None) -> TextToVideoOutput:
        """Generate clips for ``prompt``.

        Args:
            num_frames: 1 + tau * k frames (1 = an image), at most ``max_num_frames``; with a ``kv_budget`` at
                most ``omniar.limits.MAX_LONG_NUM_FRAMES`` (1,025).
            guidance_scale: classifier-free guidance (1 = off, 0 = unconditional).
            guidance_schedule: ``constant`` or ``linear`` (ramped from 1 at the coarsest scale).
            top_k, top_p, temperature: sampling filters (0 / 1.0 disable; temperature 0 = greedy).
            seed: makes the result reproducible (bit for bit on CPU); None draws a fresh one.
            generator: a CPU ``torch.Generator`` to draw from instead of ``seed`` (it advances).
            video: (B, 3, T0, H, W) in [-1, 1], first frames to continue (kept as given).
            elastic: run a sub-model, e.g. ``{"depth": 2}`` or ``{"num_experts": 4, "top_k": 1}``.
            callback: called with ``{"frame", "scale", "codes", "latent"}`` after every scale.
            output_type: ``"uint8"``, ``"np"``, ``"pil"`` or ``"pt"`` (see :class:`TextToVideoOutput`).
            kv_budget: visual tokens each layer's KV cache may hold (the text is always kept); None: unbounded.
            kv_policy: how a budgeted cache makes room at frame boundaries: ``"window"`` or ``"nacl"``
                (:class:`omniar.backbone.attention.KVBudget`); None: ``DEFAULT_KV_POLICY`` with a budget,
                ``"none"`` (no eviction) without.
            random_ratio: ``nacl``'s share of evictions drawn at random (by the scores), from the call's
                generator.
            kv_rope: temporal positions of kept keys, ``"extrapolate"`` or ``"rebase"``; None: ``DEFAULT_KV_ROPE``.
            kv_recent_frames: ``nacl`` keeps the newest this many frames whole (as many as fit) and scores only
                older tokens; default ``DEFAULT_KV_RECENT_FRAMES``.
            kv_horizon: ``nacl`` keeps no older token than a clip of this many frames has before its last frame
                (keys at temporal distances the model was trained on); None: no limit. Default
                ``DEFAULT_KV_HORIZON`` (17).
            on_frames: streaming: called with each latent frame's decoded frames (B, t, ...) of ``output_type``
                as soon as it is generated (t = 1, then tau), so the clip is never held whole; the output's
                ``frames`` is then None. The whole batch is decoded at once, one latent frame at a time.
            height, width: the frame size; None (the default) is the size the pipeline was built for
                (:meth:`check_size`), the only one it can make.
        """
        prompts = self._check_call(prompt, num_frames, guidance_scale, guidance_schedule, top_k, top_p,
                                   temperature, seed, video, elastic, callback, output_type, generator,
                                   kv_budget, kv_policy, random_ratio, kv_rope, kv_recent_frames, kv_horizon,
                                   on_frames)
        self.check_size(height, width)
        tok, model, dev = self.video_tokenizer, self.model, self.device
        scales, b = tok.scales, len(prompts)
        if generator is None:
            generator = torch.Generator()  # private: seed=None must not reseed the caller's global RNG
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
        horizon = None if kv_horizon is None else tok.num_latent_frames(kv_horizon)
        budget = None if kv_budget is None else KVBudget(kv_budget, kv_policy or DEFAULT_KV_POLICY, random_ratio,
                                                         kv_rope or DEFAULT_KV_ROPE, generator, kv_recent_frames,
                                                         horizon)
        use_cfg = guidance_scale != 1.0
        text = text_inputs(prompts + ([None] * b if use_cfg else []), self.max_text_len, self.text_tokenizer,
                           self.text_encoder, dev)
        t_lat = tok.num_latent_frames(num_frames)
        ctx = model.elastic(**elastic) if elastic else contextlib.nullcontext()
        decode_dtype = self.decode_dtype
        codes = [torch.empty(b, t_lat, h, w, dtype=torch.long) for h, w in tok.scale_shapes]
        vocab = [tok.scale_vocab(s) for s in range(len(scales))]
        start = time.perf_counter()
        passes = 0
        with ctx, contextlib.ExitStack() as stream:
            cache = model.new_cache(t_lat, budget)
            given = tok.encode(video.to(dev)) if video is not None else None
            n_given = given.num_latent_frames if given is not None else 0
            model.forward_text(cache=cache, **text)
            passes += 1
            if on_frames is not None:
                # the decoder's causal state carries from one latent frame to the next (exact, tested)
                stream.enter_context(tok.decoder.streaming())
                shown = 0  # pixel frames handed over so far
            prev = None  # previous latent frame's full accumulation (B, C, h, w)
            latents = []  # every latent frame's, decoded after the loop (not when streaming)
            bar = tqdm(total=(t_lat - n_given) * len(scales), disable=not progress, desc="generate")
            for f in range(t_lat):
                f_hat = None
                for s, (h, w) in enumerate(tok.scale_shapes):
                    if f < n_given:
                        idx = given.codes[s][:, f].cpu()
                    inp = tok.scale_input(f_hat if s > 0 else prev, s, b).to(dev, model.dtype)
                    logits = model.forward_scale(torch.cat([inp, inp]) if use_cfg else inp, f, s, cache).float()
                    passes += 1
                    if f >= n_given:
                        if use_cfg:
                            g = guidance_for_scale(guidance_scale, s, len(scales), guidance_schedule)
                            logits = guided_logits(logits[:b], logits[b:], g)
                        if vocab[s] < logits.shape[-1]:  # codes this scale does not have (coarse_codes)
                            logits[..., vocab[s]:] = float("-inf")
                        idx = sample(logits, temperature, top_k, top_p, generator).view(b, h, w)
                        bar.update(1)
                    codes[s][:, f] = idx
                    f_hat = tok.accumulate(f_hat, idx, s)
                    if callback is not None:
                        callback({"frame": f, "scale": s, "codes": idx, "latent": f_hat})
                prev = f_hat
                if on_frames is None:
                    latents.append(f_hat)
                else:
                    with tok.autocast(decode_dtype):
                        pixels = tok.render(f_hat[:, :, None]).clamp(-1, 1)
                    pixels = self._keep_given(pixels.float().cpu(), video, shown)
                    shown += pixels.shape[2]
                    on_frames(convert_frames(pixels, output_type))
            bar.close()
        gen_s = time.perf_counter() - start
        result = MultiScaleCodes(codes, scales, num_frames)
        frames = None
        if on_frames is None:
            # the latents generation built, as streaming decodes them (rebuilding them from the codes, all frames
            # in one batch, rounds differently); decode_batch_size clips and DECODE_CHUNK_FRAMES latent frames at a
            # time: the CPU conv3d's column buffers grow with the decoded block, so this bounds decode memory
            # whatever the batch size and clip length.
            latent, step = torch.stack(latents, dim=2), self.decode_batch_size
            pixels = torch.cat([tok.decode_latent(latent[i:i + step], chunk_size=DECODE_CHUNK_FRAMES,
                                                  dtype=decode_dtype).float().cpu()
                                for i in range(0, b, step)])
            frames = convert_frames(self._keep_given(pixels, video, 0), output_type)
        tokens = b * (t_lat - n_given) * tok.tokens_per_frame
        timings = {"generate_s": gen_s, "decode_s": time.perf_counter() - start - gen_s, "forward_passes": passes,
                   "tokens": tokens, "tokens_per_s": tokens / max(gen_s, 1e-9)}
        return TextToVideoOutput(frames, result, timings)

    @staticmethod
    def _keep_given(pixels: torch.Tensor, video: torch.Tensor | None, first: int) -> torch.Tensor:
        """Decoded frames ``first, first + 1, ...`` (B, 3, t, H, W) with those the caller gave (``video``) put back
        exactly as they were."""
        if video is not None and first < video.shape[2]:
            given = video[:, :, first:first + pixels.shape[2]]
            pixels[:, :, :given.shape[2]] = given.float().cpu()
        return pixels


# the keyword defaults of a bare pipe(prompt) call (guidance_scale, temperature, ...), read once from its signature:
# the one source `omniar generate`, the demo and `omniar eval t2v` take theirs from, so none can drift from it
CALL_DEFAULTS = MappingProxyType({name: p.default for name, p in inspect.signature(TextToVideoPipeline.__call__)
                                  .parameters.items() if p.default is not inspect.Parameter.empty})
