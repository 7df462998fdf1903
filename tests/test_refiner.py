"""Per-frame refiner: identity at initialisation, per-frame (chunked decode unchanged), training on a
frozen tokenizer keeps every code, lowers the error, resumes exactly (also with the adversarial critic,
whose terms reach only their own module); fine-tuning starts from the base's refiner; config errors name
the key."""

import pytest
import torch
from safetensors.torch import load_file

from omniar.data.shapes import MovingShapes
from omniar.tokenizers import VideoTokenizer
from omniar.train.refiner import PatchCritic, RefinerObjective, train

TOK = dict(channels=(8, 16, 16), latent_channels=8, temporal_compression=4, spatial_compression=4,
           scales=(1, 2, 4, 8), codebook_size=32)


def video(n=2, frames=9):
    return torch.stack([MovingShapes("train", n, 32, frames, seed=3)[i]["video"] for i in range(n)])


@pytest.mark.parametrize("scale, fold", [(1, False), (2, False), (4, False), (2, True)])
def test_new_refiner_is_the_identity_and_works_frame_by_frame(scale, fold):
    """Also with ``refiner_fold_time``: a chunked decode (frame 0 alone, then whole latent frames) equals the
    clip's."""
    torch.manual_seed(0)
    plain = VideoTokenizer(**TOK).eval()
    refined = VideoTokenizer(**TOK, refiner_blocks=2, refiner_channels=8, refiner_scale=scale,
                             refiner_fold_time=fold).eval()
    refined.load_state_dict(plain.state_dict(), strict=False)
    codes = plain.encode(video())
    torch.testing.assert_close(refined.decode(codes), plain.decode(codes), rtol=0, atol=0)
    with torch.no_grad():
        torch.nn.init.normal_(refined.refiner.conv_out.weight, std=0.1)
    full = refined.decode(codes)
    assert (full - plain.decode(codes)).abs().max() > 1e-3
    torch.testing.assert_close(refined.decode(codes, chunk_size=1), full, rtol=0, atol=1e-5)


def test_a_folded_refiner_works_on_pixel_cells():
    """``refiner_scale`` s: the blocks see each s x s cell as 3 s^2 channels. A change inside one cell reaches
    the pixels of the cells within the convs' reach (in cells) and no further: s times as far as scale 1."""
    torch.manual_seed(0)
    reach = {}
    for scale in (1, 2, 4):
        refiner = VideoTokenizer(**TOK, refiner_blocks=1, refiner_channels=8, refiner_scale=scale,
                                 refiner_norm=False).refiner.eval()  # the norm is per frame: no reach
        torch.nn.init.normal_(refiner.conv_out.weight, std=0.1)
        assert refiner.conv_in.in_channels == 3 * scale * scale
        frames = torch.rand(1, 3, 64, 64) * 2 - 1
        poked = frames.clone()
        poked[..., 16, 16] += 0.5
        with torch.no_grad():
            moved = (refiner(poked) - refiner(frames)).abs().amax((0, 1))[16] > 0  # row 16, per column
        reach[scale] = int(moved.nonzero().max()) - 16
    # four 3x3 convs (in, block x 2, out): 4 cells each way; pixel 16 starts cell 16 / s, whose 4th neighbour ends
    # at pixel s (16 / s + 5) - 1
    assert reach == {1: 4, 2: 2 * 4 + 1, 4: 4 * 4 + 3}
    for bad in (3, True, 2.0):
        with pytest.raises(ValueError, match="refiner_scale"):
            VideoTokenizer(**TOK, refiner_blocks=1, refiner_scale=bad)


def test_a_time_folded_refiner_mixes_the_frames_of_one_latent_frame_only():
    """``refiner_fold_time``: 4 frames a latent frame (frame 0 alone) folded into 12 channels. A change in frame 6
    reaches frames 5-8 and no other; frame 0's copies are one frame, and the output keeps its length."""
    torch.manual_seed(0)
    tok = VideoTokenizer(**TOK, refiner_blocks=1, refiner_channels=8, refiner_fold_time=True).eval()
    assert tok.refiner.conv_in.in_channels == 12
    torch.nn.init.normal_(tok.refiner.conv_out.weight, std=0.1)
    clip = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    poked = clip.clone()
    poked[:, :, 6] += 0.5
    with torch.no_grad():
        out = tok.refine(clip)
        moved = (tok.refine(poked) - out).abs().amax((0, 1, 3, 4)) > 0
        assert out.shape == clip.shape
        assert moved.tolist() == [False] * 5 + [True] * 4
        # frame 0 is refined as the encoder folds it: four copies of itself
        single = tok.refiner(clip[:, :, :1].expand(-1, -1, 4, -1, -1).reshape(1, 12, 16, 16))  # channel: c 4 + copy
        torch.testing.assert_close(out[:, :, 0], single[:, 3::4], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="refiner_fold_time"):
        VideoTokenizer(**TOK, refiner_blocks=1, refiner_fold_time=1)


