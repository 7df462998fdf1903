"""VideoTokenizer at other resolutions and aspect ratios (#26): (h, w) latents and scale schedules, VAR's phi
sharing, causality and chunked decoding off the square, errors; the shipped tokenizer unchanged."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import omniar.assets
from omniar.data.shapes import MovingShapes
from omniar.tokenizers import MultiScaleCodes, VideoTokenizer, scale_shapes, tokens_per_frame
from omniar.tokenizers.quantizer import refine_index

TINY = dict(channels=(8, 16, 16, 16), latent_channels=8, temporal_compression=4, spatial_compression=8,
            codebook_size=32)
VAR_10 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
SCHEDULES = {  # frame size -> a schedule whose last scale is its latent grid (spatial compression 8)
    (64, 64): (1, 2, 4, 8),
    (48, 80): ((1, 1), (2, 3), (3, 5), (6, 10)),
    (128, 128): VAR_10,
    (96, 160): ((1, 2), (3, 5), (6, 10), (12, 20)),
}
WIDE = SCHEDULES[(48, 80)]


def tokenizer(scales, **extra):
    torch.manual_seed(0)
    return VideoTokenizer(**TINY, scales=scales, **extra).eval()


def clips(n, frames, size):
    ds = MovingShapes("all", n, size, frames, seed=0)
    return torch.stack([ds[i]["video"] for i in range(n)])


@pytest.mark.parametrize("size", list(SCHEDULES), ids=lambda s: f"{s[0]}x{s[1]}")
def test_round_trip_shapes(size):
    tok = tokenizer(SCHEDULES[size])
    shapes = scale_shapes(tok.scales)
    assert tok.frame_size == size and tok.latent_size == (size[0] // 8, size[1] // 8) == shapes[-1]
    assert tok.resolution == (size[0] if size[0] == size[1] else size)  # what MovingShapes / datasets take
    assert tok.tokens_per_frame == sum(h * w for h, w in shapes)
    for frames in (1, 5):
        video = clips(2, frames, tok.resolution)
        codes = tok.encode(video)
        t = 1 + (frames - 1) // 4
        assert [tuple(c.shape) for c in codes.codes] == [(2, t, h, w) for h, w in shapes]
        assert codes.scale_shapes == shapes and codes.tokens_per_frame == tok.tokens_per_frame
        out = tok.decode(codes)
        assert out.shape == video.shape and out.abs().max() <= 1
    flat = codes.flatten()
    assert flat.shape == (2, t, tok.tokens_per_frame)
    back = MultiScaleCodes.unflatten(flat, codes.scales, codes.num_frames)
    assert all(torch.equal(a, b) for a, b in zip(back.codes, codes.codes))
    acc = tok.codes_to_accumulated(codes)
    assert [tuple(a.shape) for a in acc] == [(2, t, 8, h, w) for h, w in shapes]
    previews = tok.decode_previews(codes)
    assert len(previews) == len(shapes) and torch.equal(previews[-1], out)
    latent = tok.encode_latent(video).transpose(1, 2).flatten(0, 1)
    rate, gen = torch.full((2 * t,), 0.5), torch.Generator().manual_seed(0)
    targets, noisy = tok.quantizer.quantize_corrupted(latent, rate, gen)
    assert [tuple(c.shape) for c in targets] == [tuple(c.shape) for c in noisy] == [(2 * t, h, w) for h, w in shapes]
    assert tok(video).reconstruction.shape == video.shape  # the training forward too


def test_generation_steps_match_teacher_forcing_off_the_square():
    """scale_input / accumulate one step at a time give what codes_to_accumulated gives for all frames."""
    tok = tokenizer(WIDE)
    codes = tok.encode(clips(1, 9, (48, 80)))
    acc = tok.codes_to_accumulated(codes)
    previous = None
    for f in range(codes.num_latent_frames):
        f_hat = None
        for s, idx in enumerate(codes.codes):
            step = tok.scale_input(previous if s == 0 else f_hat, s, 1)
            torch.testing.assert_close(step, acc[s][:, f], rtol=0, atol=1e-6)
            f_hat = tok.accumulate(f_hat, idx[:, f], s)
        previous = f_hat


def test_schedules_ints_pairs_and_saved_configs(tmp_path):
    assert VideoTokenizer(**TINY, scales=[1, 2, 4, 8]).scales == (1, 2, 4, 8)  # ints stay ints (square)
    mixed = VideoTokenizer(**TINY, scales=[1, [2, 3], (3, 5)])  # an int n is (n, n)
    assert mixed.scales == ((1, 1), (2, 3), (3, 5)) and mixed.frame_size == (24, 40)
    assert tokens_per_frame(mixed.scales) == 1 + 6 + 15
    assert VideoTokenizer(**TINY, scales=((1, 2), (1, 3), (2, 4))).scales[1] == (1, 3)  # a side may stay
    tok = tokenizer(WIDE)
    tok.save_pretrained(tmp_path)  # config.json holds lists of lists
    loaded = VideoTokenizer.from_pretrained(tmp_path).eval()
    assert loaded.scales == WIDE
    video = clips(1, 5, (48, 80))
    a, b = tok.encode(video), loaded.encode(video)
    assert all(torch.equal(x, y) for x, y in zip(a.codes, b.codes))
    torch.testing.assert_close(tok.decode(a), loaded.decode(b), rtol=0, atol=0)


def test_phi_sharing():
    # 10 scales on 4 convs: VAR's ticks linspace(1/12, 11/12, 4), nearest to s / 9 (VAR's own choice)
    assert [refine_index(s, 10, 4) for s in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    # rounding s / 9 * 3 (the rule for as many convs as scales) gives scale 7 phi 2: not VAR's, so not used here
    assert round(7 / 9 * 3) == 2
    assert [refine_index(s, 4, 3) for s in range(4)] == [0, 0, 1, 2]  # other K: ticks linspace(1/6, 5/6, 3)
    assert [refine_index(s, 16, 8) for s in (0, 1, 2, 15)] == [0, 0, 1, 7]
    # a conv per scale or more: unchanged (the shipped and every saved square tokenizer)
    assert [refine_index(s, 4, 4) for s in range(4)] == [0, 1, 2, 3]
    assert [refine_index(s, 3, 6) for s in range(3)] == [0, 2, 5] and refine_index(0, 1, 4) == 0
    tok = tokenizer(VAR_10, num_refine=4)
    q = tok.quantizer
    for s, (h, w) in enumerate(scale_shapes(VAR_10)):  # embed_scale uses that conv
        idx = torch.randint(0, 32, (1, h, w))
        z = torch.nn.functional.interpolate(q.codebook[idx].permute(0, 3, 1, 2), size=(16, 16), mode="bicubic")
        conv = q.refine[[0, 0, 1, 1, 1, 2, 2, 3, 3, 3][s]]
        with torch.no_grad():
            torch.testing.assert_close(q.embed_scale(idx, s), 0.5 * z + 0.5 * conv(z), rtol=0, atol=1e-6)


def test_a_repeated_latent_grid_quantizes_what_the_maps_before_it_left():
    """[1, 2, 4, 8, 8]: a second residual step at full resolution. The first four scales code exactly as the
    schedule without it (same weights; the repeat shares the 8x8 conv), the fifth codes their residual."""
    base, rep = tokenizer((1, 2, 4, 8)), tokenizer((1, 2, 4, 8, 8))
    assert rep.scales == (1, 2, 4, 8, 8) and rep.tokens_per_frame == 85 + 64
    assert rep.scale_names == ("1x1", "2x2", "4x4", "8x8", "8x8+1") and rep.quantizer.refine_of == [0, 1, 2, 3, 3]
    rep.load_state_dict(base.state_dict())  # no new tensor: a tokenizer gains the step from saved weights
    video = clips(2, 5, 64)
    a, b = base.encode(video), rep.encode(video)
    assert all(torch.equal(x, y) for x, y in zip(a.codes, b.codes[:4])) and len(b.codes) == 5
    q = rep.quantizer
    latent = rep.encode_latent(video).transpose(1, 2).flatten(0, 1)  # (B * t, C, 8, 8)
    with torch.no_grad():
        left = latent - q.codes_to_latent([c.flatten(0, 1) for c in b.codes], upto_scale=3)
        assert torch.equal(b.codes[4].flatten(0, 1), q.lookup(left, 4))
        torch.testing.assert_close(q.codes_to_latent([c.flatten(0, 1) for c in b.codes]),
                                   q.codes_to_latent([c.flatten(0, 1) for c in b.codes], 3)
                                   + q.embed_scale(b.codes[4].flatten(0, 1), 3), rtol=0, atol=1e-6)
    previews = rep.decode_previews(b)
    assert len(previews) == 5 and torch.equal(previews[-1], rep.decode(b))


def shipped_tokenizer_reference(tok: VideoTokenizer) -> dict[str, torch.Tensor]:
    """What tests/data/shipped_tokenizer_head.safetensors holds: codes (and preview codes), full and preview decodes,
    accumulated latents and corrupted re-quantization of one held-out clip. When a tokenizer ships, rewrite it:
    ``cd tests && python -c "import test_tokenizer_resolution as t; t.write_reference()"``."""
    video = MovingShapes("heldout", 1, 64, 5, seed=1234)[0]["video"][None]
    codes = tok.encode(video)
    ref = {f"codes_{s}": c for s, c in enumerate(codes.codes)}
    ref |= {f"preview_codes_{s}": c for s, c in enumerate(codes.previews or [])}
    ref |= {f"preview_{s}": p for s, p in enumerate(tok.decode_previews(codes))}  # the last is the full decode
    ref |= {f"accumulated_{s}": a for s, a in enumerate(tok.codes_to_accumulated(codes))}
    f = tok.encode_latent(video).transpose(1, 2).flatten(0, 1)
    rate, gen = torch.full((f.shape[0],), 0.3), torch.Generator().manual_seed(0)
    targets, noisy = tok.quantizer.quantize_corrupted(f, rate, gen)
    ref |= {f"targets_{s}": t for s, t in enumerate(targets)} | {f"corrupted_{s}": n for s, n in enumerate(noisy)}
    return ref


REFERENCE = Path(__file__).parent / "data" / "shipped_tokenizer_head.safetensors"


def write_reference() -> None:
    tok = VideoTokenizer.from_pretrained(omniar.assets.path("shapes-tokenizer")).eval()
    with torch.no_grad():
        ref = shipped_tokenizer_reference(tok)
    save_file({k: v.contiguous() for k, v in ref.items()}, REFERENCE)


@torch.no_grad()
def test_shipped_tokenizer_unchanged():
    """Codes, decodes and previews of the shipped tokenizer equal the reference stored in tests/data by the same
    calls when its weights shipped, so a code change cannot silently move the codes the shipped AR model was
    trained on, or what users see."""
    ref = load_file(REFERENCE)
    tok = VideoTokenizer.from_pretrained(omniar.assets.path("shapes-tokenizer")).eval()
    assert tok.scales == (1, 2, 4, 8) and tok.resolution == 64
    got = shipped_tokenizer_reference(tok)
    assert got.keys() == ref.keys()
    for key, value in got.items():
        if value.is_floating_point():  # 1e-4: fp32 convs differ by up to 3e-5 between 1 and 2 threads (oneDNN)
            torch.testing.assert_close(value, ref[key], rtol=0, atol=1e-4 if key.startswith("preview") else 1e-6)
        else:
            assert torch.equal(value, ref[key]), key


@pytest.mark.parametrize("design", [{}, dict(fold_time=True)], ids=["3d", "fold"])
def test_non_square_causal_and_chunked_decode_exact(design):
    tok = tokenizer(WIDE, **design)
    video = clips(2, 17, (48, 80))
    later = video.clone()
    later[:, :, 9:] = -later[:, :, 9:]  # frames 9.. only: latent frames 0..2 cover frames 0..8
    a, b = tok.encode(video), tok.encode(later)
    assert all(torch.equal(x[:, :3], y[:, :3]) for x, y in zip(a.codes, b.codes))
    assert any(not torch.equal(x[:, 3:], y[:, 3:]) for x, y in zip(a.codes, b.codes))
    full = tok.decode(a)
    for chunk in (1, 2, 3):
        torch.testing.assert_close(tok.decode(a, chunk_size=chunk), full, rtol=0, atol=1e-5)


def test_errors_name_the_argument():
    tok = tokenizer(WIDE)
    for shape in ((1, 3, 5, 48, 64), (1, 3, 5, 80, 48), (1, 3, 5, 64, 64)):  # not 48 x 80 (transposed too)
        with pytest.raises(ValueError, match="^video: frames must be 48x80"):
            tok.encode(torch.zeros(shape))
    with pytest.raises(ValueError, match="video \\(frames\\)"):
        tok.encode(torch.zeros(1, 3, 6, 48, 80))
    with pytest.raises(ValueError, match="^latent"):
        tok.decode_latent(torch.zeros(1, 8, 2, 10, 6))
    codes = tok.encode(clips(1, 5, (48, 80)))
    with pytest.raises(ValueError, match="^codes: scale 3"):
        MultiScaleCodes(codes.codes[:3] + [codes.codes[3].transpose(2, 3)], WIDE, 5)
    with pytest.raises(ValueError, match="^codes: scales"):  # another schedule
        tok.decode(MultiScaleCodes([c[:, :, :1, :1] for c in codes.codes[:1]], (1,), 5))
    for bad in ([], "1248", [1, 2, 2, 4], [4, 2, 8], [[1, 1], [2, 3], [3, 2]], [[1, 1], [1, 1], [2, 2]], [[1, 2, 3]],
                [[0, 1], [2, 2]], [1, [2, "3"]], [1, 2, 4, 1000], None):
        with pytest.raises(ValueError, match="^scales"):
            VideoTokenizer(**TINY, scales=bad)
    with pytest.raises(ValueError, match="^scales"):
        MultiScaleCodes(codes.codes, [[1, 1], [3, 2], [2, 5], [6, 10]], 5)  # a side shrinks


def test_a_48x80_tokenizer_trains_on_a_folder_of_48x80_clips(tmp_path):
    """``omniar data shapes --size 48x80`` writes clips that VideoFolderDataset reads whole at the tokenizer's
    (48, 80) resolution, and a few training steps run on them."""
    from omniar.cli import main
    from omniar.data import VideoFolderDataset

    assert main(["data", "shapes", "--out", str(tmp_path), "--size", "48x80", "--clips", "2", "--frames", "5"]) == 0
    tok = tokenizer(WIDE).train()
    data = VideoFolderDataset(tmp_path, num_frames=5, size=tok.resolution, sample="start")
    video = torch.stack([data[i]["video"] for i in range(len(data))])
    assert video.shape == (2, 3, 5, 48, 80)
    opt = torch.optim.AdamW(tok.parameters(), 1e-3)
    for _ in range(2):
        out = tok(video)
        loss = (out.reconstruction - video).square().mean() + out.vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss) and bool(tok.quantizer.initialized)
