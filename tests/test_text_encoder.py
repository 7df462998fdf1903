"""A pretrained text encoder (transformers T5 / CLIP) in place of the byte-level prompt: tiny random models and
tokenizers built here and saved to temp folders (nothing is downloaded), trained and generated through the
pipeline, saved and loaded; the encoder stays frozen; guidance uses its empty-prompt states; a model trained with
an encoder refuses every prompt path that lacks it."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from _train_helpers import ROOT, subprocess_env, tiny_ar_config, weights
from test_t2v import PROMPT, TOK

transformers = pytest.importorskip("transformers")

from omniar.backbone import OmniARConfig, OmniARModel  # noqa: E402
from omniar.backbone.text_encoder import TextEncoder  # noqa: E402
from omniar.data.shapes import vocabulary  # noqa: E402
from omniar.generation import TextToVideoPipeline  # noqa: E402
from omniar.generation.pipeline import text_inputs  # noqa: E402
from omniar.tokenizers import VideoTokenizer  # noqa: E402
from omniar.tokenizers.text import TextTokenizer  # noqa: E402

MAX_TEXT_LEN = 16
WIDTH = {"t5": 32, "clip": 24}  # the encoders' widths differ from each other and from the backbone's


def save_encoder(folder, kind: str):
    """A random tiny T5 encoder or CLIP text model and a word-level tokenizer of the Moving Shapes words."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = ["<pad>", "</s>", "<unk>", "<s>"]
    vocab = {w: i for i, w in enumerate(specials + vocabulary())}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    # T5 ends a text with </s>; CLIP wraps it in start and end tokens
    template = "$A </s>" if kind == "t5" else "<s> $A </s>"
    tk.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("</s>", 1), ("<s>", 3)])
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>",
                                                     unk_token="<unk>", bos_token="<s>")
    torch.manual_seed(1)
    if kind == "t5":
        encoder = transformers.T5EncoderModel(transformers.T5Config(
            vocab_size=len(vocab), d_model=WIDTH[kind], d_kv=8, d_ff=64, num_layers=2, num_heads=4,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    else:
        encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=WIDTH[kind], intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=MAX_TEXT_LEN, pad_token_id=0, eos_token_id=1,
            bos_token_id=3))
    encoder.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=["t5", "clip"])
def encoder_folder(request, tmp_path_factory):
    return save_encoder(tmp_path_factory.mktemp(request.param), request.param)


def tiny_encoder_pipeline(folder) -> TextToVideoPipeline:
    torch.manual_seed(0)
    encoder = TextEncoder.from_pretrained(folder)
    model = OmniARModel.from_config_obj(OmniARConfig(
        text_embed_dim=encoder.hidden_size, codebook_size=32, code_dim=8, scales=(1, 2, 4, 8), hidden_size=32,
        num_layers=2, num_heads=2, num_kv_heads=1, num_experts=4, top_k=2, expert_hidden_size=16, init_std=0.3))
    return TextToVideoPipeline(VideoTokenizer(**TOK), TextTokenizer(), model, max_text_len=MAX_TEXT_LEN,
                               max_num_frames=9, text_encoder=encoder)


