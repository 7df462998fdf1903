"""Training observability in TensorBoard: the engine's grad norm (before clipping), throughput (time beside
training left out) and hparams; the tokenizer trainer's reconstruction previews, the AR trainer's sample clips
and its loss split into the full model's and the elastic sub-model's. Previews change no weight, also across
a resume."""

import copy
import io
import math

import numpy as np
import pytest
import torch
from _train_helpers import assert_bitwise_equal, tiny_ar_config, tiny_config, weights
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from omniar.pixels import to_uint8
from omniar.tokenizers import VideoTokenizer
from omniar.train.common import build_dataset
from omniar.train.engine import EngineConfig, TrainEngine


def events(run_dir) -> EventAccumulator:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def filmstrips(acc: EventAccumulator, tag: str, rows: int, frames: int, size: int) -> dict[int, np.ndarray]:
    """The images of ``tag`` by step, back as (rows, T, H, W, 3) uint8."""
    out = {}
    for e in acc.Images(tag):
        image = np.array(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
        assert image.shape == (rows * size, frames * size, 3)
        out[e.step] = image.reshape(rows, size, frames, size, 3).transpose(0, 2, 1, 3, 4)
    return out


@pytest.mark.parametrize("stage", [0, 2])
def test_grad_norm_is_the_global_norm_before_clipping(tmp_path, stage):
    torch.manual_seed(0)
    model, x = torch.nn.Linear(4, 3), torch.randn(8, 4) * 10
    reference = copy.deepcopy(model)
    reference(x).pow(2).mean().backward()
    want = float(torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()]))
    with TrainEngine(model, EngineConfig(out_dir=str(tmp_path), zero_stage=stage, grad_clip=1.0)) as engine:
        assert engine.backward_step(engine.ds(x).pow(2).mean())
        assert want > 10 and engine.grad_norm == pytest.approx(want, rel=1e-5)
        assert not engine.backward_step(engine.ds(x).sum() * float("nan"))
        assert math.isnan(engine.grad_norm)


def test_paused_restores_each_mode_and_its_time_is_not_throughput(tmp_path, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout())
    with TrainEngine(model, EngineConfig(out_dir=str(tmp_path), lr=0.1)) as engine:
        engine.module[1].eval()  # a frozen part stays in eval mode
        clock = iter([100.0, 101.0, 104.0, 110.0])  # resume; paused from 101 to 104; logged at 110
        monkeypatch.setattr("omniar.train.engine.time.perf_counter", lambda: next(clock))
        assert engine.resume() == 0
        with engine.paused(engine.module) as module:
            assert not module.training and not module[0].training and not torch.is_grad_enabled()
        assert engine.module.training and engine.module[0].training and not engine.module[1].training
        engine.log_step({"loss": 1.0}, 4, samples=8, tokens=100)  # 4 steps in 10 s, 3 of them paused
        monkeypatch.undo()
    acc = events(tmp_path)
    assert scalars(acc, "throughput/samples_per_s")[4] == pytest.approx(4 * 8 / 7)
    assert scalars(acc, "throughput/tokens_per_s")[4] == pytest.approx(4 * 100 / 7)
    assert scalars(acc, "lr")[4] == pytest.approx(0.1) and scalars(acc, "skipped_steps") == {4: 0}


def test_tokenizer_previews_reconstructions_and_logs_grad_norm_throughput_and_config(tmp_path):
    """Training clips 0 and 1, each as rows: original, reconstruction, previews from scales 0..S-2."""
    from omniar.train.tokenizer import reconstruction_filmstrips, train

    straight = weights(train(tiny_config(tmp_path / "a", 4, sample_every=0), progress=False))
    config = tiny_config(tmp_path / "b", 4, sample_every=2)
    train(config, progress=False, stop_at=2)
    final = train(config, progress=False)
    assert_bitwise_equal(straight, weights(final))

    acc = events(tmp_path / "b")
    assert acc.Tags()["images"] == ["reconstruction/0", "reconstruction/1"]
    data = config["data"]
    clips = torch.stack([build_dataset("shapes", None, 10, data["size"], data["num_frames"], 0)[i]["video"]
                         for i in range(2)])
    tok = VideoTokenizer.from_pretrained(final).eval()
    with torch.no_grad():
        want = reconstruction_filmstrips(tok, clips).numpy()
    rows = 2 + len(tok.scales) - 1
    for i in range(2):
        got = filmstrips(acc, f"reconstruction/{i}", rows, data["num_frames"], data["size"])
        assert sorted(got) == [2, 4]
        assert np.array_equal(got[4][0], to_uint8(clips[i]).permute(1, 2, 3, 0).numpy())  # the clip itself
        assert np.abs(got[4].astype(int) - want[i]).max() <= 1  # the model of step 4
        assert not np.array_equal(got[4][1], got[4][2])  # the coarsest preview is not the reconstruction

    grad_norm, throughput = scalars(acc, "grad_norm"), scalars(acc, "throughput/samples_per_s")
    assert sorted(grad_norm) == sorted(throughput) == [1, 2, 3, 4]
    assert all(0 < v < math.inf for v in [*grad_norm.values(), *throughput.values()])
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["train.sample_every"].number_value == 2 and hparams["data.dataset"].string_value == "shapes"
    assert hparams["model.channels"].string_value == "[8, 16, 16]"


def test_ar_logs_full_and_elastic_losses_sample_clips_and_tokens_per_second(tmp_path):
    from omniar.train.ar import SAMPLE_PROMPTS, train
    from omniar.train.pretokenize import TokenizedDataset

    torch.manual_seed(0)
    VideoTokenizer(**tiny_config("unused", 1)["model"]).save_pretrained(tmp_path / "tok")

    def config(name, sample_every):
        return tiny_ar_config(tmp_path, 16, out_dir=str(tmp_path / name), steps=6, log_every=1, micro_batch_size=2,
                              sample_every=sample_every)

    straight = weights(train(config("a", 0), progress=False))
    train(config("b", 3), progress=False, stop_at=3)
    assert_bitwise_equal(straight, weights(train(config("b", 3), progress=False)))

    acc = events(tmp_path / "b")
    loss, full, elastic = (scalars(acc, tag) for tag in ("loss", "loss/full", "loss/elastic"))
    assert sorted(loss) == sorted(full) == [1, 2, 3, 4, 5, 6]
    assert 0 < len(elastic) < 6 and elastic.keys() == scalars(acc, "elastic_visual_ce").keys()  # sampled steps
    for step, total in loss.items():
        assert total == pytest.approx(full[step] + elastic.get(step, 0.0), rel=1e-5)

    cfg = config("b", 3)
    tok = VideoTokenizer.from_pretrained(tmp_path / "tok")
    latent_frames = 1 + (cfg["data"]["num_frames"] - 1) // tok.config.temporal_compression
    per_clip = cfg["data"]["max_text_len"] + latent_frames * sum(n * n for n in tok.scales)
    tokens, samples = scalars(acc, "throughput/tokens_per_s"), scalars(acc, "throughput/samples_per_s")
    assert all(tokens[s] == pytest.approx(per_clip * samples[s], rel=1e-5) for s in loss)

    prompts = TokenizedDataset(tmp_path / "codes").captions[:SAMPLE_PROMPTS]
    got = filmstrips(acc, "samples", len(prompts), 1 + tok.config.temporal_compression, tok.resolution)
    assert sorted(got) == [3, 6] and got[6].std() > 0
    text = acc.Tensors("samples/prompts/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert all(f"{i}. {p}" in text for i, p in enumerate(prompts))
