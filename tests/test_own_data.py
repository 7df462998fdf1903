"""The own-data recipe end to end through the command line (#26): `omniar data shapes` writes a 48x80 captioned
video folder, `omniar train tokenizer` and `omniar train ar` train tiny models on it from configs/own_data_*.yaml,
and `omniar generate` makes a 48x80 clip from the result. Also: the recipe's configs as shipped agree with
themselves, and a data.size the tokenizer does not make is refused before any work."""

import json
from pathlib import Path

import yaml

from omniar.cli import main
from omniar.data.video_io import read_video
from omniar.tokenizers import VideoTokenizer
from omniar.train.ar import ARDataConfig, check_model_section
from omniar.train.common import VideoDataConfig
from omniar.train.pretokenize import TokenizedDataset

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TOK_CONFIG, AR_CONFIG = str(CONFIGS / "own_data_tokenizer.yaml"), str(CONFIGS / "own_data_ar.yaml")
CPU_RUN = ["--set", "train.precision=fp32", "--set", "train.zero_stage=0", "--set", "data.num_workers=0",
           "--set", "data.num_frames=5", "--set", "train.log_every=1", "--set", "train.save_every=100",
           "--steps", "3"]


def sets(**values) -> list[str]:
    return [arg for key, value in values.items() for arg in ("--set", f"{key.replace('__', '.')}={value}")]


def test_shipped_recipe_configs_agree():
    tok_cfg, ar_cfg = (yaml.safe_load(open(path)) for path in (TOK_CONFIG, AR_CONFIG))
    tok = VideoTokenizer(**tok_cfg["model"])
    assert tok.frame_size == (128, 224) and tok.latent_size == (16, 28)
    assert VideoDataConfig(**tok_cfg["data"]).size == tok.resolution
    tok.check_num_frames(tok_cfg["data"]["num_frames"])
    assert ar_cfg["train"]["tokenizer"] == tok_cfg["train"]["out_dir"] + "/final"
    assert ARDataConfig(**ar_cfg["data"]).num_frames == tok_cfg["data"]["num_frames"]
    check_model_section(ar_cfg["model"])  # sets nothing the tokenizers fix


def test_data_size_other_than_the_tokenizers_is_refused(tmp_path, capsys):
    args = ["train", "tokenizer", "--config", TOK_CONFIG, "--out", str(tmp_path / "tok"),
            *sets(data__path=tmp_path, data__size="[48,64]")]
    assert main(args) == 2
    assert "omniar: error: data.size: must equal the tokenizer resolution (128, 224)" in capsys.readouterr().err
    assert not (tmp_path / "tok").exists()


def test_own_videos_train_tokenizer_then_ar_then_generate(tmp_path, capsys):
    data = tmp_path / "videos"
    assert main(["data", "shapes", "--out", str(data), "--size", "48x80", "--clips", "8", "--frames", "5"]) == 0
    lines = (data / "captions.jsonl").read_text().splitlines()
    assert len(lines) == 8 and read_video(data / json.loads(lines[0])["video"]).shape == (5, 48, 80, 3)

    scales = "[[1,1],[2,3],[3,5],[6,10]]"  # the 6 x 10 latent grid of 48x80 at spatial_compression 8
    assert main(["train", "tokenizer", "--config", TOK_CONFIG, "--out", str(tmp_path / "tok"), *CPU_RUN,
                 *sets(data__path=data, data__size="[48,80]", model__channels="[8,16,16,16]", model__scales=scales,
                       model__latent_channels=8, model__codebook_size=32, train__micro_batch_size=2,
                       train__sample_every=0)]) == 0
    tok = VideoTokenizer.from_pretrained(str(tmp_path / "tok" / "final"))
    assert tok.frame_size == (48, 80) and tok.scale_shapes == ((1, 1), (2, 3), (3, 5), (6, 10))

    assert main(["train", "ar", "--config", AR_CONFIG, "--out", str(tmp_path / "ar"), *CPU_RUN,
                 *sets(data__path=data, data__cache_dir=tmp_path / "codes", data__num_clips=8,
                       data__max_num_frames=9, train__tokenizer=tmp_path / "tok" / "final",
                       train__micro_batch_size=4, train__sample_every=0, model__hidden_size=32, model__num_layers=2,
                       model__num_heads=2, model__num_kv_heads=1, model__num_experts=4,
                       model__expert_hidden_size=16)]) == 0
    capsys.readouterr()
    assert TokenizedDataset(tmp_path / "codes").scales == tok.scales  # the cache's JSON lists, canonical again

    out = tmp_path / "t2v.mp4"
    assert main(["generate", "--model", str(tmp_path / "ar" / "final"), "--prompt", json.loads(lines[0])["caption"],
                 "--num-frames", "5", "--out", str(out)]) == 0
    assert read_video(out).shape == (5, 48, 80, 3)
