"""CLIP's byte-level BPE tokenizer with OpenAI's vocabulary (bpe_simple_vocab_16e6).

Matches transformers' CLIPTokenizer (the `tokenizers`-backed one), step for step:
1. the special strings "<|startoftext|>", "<|endoftext|>" and the pad token (SD2's "!") typed
   in a prompt are split out first, from the raw text, and become their ids (HF "added tokens");
2. every other piece is normalised: NFC, each whitespace run -> " ", lower-case;
3. pre-tokenised with CLIP's word regex, then GPT-2's regex (HF's ByteLevel step; it only
   ever splits the special strings, e.g. "<|ENDOFTEXT|>" -> "<|", "endoftext", "|>");
4. each word's UTF-8 bytes become printable stand-in characters and are merged by BPE,
   with "</w>" on the word's last symbol.
Unlike OpenAI's original it does not run ftfy or html-unescape: "&amp;" stays "&amp;".
"""

from __future__ import annotations

import gzip
import unicodedata
from functools import lru_cache
from importlib import resources
from pathlib import Path

import regex
import torch

_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2  # 48,894 merges follow the version line of the vocabulary file
_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
_WHITESPACE = regex.compile(r"\s+")
_CLIP_WORDS = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)
_GPT2_WORDS = regex.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+")


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable stand-in character, in vocabulary order (printable bytes first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def normalize(text: str) -> str:
    """NFC, whitespace runs -> one space, lower-case character by character (as HF's
    Lowercase does: no final-sigma rule, so "Σ" always becomes "σ", unlike str.lower)."""
    text = _WHITESPACE.sub(" ", unicodedata.normalize("NFC", text))
    return "".join(c.lower() for c in text)


def pre_tokenize(text: str) -> list[str]:
    """Normalised text -> words (whitespace dropped)."""
    return [w for word in _CLIP_WORDS.findall(text) for w in _GPT2_WORDS.findall(word)]


@lru_cache(maxsize=8)
def special_splitter(specials: frozenset[str]) -> regex.Pattern:
    """Splits raw text around the special strings, longest first (HF matches added tokens
    leftmost-longest); the captured specials land at the odd positions of `split`."""
    return regex.compile("(" + "|".join(map(regex.escape, sorted(specials, key=len, reverse=True))) + ")")


def load_merges(vocab_path: str | Path | None = None) -> list[tuple[str, str]]:
    """The 48,894 BPE merges, in rank order, from the gzipped OpenAI vocabulary file."""
    source = resources.files("sdtorch") / "data" / _VOCAB_FILE if vocab_path is None else Path(vocab_path)
    with source.open("rb") as f:
        lines = gzip.decompress(f.read()).decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]


class ClipTokenizer:
    """Text -> CLIP token ids. `vocab_path`: a bpe_simple_vocab_16e6.txt.gz (default: the packaged one)."""

    bos_id: int = 49406
    eos_id: int = 49407
    vocab_size: int = 49408
    max_length: int = 77

    def __init__(self, vocab_path: str | Path | None = None) -> None:
        merges = load_merges(vocab_path)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        chars = list(self.byte_encoder.values())
        tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + list(_SPECIALS)
        assert len(tokens) == self.vocab_size, len(tokens)
        self.encoder = {t: i for i, t in enumerate(tokens)}
        self.decoder = tokens
        self.bpe_ranks = {m: i for i, m in enumerate(merges)}
        self.bpe = lru_cache(maxsize=65536)(self._bpe)

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Byte-mapped word -> BPE symbols; repeatedly merges the lowest-ranked adjacent pair."""
        symbols = [*word[:-1], word[-1] + "</w>"]
        while len(symbols) > 1:
            pairs = zip(symbols[:-1], symbols[1:])
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(symbols):  # merge every occurrence of `best`, left to right
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return tuple(symbols)

    def encode(self, text: str, *, pad_id: int = 49407) -> list[int]:
        """Text -> BPE ids (L,), without start/end tokens and without truncation.

        The reference makes its pad token special too, so with SD2's pad "!" (pad_id=0) every
        "!" typed in the text is split out like "<|endoftext|>": "!!!" -> [0, 0, 0], not [995].
        """
        if not 0 <= pad_id < self.vocab_size:
            raise ValueError(f"pad_id must be a token id in [0, {self.vocab_size}), got {pad_id}")
        specials = {*_SPECIALS, self.decoder[pad_id]}
        ids = []
        for piece in special_splitter(frozenset(specials)).split(text):
            if piece in specials:
                ids.append(self.encoder[piece])
                continue
            for word in pre_tokenize(normalize(piece)):
                mapped = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                ids.extend(self.encoder[s] for s in self.bpe(mapped))
        return ids

    def __call__(self, texts: str | list[str], *, pad_id: int = 49407, max_length: int = 77) -> torch.LongTensor:
        """Prompts -> ids (B, max_length): [bos] + ids[:max_length - 2] + [eos], then pad_id.

        pad_id: 49407 ("<|endoftext|>") for SD1's tokenizer, 0 ("!") for SD2's.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not all(isinstance(t, str) for t in texts):
            raise TypeError(f"prompts must be a str or a list of str, got {texts!r}")
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 (for start and end tokens), got {max_length}")
        out = torch.full((len(texts), max_length), pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.bos_id, *self.encode(text, pad_id=pad_id)[: max_length - 2], self.eos_id]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, ids: list[int] | torch.Tensor, *, pad_id: int = 49407) -> str:
        """Ids (L,) -> text, as the reference's decode(ids, skip_special_tokens=True): start, end
        and pad ids are dropped and each "</w>" becomes a space, so words come back lower-case and
        punctuation space-separated ("it 's")."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        text = "".join(self.decoder[i] for i in ids if i not in (self.bos_id, self.eos_id, pad_id))
        raw = bytes(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()
