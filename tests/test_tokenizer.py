"""VideoTokenizer: shapes, causality, residual scales, chunked decode, teacher forcing, save/load, errors."""

import copy

import pytest
import torch

from omniar.data.shapes import MovingShapes
from omniar.tokenizers import MultiScaleCodes, VideoTokenizer
from omniar.tokenizers import causal3d
from omniar.tokenizers.causal3d import Conv2d, FrameGroupNorm, FusedSequential, GlobalContext

TINY = dict(channels=(8, 16, 16), latent_channels=8, temporal_compression=4, spatial_compression=4,
            scales=(1, 2, 4, 8), codebook_size=32)


@pytest.fixture(scope="module")
def tok():
    torch.manual_seed(0)
    return VideoTokenizer(**TINY).eval()


def clips(n, frames=9, size=32, seed=0):
    ds = MovingShapes("all", n, size, frames, seed=seed)
    return torch.stack([ds[i]["video"] for i in range(n)])


@pytest.mark.parametrize("frames", [1, 5, 17])
def test_encode_decode_shapes(tok, frames):
    video = clips(2, frames)
    codes = tok.encode(video)
    t_lat = 1 + (frames - 1) // 4
    assert codes.num_latent_frames == t_lat and codes.num_frames == frames
    assert [tuple(c.shape) for c in codes.codes] == [(2, t_lat, n, n) for n in (1, 2, 4, 8)]
    assert all(c.dtype == torch.long for c in codes.codes)
    out = tok.decode(codes)
    assert out.shape == video.shape and out.abs().max() <= 1


def test_encoder_is_causal(tok):
    video = clips(1, 17)
    later = video.clone()
    later[:, :, 9:] = -later[:, :, 9:]  # change frames 9.. only
    with torch.no_grad():
        a, b = tok.encoder(video), tok.encoder(later)
    # latent frame j sees pixel frames <= 4j: latents 0..2 cover frames 0..8
    assert torch.equal(a[:, :, :3], b[:, :, :3])
    assert not torch.allclose(a[:, :, 3:], b[:, :, 3:])
    ca, cb = tok.encode(video), tok.encode(later)
    assert all(torch.equal(x[:, :3], y[:, :3]) for x, y in zip(ca.codes, cb.codes))


def test_first_frame_encoded_alone(tok):
    video = clips(1, 9)
    with torch.no_grad():
        full = tok.encoder(video)
        alone = tok.encoder(video[:, :, :1])
    torch.testing.assert_close(full[:, :, :1], alone, rtol=0, atol=1e-6)


def test_chunked_decode_equals_full(tok):
    codes = tok.encode(clips(2, 17))
    full = tok.decode(codes)
    for chunk in (1, 2, 3):
        torch.testing.assert_close(tok.decode(codes, chunk_size=chunk), full, rtol=0, atol=1e-5)


def test_codes_flatten_roundtrip(tok):
    codes = tok.encode(clips(2, 9))
    flat = codes.flatten()
    assert flat.shape == (2, 3, 1 + 4 + 16 + 64)
    back = MultiScaleCodes.unflatten(flat, codes.scales, codes.num_frames)
    assert all(torch.equal(a, b) for a, b in zip(back.codes, codes.codes))


def test_codes_to_accumulated_matches_partial_latents(tok):
    codes = tok.encode(clips(2, 9))
    acc = tok.codes_to_accumulated(codes)
    q = tok.quantizer
    assert [tuple(a.shape) for a in acc] == [(2, 3, 8, n, n) for n in (1, 2, 4, 8)]
    assert torch.count_nonzero(acc[0][:, 0]) == 0  # frame 0 starts from the BOV token
    flat = [c.flatten(0, 1) for c in codes.codes]
    with torch.no_grad():
        for s, n in enumerate(tok.scales[1:], start=1):
            partial = q.codes_to_latent(flat, s - 1).unflatten(0, (2, 3))
            expect = torch.nn.functional.interpolate(partial.flatten(0, 1), size=(n, n), mode="area")
            torch.testing.assert_close(acc[s].flatten(0, 1), expect, rtol=0, atol=1e-6)
        full = q.codes_to_latent(flat).unflatten(0, (2, 3))
        prev = torch.nn.functional.interpolate(full[:, :-1].flatten(0, 1), size=(1, 1), mode="area")
        torch.testing.assert_close(acc[0][:, 1:].flatten(0, 1), prev, rtol=0, atol=1e-6)


def test_save_load_roundtrip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()
    assert any(p.suffix == ".safetensors" for p in tmp_path.iterdir())
    loaded = VideoTokenizer.from_pretrained(tmp_path).eval()
    video = clips(1, 5)
    a, b = tok.encode(video), loaded.encode(video)
    assert all(torch.equal(x, y) for x, y in zip(a.codes, b.codes))
    torch.testing.assert_close(tok.decode(a), loaded.decode(b))


