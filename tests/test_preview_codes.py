"""Preview codes: the cells' colour sketches, their tables, and that only previews read them."""

import pytest
import torch
from test_tokenizer import TINY, clips

from omniar.tokenizers import MultiScaleCodes, VideoTokenizer
from omniar.tokenizers.previews import cell_palettes
from omniar.tokenizers.quantizer import kmeans

RED, WHITE = torch.tensor([0.7, -0.7, -0.7]), torch.tensor([1.0, 1.0, 1.0])


def square_clip():
    """5 white 16x16 frames; frames 1-4 have a red 4x4 square in the top-left 8x8 cell."""
    video = WHITE.view(1, 3, 1, 1, 1).repeat(1, 1, 5, 16, 16)
    video[:, :, 1:, 2:6, 2:6] = RED.view(1, 3, 1, 1, 1)
    return video


def test_cell_palettes_read_each_latent_frames_dominant_and_accent_colour():
    video = square_clip()
    video[:, :, 4, 6, 6] = (WHITE + RED) / 2  # an anti-aliased edge pixel: no part of any colour
    whole = cell_palettes(video, (1, 1), 4)  # (B, T_lat, 11, 1, 1): frame 0, then frames 1-4
    assert whole.shape == (1, 2, 11, 1, 1)
    first, folded = whole[0, 0, :, 0, 0], whole[0, 1, :, 0, 0]
    torch.testing.assert_close(first, torch.cat([WHITE, WHITE, torch.zeros(5)]))  # no accent: dominant, share 0
    torch.testing.assert_close(folded[:6], torch.cat([WHITE, RED]))
    torch.testing.assert_close(folded[6], torch.tensor(65 / 1024) ** 0.5)  # 64 red pixels, 1 edge pixel
    # the square's place (rows and columns 2-5 of 0-15) in half-widths from the centre: in frame 1, then in frame 4
    # with the edge pixel (6, 6)
    start, end = -1 + 3.5 * 2 / 15, -1 + (3.5 * 16 + 6) / 17 * 2 / 15
    torch.testing.assert_close(folded[7:], torch.tensor([start, start, end, end]))
    cells = cell_palettes(video, (2, 2), 4)[0, 1]  # (11, 2, 2)
    torch.testing.assert_close(cells[3:6, 0, 0], RED)  # the square's cell
    torch.testing.assert_close(cells[6, 0, 0], torch.tensor(65 / 256) ** 0.5)
    end = (-1 + (3.5 * 16 + 6) / 17 * 2 / 7) / 4  # in the 8x8 cell, weighted by 1 / (2 x 2)
    torch.testing.assert_close(cells[7:, 0, 0], torch.tensor([0, 0, end, end]))  # frame 1: the cell's centre
    for i, j in ((0, 1), (1, 0), (1, 1)):  # the others: white, no accent
        torch.testing.assert_close(cells[:, i, j], torch.cat([WHITE, WHITE, torch.zeros(5)]))


def test_kmeans_finds_separated_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 5.0], [-5.0, 5.0]])
    x = (centres[:, None] + 0.1 * torch.randn(3, 40, 2, generator=gen)).flatten(0, 1)
    found = kmeans(x, 3, torch.Generator().manual_seed(1))
    assert torch.cdist(centres, found).min(1).values.max() < 0.1
    with pytest.raises(ValueError, match="x: needs at least 3 rows"):
        kmeans(x[:2], 3, gen)


def palette_tokenizer():
    torch.manual_seed(0)
    tok = VideoTokenizer(**TINY, fold_time=True, preview_decoder=True, preview_codes=(4, 6, 6)).eval()
    tok.preview_palette.fit(clips(8, 9), torch.Generator().manual_seed(0))
    return tok


