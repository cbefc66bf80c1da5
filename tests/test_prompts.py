"""AUTOMATIC1111 prompt syntax (sdtorch/prompts.py) and textual-inversion embeddings
(sdtorch/embeddings.py): parser, chunking, emphasis, LoRA tags, embedding files, and the
embeddings' parity with diffusers' `load_textual_inversion`."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from sdtorch.conditioning.embeddings import load_embedding, load_embeddings, save_embedding
from sdtorch.conditioning.prompts import (
    BREAK,
    emphasize,
    encode_chunks,
    extract_loras,
    pad_to_same_length,
    parse_prompt_attention,
    tokenize_prompt,
)
from sdtorch.conditioning.tokenizer import ClipTokenizer
from sdtorch.config import TINY
from sdtorch.generate.guidance import text_conditions
from sdtorch.generate.pipeline import GenerationParams, Pipeline
from sdtorch.models.clip import ClipTextModel
from sdtorch.models.unet import UNetModel
from sdtorch.models.vae import AutoencoderKL

BOS, EOS, COMMA, A, B = 49406, 49407, 267, 320, 321  # "a" and "b" are one token each

# The first six cases are the doctests of `parse_prompt_attention` in AUTOMATIC1111's
# https://github.com/AUTOMATIC1111/stable-diffusion-webui/blob/master/modules/prompt_parser.py
# (expected values copied as written there); the rest follow from the same function's code.
PARSER_CASES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("", [("", 1.0)]),
    ("[a]", [("a", 1 / 1.1)]),
    ("[[a]]", [("a", 1 / 1.1 / 1.1)]),
    ("(a: 1.5 )", [("a", 1.5)]),  # spaces around the weight
    ("(a:0)", [("a", 0.0)]),
    ("[a:1.5]", [("a:1.5", 1 / 1.1)]),  # a weight needs round brackets
    ("a:1.5)", [("a:1.5)", 1.0)]),  # closers with nothing open are text
    (")a]", [(")a]", 1.0)]),
    ("\\\\ \\) \\[", [("\\ ) [", 1.0)]),
    ("a\\b", [("ab", 1.0)]),  # a lone backslash disappears
    ("((a) b)", [("a", 1.1 * 1.1), (" b", 1.1)]),
    ("a BREAK b", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("a\nBREAK\nb", [("a", 1.0), BREAK, ("b", 1.0)]),
    ("a break b, BREAKFAST", [("a break b, BREAKFAST", 1.0)]),  # upper case, a word of its own
    ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),  # A1111 would encode "break" here (see prompts.py)
]


@pytest.mark.parametrize("text,expected", PARSER_CASES)
def test_parse_prompt_attention(text, expected):
    assert parse_prompt_attention(text) == expected


def test_parse_bad_weight():
    with pytest.raises(ValueError, match="bad emphasis weight"):
        parse_prompt_attention("(a:1.2.3)")


def test_extract_loras():
    assert extract_loras("a cat <lora:film grain v2:0.6>, <lora:x>") == ("a cat , ", [("film grain v2", 0.6), ("x", 1.0)])
    assert extract_loras("no tags <hypernet:y:1>") == ("no tags <hypernet:y:1>", [])
    with pytest.raises(ValueError, match="not a number"):
        extract_loras("<lora:x:strong>")
    with pytest.raises(ValueError, match="expected <lora:name>"):
        extract_loras("<lora:x:1:0.5>")


# --- chunking ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return ClipTokenizer()


def body(chunk) -> list[int]:
    """The prompt tokens of a framed chunk (between the start token and the first end token)."""
    return chunk.tokens[1 : chunk.tokens.index(EOS)]


@pytest.mark.parametrize("pad_id", [EOS, 0])
def test_short_prompt_is_the_plain_tokens(tok, pad_id):
    for text in ["a photo of an astronaut riding a horse", "", "wow!!! a, b"]:
        (chunk,) = tokenize_prompt(text, tok, pad_id=pad_id)
        assert chunk.tokens == tok(text, pad_id=pad_id)[0].tolist()
        assert chunk.weights == [1.0] * 77


def test_long_prompt_chunks_of_75(tok):
    ids = tok.encode(" ".join(["a very long prompt that goes on"] * 20))  # 140 tokens, no commas
    chunks = tokenize_prompt(" ".join(["a very long prompt that goes on"] * 20), tok)
    assert [len(c.tokens) for c in chunks] == [77, 77]
    assert body(chunks[0]) + body(chunks[1]) == ids
    assert len(body(chunks[0])) == 75 and chunks[0].tokens[-1] == EOS
    assert chunks[1].tokens[1 + 65 :] == [EOS] * 11


def test_break_pads_the_chunk(tok):
    chunks = tokenize_prompt("a b BREAK b", tok)
    assert [c.tokens[:4] for c in chunks] == [[BOS, A, B, EOS], [BOS, B, EOS, EOS]]
    assert len(tokenize_prompt("BREAK", tok)) == 1 and len(tokenize_prompt("a BREAK", tok)) == 1


def test_comma_backtrack(tok):
    text = " ".join(["a"] * 70) + ", " + " ".join(["b"] * 10)
    first, second = tokenize_prompt(text, tok)  # the chunk fills 5 tokens after the comma: they move
    assert body(first) == [A] * 70 + [COMMA] and body(second) == [B] * 10
    first, second = tokenize_prompt(text, tok, comma_backtrack=0)
    assert body(first) == [A] * 70 + [COMMA] + [B] * 4 and body(second) == [B] * 6
    far = " ".join(["a"] * 40) + ", " + " ".join(["b"] * 45)  # the comma 35 tokens back: no move
    first, second = tokenize_prompt(far, tok)
    assert body(first) == [A] * 40 + [COMMA] + [B] * 34 and body(second) == [B] * 11


def test_weights_follow_their_tokens(tok):
    (chunk,) = tokenize_prompt("a (b:1.5) [a]", tok)
    assert body(chunk) == [A, B, A]
    assert chunk.weights[:5] == [1.0, 1.0, 1.5, 1 / 1.1, 1.0]


def test_embedding_takes_its_slots_and_never_straddles(tok):
    from sdtorch.conditioning.prompts import embedding_lookup

    vec = torch.randn(2, 8)
    lookup = embedding_lookup({"sdtok": vec}, tok, EOS)
    (chunk,) = tokenize_prompt("a sdtok b", tok, lookup=lookup)
    assert body(chunk) == [A, 0, 0, B]
    assert torch.equal(chunk.vectors[2], vec[0])
    assert torch.equal(chunk.vectors[3], vec[1]) and chunk.vectors[1] is None
    first, second = tokenize_prompt(" ".join(["a"] * 74) + " sdtok", tok, lookup=lookup)
    assert body(first) == [A] * 74 and body(second) == [0, 0]


# --- encoding ----------------------------------------------------------------------------------

def tiny_pipe(clip_cfg=TINY.clip) -> Pipeline:
    torch.manual_seed(0)
    cfg = replace(TINY, clip=clip_cfg)
    return Pipeline(cfg, UNetModel(cfg.unet), AutoencoderKL(cfg.vae), ClipTextModel(cfg.clip))


SD2_CLIP = replace(TINY.clip, pad_token_id=0, clip_skip=2, layers=3, act="gelu")


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return tiny_pipe()


@pytest.mark.parametrize("clip_cfg", [TINY.clip, SD2_CLIP], ids=["sd1", "sd2"])
def test_short_prompts_bit_identical_to_plain(clip_cfg):
    p = tiny_pipe(clip_cfg)
    prompts = ["a photo of an astronaut riding a horse", "", "Ünïcödé café, 東京 🍎!!! & co.",
               " ".join(["word"] * 75)]
    a = p.encode_prompt(prompts, syntax="a1111")
    b = p.encode_prompt(prompts, syntax="plain")
    assert a.shape == b.shape == (4, 77, clip_cfg.width)
    assert torch.equal(a, b)
    assert torch.equal(p.encode_prompt(prompts[:1], clip_skip=1), p.encode_prompt(prompts[:1], 1, syntax="plain"))


def test_long_prompt_is_77k_and_starts_as_the_truncated_one(pipe):
    text = " ".join(["a very long prompt that goes on"] * 20)
    z = pipe.encode_prompt([text])
    assert z.shape == (1, 154, 32)
    assert torch.equal(z[:, :77], pipe.encode_prompt([text], syntax="plain"))
    three = pipe.encode_prompt([text + " BREAK more"])
    assert three.shape == (1, 231, 32)


def test_break_chunks_are_encoded_separately(pipe):
    z = pipe.encode_prompt(["a cat BREAK a dog"])
    assert torch.equal(z[:, :77], pipe.encode_prompt(["a cat"]))
    assert torch.equal(z[:, 77:], pipe.encode_prompt(["a dog"]))


def test_emphasis_scales_its_tokens_then_restores_the_mean(pipe):
    plain = pipe.encode_prompt(["a red apple"])
    weighted = pipe.encode_prompt(["a (red:1.5) apple"])
    assert torch.allclose(weighted.mean(), plain.mean(), rtol=1e-5, atol=1e-7)
    w = torch.ones(1, 77)
    w[0, 2] = 1.5  # "red" after the start token
    c = plain.mean() / (plain * w[..., None]).mean()
    before_rescale = weighted / c
    changed = (before_rescale - plain).abs().amax(dim=-1)[0] > 1e-5  # (77,)
    assert changed.nonzero().flatten().tolist() == [2]
    assert torch.allclose(before_rescale[0, 2], plain[0, 2] * 1.5, rtol=1e-5, atol=1e-6)
    # the function itself, per prompt of a batch
    z = torch.randn(2, 77, 8) + 0.3
    w2 = torch.ones(2, 77)
    w2[1, 5] = 0.5
    out = emphasize(z, w2)
    assert torch.equal(out[0], z[0])
    assert torch.allclose(out.mean(dim=(1, 2)), z.mean(dim=(1, 2)), rtol=1e-5)
    ratio = out[1] / z[1]
    assert torch.allclose(ratio[5], ratio[0] * 0.5, rtol=1e-4)


def pair(pipe, params):
    """The (cond, uncond) text states a run of `params` conditions on."""
    text = text_conditions(pipe, params, None)
    return text.cond.crossattn, text.uncond.crossattn


def test_rows_and_cond_uncond_padded_with_empty_chunks(pipe):
    long = " ".join(["a very long prompt that goes on"] * 20)
    empty = pipe.encode_prompt([""])
    z = pipe.encode_prompt(["a cat", long])
    assert z.shape == (2, 154, 32) and torch.allclose(z[0, 77:], empty[0], atol=1e-6)
    cond, uncond = pair(pipe, GenerationParams(long, "blurry", batch_size=2))
    assert cond.shape == uncond.shape == (2, 154, 32)
    assert torch.equal(uncond[:, :77], pipe.encode_prompt(["blurry"] * 2))
    assert torch.equal(uncond[:, 77:], empty.expand(2, -1, -1))
    a, b = pad_to_same_length(empty, torch.zeros(1, 231, 32), empty)
    assert a.shape == b.shape == (1, 231, 32)


def test_long_prompt_generates(pipe):
    long = " ".join(["a very long prompt that goes on"] * 20)
    params = GenerationParams(long, "", steps=2, sampler="euler", width=32, height=32, batch_size=2)
    latents = pipe.generate_latents(params, progress=False)
    assert latents.shape[:2] == (2, 4) and latents.isfinite().all()


def test_lora_tags(pipe):
    with pytest.raises(ValueError, match="prompt names LoRA 'film' but no LoRA directory was given"):
        pair(pipe, GenerationParams("a cat <lora:film:0.5>"))
    seen = []
    pipe.lora_loader = seen.append
    try:
        cond, _ = pair(pipe, GenerationParams("a cat <lora:film:0.5>"))
        pair(pipe, GenerationParams("a cat"))
    finally:
        pipe.lora_loader = None
    assert seen == [[("film", 0.5)], []]  # every generation says which LoRAs are active
    assert torch.equal(cond, pipe.encode_prompt(["a cat"]))


def test_embedding_of_token_rows_equals_those_words(pipe):
    rows = pipe.clip.text_model.embeddings.token_embedding.weight[pipe.tokenizer.encode("red apple")]
    pipe.embeddings = {"sdtok": rows.detach().clone()}
    try:
        a = pipe.encode_prompt(["a sdtok on a (table)", "a sdtok"])
    finally:
        pipe.embeddings = {}
    assert torch.allclose(a, pipe.encode_prompt(["a red apple on a (table)", "a red apple"]), atol=1e-6)


def test_encode_chunks_without_overrides_matches_clip(pipe, tok):
    chunk = tokenize_prompt("a cat", tok)[0]
    z = encode_chunks(pipe.clip, [[chunk]], chunk)
    assert torch.equal(z, pipe.clip(torch.tensor([chunk.tokens])).float())


# --- embedding files ---------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_embedding_round_trip(tmp_path, suffix):
    vectors = torch.randn(3, 32)
    path = save_embedding(tmp_path / f"style{suffix}", "my-style", vectors, step=500)
    emb = load_embedding(path)
    assert (emb.name, emb.step) == ("my-style", 500) and torch.equal(emb.vectors, vectors)
    if suffix == ".pt":  # A1111's layout
        data = torch.load(path, weights_only=True)
        assert data["string_to_token"] == {"*": 265} and torch.equal(data["string_to_param"]["*"], vectors)
    else:
        from safetensors.torch import load_file

        assert list(load_file(path)) == ["emb_params"]


def test_other_formats_and_folders(tmp_path):
    from safetensors.torch import save_file

    torch.save({"<cat-toy>": torch.randn(32)}, tmp_path / "learned_embeds.bin")  # diffusers, one vector (D,)
    emb = load_embedding(tmp_path / "learned_embeds.bin")
    assert emb.name == "<cat-toy>" and emb.vectors.shape == (1, 32)
    (tmp_path / "sub").mkdir()
    save_file({"emb_params": torch.randn(2, 32)}, tmp_path / "sub" / "kohya.safetensors")
    save_embedding(tmp_path / "wide.pt", "wide", torch.randn(1, 768))  # another model family
    found = load_embeddings(tmp_path, width=32)
    assert sorted(found) == ["kohya", "learned_embeds"] and found["kohya"].shape == (2, 32)
    with pytest.raises(ValueError, match="width 768"):
        load_embeddings(tmp_path / "wide.pt", width=32)
    save_file({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280)}, tmp_path / "xl.safetensors")
    xl = load_embedding(tmp_path / "xl.safetensors")
    assert xl.vectors.shape == (1, 768) and xl.vectors2.shape == (1, 1280)
    with pytest.raises(ValueError, match="SDXL embedding"):  # on a model with one text encoder
        load_embeddings(tmp_path / "xl.safetensors", width=768)
    assert "xl" not in load_embeddings(tmp_path, width=32)  # skipped in a folder


class RunsCode:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_unsafe_pickle_refused(tmp_path, capsys):
    torch.save({"string_to_param": {"*": torch.zeros(1, 32)}, "name": "x", "extra": RunsCode()}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="refused to load embedding .* asks for print"):
        load_embedding(tmp_path / "bad.pt")
    assert "must never run" not in capsys.readouterr().out
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read embedding"):
        load_embedding(tmp_path / "junk.pt")


# --- parity with diffusers' textual inversion ----------------------------------------------------

@pytest.mark.parametrize("pair", ["tiny_reference", "tiny_v_reference"])
@torch.no_grad()
def test_textual_inversion_matches_diffusers(request, pair, tmp_path, parity_log):
    from diffusers import StableDiffusionPipeline

    import sdtorch

    ref = request.getfixturevalue(pair)
    g = torch.Generator().manual_seed(0)
    width = ref.preset.clip.width
    two = save_embedding(tmp_path / "sdtok.pt", "sdtok", torch.randn(2, width, generator=g) * 0.5)
    one = save_embedding(tmp_path / "sdone.safetensors", "sdone", torch.randn(1, width, generator=g) * 0.5)
    theirs = StableDiffusionPipeline.from_pretrained(ref.folder, local_files_only=True, safety_checker=None)
    theirs.load_textual_inversion(str(two), token="sdtok")  # adds tokens "sdtok", "sdtok_1"
    theirs.load_textual_inversion(str(one), token="sdone")
    ours = sdtorch.load(ref.checkpoint, config=ref.preset)
    ours.load_embeddings(tmp_path)
    prompts = ["a photo of sdtok on a table", "sdone and sdtok, sdone", "no embedding here"]
    assert theirs.maybe_convert_prompt(prompts[0], theirs.tokenizer) == "a photo of sdtok sdtok_1 on a table"
    a = ours.encode_prompt(prompts)  # a1111 syntax, one chunk each
    b = theirs.encode_prompt(prompts, "cpu", 1, False)[0]
    assert a.shape == b.shape
    assert not torch.allclose(a[:2], ours.encode_prompt(prompts[:2], syntax="plain"))  # the vectors matter
    diff = parity_log("textual inversion max abs diff", (a - b).abs().max().item())
    assert diff <= 1e-5


def test_cli_embeddings_and_lora_error(tiny_file, tmp_path, capsys):
    from sdtorch.cli import main

    save_embedding(tmp_path / "emb" / "sdtok.pt", "sdtok", torch.randn(2, 32))
    base = ["-c", str(tiny_file), "--steps", "1", "--seed", "1", "--width", "32", "--height", "32",
            "--out", str(tmp_path / "out")]
    assert main(["generate", "a (sdtok:1.2) BREAK on a table", *base, "--embeddings", str(tmp_path / "emb")]) == 0
    assert "embeddings: sdtok" in capsys.readouterr().err
    assert main(["generate", "a cat <lora:film:0.5>", *base]) == 2
    assert "prompt names LoRA 'film'" in capsys.readouterr().err
    assert main(["generate", "a cat <lora:film:0.5>", *base, "--prompt-syntax", "plain"]) == 0
