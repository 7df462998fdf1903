"""Long video (#27): KV budgets (window / NACL eviction, RoPE extrapolation / re-basing), streaming output,
continuation from given frames in the CLI, and the argument checks."""

import contextlib

import numpy as np
import pytest
import torch
from test_t2v import PROMPT, tiny_pipeline

from omniar.backbone.attention import KVBudget
from omniar.cli import main
from omniar.data.shapes import MovingShapes
from omniar.data.video_io import read_video, write_video
from omniar.generation import pipeline as pipeline_module
from omniar.pixels import to_uint8

ARMS = [("window", "extrapolate"), ("window", "rebase"), ("nacl", "extrapolate"), ("nacl", "rebase")]
PER_FRAME = 85  # tokens of a latent frame: scales 1, 2, 4, 8


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def run(pipe, **kwargs):
    args = {"num_frames": 9, "seed": 0, **kwargs}
    return pipe(PROMPT, **args).frames


@pytest.mark.parametrize("policy, rope", ARMS)
def test_a_budget_larger_than_the_clip_changes_nothing(pipe, policy, rope):
    want = run(pipe)  # 3 latent frames: 255 visual tokens
    assert pipe.cache_tokens(9) == 3 * PER_FRAME and pipe.cache_tokens() == pipe.cache_tokens(pipe.max_num_frames)
    got = run(pipe, kv_budget=pipe.cache_tokens(9), kv_policy=policy, kv_rope=rope, random_ratio=0.5)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("policy, rope", ARMS)
@pytest.mark.parametrize("budget", [2 * PER_FRAME, 300])
def test_the_cache_never_exceeds_the_budget(pipe, monkeypatch, policy, rope, budget):
    held, forward_scale = [], pipe.model.forward_scale

    def record(inputs, frame, scale, cache, *args):
        logits = forward_scale(inputs, frame, scale, cache, *args)
        held.append(len(cache) - cache.text_slots)
        assert cache.keys[0].shape[2] <= cache.text_slots + budget  # the buffers too
        return logits

    monkeypatch.setattr(pipe.model, "forward_scale", record)
    frames = run(pipe, num_frames=33, kv_budget=budget, kv_policy=policy, kv_rope=rope, random_ratio=0.5)
    assert frames.shape[1] == 33 > pipe.max_num_frames  # a budget lifts the frame limit
    assert max(held) <= budget and max(held) > budget - PER_FRAME  # used, never exceeded


def _steps(model, cache, inputs, frames):
    return torch.cat([model.forward_scale(inputs[f][s], f, s, cache) for f in frames for s in range(4)], dim=1)


@torch.no_grad()
@pytest.mark.parametrize("policy", ["window", "nacl"])
def test_evicted_keys_and_values_are_never_attended(pipe, policy):
    """Fill every slot an eviction drops with noise just before it is dropped: the later logits do not move."""
    model = pipe.model
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (2, 12))
    inputs = [[torch.randn(2, 8, n, n) for n in (1, 2, 4, 8)] for _ in range(6)]
    logits, layer_keeps = [], []
    for perturb in (False, True):
        budget = KVBudget(200, policy, 0.5, generator=torch.Generator().manual_seed(0))
        cache = model.new_cache(6, budget)
        evict = cache.evict

        def noisy_evict(keep, cache=cache, evict=evict, perturb=perturb):
            keep = keep.expand(len(cache.slot_index), len(cache))
            layer_keeps.append(keep.clone())
            if perturb:
                for layer, row in enumerate(keep):
                    for buf in (cache.keys[layer], cache.values[layer]):
                        buf[:, :, :len(cache)][:, :, ~row] = 1e3 * torch.randn_like(buf[:, :, :len(cache)][:, :, ~row])
            evict(keep)

        cache.evict = noisy_evict
        model.forward_text(ids, None, cache)
        logits.append(_steps(model, cache, inputs, range(6)))
    assert torch.equal(logits[0], logits[1])
    assert len(layer_keeps) == 2 * 4  # evictions at frames 2, 3, 4 and 5
    if policy == "nacl":  # per layer: the two layers keep different tokens
        assert any(not torch.equal(k[0], k[1]) for k in layer_keeps)


@torch.no_grad()
def test_window_equals_the_full_forward_with_a_sliding_frame_mask(pipe):
    """Fast path vs reference: a budget of two frames keeps one old frame, so each frame sees the text, the
    frame before it and itself: the teacher-forced pass with that frame visibility."""
    model = pipe.model
    torch.manual_seed(1)
    ids = torch.randint(3, 200, (2, 12))
    inputs = [[torch.randn(2, 8, n, n) for n in (1, 2, 4, 8)] for _ in range(5)]
    cache = model.new_cache(5, KVBudget(2 * PER_FRAME, "window"))
    model.forward_text(ids, None, cache)
    got = _steps(model, cache, inputs, range(5)).view(2, 5, PER_FRAME, -1)
    t = torch.arange(5)
    visible = (t[None, :] >= t[:, None] - 1).expand(2, 5, 5)
    vis = [torch.stack([inputs[f][s] for f in range(5)], dim=1) for s in range(4)]
    want = model(ids, None, vis, frame_visibility=visible).visual_logits
    assert (got - want).abs().max() < 1e-4


