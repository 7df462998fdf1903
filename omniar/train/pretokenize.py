"""Tokenize a text-video dataset once and cache it on disk (resumable, shard by shard).

Each shard ``shard_XXXXX.safetensors`` holds the continuous latents (fp16, for
the self-correcting re-quantization during AR training) and the code maps per
scale; ``shard_XXXXX.json`` its captions. The safetensors file is written last
and atomically, so its presence marks a complete shard and a rerun skips it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from .._checks import check_int, require
from .._pretrained import weights_sha256, write_file_atomically
from .._scales import check_scales
from ..tokenizers import VideoTokenizer


def _collate_clips(items: list[dict]) -> tuple[torch.Tensor, list[str]]:
    return torch.stack([it["video"] for it in items]), [it["caption"] for it in items]


def encoder_fingerprint(tokenizer: VideoTokenizer) -> str:
    """SHA-256 of the weights that decide the codes (encoder and quantizer): a retrained encoder
    invalidates a cache, a retrained decoder or refiner does not."""
    return weights_sha256(tokenizer, ("encoder.", "quantizer."))


def pretokenize(tokenizer: VideoTokenizer, dataset: Dataset, out_dir: str | Path, num_clips: int, source: dict,
                shard_size: int = 1024, batch_size: int = 32, num_workers: int = 0, progress: bool = True) -> Path:
    """Encode items ``0..num_clips-1`` of ``dataset`` (dicts with "video" and "caption") into ``out_dir``.

    ``source``: the JSON settings that decide the dataset's items (name, path, seed, frames, size). It is
    recorded in the manifest with the scales and :func:`encoder_fingerprint`; a cache made from another
    source or encoder is refused instead of silently reused."""
    check_int(num_clips, "num_clips", 1, len(dataset))
    require(isinstance(source, dict), "source", f"must be a dict of data settings, got {type(source).__name__}")
    check_int(shard_size, "shard_size", 1)
    check_int(batch_size, "batch_size", 1)
    require(tokenizer.config.codebook_size <= 32767, "tokenizer", "codebook too large for int16 code storage")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(json.dumps({
        "num_clips": num_clips, "shard_size": shard_size, "source": source, "scales": list(tokenizer.scales),
        "encoder_sha256": encoder_fingerprint(tokenizer)}))
    old = out / "manifest.json"
    if old.exists():
        recorded = json.loads(old.read_text())
        differ = sorted(k for k in manifest.keys() | recorded.keys() if manifest.get(k) != recorded.get(k))
        require(not differ, "out_dir", f"{out} holds a cache made with other settings ({', '.join(differ)} "
                "differ); use another folder")
    write_file_atomically(old, lambda p: p.write_text(json.dumps(manifest, indent=1)))
    tokenizer.eval()
    num_shards = -(-num_clips // shard_size)
    for k in tqdm(range(num_shards), desc="pretokenize", disable=not progress):
        target = out / f"shard_{k:05d}.safetensors"
        if target.exists():
            continue
        indices = range(k * shard_size, min((k + 1) * shard_size, num_clips))
        loader = DataLoader(Subset(dataset, indices), batch_size=batch_size, num_workers=num_workers,
                            collate_fn=_collate_clips)
        latents, codes, captions = [], [], []
        for video, caption in loader:
            latent = tokenizer.encode_latent(video)
            latents.append(latent.half().cpu())
            codes.append([c.short().cpu() for c in tokenizer.quantize_latent(latent).codes])
            captions += caption
        tensors = {"latent": torch.cat(latents)}
        for s in range(len(tokenizer.scales)):
            tensors[f"codes_{s}"] = torch.cat([c[s] for c in codes])
        write_file_atomically(out / f"shard_{k:05d}.json", lambda p: p.write_text(json.dumps(captions)))
        write_file_atomically(target, lambda p: save_file(tensors, str(p)))
    return out


class TokenizedDataset(Dataset):
    """The cache written by :func:`pretokenize`, held in memory.

    Items: ``{"latent": float (C, T_lat, N, N), "codes": list of LongTensor (T_lat, n, n), "caption": str}``.
    """

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        require((folder / "manifest.json").is_file(), "folder", f"{folder} is not a pretokenized cache")
        self.manifest = json.loads((folder / "manifest.json").read_text())
        shards = sorted(folder.glob("shard_*.safetensors"))
        expected = -(-self.manifest["num_clips"] // self.manifest["shard_size"])
        require(len(shards) == expected, "folder", f"{folder} has {len(shards)} of {expected} shards; "
                "rerun pretokenization to finish it")
        parts = [load_file(str(p)) for p in shards]
        self.latent = torch.cat([p["latent"] for p in parts])
        self.scales = check_scales(self.manifest["scales"], "manifest scales")  # JSON lists -> the tokenizer's form
        self.codes = [torch.cat([p[f"codes_{s}"] for p in parts]) for s in range(len(self.scales))]
        self.captions = [c for p in shards for c in json.loads(p.with_suffix(".json").read_text())]

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int) -> dict:
        return {"latent": self.latent[index].float(), "codes": [c[index].long() for c in self.codes],
                "caption": self.captions[index]}