def test_train_generate_save_load(encoder_folder, tmp_path):
    """`omniar train ar` with model.text_encoder: the exported pipeline carries the encoder, unchanged by training,
    and generates the same clip after a save/load round trip."""
    from omniar.train.ar import train

    tiny_encoder_pipeline(encoder_folder).video_tokenizer.save_pretrained(tmp_path / "tok")
    config = tiny_ar_config(tmp_path, 16, out_dir=str(tmp_path / "run"), steps=3, micro_batch_size=4)
    config["model"]["text_encoder"] = str(encoder_folder)
    config["data"]["max_text_len"] = MAX_TEXT_LEN
    final = train(config, progress=False)

    before, after = weights(encoder_folder), weights(final / "text_encoder")
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), "training changed the frozen encoder"
    model = OmniARModel.from_pretrained(final / "model")
    assert model.omniar_config.text_embed_dim == TextEncoder.from_pretrained(encoder_folder).hidden_size

    pipe = TextToVideoPipeline.from_pretrained(final)
    assert isinstance(pipe.text_encoder, TextEncoder)
    out = pipe(PROMPT, num_frames=5, seed=0)
    assert out.frames.shape == (1, 5, 32, 32, 3)
    pipe.save_pretrained(tmp_path / "copy")
    again = TextToVideoPipeline.from_pretrained(tmp_path / "copy")(PROMPT, num_frames=5, seed=0)
    assert np.array_equal(out.frames, again.frames)

    # the same folder without its encoder: refused, naming it, before any prompt is read
    index = json.loads((tmp_path / "copy" / "model_index.json").read_text())
    del index["text_encoder"]
    (tmp_path / "copy" / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(tmp_path / "copy" / "text_encoder")
    with pytest.raises(ValueError, match=r"^text_encoder: is missing: the model was trained on a text encoder"):
        TextToVideoPipeline.from_pretrained(tmp_path / "copy")


def test_prompt_changes_the_clip_and_guidance_uses_the_empty_prompt_states(encoder_folder, monkeypatch):
    pipe = tiny_encoder_pipeline(encoder_folder)
    other = "a blue square moves up on a white background"
    a, b = (pipe(p, num_frames=1, seed=0, guidance_scale=1.0).codes.codes[-1] for p in (PROMPT, other))
    assert not torch.equal(a, b), "the encoder's states do not reach the model"

    seen = []
    forward_text = pipe.model.forward_text
    monkeypatch.setattr(pipe.model, "forward_text", lambda *args, **kw: seen.append(kw) or forward_text(*args, **kw))
    pipe([PROMPT, other], num_frames=1, seed=0, guidance_scale=3.0)
    text = seen[-1]
    assert text["text_ids"] is None
    states, mask = pipe.text_encoder.encode([PROMPT, other, "", ""], MAX_TEXT_LEN)
    assert torch.equal(text["text_embeds"], states) and torch.equal(text["text_mask"], mask)
    assert mask[2:].sum(1).tolist() == [len(pipe.text_encoder.tokenizer("")["input_ids"])] * 2
    # caption dropout trains the same unconditional branch: None is the empty prompt
    dropped = text_inputs([None], MAX_TEXT_LEN, pipe.text_tokenizer, pipe.text_encoder, torch.device("cpu"))
    assert torch.equal(dropped["text_embeds"], states[2:3])

    pipe(PROMPT, num_frames=1, seed=0, guidance_scale=1.0)
    assert seen[-1]["text_embeds"].shape[0] == 1  # no unconditional rows without guidance


def test_encoder_is_frozen(encoder_folder):
    encoder = TextEncoder.from_pretrained(encoder_folder)
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.train().training and not encoder.encoder.training  # dropout stays off
    states, mask = encoder.encode([PROMPT], MAX_TEXT_LEN)
    assert states.shape == (1, MAX_TEXT_LEN, encoder.hidden_size) and states.dtype == torch.float32
    assert not states.requires_grad and mask.dtype == torch.bool and not mask[0, -1]  # right-padded


def test_mismatches_are_refused_naming_the_argument(encoder_folder, tmp_path):
    pipe = tiny_encoder_pipeline(encoder_folder)
    tok, text_tok, model, encoder = pipe.video_tokenizer, pipe.text_tokenizer, pipe.model, pipe.text_encoder
    with pytest.raises(ValueError, match=r"^text_encoder: is missing: the model was trained on a text encoder"):
        TextToVideoPipeline(tok, text_tok, model, max_text_len=MAX_TEXT_LEN)
    cache = model.new_cache()
    with pytest.raises(ValueError, match=r"^text_ids: this model was trained with a text encoder"):
        model.forward_text(torch.zeros(1, 4, dtype=torch.long), None, cache)
    with pytest.raises(ValueError, match=r"^text_embeds: must be a float tensor \(B, L, "):
        model(None, None, text_embeds=torch.zeros(1, 4, encoder.hidden_size + 1))
    byte_model = OmniARModel.from_config_obj(model.omniar_config.replace(text_embed_dim=None))
    with pytest.raises(ValueError, match=r"^text_encoder: the model reads byte-level text"):
        TextToVideoPipeline(tok, text_tok, byte_model, max_text_len=MAX_TEXT_LEN, text_encoder=encoder)
    with pytest.raises(ValueError, match=r"^text_embeds: this model reads byte-level text_ids"):
        byte_model(torch.zeros(1, 4, dtype=torch.long), text_embeds=torch.zeros(1, 4, 8))
    wide = OmniARModel.from_config_obj(model.omniar_config.replace(text_embed_dim=encoder.hidden_size + 8))
    with pytest.raises(ValueError, match=r"^text_encoder: gives \d+-wide states, the model reads"):
        TextToVideoPipeline(tok, text_tok, wide, max_text_len=MAX_TEXT_LEN, text_encoder=encoder)
    # a call, and the up-front check of omniar generate --batch
    for check in (lambda p: pipe(p, num_frames=1), pipe.check_prompts):
        with pytest.raises(ValueError, match=r"^prompt: is too long: \d+ tokens, at most 16 fit"):
            check(" ".join(["red"] * 20))
    if encoder.max_length is not None:  # CLIP: a position table
        with pytest.raises(ValueError, match=r"^max_text_len: must be at most the text encoder's 16 positions"):
            TextToVideoPipeline(tok, text_tok, model, max_text_len=32, text_encoder=encoder)
    with pytest.raises(ValueError, match=r"^model.text_encoder: .*config.json not found"):
        TextEncoder.from_pretrained(tmp_path / "nothing", name="model.text_encoder")


def test_missing_tensors_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = save_encoder(tmp_path / "t5", "t5")
    state = load_file(folder / "model.safetensors")
    dropped = sorted(state)[-1]
    save_file({k: v for k, v in state.items() if k != dropped}, folder / "model.safetensors", {"format": "pt"})
    with pytest.raises(ValueError, match=r"^path: .*missing or mis-shaped tensors"):
        TextEncoder.from_pretrained(folder)


def test_training_config_refuses_text_embed_dim_and_bad_folders(tmp_path):
    from omniar.train.ar import check_model_section

    with pytest.raises(ValueError, match=r"^model: \['text_embed_dim'\] are set from"):
        check_model_section({"text_embed_dim": 32})
    assert check_model_section({"text_encoder": "x", "hidden_size": 64}) == {"hidden_size": 64}


def test_omniar_imports_and_explains_without_transformers(tmp_path, monkeypatch):
    """The extra is optional: with transformers hidden, omniar (CLI, trainer, pipeline) still imports, and loading
    an encoder says how to install it."""
    code = ("import sys; sys.modules['transformers'] = None\n"
            "import omniar.cli, omniar.train.ar, omniar.generation, omniar.backbone.text_encoder\n"
            "assert sys.modules['transformers'] is None\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=subprocess_env(), timeout=300)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ValueError, match=r"^model.text_encoder: .*pip install 'omniar\[text\]'"):
        TextEncoder.from_pretrained(tmp_path, name="model.text_encoder")