@torch.no_grad()
def test_rebase_puts_kept_frames_next_to_each_other(pipe):
    """After a re-based NACL eviction each layer's kept frames sit contiguously before the next frame and the
    text right before them; a key rotated there equals the key computed at that position."""
    model = pipe.model
    torch.manual_seed(2)
    ids = torch.randint(3, 200, (1, 12))
    inputs = [[torch.randn(1, 8, n, n) for n in (1, 2, 4, 8)] for _ in range(6)]
    cache = model.new_cache(6, KVBudget(3 * PER_FRAME, "nacl", rope="rebase"))
    model.forward_text(ids, None, cache)
    _steps(model, cache, inputs, range(6))
    for layer in range(2):
        seq = cache.slot_index[layer, :len(cache)]
        frame, key_t = cache.meta.frame[seq], cache.key_t[layer, :len(cache)]
        kept = frame[frame >= 0].unique()
        assert torch.equal(key_t[frame < 0], torch.arange(12.0) + 5 - len(kept) + 1)
        ranks = torch.searchsorted(kept, frame[frame >= 0])
        assert torch.equal(key_t[frame >= 0], 12.0 + 5 - len(kept) + 1 + ranks.float())


@torch.no_grad()
@pytest.mark.parametrize("recent", [1, 2, 3])
def test_nacl_keeps_its_recent_frames_whole(pipe, recent):
    """After each NACL eviction every layer holds the newest ``recent_frames`` frames whole (as many as fit
    beside the next frame) and scored tokens of older frames in the rest of the budget."""
    model = pipe.model
    torch.manual_seed(3)
    ids = torch.randint(3, 200, (1, 12))
    inputs = [[torch.randn(1, 8, n, n) for n in (1, 2, 4, 8)] for _ in range(7)]
    cache = model.new_cache(7, KVBudget(3 * PER_FRAME + 40, "nacl", recent_frames=recent))
    model.forward_text(ids, None, cache)
    for f in range(7):
        _steps(model, cache, inputs, [f])
        if f >= 3:  # evicted before this frame: frames f-k..f-1 whole (k = recent, at most 2 fit), then frame f
            whole = min(recent, 2)
            for layer in range(2):
                frame = cache.meta.frame[cache.slot_index[layer, :len(cache)]]
                for g in range(f - whole, f + 1):
                    assert int((frame == g).sum()) == PER_FRAME
                scored = int(((frame >= 0) & (frame < f - whole)).sum())  # tokens of older frames
                assert scored == 3 * PER_FRAME + 40 - (whole + 1) * PER_FRAME and int((frame < 0).sum()) == 12


@torch.no_grad()
def test_nacl_horizon_keeps_only_tokens_near_the_next_frame(pipe):
    """With ``horizon_frames`` H, after each NACL eviction no held visual token is more than H - 1 frames older
    than the frame about to be made (the cache may hold fewer); a horizon longer than the clip changes nothing."""
    model = pipe.model
    torch.manual_seed(3)
    ids = torch.randint(3, 200, (1, 12))
    inputs = [[torch.randn(1, 8, n, n) for n in (1, 2, 4, 8)] for _ in range(8)]

    def held_frames(horizon):
        cache = model.new_cache(8, KVBudget(3 * PER_FRAME + 40, "nacl", random_ratio=0.5, recent_frames=1,
                                            generator=torch.Generator().manual_seed(0), horizon_frames=horizon))
        model.forward_text(ids, None, cache)
        held = []
        for f in range(8):
            _steps(model, cache, inputs, [f])
            held.append(cache.meta.frame[cache.slot_index[:, :len(cache)]].clone())  # (layers, n) after frame f
        return held

    for horizon in (3, 4):  # 4: the layers' older tokens come from different frames
        near = held_frames(horizon)
        for f, frame in enumerate(near):  # held after frame f: its eviction made room for frame f
            assert all(int(row[row >= 0].min()) >= f + 1 - horizon for row in frame), (horizon, f)
    near = held_frames(3)
    assert any(frame.shape[1] < 12 + 3 * PER_FRAME + 40 for frame in near[4:])  # too few near tokens to fill it
    assert all(torch.equal(a, b) for a, b in zip(held_frames(8), held_frames(None)))
    assert not all(torch.equal(a, b) for a, b in zip(near, held_frames(None)))


