"""Helpers that build reference (Hugging Face) files for parity tests. Test-only."""

from __future__ import annotations

import gzip
import json
from functools import lru_cache
from pathlib import Path

VOCAB_GZ = Path(__file__).resolve().parents[1] / "sdtorch" / "data" / "bpe_simple_vocab_16e6.txt.gz"


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins CLIP BPE uses for raw bytes, in vocabulary order
    (printable bytes first, as OpenAI's `bytes_to_unicode` dict is ordered)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


@lru_cache(maxsize=1)
def _vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    lines = gzip.open(VOCAB_GZ, "rt", encoding="utf-8").read().split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]  # 48,894 merges after the version line
    chars = _bytes_to_unicode()
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def write_hf_tokenizer(folder: str | Path, pad_token: str = "<|endoftext|>") -> Path:
    """Write vocab.json + merges.txt (+ configs) loadable by transformers' CLIPTokenizer.

    pad_token: "<|endoftext|>" as SD1's tokenizer, "!" as SD2's.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    cfg = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": 77,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
        "do_lower_case": True,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    (folder / "special_tokens_map.json").write_text(
        json.dumps({k: cfg[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")})
    )
    return folder