def test_ema_codebook_restarts_dead_codes():
    torch.manual_seed(0)
    tok = VideoTokenizer(**{**TINY, "dead_code_threshold": 0.5, "ema_decay": 0.5})
    tok.train()
    video = clips(2, 5)
    q = tok.quantizer
    tok(video)  # the first update starts the codebook on data
    far = torch.full_like(q.codebook[0], 1e3)  # a code no residual is ever nearest to
    q.codebook[0], q.ema_sum[0], q.ema_count[0] = far, far, 1.0
    out = tok(video)  # its count halves to 0.5 (alive); the next update finds it dead
    assert torch.equal(q.codebook[0], far)
    out = tok(video)
    assert q.codebook[0].abs().max() < 100 and q.ema_count[0] == 1.0  # restarted on a residual of the batch
    assert out.vq_loss.item() > 0 and torch.isfinite(q.codebook).all()


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(3, 9, 32, 32), "video"),                      # wrong rank
    (torch.zeros(1, 3, 9, 30, 32), "video"),                   # size not the tokenizer's
    (torch.zeros(1, 3, 8, 32, 32), "video \\(frames\\)"),      # T != 1 + tau k
    (torch.zeros(1, 1, 9, 32, 32), "video"),                   # channels
    (torch.full((1, 3, 9, 32, 32), float("nan")), "video"),    # NaN
    (torch.full((1, 3, 9, 32, 32), 3.0), "video"),             # out of range
    (torch.zeros(1, 3, 9, 32, 32, dtype=torch.long), "video"), # dtype
])
def test_bad_video_raises_value_error_naming_it(tok, bad, match):
    with pytest.raises(ValueError, match=match):
        tok.encode(bad)


def test_bad_codes_and_config_raise(tok):
    codes = tok.encode(clips(1, 5))
    with pytest.raises(ValueError, match="upto_scale"):
        tok.decode_partial(codes, 7)
    bad = MultiScaleCodes([c + 1000 for c in codes.codes], codes.scales, codes.num_frames)
    with pytest.raises(ValueError, match="codes"):
        tok.decode(bad)
    with pytest.raises(ValueError, match="codes.*num_frames"):
        tok.decode(MultiScaleCodes(codes.codes, codes.scales, 9))  # 2 latent frames are 5 frames
    for broken in ([], [torch.zeros(0, 2, 1, 1, dtype=torch.long)]):
        with pytest.raises(ValueError, match="codes"):
            MultiScaleCodes(broken, codes.scales[:len(broken)] or (1,), 5)
    latent = tok.encode_latent(clips(1, 5))
    for bad in (latent[:, :, :, :4], latent[:, :3], latent[0], latent.long(), latent * float("nan")):
        for call in (tok.quantize_latent, tok.decode_latent):
            with pytest.raises(ValueError, match="^latent"):
                call(bad)
    with pytest.raises(ValueError, match="channels"):
        VideoTokenizer(**{**TINY, "channels": (8, 16)})
    with pytest.raises(ValueError, match="temporal_compression"):
        VideoTokenizer(**{**TINY, "temporal_compression": 3})
    with pytest.raises(ValueError, match="scales"):
        VideoTokenizer(**{**TINY, "scales": (4, 2, 8)})


def test_conv3d_inference_uses_onednn_and_matches_native():
    """Batch-1 CPU inference convs would otherwise fall to PyTorch's native conv3d, 7x slower here."""
    from torch.profiler import profile

    from omniar.tokenizers.causal3d import Conv3d

    torch.manual_seed(0)
    conv = Conv3d(8, 8, 3, padding=(0, 1, 1))
    x = torch.randn(1, 8, 4, 16, 16)
    ref = torch.nn.functional.conv3d(x, conv.weight, conv.bias, padding=(0, 1, 1))  # grad mode: native path
    with torch.no_grad(), profile() as prof:
        out = conv(x)
    ops = {e.key for e in prof.key_averages()}
    assert "aten::mkldnn_convolution" in ops and "aten::slow_conv3d_forward" not in ops
    assert (out - ref).abs().max() < 1e-4
    with torch.no_grad(), torch.backends.mkldnn.flags(enabled=False), profile() as prof:
        conv(x)  # a user who switches oneDNN off gets PyTorch's own choice
    assert "aten::mkldnn_convolution" not in {e.key for e in prof.key_averages()}
    y = conv(x.requires_grad_())  # training keeps nn.Conv3d's autograd path
    y.sum().backward()
    assert x.grad is not None and conv.weight.grad is not None


def test_upsampling_convs_run_at_the_input_resolution_and_equal_the_modules():
    """The fold decoder's nearest x2 upsampling + 3 x 3 conv pairs run as one stride-2 transposed conv at the input
    resolution (no upsampled tensor is made): the modules' own result within fp32 rounding (and within bf16's
    under autocast), gradients included; any other pair runs module by module."""
    from torch.profiler import profile

    torch.manual_seed(0)
    tok = VideoTokenizer(**TINY, fold_time=True).eval()
    frames = tok.decoder.frames
    assert isinstance(frames, FusedSequential)
    x = torch.randn(3, TINY["channels"][-1], 8, 10)  # (frames, channels, h, w): not square
    one_by_one = lambda v: torch.nn.Sequential.forward(frames, v)  # noqa: E731
    with torch.no_grad(), profile() as prof:
        got = frames(x)
    assert "aten::upsample_nearest2d" not in {e.key for e in prof.key_averages()}
    with torch.no_grad():
        want = one_by_one(x)
        assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = frames(x)
        assert float((half.float() - want).abs().max()) < 2e-2 * float(want.abs().max())
    xg = x.clone().requires_grad_()
    grads = []
    for run in (frames, one_by_one):
        xg.grad = None
        tok.zero_grad()
        run(xg).square().sum().backward()
        grads.append([xg.grad] + [m.weight.grad for m in frames.modules() if isinstance(m, Conv2d)])
    for a, b in zip(*grads):
        assert float((a - b).abs().max()) < 1e-4 * float(b.abs().max())
    for conv in (Conv2d(4, 4, 5, padding=2), Conv2d(4, 4, 3, padding=1, padding_mode="reflect")):
        other = FusedSequential(torch.nn.Upsample(scale_factor=2, mode="nearest"), conv)
        with torch.no_grad(), profile() as prof:
            other(torch.randn(1, 4, 6, 6))
        assert "aten::upsample_nearest2d" in {e.key for e in prof.key_averages()}