def test_seeds_reproduce_with_nacl_random_evictions(pipe):
    kwargs = dict(num_frames=33, kv_budget=2 * PER_FRAME + 30, kv_policy="nacl", random_ratio=0.5)
    a, b = run(pipe, **kwargs), run(pipe, **kwargs)
    assert np.array_equal(a, b)
    generator = torch.Generator().manual_seed(0)
    assert np.array_equal(a, pipe(PROMPT, generator=generator, **kwargs).frames)
    assert not np.array_equal(a, run(pipe, seed=1, **kwargs))


def test_the_random_share_changes_what_is_kept(pipe, monkeypatch):
    kept, make_room = {}, type(pipe.model.new_cache()).make_room

    def record(cache, *args):
        make_room(cache, *args)
        kept.setdefault(cache.budget.random_ratio, []).append(cache.slot_index[:, :len(cache)].clone())

    monkeypatch.setattr(type(pipe.model.new_cache()), "make_room", record)
    for ratio in (0.0, 1.0):  # the same codes drawn until the first eviction
        run(pipe, num_frames=13, kv_budget=2 * PER_FRAME + 30, kv_policy="nacl", random_ratio=ratio, temperature=0)
    assert not torch.equal(kept[0.0][-1], kept[1.0][-1])


def test_the_call_keeps_kv_recent_frames_whole(pipe, monkeypatch):
    budgets, new_cache = [], pipe.model.new_cache
    monkeypatch.setattr(pipe.model, "new_cache", lambda *a: budgets.append(a[1]) or new_cache(*a))
    kwargs = dict(num_frames=13, kv_budget=3 * PER_FRAME, kv_policy="nacl", temperature=0)
    assert not np.array_equal(run(pipe, **kwargs), run(pipe, kv_recent_frames=1, **kwargs))
    assert [b.recent_frames for b in budgets] == [3, 1]


@pytest.mark.parametrize("budget", [None, 2 * PER_FRAME])
def test_streamed_frames_equal_the_in_memory_clip(pipe, budget, monkeypatch):
    video = MovingShapes("all", 1, 32, 5, seed=0)[0]["video"][None]
    kwargs = dict(num_frames=17, kv_budget=budget, video=video)
    chunks = []
    out = pipe(PROMPT, seed=0, on_frames=chunks.append, **kwargs)
    assert out.frames is None and [c.shape[1] for c in chunks] == [1, 4, 4, 4, 4]
    streamed = np.concatenate(chunks, axis=1)
    # the in-memory clip decodes DECODE_CHUNK_FRAMES latent frames a call, which rounds differently in bf16
    assert np.abs(streamed.astype(np.int16) - run(pipe, **kwargs)).max() <= 1
    monkeypatch.setattr(pipeline_module, "DECODE_CHUNK_FRAMES", 1)  # one a call, as streamed: bit for bit
    assert np.array_equal(streamed, run(pipe, **kwargs))


@pytest.fixture(scope="module")
def model_dir(pipe, tmp_path_factory):
    return str(pipe.save_pretrained(tmp_path_factory.mktemp("long") / "pipe"))


def test_cli_stream_writes_the_in_memory_clip(pipe, model_dir, tmp_path, monkeypatch):
    import omniar.data.video_io as video_io

    handed, writer = [], video_io.mp4_writer

    @contextlib.contextmanager
    def recording(*args, **kwargs):
        with writer(*args, **kwargs) as write:
            yield lambda frames: (handed.append(frames.copy()), write(frames))

    monkeypatch.setattr(video_io, "mp4_writer", recording)
    out = tmp_path / "long.mp4"
    args = ["--prompt", PROMPT, "--num-frames", "25", "--kv-budget", "170", "--kv-policy", "nacl",
            "--random-ratio", "0.25", "--seed", "3"]
    assert main(["generate", "--model", model_dir, "--out", str(out), "--stream", *args]) == 0
    monkeypatch.setattr(pipeline_module, "DECODE_CHUNK_FRAMES", 1)  # decoded as streamed: the same rounding
    want = pipe(PROMPT, num_frames=25, kv_budget=170, kv_policy="nacl", random_ratio=0.25, seed=3).frames[0]
    assert len(handed) > 1 and np.array_equal(np.concatenate(handed), want)  # frames handed over as they come
    # and the file holds them as write_video writes the in-memory clip (H.264 is lossy, more so on noise; its
    # threads need not encode two runs bit for bit alike)
    whole = read_video(write_video(tmp_path / "memory.mp4", want)).astype(int)
    assert np.abs(read_video(out) - whole).mean() < 1


