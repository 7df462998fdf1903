"""Non-square sizes outside the models (#26): the trainers' data.size, the AR loss's per-scale weights on an (h, w)
schedule, the frames omniar generate continues from, and the demo's labels."""

import numpy as np
import pytest
import torch

from omniar.commands.generate import fit_frames
from omniar.data.shapes import MovingShapes
from omniar.data.video_io import write_video
from omniar.pixels import to_uint8
from omniar.train.ar import ARTrainConfig, visual_mean
from omniar.train.common import VideoDataConfig
from test_pipeline_resolution import PROMPTS, tiny_pipeline


@pytest.mark.parametrize("size, want", [(64, 64), ([48, 80], (48, 80)), ((96, 160), (96, 160)), ([64, 64], 64)])
def test_data_size_takes_a_side_or_height_width(size, want):
    """The canonical form is VideoTokenizer.resolution's (a side when square), which the trainers compare it with."""
    assert VideoDataConfig(size=size).size == want


@pytest.mark.parametrize("size", [[48], [48, 80, 3], "48x80", [48, 4], True])
def test_bad_data_size_is_named(size):
    with pytest.raises(ValueError, match="^data.size: "):
        VideoDataConfig(size=size)


def test_scale_weighting_counts_each_h_by_w_scale_once():
    scales = ((1, 1), (2, 3), (3, 5), (6, 10))
    per_scale = torch.tensor([1.0, 2.0, 4.0, 8.0])
    per_token = torch.cat([v.repeat(h * w) for v, (h, w) in zip(per_scale, scales)]).expand(2, 3, -1)
    assert torch.allclose(visual_mean(per_token, scales, ARTrainConfig()), per_scale.mean())
    token_mean = (1 * 1 + 2 * 6 + 4 * 15 + 8 * 60) / 82
    assert torch.allclose(visual_mean(per_token, scales, ARTrainConfig(scale_weighting="token")),
                          torch.tensor(token_mean))
    square = torch.rand(2, 3, 1 + 4 + 16 + 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(visual_mean(square, (1, 2, 4, 8), ARTrainConfig()),  # the int form of the same schedule
                       visual_mean(square, ((1, 1), (2, 2), (4, 4), (8, 8)), ARTrainConfig()))


def test_init_frames_fit_height_and_width():
    clip = to_uint8(MovingShapes("all", 1, (48, 80), 5, seed=0)[0]["video"]).permute(1, 2, 3, 0).numpy()
    same = fit_frames(clip, (48, 80))
    assert same.shape == (1, 3, 5, 48, 80)
    assert np.array_equal(to_uint8(same[0]).permute(1, 2, 3, 0).numpy(), clip)  # the right size passes unchanged
    assert fit_frames(clip, 32).shape == (1, 3, 5, 32, 32)  # centre crop of the 80 px width
    assert fit_frames(clip[:, :, 16:64], (24, 40)).shape == (1, 3, 5, 24, 40)


def test_demo_labels_name_height_and_width(tmp_path):
    demo = pytest.importorskip("omniar.commands.demo")
    app = demo.Demo(tiny_pipeline((48, 80)))
    _, previews, _ = app.generate(PROMPTS[0], 1, 3.0, 1.0, 0, 1.0, 0, next(iter(app.elastic)))
    captions = ["scales <= 1x1", "scales <= 2x3", "scales <= 3x5", "scales <= 6x10"]
    assert [caption for _, caption in previews] == captions
    clip = to_uint8(MovingShapes("all", 1, (64, 96), 5, seed=0)[0]["video"]).permute(1, 2, 3, 0).numpy()
    write_video(tmp_path / "clip.mp4", clip)
    strips, _, table = app.reconstruct(str(tmp_path / "clip.mp4"))
    assert [caption for _, caption in strips] == captions
    assert table.startswith("5 frame(s) at 48x80 px") and "| 6x10 |" in table


def test_reconstruct_cli_at_48x80(tmp_path, capsys):
    from omniar.cli import main
    from omniar.data.video_io import read_video

    tiny_pipeline((48, 80)).video_tokenizer.save_pretrained(tmp_path / "tok")
    assert main(["reconstruct", "--model", str(tmp_path / "tok"), "--out", str(tmp_path / "r.mp4")]) == 0
    assert "scales <= 1x1, 2x3, 3x5\n" in capsys.readouterr().out
    assert read_video(tmp_path / "r.mp4").shape == (17, 48, 5 * 80, 3)  # original | reconstruction | 3 previews
