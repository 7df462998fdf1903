"""Untrusted model folders: safetensors only; truncated, tampered or mismatched files name the file and tensor."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from omniar.backbone import OmniARConfig, OmniARModel
from omniar.generation import TextToVideoPipeline
from omniar.tokenizers import VideoTokenizer

WEIGHTS = "diffusion_pytorch_model.safetensors"
KEY = "decoder.net.0.conv.weight"


def tiny_tokenizer() -> VideoTokenizer:
    torch.manual_seed(0)
    return VideoTokenizer(channels=(8, 8, 8), latent_channels=4, temporal_compression=1, spatial_compression=4,
                          scales=(1, 2), codebook_size=16)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok") / "ok"
    tiny_tokenizer().save_pretrained(str(folder))
    return folder


def edit_tensors(fn):
    def apply(folder):
        path = folder / WEIGHTS
        tensors = load_file(path)
        fn(tensors)
        save_file(tensors, path)
    return apply


def truncate(folder):
    path = folder / WEIGHTS
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def scramble_header(folder):
    data = bytearray((folder / WEIGHTS).read_bytes())
    data[10:20] = b"X" * 10
    (folder / WEIGHTS).write_bytes(bytes(data))


def pickle_only(folder):
    state = load_file(folder / WEIGHTS)
    (folder / WEIGHTS).unlink()
    torch.save(state, folder / "diffusion_pytorch_model.bin")


def edit_config(**changes):
    def apply(folder):
        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps(config))
    return apply


CASES = {
    "truncated": (truncate, rf"{WEIGHTS} is truncated or corrupt"),
    "header": (scramble_header, rf"{WEIGHTS} is truncated or corrupt"),
    "shape": (edit_tensors(lambda t: t.update({KEY: torch.zeros(3, 3)})),
              rf"{WEIGHTS}: tensor '{KEY}' has shape \(3, 3\)"),
    "dtype": (edit_tensors(lambda t: t.update({KEY: t[KEY].to(torch.int32)})),
              rf"{WEIGHTS}: tensor '{KEY}' has dtype torch.int32"),
    "nan": (edit_tensors(lambda t: t[KEY].view(-1).__setitem__(3, float("nan"))),
            rf"{WEIGHTS}: tensor '{KEY}' holds NaN"),
    "missing": (edit_tensors(lambda t: t.pop(KEY)), rf"lacks 1 tensor\(s\) of this model, e.g. \['{KEY}'\]"),
    "extra": (edit_tensors(lambda t: t.update(evil=torch.zeros(1))), r"tensor 'evil' is not a tensor of this model"),
    "pickle": (pickle_only, r"found \['diffusion_pytorch_model.bin'\]: pickle files are never loaded"),
    "config_value": (edit_config(codebook_size=-5), r"config.json: codebook_size: must be >= 2"),
    "config_class": (edit_config(_class_name="OmniARModel"), r"config.json describes a OmniARModel"),
    "config_json": (lambda f: (f / "config.json").write_text("{oops"), r"config.json is not valid JSON"),
    # diffusers' from_config would drop a misspelled key and keep the default
    "config_typo": (edit_config(codebook_sise=16, refiner_nrom=False),
                    r"config.json: unknown keys \['codebook_sise', 'refiner_nrom'\]"),
    "config_float": (edit_config(channels=[8.9, 8, 8]), r"config.json: channels: must be an int, got 8.9"),
    "config_strings": (edit_config(scales=["1", "2"]), r"config.json: scales: must be an int, got '1'"),
    # refused before the allocator is asked for anything
    "config_huge": (edit_config(codebook_size=10**9), r"config.json: codebook_size: must be <= 65536"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_folder_is_a_clear_value_error(saved, tmp_path, case):
    tamper, message = CASES[case]
    folder = tmp_path / case
    shutil.copytree(saved, folder)
    tamper(folder)
    with pytest.raises(ValueError, match=rf"^pretrained_model_name_or_path: .*{message}"):
        VideoTokenizer.from_pretrained(folder)


def test_intact_folder_round_trips_exactly(saved):
    loaded = VideoTokenizer.from_pretrained(saved)
    reference = tiny_tokenizer().state_dict()
    assert not loaded.training
    assert all(torch.equal(v, reference[k]) for k, v in loaded.state_dict().items())

def test_half_precision_folder_loads_as_float32(tmp_path):
    """Shipped weights may be stored in float16 (half the bytes): they load into the float32 model as
    exactly the rounded values, so codes made with the stored folder are the ones a user gets."""
    model = tiny_tokenizer()
    model.to(torch.float16).save_pretrained(tmp_path / "half")
    assert load_file(tmp_path / "half" / WEIGHTS)[KEY].dtype == torch.float16
    loaded = VideoTokenizer.from_pretrained(tmp_path / "half")
    for k, v in loaded.state_dict().items():
        want = model.state_dict()[k]
        assert v.dtype == (torch.float32 if want.is_floating_point() else want.dtype)
        assert torch.equal(v, want.to(v.dtype))


def test_save_is_atomic(tmp_path, monkeypatch):
    """A save that dies mid-write leaves the previous folder loadable and unchanged; a save that
    completes replaces it and leaves nothing beside it."""
    folder = tmp_path / "model"
    tiny_tokenizer().save_pretrained(folder)
    before = (folder / WEIGHTS).read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr("safetensors.torch.save_file", crash)
    changed = tiny_tokenizer()
    with torch.no_grad():
        changed.get_parameter(KEY).add_(1)
    with pytest.raises(OSError, match="disk full"):
        changed.save_pretrained(folder)
    assert (folder / WEIGHTS).read_bytes() == before
    VideoTokenizer.from_pretrained(folder)
    monkeypatch.undo()
    changed.save_pretrained(folder)
    assert torch.equal(VideoTokenizer.from_pretrained(folder).get_parameter(KEY), changed.get_parameter(KEY))
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_saved_files_get_a_normal_new_file_mode(tmp_path):
    """diffusers writes the weights owner-only; a shared model folder must be readable as the umask says."""
    import os

    old = os.umask(0o022)
    try:
        tiny_tokenizer().save_pretrained(tmp_path / "model", max_shard_size="20KB")
    finally:
        os.umask(old)
    files = list((tmp_path / "model").iterdir())
    assert len(files) > 3 and {p.stat().st_mode & 0o777 for p in files} == {0o644}


def test_sharded_folder_checks_the_index(tmp_path):
    model = OmniARModel.from_config_obj(OmniARConfig(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                                     num_experts=4, top_k=1, expert_hidden_size=16,
                                                     codebook_size=16, code_dim=4, scales=(1, 2)))
    model.save_pretrained(str(tmp_path / "m"), max_shard_size="20KB")
    index_file = tmp_path / "m" / (WEIGHTS + ".index.json")
    index = json.loads(index_file.read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = OmniARModel.from_pretrained(tmp_path / "m")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())

    key, shard = next(iter(index["weight_map"].items()))
    index["weight_map"][key] = next(s for s in index["weight_map"].values() if s != shard)
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"tensor '{key}' is not assigned to this file"):
        OmniARModel.from_pretrained(tmp_path / "m")
    (tmp_path / "m" / shard).unlink()
    with pytest.raises(ValueError, match=rf"{shard} \(listed in .*index.json\) not found"):
        OmniARModel.from_pretrained(tmp_path / "m")


def test_only_local_folders_and_known_options(saved, tmp_path):
    with pytest.raises(ValueError, match="pretrained_model_name_or_path: .* is not a local model folder"):
        VideoTokenizer.from_pretrained("someone/some-model")
    with pytest.raises(ValueError, match=r"kwargs: unsupported options \['use_safetensors'\]"):
        VideoTokenizer.from_pretrained(saved, use_safetensors=False)
    assert VideoTokenizer.from_pretrained(saved, torch_dtype=torch.bfloat16).dtype == torch.bfloat16


def test_pipeline_index_is_validated(tmp_path):
    pipe = TextToVideoPipeline.from_pretrained()
    pipe.save_pretrained(tmp_path / "p")
    index_file = tmp_path / "p" / "model_index.json"
    index = json.loads(index_file.read_text())
    del index["max_num_frames"]
    index_file.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="path: .*model_index.json lacks 'max_num_frames'"):
        TextToVideoPipeline.from_pretrained(tmp_path / "p")
    for key, value in (("max_batch_size", 10**6), ("max_num_frames", 10**6), ("max_text_len", 10**6)):
        index_file.write_text(json.dumps(index | {"max_num_frames": 33, key: value}))
        with pytest.raises(ValueError, match=f"path: .*model_index.json: {key}: must be <= "):
            TextToVideoPipeline.from_pretrained(tmp_path / "p")
    index_file.write_text("not json")
    with pytest.raises(ValueError, match="path: .*model_index.json is not valid JSON"):
        TextToVideoPipeline.from_pretrained(tmp_path / "p")


def test_backbone_sizes_are_bounded(tmp_path):
    from omniar import limits

    for key, value in (("hidden_size", 2 * limits.MAX_CHANNELS), ("num_experts", limits.MAX_EXPERTS + 1),
                       ("codebook_size", 10**9), ("num_layers", 10**6)):
        with pytest.raises(ValueError, match=f"^{key}: must be <= "):
            OmniARConfig(**{key: value})
