"""Loading omniar model folders: safetensors only, every tensor checked before use.

diffusers' ``ModelMixin.from_pretrained`` falls back to pickled ``.bin`` files, fills
missing tensors with random values and accepts NaNs with at most a log line. omniar
models load through :meth:`PretrainedModel.from_pretrained` instead: a local folder
written by ``save_pretrained`` (one ``.safetensors`` file or shards with an index),
and any truncated, tampered or mismatched file is a ``ValueError`` naming the file
and, where there is one, the tensor.
"""

from __future__ import annotations

import hashlib
import inspect
import itertools
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers.models.modeling_utils import ModelMixin
from safetensors import safe_open

from ._checks import normal_file_mode, require

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"


def read_json(path: Path, name: str) -> dict:
    """A JSON object from ``path``; a missing or malformed file is a ValueError naming it."""
    require(path.is_file(), name, f"{path} not found")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{name}: {path} is not valid JSON ({e})") from None
    require(isinstance(data, dict), name, f"{path} must hold a JSON object")
    return data


def weight_files(folder: Path, name: str = "pretrained_model_name_or_path") -> dict[Path, set[str] | None]:
    """Safetensors files of a model folder -> the tensor names the index assigns them (None: unindexed)."""
    index_file = folder / INDEX
    if index_file.is_file():
        weight_map = read_json(index_file, name).get("weight_map")
        require(isinstance(weight_map, dict) and weight_map, name, f"{index_file} has no weight_map")
        files: dict[Path, set[str] | None] = {}
        for key, shard in weight_map.items():
            require(isinstance(shard, str) and "/" not in shard and shard.endswith(".safetensors"),
                    name, f"{index_file}: bad shard name {shard!r} for {key!r}")
            files.setdefault(folder / shard, set()).add(key)
        return files
    if (folder / WEIGHTS).is_file():
        return {folder / WEIGHTS: None}
    pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt*"))
    hint = f" (found {pickled}: pickle files are never loaded, convert them to safetensors)" if pickled else ""
    raise ValueError(f"{name}: {folder} has no {WEIGHTS} or {INDEX}{hint}")


def load_checked_state_dict(folder: Path, expected: dict[str, torch.Tensor],
                            name: str = "pretrained_model_name_or_path",
                            optional: str | tuple[str, ...] | None = None) -> dict[str, torch.Tensor]:
    """Read every tensor of ``folder`` and check it against ``expected`` (a model's state dict):
    no unknown or missing names (names starting with ``optional``, a prefix or a tuple of them, may be
    missing), same shapes, floating tensors stay floating, all values finite. Errors name ``name``, the
    argument the folder came from."""
    loaded: dict[str, torch.Tensor] = {}
    for path, indexed in weight_files(folder, name).items():
        require(path.is_file(), name, f"{path} (listed in {INDEX}) not found")
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                tensors = {k: f.get_tensor(k) for k in keys}
        except Exception as e:  # safetensors raises its own error types for bad headers and short files
            raise ValueError(f"{name}: {path} is truncated or corrupt ({e})") from None
        for key, value in tensors.items():
            where = f"{path}: tensor {key!r}"
            require(indexed is None or key in indexed, name, f"{where} is not assigned to this file by {INDEX}")
            require(key in expected, name, f"{where} is not a tensor of this model")
            require(key not in loaded, name, f"{where} appears in two files")
            want = expected[key]
            require(value.shape == want.shape, name,
                    f"{where} has shape {tuple(value.shape)}, the model expects {tuple(want.shape)}")
            require(value.is_floating_point() == want.is_floating_point(), name,
                    f"{where} has dtype {value.dtype}, the model expects {want.dtype}")
            require(not value.is_floating_point() or bool(torch.isfinite(value).all()), name,
                    f"{where} holds NaN or infinite values")
            loaded[key] = value
    missing = sorted(k for k in set(expected) - set(loaded) if optional is None or not k.startswith(optional))
    require(not missing, name, f"{folder} lacks {len(missing)} tensor(s) of this model, e.g. {missing[:3]}")
    return loaded