@pytest.mark.parametrize("norm", [True, False])
def test_a_drifted_residual_stream_passes_gradient_only_with_the_norm(norm):
    """A 6-block refiner trained at lr 2e-3 drifted to ~-8,000, where SiLU is zero: the output conv saw
    no input and nothing learned. The norm before the last SiLU (``refiner_norm``) keeps gradient flowing."""
    torch.manual_seed(0)
    refiner = VideoTokenizer(**TOK, refiner_blocks=2, refiner_channels=8, refiner_norm=norm).refiner
    with torch.no_grad():
        refiner.conv_in.bias.fill_(-1e4)
    frames = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.nn.functional.mse_loss(refiner(frames), frames.flip(-1)).backward()
    assert (refiner.conv_out.weight.grad.abs().sum() > 1e-3) == norm
    with pytest.raises(ValueError, match="refiner_norm"):
        VideoTokenizer(**TOK, refiner_blocks=1, refiner_norm="yes")


def config(tmp_path, tok_dir, **train):
    return {"model": {"refiner_blocks": 1, "refiner_channels": 8},
            "data": {"dataset": "shapes", "size": 32, "num_frames": 5, "seed": 1},
            "train": {"tokenizer": str(tok_dir), "out_dir": str(tmp_path / "run"), "num_clips": 4, "steps": 30,
                      "lr": 1e-2, "micro_batch_size": 8, "log_every": 5, "save_every": 15, **train}}


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tok") / "tok"
    VideoTokenizer(**TOK, refiner_norm=False).save_pretrained(folder)  # a base from before the norm, as shipped
    return folder


@pytest.mark.parametrize("adv, scale, fold", [({}, 1, False), ({"adv_weight": 0.5, "adv_start": 10}, 1, False),
                                              ({}, 2, False), ({"adv_weight": 0.5, "adv_start": 25}, 1, True)],
                         ids=["mse", "adversarial", "pixel-cells", "time-fold"])
def test_training_keeps_codes_lowers_error_and_resumes_exactly(tmp_path, tok_dir, adv, scale, fold):
    def cfg(folder):
        c = config(folder, tok_dir, **adv)
        c["model"] |= {"refiner_scale": scale, "refiner_fold_time": fold}
        return c

    final = train(cfg(tmp_path / "a"), progress=False)
    base, tuned = VideoTokenizer.from_pretrained(tok_dir), VideoTokenizer.from_pretrained(final)
    assert tuned.refiner is not None and base.refiner is None and tuned.refiner.scale == scale
    assert tuned.refiner.conv_in.in_channels == 3 * scale * scale * (4 if fold else 1)
    assert tuned.config.refiner_norm and isinstance(tuned.refiner.norm_out, torch.nn.GroupNorm)  # new: normed
    clip = video(frames=5)
    assert all(torch.equal(a, b) for a, b in zip(tuned.encode(clip).codes, base.encode(clip).codes))
    cache = load_file(next((tmp_path / "a" / "run").glob("decoded_*.safetensors")))
    x, y = cache["decoded"].float(), cache["real"].float()
    assert x.shape == y.shape == (4 * 5, 3, 32, 32)
    clips = x.unflatten(0, (4, 5)).transpose(1, 2)  # the refiner as decoding runs it (folded or per frame)
    with torch.no_grad():
        refined = tuned.refine(clips).transpose(1, 2).flatten(0, 1)
        assert torch.nn.functional.mse_loss(refined, y) < 0.95 * torch.nn.functional.mse_loss(x, y)

    train(cfg(tmp_path / "b"), progress=False, stop_at=15)
    resumed = VideoTokenizer.from_pretrained(train(cfg(tmp_path / "b"), progress=False))
    assert all(torch.equal(a, b) for a, b in zip(resumed.refiner.state_dict().values(),
                                                 tuned.refiner.state_dict().values()))