def test_preview_codes_change_previews_alone():
    tok = palette_tokenizer()
    plain = VideoTokenizer(**TINY, fold_time=True, preview_decoder=True).eval()
    plain.load_state_dict({k: v for k, v in tok.state_dict().items() if not k.startswith("preview_palette.")})
    video = clips(3, 9)
    codes, plain_codes = tok.encode(video), plain.encode(video)
    assert plain_codes.previews is None
    assert all(torch.equal(a, b) for a, b in zip(codes.codes, plain_codes.codes))  # the residual codes stay
    assert [tuple(c.shape) for c in codes.previews] == [(3, 3, 1, 1), (3, 3, 2, 2), (3, 3, 4, 4)]
    assert [int(c.max()) < k for c, k in zip(codes.previews, (4, 6, 6))] == [True] * 3
    for s in range(3):  # patches start at zero: the previews of a preview decoder without them
        assert torch.equal(tok.decode_partial(codes, s), plain.decode_partial(plain_codes, s))
    with torch.no_grad():
        for p in tok.preview_palette.patches:
            p.normal_()
    assert torch.equal(tok.decode(codes), plain.decode(plain_codes))  # full decodes never read them
    for s in range(3):
        assert not torch.allclose(tok.decode_partial(codes, s), plain.decode_partial(plain_codes, s), atol=1e-3)
    # codes without preview codes (an AR model's) decode their previews as a tokenizer without them would
    bare = MultiScaleCodes(codes.codes, codes.scales, codes.num_frames)
    with torch.no_grad():
        latent = tok._codes_to_latent(bare, 1)
        torch.testing.assert_close(tok.decode_partial(bare, 1), tok.decode_latent(latent), rtol=0, atol=0)
    # training: a clip truncated to scale s decodes as decode_partial does
    upto = torch.tensor([0, 2, 3])
    with torch.no_grad():
        out = tok(video, upto)
    for b, s in enumerate(upto.tolist()):
        torch.testing.assert_close(out.reconstruction[b:b + 1].clamp(-1, 1), tok.decode_partial(codes.split()[b], s),
                                   rtol=0, atol=1e-5)


def test_preview_codes_round_trip_and_travel_with_the_codes(tmp_path):
    tok = palette_tokenizer()
    with torch.no_grad():
        tok.preview_palette.patches[1].normal_()
    tok.save_pretrained(tmp_path)
    loaded = VideoTokenizer.from_pretrained(tmp_path).eval()
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in tok.state_dict().items())
    codes = loaded.encode(clips(2, 9))
    one = codes.split()[1]
    assert all(torch.equal(a, b[1:]) for a, b in zip(one.previews, codes.previews))
    first = codes.first_frame()
    assert first.num_frames == 1 and [tuple(c.shape[:2]) for c in first.previews] == [(2, 1)] * 3
    torch.testing.assert_close(loaded.decode_partial(first, 1), loaded.decode_partial(codes, 1)[:, :, :1],
                               rtol=0, atol=1e-5)  # causal: frame 0 alone decodes as in the clip


def test_preview_codes_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"preview_codes: must list one table size per scale but the last \(3\)"):
        VideoTokenizer(**TINY, preview_decoder=True, preview_codes=(4, 4))
    with pytest.raises(ValueError, match="preview_codes: needs preview_decoder=True"):
        VideoTokenizer(**TINY, preview_codes=(4, 4, 4))
    with pytest.raises(ValueError, match="preview_codes"):
        VideoTokenizer(**TINY, preview_decoder=True, preview_codes=(4, 0, 4))
    tok = palette_tokenizer()
    codes = tok.encode(clips(1, 5))
    with pytest.raises(ValueError, match=r"previews: scale 1 must have shape \(1, 2, 2, 2\)"):
        MultiScaleCodes(codes.codes, codes.scales, 5, [codes.previews[0], codes.previews[0], codes.previews[2]])
    with pytest.raises(ValueError, match="codes: carry preview codes"):
        VideoTokenizer(**TINY).decode_partial(codes, 0)
    codes.previews[0] = codes.previews[0] + 4
    with pytest.raises(ValueError, match=r"codes: preview indices of scale 0 must be integers in \[0, 4\)"):
        tok.decode_partial(codes, 0)