def weights_sha256(module: torch.nn.Module, prefixes: tuple[str, ...] = ("",), extra: object = None) -> str:
    """SHA-256 of the module's tensors whose names start with one of ``prefixes`` (and of ``extra``,
    JSON-encoded): a key for caches that are valid only for these exact weights and settings."""
    digest = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for name, tensor in sorted(module.state_dict().items()):
        if name.startswith(prefixes):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def write_file_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` a temporary file, then rename it: readers never see a partial file, and the pid in
    its name keeps two runs filling the same cache from clobbering each other's temporary files."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.chmod(tmp, normal_file_mode())  # safetensors writes owner-only
    os.replace(tmp, path)


def write_folder_atomically(folder: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """``write`` a folder aside, then swap it in for ``folder``: a crash leaves the old folder or
    the new one, never a mix (at worst a stray ``.NAME.tmp-PID`` / ``.NAME.old-PID`` beside it)."""
    folder = Path(folder)
    tmp, old = (folder.with_name(f".{folder.name}.{tag}-{os.getpid()}") for tag in ("tmp", "old"))
    for p in (tmp, old):
        if p.exists():
            shutil.rmtree(p)
    write(tmp)
    mode = normal_file_mode()  # diffusers writes weights owner-only
    for path in tmp.rglob("*"):
        if path.is_file():
            os.chmod(path, mode)
    if folder.exists():
        os.replace(folder, old)
    os.replace(tmp, folder)
    if old.exists():
        shutil.rmtree(old)
    return folder


class PretrainedModel(ModelMixin):
    """``ModelMixin`` whose ``from_pretrained`` reads only checked safetensors from a local folder
    and whose ``save_pretrained`` writes its folder atomically."""

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> Path:
        """diffusers' ``save_pretrained`` (safetensors, optional ``max_shard_size``) into a folder
        written aside and swapped in."""
        return write_folder_atomically(
            save_directory, lambda tmp: super(PretrainedModel, self).save_pretrained(str(tmp), **kwargs))

    def to(self, *args, **kwargs):
        # nn.Module's own: diffusers' warns of modules to keep in float32 at every cast, even for a model with none
        return torch.nn.Module.to(self, *args, **kwargs)

    # diffusers' own device and dtype first look through every module for offloading and casting hooks (about 1 ms
    # for the tokenizer, read at every generation step); omniar attaches none, so the first tensor answers
    @property
    def device(self) -> torch.device:
        return next(itertools.chain(self.parameters(), self.buffers())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(t.dtype for t in itertools.chain(self.parameters(), self.buffers()) if t.is_floating_point())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a folder written by ``save_pretrained``. ``torch_dtype`` is the one option (a cast
        after loading); omniar never downloads, so the path must be a local folder."""
        torch_dtype = kwargs.pop("torch_dtype", None)
        require(not kwargs, "kwargs", f"unsupported options {sorted(kwargs)} (only torch_dtype)")
        folder = Path(pretrained_model_name_or_path)
        require(folder.is_dir(), "pretrained_model_name_or_path",
                f"{folder} is not a local model folder (omniar never downloads weights)")
        config_file = folder / cls.config_name
        config = read_json(config_file, "pretrained_model_name_or_path")
        require(config.get("_class_name", cls.__name__) == cls.__name__, "pretrained_model_name_or_path",
                f"{config_file} describes a {config.get('_class_name')}, not a {cls.__name__}")
        # diffusers' from_config drops unknown keys: a misspelled setting would silently keep its default
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        require(not unknown, "pretrained_model_name_or_path", f"{config_file}: unknown keys {unknown}")
        try:  # each model validates its own config values in __init__
            model = cls.from_config(config)
        except (TypeError, ValueError) as e:
            raise ValueError(f"pretrained_model_name_or_path: {config_file}: {e}") from None
        model.load_state_dict(load_checked_state_dict(folder, model.state_dict()), strict=True)
        if torch_dtype is not None:
            model = model.to(torch_dtype)
        return model.eval()