@pytest.mark.parametrize("model, name", [({}, "model.refiner_blocks"), ({"refiner_blocks": 1, "channels": 4}, "model")])
def test_config_errors_name_the_key(tmp_path, tok_dir, model, name):
    cfg = config(tmp_path, tok_dir)
    cfg["model"] = model
    with pytest.raises(ValueError, match=f"^{name}"):
        train(cfg, progress=False)


def test_typos_bad_tokenizer_and_stop_at_fail_before_any_work(tmp_path, tok_dir):
    typo = config(tmp_path, tok_dir)
    typo["trian"] = {"lr": 5}
    with pytest.raises(ValueError, match=r"^config: unknown keys \['trian'\]"):
        train(typo, progress=False)
    with pytest.raises(ValueError, match="^train.tokenizer: must be a tokenizer folder or one of the shipped"):
        train(config(tmp_path, "no-such-tokenizer"), progress=False)
    with pytest.raises(ValueError, match="^stop_at: must be >= 1"):
        train(config(tmp_path, tok_dir), progress=False, stop_at=0)
    assert not (tmp_path / "run").exists()


def test_frame_cache_is_keyed_by_the_tokenizer_and_the_data(tmp_path, tok_dir):
    other_tok = VideoTokenizer.from_pretrained(tok_dir)
    with torch.no_grad():
        next(other_tok.decoder.parameters()).add_(0.1)
    other_tok.save_pretrained(tmp_path / "other_tok")

    def caches(tok=tok_dir, **data):
        cfg = config(tmp_path, tok)
        cfg["data"].update(data)
        train(cfg, progress=False, stop_at=1)
        return len(list((tmp_path / "run").glob("decoded_*.safetensors")))

    assert caches() == 1
    assert caches(num_workers=1) == 1  # loading settings do not change the frames
    assert caches(seed=2) == 2
    assert caches(tmp_path / "other_tok") == 3


def test_each_adversarial_term_reaches_only_its_own_module():
    torch.manual_seed(0)
    refiner = VideoTokenizer(**TOK, refiner_blocks=1, refiner_channels=8).refiner
    with torch.no_grad():
        torch.nn.init.normal_(refiner.conv_out.weight, std=0.1)  # zero at init would block earlier layers
    objective = RefinerObjective(refiner, PatchCritic(3, 8))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    y = x.flip(-1)

    def grads(term):
        objective.zero_grad(set_to_none=True)
        _, terms = objective(x, y, adv_weight=0.5)
        terms[term].backward()
        return [sum(0.0 if p.grad is None else p.grad.abs().sum().item() for p in m.parameters())
                for m in (objective.refiner, objective.critic)]

    refiner_grad, critic_grad = grads("adv")
    assert refiner_grad > 0 and critic_grad == 0
    refiner_grad, critic_grad = grads("critic")
    assert refiner_grad == 0 and critic_grad > 0
    loss, terms = objective(x, y, adv_weight=0.5)
    expected = terms["mse"] + terms["critic"] + 0.5 * terms["adv_scale"] * terms["adv"]
    torch.testing.assert_close(loss, expected)
    loss, terms = objective(x, y, adv_weight=0.0)  # before adv_start: the critic still learns
    assert "adv_scale" not in terms
    torch.testing.assert_close(loss, terms["mse"] + terms["critic"])
    loss, terms = RefinerObjective(refiner, None)(x, y)
    assert set(terms) == {"refined", "mse"} and torch.equal(loss, terms["mse"])


def test_finetune_continues_the_base_refiner(tmp_path, tok_dir):
    torch.manual_seed(1)
    base = VideoTokenizer(**TOK, refiner_blocks=1, refiner_channels=8)
    base.load_state_dict(VideoTokenizer.from_pretrained(tok_dir).state_dict(), strict=False)
    with torch.no_grad():
        torch.nn.init.normal_(base.refiner.conv_out.weight, std=0.1)
    base.save_pretrained(tmp_path / "with_refiner")
    cfg = config(tmp_path / "ft", tmp_path / "with_refiner", finetune=True, steps=1, lr=1e-12)
    tuned = VideoTokenizer.from_pretrained(train(cfg, progress=False))
    for (name, a), b in zip(base.refiner.state_dict().items(), tuned.refiner.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9, msg=name)
    cfg["model"]["refiner_blocks"] = 2
    with pytest.raises(ValueError, match="^model: .*refiner_blocks"):
        train(cfg, progress=False)
    with pytest.raises(ValueError, match="^train.finetune: needs a tokenizer with a refiner"):
        train(config(tmp_path / "none", tok_dir, finetune=True), progress=False)