needs_kernel = pytest.mark.skipif(causal3d._kernels() is None, reason="no C compiler or no AVX-512 BF16")


def _kernel_calls(monkeypatch, name: str) -> list:
    """The calls of the decoder's C kernel ``name`` from here on, each still run."""
    lib = causal3d._kernels()
    real, calls = getattr(lib, name), []
    monkeypatch.setattr(lib, name, lambda *a: calls.append(a) or real(*a))
    return calls


def _norm_case(kind: str, seed: int = 0):
    """A GroupNorm with random affine weights and a channels-last bf16 input of the decoder's kinds: 32 groups of 64
    channels, one channel per group (the refiner's), per frame over (B, C, T, H, W) (FrameGroupNorm)."""
    torch.manual_seed(seed)
    if kind == "frames":
        norm, x = FrameGroupNorm(32, 64, eps=1e-6), torch.randn(2, 64, 3, 6, 10)
        x = x.contiguous(memory_format=torch.channels_last_3d)
    else:
        channels, groups = (64, 32) if kind == "groups" else (48, 48)
        norm = torch.nn.GroupNorm(groups, channels, eps=1e-6)
        x = torch.randn(5, channels, 12, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    # per-channel offsets and scales, some far from zero mean: the variance is taken about the mean (two passes)
    shape = (1, x.shape[1]) + (1,) * (x.dim() - 2)
    return norm, (x * torch.rand(shape).add(0.2) * 3 + torch.randn(shape) * 4).bfloat16()


@needs_kernel
@pytest.mark.parametrize("kind", ["groups", "one channel a group", "frames"])
def test_group_norm_silu_in_one_call_is_closer_to_exact_than_torchs_bf16(kind, monkeypatch):
    """The decoder's GroupNorm + SiLU in bf16 runs as one C call: its output keeps the input's dtype and layout, and
    lies closer to the exact result (float64 on the same bf16 input) than torch's two bf16 ops do (it rounds once);
    split over threads it gives the same bits."""
    norm, x = _norm_case(kind)
    calls = _kernel_calls(monkeypatch, "omniar_group_norm_silu")
    with torch.no_grad():
        got = causal3d.group_norm_silu(norm, x)
        exact = torch.nn.functional.silu(copy.deepcopy(norm).double()(x.double()))
        torchs = torch.nn.functional.silu(norm.bfloat16()(x))
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(2)
            two = causal3d.group_norm_silu(norm, x)
            torch.set_num_threads(1)
            one = causal3d.group_norm_silu(norm, x)
        finally:
            torch.set_num_threads(threads)
    assert len(calls) == 3
    assert got.dtype == torch.bfloat16 and got.stride() == x.stride()
    err, torch_err = (float((y.double() - exact).abs().mean()) for y in (got, torchs))
    assert err <= torch_err, (err, torch_err)
    assert float((got.double() - exact).abs().max()) <= 2 ** -7 * float(exact.abs().max())
    assert torch.equal(two, one)


@needs_kernel
def test_group_norm_silu_leaves_other_cases_to_torch(monkeypatch):
    """Training, fp32, the plain layout and channels the kernel does not take (not a multiple of 16) run torch's
    GroupNorm then SiLU, unchanged."""
    lib = causal3d._kernels()
    monkeypatch.setattr(lib, "omniar_group_norm_silu", lambda *a: 1)  # the kernel's "not taken": a fallback
    norm, x = _norm_case("groups")
    norm = norm.bfloat16()
    want = lambda v: torch.nn.functional.silu(norm(v))  # noqa: E731
    odd = torch.nn.GroupNorm(8, 24).bfloat16()
    odd_x = torch.randn(2, 24, 4, 4).bfloat16().contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for v in (x.float().contiguous(memory_format=torch.channels_last), x.contiguous(), x):
            assert torch.equal(causal3d.group_norm_silu(norm.to(v.dtype), v), want(v))
        assert torch.equal(causal3d.group_norm_silu(odd, odd_x), torch.nn.functional.silu(odd(odd_x)))
    assert torch.equal(causal3d.group_norm_silu(norm, x), want(x))  # gradients on
    monkeypatch.undo()
    with torch.no_grad():  # a real kernel declines C = 24 by itself
        assert torch.equal(causal3d.group_norm_silu(odd, odd_x), torch.nn.functional.silu(odd(odd_x)))


@needs_kernel
def test_bf16_decode_runs_the_c_kernels_and_stays_near_fp32(monkeypatch):
    """A bf16 decode (autocast, channels-last) runs every GroupNorm + SiLU pair of the decoder and the refiner's norm
    as one call and its 3 x 3 convs of 32k channels by Winograd (two in the decoder's first residual block, two in
    the refiner's), and its frames stay within twice the squared error of torch's bf16 ops from the fp32 decode."""
    torch.manual_seed(0)
    tok = VideoTokenizer(**{**TINY, "channels": (16, 32, 32)}, fold_time=True, refiner_channels=32,
                         refiner_blocks=1).eval()
    codes = tok.encode(clips(2, 9))
    calls = {name: _kernel_calls(monkeypatch, name) for name in ("omniar_group_norm_silu", "omniar_winograd_bf16")}
    fp32 = tok.decode(codes)
    fast = tok.decode(codes, dtype=torch.bfloat16)
    pairs = sum(isinstance(m, torch.nn.GroupNorm) for m in tok.decoder.modules()) + 1  # the refiner's norm
    assert len(calls["omniar_group_norm_silu"]) == pairs
    assert len(calls["omniar_winograd_bf16"]) == 4
    monkeypatch.setattr(causal3d, "_kernels", lambda: None)
    torchs = tok.decode(codes, dtype=torch.bfloat16)
    err, torch_err = (float((v - fp32).square().mean()) for v in (fast, torchs))
    assert err <= 2 * torch_err, (err, torch_err)


def _winograd_case(c: int, k: int, h: int, w: int, seed: int = 0):
    torch.manual_seed(seed)
    conv = Conv2d(c, k, 3, padding=1)
    return conv, torch.randn(3, c, h, w).bfloat16().contiguous(memory_format=torch.channels_last)


@needs_kernel
@pytest.mark.parametrize("c, k, h, w, bias", [(32, 64, 6, 10, True), (64, 64, 8, 8, False), (128, 32, 4, 2, True)])
def test_winograd_conv_is_near_exact_and_splits_over_threads_bit_for_bit(c, k, h, w, bias, monkeypatch):
    """A bf16-decoding 3 x 3 conv by Winograd F(2 x 2, 3 x 3) in one C call: channels-last bf16 out, within three
    times the RMS error of torch's bf16 conv against float64 on the same bf16 input (about twice: its input transform
    is rounded to bf16), no pixel far off (the border's included), and the same bits on one thread or two."""
    conv, x = _winograd_case(c, k, h, w)
    if not bias:
        conv.bias = None
    calls = _kernel_calls(monkeypatch, "omniar_winograd_bf16")
    with torch.no_grad():
        exact = torch.nn.functional.conv2d(x.double(), conv.weight.double(),
                                           None if conv.bias is None else conv.bias.double(), padding=1)
        torchs = torch.nn.functional.conv2d(x, conv.weight.bfloat16(), None if conv.bias is None
                                            else conv.bias.bfloat16(), padding=1)
        threads = torch.get_num_threads()
        try:
            with torch.autocast("cpu", torch.bfloat16):
                got = conv(x)
                torch.set_num_threads(1)
                one = conv(x)
        finally:
            torch.set_num_threads(threads)
    assert len(calls) == 2
    assert got.dtype == torch.bfloat16 and got.is_contiguous(memory_format=torch.channels_last)
    rms = lambda y: float((y.double() - exact).square().mean().sqrt())  # noqa: E731
    assert rms(got) <= 3 * rms(torchs), (rms(got), rms(torchs))
    assert float((got.double() - exact).abs().max()) <= 2 ** -6 * float(exact.abs().max())
    assert torch.equal(got, one)


@needs_kernel
def test_winograd_conv_leaves_other_convs_to_torch():
    """Strides, other kernels, padding or groups, channel counts that are not multiples of 32, odd sizes, fp32, the
    plain layout and training are not taken (None: the conv runs oneDNN's)."""
    conv, x = _winograd_case(32, 32, 6, 6)
    others = [Conv2d(32, 32, 3, padding=1, stride=2), Conv2d(32, 32, 5, padding=2), Conv2d(32, 32, 3),
              Conv2d(32, 32, 3, padding=1, groups=2), Conv2d(32, 32, 3, padding=1, padding_mode="reflect"),
              Conv2d(32, 48, 3, padding=1)]
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        assert causal3d.winograd_conv(conv, x) is not None
        assert all(causal3d.winograd_conv(other, x) is None for other in others)
        narrow, odd = _winograd_case(48, 32, 6, 6)[1], _winograd_case(32, 32, 5, 6)[1]
        assert causal3d.winograd_conv(Conv2d(48, 32, 3, padding=1), narrow) is None
        for v in (odd, x.float().contiguous(memory_format=torch.channels_last), x.contiguous(), x[0]):
            assert causal3d.winograd_conv(conv, v) is None
        assert torch.equal(conv(x[0]), torch.nn.Conv2d.forward(conv, x[0]))  # unbatched: torch's conv
    with torch.autocast("cpu", torch.bfloat16):
        assert causal3d.winograd_conv(conv, x) is None  # gradients on


def test_bf16_tokenizer_encodes_and_decodes():
    """A bf16 model (from_pretrained(torch_dtype=bf16), or .to()) quantizes its latents in fp32."""
    torch.manual_seed(0)
    tok16 = VideoTokenizer(**TINY).eval().to(torch.bfloat16)
    video = clips(1, 5)
    codes = tok16.encode(video)
    assert codes.num_latent_frames == 2 and all(int(c.max()) < TINY["codebook_size"] for c in codes.codes)
    out = tok16.decode(codes)
    assert out.dtype == torch.bfloat16 and out.shape == video.shape and torch.isfinite(out.float()).all()
    assert tok16(video.bfloat16()).reconstruction.shape == video.shape


DESIGNS = [dict(conv="2+1d"), dict(fold_time=True), dict(fold_time=True, conv="2+1d")]


@pytest.mark.parametrize("design", DESIGNS, ids=["2+1d", "fold", "fold-2+1d"])
def test_cheap_designs_are_causal_and_decode_in_chunks_exactly(design):
    torch.manual_seed(0)
    tok = VideoTokenizer(**TINY, **design).eval()
    video = clips(2, 17)
    later = video.clone()
    later[:, :, 9:] = -later[:, :, 9:]
    with torch.no_grad():
        a, b = tok.encoder(video), tok.encoder(later)
        alone = tok.encoder(video[:, :, :1])
    assert torch.equal(a[:, :, :3], b[:, :, :3]) and not torch.allclose(a[:, :, 3:], b[:, :, 3:])
    torch.testing.assert_close(a[:, :, :1], alone, rtol=0, atol=1e-6)  # frame 0 is encoded alone
    full = tok.decode_latent(a)
    changed = a.clone()
    changed[:, :, 3:] = 0
    assert torch.equal(tok.decode_latent(changed)[:, :, :9], full[:, :, :9])  # decoder causal too
    for chunk in (1, 2, 3):
        torch.testing.assert_close(tok.decode_latent(a, chunk_size=chunk), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("design", DESIGNS[1:2] + [{}], ids=["fold", "3d"])
def test_short_clip_training_gives_full_clip_shapes(design):
    """Trained on 5-frame clips (1 + 4k, the cheap setting), a tokenizer still takes any 1 + 4k frames."""
    torch.manual_seed(0)
    tok = VideoTokenizer(**TINY, **design)
    opt = torch.optim.AdamW(tok.parameters(), 1e-3)
    out = tok(clips(2, 5))
    (out.reconstruction - clips(2, 5)).square().mean().backward()
    opt.step()
    tok.eval()
    for frames in (1, 17, 33):
        codes = tok.encode(clips(1, frames))
        assert [tuple(c.shape) for c in codes.codes] == [(1, 1 + (frames - 1) // 4, n, n) for n in (1, 2, 4, 8)]
        assert tok.decode(codes).shape == (1, 3, frames, 32, 32)


@pytest.mark.parametrize("fold", [False, True])
def test_global_context_starts_as_no_change_stays_causal_and_learns(fold):
    torch.manual_seed(0)
    plain = VideoTokenizer(**TINY, fold_time=fold).eval()
    tok = VideoTokenizer(**TINY, fold_time=fold, global_context=True).eval()
    missing = tok.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == ["encoder.context.proj.bias", "encoder.context.proj.weight"]
    video = clips(2, 9)
    assert torch.equal(tok.encode_latent(video), plain.encode_latent(video))  # zero at initialisation
    torch.nn.init.normal_(tok.encoder.context.proj.weight)
    later = video.clone()
    later[:, :, 5:] = -later[:, :, 5:]  # latent frame 2 only
    a, b = tok.encode_latent(video), tok.encode_latent(later)
    assert torch.equal(a[:, :, :2], b[:, :, :2]) and not torch.equal(a[:, :, 2], b[:, :, 2])
    # one vector per latent frame: the latent moves by the same amount in every cell
    shift = a - plain.encode_latent(video)
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift), atol=1e-5) and shift.abs().max() > 0
    tok.train()
    tok(video, torch.tensor([0, 0]), preview_grad=True).reconstruction.square().mean().backward()
    assert tok.encoder.context.proj.weight.grad.abs().sum() > 0


def test_positions_start_as_no_change_let_a_constant_latent_paint_a_place_and_stay_causal():
    torch.manual_seed(0)
    plain = VideoTokenizer(**TINY, fold_time=True, global_context=True).eval()
    tok = VideoTokenizer(**TINY, fold_time=True, global_context=True, positions=True).eval()
    own = tok.state_dict()
    # the new tensors are the position map and the salient-place part of the context's projection
    tok.load_state_dict({k: v if v.shape == own[k].shape else torch.cat([v, own[k][:, v.shape[1]:]], 1)
                         for k, v in plain.state_dict().items()}, strict=False)
    assert sorted(set(own) - set(plain.state_dict())) == [f"position_map.{k}" for k in (
        "basis.weight", "key.weight", "mix.bias", "mix.weight", "proj.bias", "proj.weight")]
    video = clips(2, 9)
    assert torch.equal(tok.encode_latent(video), plain.encode_latent(video))  # zero at initialisation
    assert torch.equal(tok.decode_latent(plain.encode_latent(video)), plain.decode_latent(plain.encode_latent(video)))
    # the encoder's context now tells where a feature is: a mirrored clip moves the context vector
    torch.nn.init.normal_(tok.encoder.context.proj.weight)
    mirrored = video.flip(-1)
    shift = tok.encode_latent(video) - plain.encode_latent(video)
    shift_m = tok.encode_latent(mirrored) - plain.encode_latent(mirrored)
    assert not torch.allclose(shift[..., 0, 0], shift_m[..., 0, 0], atol=1e-4)
    # a latent constant over the frame (a 1x1 preview) reaches the decoder varying with position, by the same
    # map in every frame; positions are relative to the grid (a half-height grid is not the top half)
    torch.nn.init.normal_(tok.position_map.proj.weight)
    constant = torch.randn(1, 8, 2, 1, 1).expand(-1, -1, -1, 8, 8).contiguous()
    with torch.no_grad():
        added = tok.position_map(constant) - constant
        half = tok.position_map(constant[..., :4, :]) - constant[..., :4, :]
    assert not torch.allclose(added, added[..., :1, :1].expand_as(added)) and torch.allclose(added[:, :, 0], added[:, :, 1], atol=1e-5)
    assert not torch.allclose(half, added[..., :4, :])
    # the product term: two constant latents get differently shaped maps, not one map shifted by a constant
    torch.nn.init.normal_(tok.position_map.mix.weight)
    with torch.no_grad():
        other = -constant
        a, b = tok.position_map(constant) - constant, tok.position_map(other) - other
    spread = (a - b) - (a - b).mean((-2, -1), keepdim=True)
    assert spread.abs().max() > 1e-2
    latent = tok.encode_latent(video)
    changed = latent.clone()
    changed[:, :, 2:] = 0
    assert torch.equal(tok.decode_latent(changed)[:, :, :5], tok.decode_latent(latent)[:, :, :5])  # causal
    torch.testing.assert_close(tok.decode_latent(latent, chunk_size=1), tok.decode_latent(latent), rtol=0, atol=1e-5)
    tok.train()
    tok(video, torch.tensor([0, 0]), preview_grad=True).reconstruction.square().mean().backward()
    assert tok.position_map.proj.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="positions"):
        VideoTokenizer(**TINY, positions=True)


def test_positions_context_reads_the_salient_regions_place_and_features_at_full_scale():
    """The place and the pooled features of a small object do not shrink with its size; the mean does."""
    ctx = GlobalContext(4, 8, positions=True, frequencies=2)
    ctx.proj = torch.nn.Identity()  # read the statistics themselves: mean, max, pooled (C each), place (4F)

    def read(cells):
        h = torch.zeros(1, 4, 1, 8, 8)
        for y, x in cells:
            h[0, :, 0, y, x] = torch.tensor([5.0, -2.0, 1.0, 3.0])
        return ctx(h)[0, :, 0, 0, 0]

    one, four, other = read([(1, 6)]), read([(1, 6), (1, 7), (2, 6), (2, 7)]), read([(6, 1)])
    centre = torch.tensor([-1 + 3 / 8, 1 - 3 / 16 * 2])  # the 1x1 object's cell (1, 6) in [-1, 1] coordinates
    expected = torch.cat([torch.stack([(torch.pi * 2.0 ** k * c).sin() for k in range(2)] +
                                      [(torch.pi * 2.0 ** k * c).cos() for k in range(2)]) for c in centre])
    torch.testing.assert_close(one[12:], expected, atol=0.1, rtol=0)  # the centroid of the odd cell
    torch.testing.assert_close(one[8:12], four[8:12], atol=0.5, rtol=0)  # pooled features: the object's, any size
    assert one[8] > 4 and (four[:4] - 4 * one[:4]).abs().max() < 1e-5  # while the mean grows with the area
    assert (one[12:] - other[12:]).abs().max() > 1  # another place reads differently
    assert torch.equal(read([])[12:], torch.cat([torch.zeros(2), torch.ones(2)] * 2))  # a plain frame: the centre


def test_coarse_codes_give_the_first_scale_its_own_table_learnt_from_its_residuals():
    torch.manual_seed(0)
    tok = VideoTokenizer(**TINY, fold_time=True, coarse_codes=4)
    plain = VideoTokenizer(**TINY, fold_time=True)
    missing = tok.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert sorted(missing) == sorted(f"quantizer.coarse_{n}" for n in ("codebook", "ema_count", "ema_sum", "initialized"))
    # the first scale's residual is each map's mean: with every map's mean c, the first table learns c alone
    q = tok.quantizer.train()
    noise = torch.randn(6, 8, 8, 8)
    c = torch.full((1, 8, 1, 1), 3.0)
    _, codes, _ = q(c + noise - noise.mean((2, 3), keepdim=True))
    assert bool(q.coarse_initialized) and torch.allclose(q.coarse_codebook, c.view(1, 8).expand(4, -1))
    assert int(codes[0].max()) < 4
    tok.eval()
    video = clips(3, 9)
    codes = tok.encode(video)
    assert int(codes.codes[0].max()) < 4 and tok.scale_vocab(0) == 4 and tok.scale_vocab(1) == 32
    bad = MultiScaleCodes([torch.full_like(codes.codes[0], 5)] + codes.codes[1:], tok.scales, 9)
    with pytest.raises(ValueError, match="scale 0 must be integers in \\[0, 4\\)"):
        tok.decode(bad)
    _, noisy = q.quantize_corrupted(tok.encode_latent(video).transpose(1, 2).flatten(0, 1), torch.ones(9),
                                    torch.Generator().manual_seed(0))
    assert int(noisy[0].max()) < 4 and int(noisy[1].max()) >= 4  # random codes stay within each scale's table
    with pytest.raises(ValueError, match="coarse_codes"):
        VideoTokenizer(**TINY, coarse_codes=33)


def test_preview_decoder_takes_the_previews_and_leaves_full_decodes_alone():
    torch.manual_seed(0)
    tok = VideoTokenizer(**TINY, fold_time=True, preview_decoder=True, refiner_blocks=1).eval()
    torch.manual_seed(0)
    plain = VideoTokenizer(**TINY, fold_time=True, refiner_blocks=1).eval()
    with torch.no_grad():  # a refiner that changes the frames (it starts as the identity)
        for p in plain.refiner.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    tok.refiner.load_state_dict(plain.refiner.state_dict())
    assert all(torch.equal(v, tok.state_dict()[k]) for k, v in plain.state_dict().items())  # same nets besides it
    video = clips(3, 9)
    codes = tok.encode(video)
    # a copy: full decodes as without it, previews as without it and without the refiner (full decodes only)
    assert torch.equal(tok.decode(codes), plain.decode(codes))
    refiner, plain.refiner = plain.refiner, None
    for s in range(len(tok.scales) - 1):
        torch.testing.assert_close(tok.decode_partial(codes, s), plain.decode_partial(codes, s), rtol=0, atol=0)
    plain.refiner = refiner
    for s in range(len(tok.scales) - 1):  # (the refiner does change them)
        assert not torch.allclose(tok.decode_partial(codes, s), plain.decode_partial(codes, s), atol=1e-3)
    with torch.no_grad():
        for p in tok.preview_net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    assert torch.equal(tok.decode(codes), plain.decode(codes))  # full decodes: the decoder and refiner alone
    for s in range(len(tok.scales) - 1):
        assert not torch.allclose(tok.decode_partial(codes, s), plain.decode_partial(codes, s), atol=1e-3)
    chunked = tok.decode_partial(codes, 1, chunk_size=1)  # streamed through the preview decoder's own state
    torch.testing.assert_close(chunked, tok.decode_partial(codes, 1), rtol=0, atol=1e-5)
    # training: each clip through the decoder of its prefix, and only that decoder learns from it
    upto = torch.tensor([0, 3, 2])
    out = tok(video, upto)
    for b, s in enumerate(upto.tolist()):
        expect = tok.decode_partial(MultiScaleCodes([c[b:b + 1] for c in out.codes.codes], tok.scales, 9), s)
        torch.testing.assert_close(out.reconstruction[b:b + 1].clamp(-1, 1), expect, rtol=0, atol=1e-5)
    full, preview = (tok.decoder, tok.refiner), (tok.preview_net,)
    for clip, learns, idle in ((1, full, preview), (0, preview, full)):
        tok.zero_grad()
        out = tok(video, upto)
        out.reconstruction[clip].square().mean().backward()
        for net in learns:
            assert any(p.grad is not None and p.grad.any() for p in net.parameters())
        for net in idle:
            assert all(p.grad is None or not p.grad.any() for p in net.parameters())
    with pytest.raises(ValueError, match="preview_decoder"):
        VideoTokenizer(**TINY, preview_decoder=1)


def test_preview_positions_are_the_preview_decoders_own():
    torch.manual_seed(0)
    kw = dict(**TINY, fold_time=True, global_context=True, positions=True, preview_decoder=True)
    tok = VideoTokenizer(**kw, preview_positions=True).eval()
    with torch.no_grad():  # position maps that change the latent (their output convs start at zero)
        for p in tok.position_map.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    tok.preview_position_map.load_state_dict(tok.position_map.state_dict())
    codes = tok.encode(clips(2, 9))
    full, previews = tok.decode(codes), [tok.decode_partial(codes, s) for s in range(3)]
    with torch.no_grad():
        for p in tok.preview_position_map.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert torch.equal(tok.decode(codes), full)  # full decodes read the shared map
    for s in range(3):
        assert not torch.allclose(tok.decode_partial(codes, s), previews[s], atol=1e-3)  # previews read their own
    with pytest.raises(ValueError, match="preview_positions: needs preview_decoder=True and positions=True"):
        VideoTokenizer(**TINY, fold_time=True, global_context=True, positions=True, preview_positions=True)


def test_preview_code_maps_paint_the_first_scale_previews_alone():
    torch.manual_seed(0)
    kw = dict(**TINY, fold_time=True, coarse_codes=8, preview_decoder=True)
    tok = VideoTokenizer(**kw, preview_code_maps=True).eval()
    plain = VideoTokenizer(**kw).eval()
    plain.load_state_dict({k: v for k, v in tok.state_dict().items() if k != "preview_code_map"})
    video = clips(4, 9)
    codes = tok.encode(video)
    before = [tok.decode_partial(codes, s) for s in range(4)]
    for s in range(4):  # zero at initialisation: no change
        assert torch.equal(before[s], plain.decode_partial(codes, s))
    first = codes.codes[0][:, :, 0, 0]  # (B, t): each latent frame's first-scale code
    code = int(first[0, 0])
    with torch.no_grad():
        tok.preview_code_map[code] = torch.randn_like(tok.preview_code_map[code])
    assert all(torch.equal(a, b) for a, b in zip(tok.encode(video).codes, codes.codes))  # the codes stay
    for s in range(1, 4):  # previews from more scales, and full decodes, stay
        assert torch.equal(tok.decode_partial(codes, s), before[s])
    after = tok.decode_partial(codes, 0)
    for b in range(4):
        # the causal decoder: frames from the first latent frame with that code on change, earlier ones stay
        hit = (first[b] == code).nonzero()[:, 0]
        start = None if len(hit) == 0 else (0 if hit[0] == 0 else 1 + 4 * (int(hit[0]) - 1))
        if start is None:
            assert torch.equal(after[b], before[0][b])
        else:
            assert torch.equal(after[b, :, :start], before[0][b, :, :start])
            assert not torch.allclose(after[b, :, start:], before[0][b, :, start:], atol=1e-3)
    # training: a clip truncated to the first scale reads its code's map (and alone trains it)
    upto = torch.tensor([0, 1, 3, 0])
    out = tok(video, upto)
    torch.testing.assert_close(out.reconstruction[:1].clamp(-1, 1), after[:1], rtol=0, atol=1e-5)
    for clip, learns in ((0, True), (1, False), (2, False)):
        tok.zero_grad()
        tok(video, upto).reconstruction[clip].square().mean().backward()
        grad = tok.preview_code_map.grad
        assert (grad is not None and bool(grad[first[clip]].any())) == learns
    with pytest.raises(ValueError, match="preview_code_maps: needs preview_decoder=True, coarse_codes > 0"):
        VideoTokenizer(**TINY, fold_time=True, preview_decoder=True, preview_code_maps=True)


def test_truncated_forward_reconstructs_from_coarse_scales_only():
    torch.manual_seed(0)
    tok = VideoTokenizer(**TINY, fold_time=True).eval()
    video = clips(3, 9)
    upto = torch.tensor([0, 2, 3])
    out = tok(video, upto)
    for b, s in enumerate(upto.tolist()):
        expect = tok.decode_partial(MultiScaleCodes([c[b:b + 1] for c in out.codes.codes], tok.scales, 9), s)
        torch.testing.assert_close(out.reconstruction[b:b + 1].clamp(-1, 1), expect, rtol=0, atol=1e-5)
    torch.testing.assert_close(tok(video, torch.tensor([3, 3, 3])).reconstruction, tok(video).reconstruction)
    # by default a truncated clip trains the decoder and the code refinement, never the encoder
    tok.zero_grad()
    tok(video[:1], torch.tensor([1])).reconstruction.square().mean().backward()
    assert all(p.grad is None or not p.grad.any() for p in tok.encoder.parameters())
    assert any(p.grad is not None and p.grad.any() for p in tok.decoder.parameters())
    # preview_grad: the same values, and the encoder learns from the preview, straight through its scales
    with_grad = tok(video, upto, preview_grad=True)
    torch.testing.assert_close(with_grad.reconstruction, out.reconstruction, rtol=0, atol=0)
    assert all(torch.equal(a, b) for a, b in zip(with_grad.codes.codes, out.codes.codes))
    tok.zero_grad()
    tok(video[:1], torch.tensor([0]), preview_grad=True).reconstruction.square().mean().backward()
    assert any(p.grad is not None and p.grad.any() for p in tok.encoder.parameters())
    for bad in (torch.tensor([4, 0, 0]), torch.tensor([0, 0]), torch.tensor([0.0, 1.0, 2.0])):
        with pytest.raises(ValueError, match="upto_scale"):
            tok(video, bad)
    # soft_previews: that clip's 1x1 preview decodes the unquantized mean of each latent frame; the others unchanged
    from omniar.tokenizers.quantizer import resize
    soft = tok(video, upto, preview_grad=True, soft_previews=torch.tensor([True, False, False]))
    latent = tok.encoder(video[:1])
    mean = tok.quantizer.upsample(resize(latent.transpose(1, 2).flatten(0, 1), tok.quantizer.shapes[0]))
    expect = tok.render(mean.unflatten(0, (1, latent.shape[2])).transpose(1, 2))
    torch.testing.assert_close(soft.reconstruction[:1], expect, rtol=0, atol=1e-4)  # batch of 3 vs 1
    assert not torch.allclose(soft.reconstruction[:1], out.reconstruction[:1], atol=1e-3)
    torch.testing.assert_close(soft.reconstruction[1:], out.reconstruction[1:], rtol=0, atol=0)
    with pytest.raises(ValueError, match="soft_previews: needs preview_grad"):
        tok(video, upto, soft_previews=torch.tensor([True, False, False]))
    for bad in (torch.tensor([True, False]), torch.tensor([1, 0, 0])):
        with pytest.raises(ValueError, match="soft_previews: must be a bool tensor of shape"):
            tok(video, upto, preview_grad=True, soft_previews=bad)
