"""ClipTokenizer against the reference, transformers' CLIPTokenizer on the same vocabulary."""

from __future__ import annotations

import random

import pytest
import torch
from reference_files import VOCAB_GZ, write_hf_tokenizer

from sdtorch.conditioning.tokenizer import ClipTokenizer

transformers = pytest.importorskip("transformers")

LONG = "a highly detailed photograph of an old lighthouse on a cliff at sunset, " * 8  # ~120 tokens
PROMPTS = [
    # empty, whitespace, ordinary, case
    "", " ", "  \t \n  ", "a photo of an astronaut riding a horse", "A PHOTO OF AN ASTRONAUT",
    "MiXeD CaSe Prompt", "  leading and trailing   spaces  ",
    # punctuation runs and prompt syntax
    "!!!", "wow!?", "hello! world", "...", "a,b;c", "hello!!! world...",
    "(masterpiece:1.2), best quality, [ugly], {blurry}", "<lora:foo:0.8>", "a_b-c+d=e",
    "https://example.com/a?b=c", "#hashtag @user", "$100 50% off", "~~~ *** ###", "“quoted” ‘single’ — dash … ellipsis",
    # apostrophes
    "it's", "we'll", "don't", "they're", "I've", "I'm", "he'd", "the cat's", "cats'", "James's hat",
    "IT'S LOUD", "rock 'n' roll", "'s", "''s", "it’s (curly)",
    # numbers
    "1920s", "3.14", "2024-01-01", "12345678901234567890", "v1.5 sd2", "①②③ ½ Ⅻ",
    # unicode: accents, NFC vs NFD, ß, CJK, emoji, ZWJ, RTL, casing specials
    "café", "cafe\u0301", "Ångström", "A\u030angstro\u0308m", "naïve façade", "Straße", "STRASSE ß ẞ",
    "東京の夜景", "一只猫", "한국어", "🍎", "🍎🍎🍎", "👩\u200d👩\u200d👧\u200d👦 family", "👍🏽",
    "🇯🇵 flag", "مرحبا بالعالم", "שלום", "Привет мир", "ΟΔΟΣ Σ", "İstanbul", "ﬁ ligature",
    # html entities stay as typed (no html-unescape), control and odd whitespace
    "&amp; &lt;b&gt; &quot;", "fish &amp; chips", "line1\nline2\tcol\r\nend", "a\u00a0b\u3000c\u2028d",
    "zero\u200bwidth", "x\x00y", "\x1c\x1f", "\ufeffbom",
    # special token strings typed literally
    "<|startoftext|>", "<|endoftext|>", "a <|endoftext|> b", "<|endoftext|><|endoftext|>",
    "<|ENDOFTEXT|>", "<|endoftext|>>", "<<|endoftext|>", "<| endoftext |>", "<|startoftext|>\u0338",
    "x<|startoftext|>y<|endoftext|>z",
    LONG,
]


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return ClipTokenizer()


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """Reference tokenizers: {pad_id: CLIPTokenizer}, SD1 pads with eos (49407), SD2 with "!" (0)."""
    root = tmp_path_factory.mktemp("hf_tokenizers")
    folders = {49407: write_hf_tokenizer(root / "sd1"), 0: write_hf_tokenizer(root / "sd2", pad_token="!")}
    return {pad_id: transformers.CLIPTokenizer.from_pretrained(f) for pad_id, f in folders.items()}