@pytest.mark.parametrize("init", ["video", "image"])
def test_cli_continuation_keeps_the_given_frames(model_dir, tmp_path, init):
    clip = to_uint8(MovingShapes("all", 1, 32, 7, seed=0)[0]["video"]).permute(1, 2, 3, 0).numpy()
    if init == "video":  # 7 frames: the first 5 (1 + 4k) are continued
        source, given = tmp_path / "init.mp4", 5
        write_video(source, clip, fps=8)
        first = read_video(source)[:given]
    else:
        from PIL import Image

        source, given, first = tmp_path / "init.png", 1, clip[:1]
        Image.fromarray(clip[0]).save(source)
    out = tmp_path / "frames"
    assert main(["generate", "--model", model_dir, "--prompt", PROMPT, "--num-frames", "9", "--format",
                 "png-frames", "--out", str(out), f"--init-{init}", str(source)]) == 0
    from PIL import Image

    frames = np.stack([np.asarray(Image.open(out / f"frame_{i:03d}.png")) for i in range(9)])
    assert np.array_equal(frames[:given], first)


@pytest.mark.parametrize("kwargs, name", [
    ({"kv_budget": 0}, "kv_budget"),
    ({"kv_budget": 1.5}, "kv_budget"),
    ({"kv_budget": "384"}, "kv_budget"),
    ({"kv_budget": 2 * PER_FRAME - 1}, "kv_budget: must be at least two frames"),
    ({"kv_budget": 300, "kv_policy": "none"}, "kv_policy"),
    ({"kv_budget": 300, "kv_policy": "h2o"}, "kv_policy"),
    ({"kv_policy": "nacl"}, "kv_policy: 'nacl' needs a kv_budget"),
    ({"kv_budget": 300, "random_ratio": -0.1}, "random_ratio"),
    ({"kv_budget": 300, "random_ratio": 1.5}, "random_ratio"),
    ({"kv_budget": 300, "random_ratio": float("nan")}, "random_ratio"),
    ({"kv_budget": 300, "kv_rope": "yarn"}, "kv_rope"),
    ({"kv_budget": 300, "kv_recent_frames": 0}, "kv_recent_frames"),
    ({"kv_budget": 300, "kv_horizon": 4}, "kv_horizon: must be >= 5"),
    ({"kv_budget": 300, "kv_horizon": "33"}, "kv_horizon"),
    ({"kv_budget": 300, "num_frames": 1029}, "num_frames: must be <= 1025"),
    ({"num_frames": 21}, "num_frames: must be <= 17"),
    ({"on_frames": 5}, "on_frames"),
])
def test_bad_long_video_arguments_name_the_argument(pipe, kwargs, name):
    with pytest.raises(ValueError, match=name):
        pipe(PROMPT, **{"num_frames": 9, **kwargs})


@pytest.mark.parametrize("args, message", [
    (["--kv-budget", "0"], "kv_budget"),
    (["--kv-budget", "300", "--kv-policy", "none"], "kv_policy"),
    (["--random-ratio", "2", "--kv-budget", "300"], "random_ratio"),
    (["--kv-recent-frames", "0", "--kv-budget", "300"], "kv_recent_frames"),
    (["--kv-horizon", "2", "--kv-budget", "300"], "kv_horizon"),
    (["--init-video", "missing.mp4"], "init_video"),
])
def test_cli_bad_long_video_flags_exit_2(model_dir, tmp_path, capsys, args, message):
    code = main(["generate", "--model", model_dir, "--prompt", PROMPT, "--num-frames", "9", "--out",
                 str(tmp_path / "x.mp4"), *args])
    assert code == 2 and message in capsys.readouterr().err


def test_demo_continues_an_upload(pipe, tmp_path, monkeypatch):
    """The text-to-video tab's optional upload, through its /continue route: the clip starts with its frames
    (an image: image-to-video); /generate keeps its arguments."""
    gradio_client = pytest.importorskip("gradio_client")
    demo = pytest.importorskip("omniar.commands.demo")
    from PIL import Image

    image = to_uint8(MovingShapes("all", 1, 32, 1, seed=0)[0]["video"]).permute(1, 2, 3, 0).numpy()[0]
    Image.fromarray(image).save(tmp_path / "start.png")
    clips, original = [], demo.Demo._generate

    def record(self, prompt, elastic, kwargs, progress):
        out, previews = original(self, prompt, elastic, kwargs, progress)
        clips.append(out.frames[0])
        return out, previews

    monkeypatch.setattr(demo.Demo, "_generate", record)
    app = demo.launch(pipe, port=None, block=False)
    try:
        client = gradio_client.Client(app.local_url, verbose=False, httpx_kwargs={"timeout": 300})  # a busy CPU
        settings = (PROMPT, 9, 3.0, 1.0, 0, 1.0, 0, "full (2 layers, 4 experts, top-2)")
        client.predict(*settings, gradio_client.handle_file(str(tmp_path / "start.png")), api_name="/continue")
        client.predict(*settings, api_name="/generate")
    finally:
        app.close()
    assert np.array_equal(clips[0][0], image) and not np.array_equal(clips[1][0], image)