def ref_ids(ref_tok, texts, max_length: int = 77) -> torch.Tensor:
    """The reference's padded, truncated ids (B, max_length)."""
    out = ref_tok(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return out.input_ids


def ref_encode(ref_tok, text: str) -> list[int]:
    """The reference's ids without start/end tokens."""
    return ref_tok(text, add_special_tokens=False).input_ids


def test_ground_truth(tok):
    ids = tok("a photo of an astronaut riding a horse")
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0, :10].tolist() == [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert (ids[0, 10:] == 49407).all()
    assert (tok.bos_id, tok.eos_id, tok.vocab_size, tok.max_length) == (49406, 49407, 49408, 77)


def test_vocabulary_matches_reference(tok, ref):
    assert tok.encoder == ref[49407].get_vocab()


@pytest.mark.parametrize("text", PROMPTS)
def test_prompt_parity(tok, ref, text):
    for pad_id, ref_tok in ref.items():
        assert ref_tok.pad_token_id == pad_id
        assert torch.equal(tok(text, pad_id=pad_id), ref_ids(ref_tok, [text])), (text, pad_id)
        assert tok.encode(text, pad_id=pad_id) == ref_encode(ref_tok, text)


def test_batch_parity(tok, ref):
    for pad_id, ref_tok in ref.items():
        ids = tok(PROMPTS, pad_id=pad_id)
        assert ids.shape == (len(PROMPTS), 77)
        assert torch.equal(ids, ref_ids(ref_tok, PROMPTS))


def test_long_prompt_truncates_with_eos_last(tok, ref):
    full = tok.encode(LONG)
    assert len(full) > 75
    ids = tok(LONG)[0]
    assert ids[0] == tok.bos_id and ids[76] == tok.eos_id
    assert ids[1:76].tolist() == full[:75]
    assert torch.equal(tok(LONG, max_length=20), ref_ids(ref[49407], [LONG], max_length=20))


def test_special_strings_typed_in_prompt(tok, ref):
    """Typed literally, the special strings become their ids (matched before lower-casing)."""
    expected = {"<|endoftext|>": [49407], "a<|startoftext|>b": [320, 49406, 321],
                "<|ENDOFTEXT|>": [27, 347, 40786, 4160, 91, 285]}  # upper case: plain text
    for text, ids in expected.items():
        assert tok.encode(text) == ids == ref_encode(ref[49407], text)


def test_sd2_pad_token_is_special(tok, ref):
    """SD2's reference tokenizer treats its pad "!" as a special token, even inside a prompt."""
    assert tok.encode("wow!!!") == [2781, 995]
    assert tok.encode("wow!!!", pad_id=0) == [2781, 0, 0, 0] == ref_encode(ref[0], "wow!!!")


def test_nfd_input_equals_nfc(tok, ref):
    nfd = "cafe\u0301"
    assert tok.encode(nfd) == tok.encode("café") == ref_encode(ref[49407], nfd)


def test_html_entities_are_not_unescaped(tok, ref):
    ids = tok.encode("fish &amp; chips")
    assert ids != tok.encode("fish & chips")
    assert ids == ref_encode(ref[49407], "fish &amp; chips")


def test_random_strings_parity(tok, ref):
    atoms = [*"abcxyzAZ019 .,!?'-_()<>|&;:\"\t\n", "é", "e\u0301", "ß", "Σ", "东京", "🍎", "\u200d",
             "'s", "'ll", "<|endoftext|>", "<|startoftext|>", "ENDOFTEXT", "\u00a0", "\u0338"]
    rng = random.Random(0)
    texts = ["".join(rng.choice(atoms) for _ in range(rng.randint(1, 30))) for _ in range(300)]
    for pad_id, ref_tok in ref.items():
        expected = [ref_encode(ref_tok, t) for t in texts]
        assert [tok.encode(t, pad_id=pad_id) for t in texts] == expected


def test_vocabulary_words_parity(tok, ref):
    """Text of every 13th vocabulary entry (some are partial UTF-8, so decode to "\ufffd")."""
    texts = [ref[49407].decode([i]) for i in range(0, 49406, 13)]
    expected = [ref_encode(ref[49407], t) for t in texts]
    assert [tok.encode(t) for t in texts] == expected


@pytest.mark.parametrize("text", PROMPTS)
def test_decode_parity(tok, ref, text):
    for pad_id, ref_tok in ref.items():
        ids = tok(text, pad_id=pad_id)[0]
        assert tok.decode(ids, pad_id=pad_id) == ref_tok.decode(ids, skip_special_tokens=True)
        for i in tok.encode(text)[:20]:  # single tokens, including partial UTF-8 sequences
            assert tok.decode([i], pad_id=pad_id) == ref_tok.decode([i], skip_special_tokens=True)


def test_decode_round_trip(tok):
    for text in ["a photo of an astronaut riding a horse", "two cats on a red sofa", "東京の夜景 🍎"]:
        assert tok.decode(tok.encode(text)) == text
        assert tok.decode(tok(text)[0]) == text
    assert tok.decode(tok.encode("A Photo,  of IT")) == "a photo , of it"


def test_deterministic(tok):
    first = tok(PROMPTS)
    assert torch.equal(tok(PROMPTS), first)
    assert torch.equal(ClipTokenizer(VOCAB_GZ)(PROMPTS), first)


def test_rejects_bad_lengths_and_pad_ids(tok):
    with pytest.raises(ValueError, match="pad_id"):
        tok("a", pad_id=49408)
    with pytest.raises(ValueError, match="max_length"):
        tok("a", max_length=1)


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["ok", None], [["nested"]]])
def test_rejects_non_string_prompts(tok, bad):
    with pytest.raises(TypeError, match="str"):
        tok(bad)
