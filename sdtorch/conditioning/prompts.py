"""AUTOMATIC1111's prompt syntax: emphasis, BREAK, LoRA tags, prompts longer than 75 tokens.

The spec is the behaviour of AUTOMATIC1111's stable-diffusion-webui (`modules/prompt_parser.py`,
`modules/sd_hijack_clip.py`, `modules/sd_emphasis.py`, `modules/extra_networks.py`):

- `(x)` multiplies x's weight by 1.1, `[x]` divides it by 1.1, `(x:1.3)` multiplies it by 1.3;
  nesting multiplies; `\\(` `\\)` `\\[` `\\]` `\\\\` are the literal characters; a bracket left
  open is closed at the end of the prompt, a closing bracket with nothing open is literal text.
- `BREAK` (upper case, a word of its own) ends the current chunk: the rest of it is padding.
- `<lora:name:multiplier>` / `<lora:name>` (multiplier 1) are taken out of the text.
- The prompt's tokens are cut into chunks of 75; a chunk that fills up moves the words after its
  last comma to the next chunk when that comma is among its last 20 tokens. Each chunk becomes
  [start] + 75 tokens (padded with end tokens) + [end], is encoded separately, and the chunks'
  states are concatenated: (B, 77·k, D). A prompt of at most 75 tokens is one chunk, exactly the
  77 tokens the plain tokenizer gives.
- Weights multiply the encoder's output at their tokens; then the chunk's output is rescaled so
  its mean equals the unweighted mean (A1111's "Original" emphasis).
- Textual-inversion embeddings: where a prompt's tokens spell an embedding's name, its n vectors
  take n token slots (a vector chunk never straddles two chunks).

Deliberate differences from A1111: the emphasis mean is taken per prompt rather than over the
batch (the same when a batch repeats one prompt, as generation does), and BREAK inside brackets
still breaks (A1111 multiplies its marker and ends up encoding the word "break").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from sdtorch.conditioning.tokenizer import ClipTokenizer

CHUNK = 75  # prompt tokens per chunk; the text encoder reads 77 = start + 75 + end
EMPHASIS = 1.1
COMMA_BACKTRACK = 20  # A1111's `comma_padding_backtrack` default
BREAK = ("BREAK", -1.0)  # the marker parse_prompt_attention returns for a BREAK

# A1111's tokens, in its order: escapes, a lone backslash, openers, "(...:weight)" closers,
# closers, plain text, a lone colon.
_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|
\(|\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|]|
[^\\()\[\]:]+|
:
""", re.VERBOSE)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)
_LORA = re.compile(r"<lora:([^>]+)>")


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Text -> [(piece, weight)]; runs of equal weight merged; BREAK as the `BREAK` marker.

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    res: list = []  # [piece, weight] lists; BREAK markers are the tuple, which nothing multiplies
    round_open, square_open = [], []

    def multiply_from(start: int, factor: float) -> None:
        for item in res[start:]:
            if item is not BREAK:
                item[1] *= factor

    for m in _ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])  # a lone backslash disappears, as in A1111
        elif piece == "(":
            round_open.append(len(res))
        elif piece == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            try:
                multiply_from(round_open.pop(), float(weight))
            except ValueError:
                raise ValueError(f"bad emphasis weight {weight!r} in prompt {text!r}") from None
        elif piece == ")" and round_open:
            multiply_from(round_open.pop(), EMPHASIS)
        elif piece == "]" and square_open:
            multiply_from(square_open.pop(), 1 / EMPHASIS)
        else:
            for i, part in enumerate(_BREAK.split(piece)):
                if i > 0:
                    res.append(BREAK)
                res.append([part, 1.0])
    for start in round_open:  # left open: closed at the end
        multiply_from(start, EMPHASIS)
    for start in square_open:
        multiply_from(start, 1 / EMPHASIS)
    if not res:
        res = [["", 1.0]]

    merged: list = [res[0]]
    for item in res[1:]:
        last = merged[-1]
        if item is not BREAK and last is not BREAK and item[1] == last[1]:
            last[0] += item[0]
        else:
            merged.append(item)
    return [item if item is BREAK else (item[0], item[1]) for item in merged]


def extract_loras(text: str) -> tuple[str, list[tuple[str, float]]]:
    """Take the `<lora:name:multiplier>` / `<lora:name>` tags out of a prompt.
    Returns (the text without them, [(name, multiplier)] in order)."""
    loras = []

    def take(m: re.Match) -> str:
        name, *args = m.group(1).split(":")
        if not name.strip() or len(args) > 1:
            raise ValueError(f"bad LoRA tag {m.group(0)!r}: expected <lora:name> or <lora:name:multiplier>")
        try:
            loras.append((name.strip(), float(args[0]) if args else 1.0))
        except ValueError:
            raise ValueError(f"bad LoRA multiplier in {m.group(0)!r}: {args[0]!r} is not a number") from None
        return ""

    return _LORA.sub(take, text), loras


@dataclass
class Chunk:
    """Prompt tokens with their weights and, for textual-inversion slots, the vector that
    replaces the token's embedding. While built: up to 75 tokens; `framed`: the 77 encoded."""

    tokens: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    vectors: list[torch.Tensor | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tokens)

    def append(self, token: int, weight: float, vector: torch.Tensor | None = None) -> None:
        self.tokens.append(token)
        self.weights.append(weight)
        self.vectors.append(vector)

    def split(self, at: int) -> Chunk:
        """Cut the chunk at `at`; returns the tail."""
        tail = Chunk(self.tokens[at:], self.weights[at:], self.vectors[at:])
        del self.tokens[at:], self.weights[at:], self.vectors[at:]
        return tail

    def framed(self, tok: ClipTokenizer, pad_id: int) -> Chunk:
        """[start] + tokens + end tokens up to 76 + [end]; after the first end token, the pad token
        (SD2 pads with "!"; A1111 writes end tokens and then replaces them)."""
        n = CHUNK - len(self)
        tokens = [tok.bos_id, *self.tokens, *[tok.eos_id] * (n + 1)]
        first_end = tokens.index(tok.eos_id)
        tokens[first_end + 1 :] = [pad_id] * (len(tokens) - first_end - 1)
        return Chunk(tokens, [1.0, *self.weights, *[1.0] * (n + 1)], [None, *self.vectors, *[None] * (n + 1)])


EmbeddingLookup = dict[int, list[tuple[list[int], torch.Tensor]]]


def embedding_lookup(embeddings: dict[str, torch.Tensor], tok: ClipTokenizer, pad_id: int) -> EmbeddingLookup:
    """{first token id of a name: [(the name's token ids, vectors (n, D))], longest name first}."""
    lookup: EmbeddingLookup = {}
    for name, vectors in embeddings.items():
        ids = tok.encode(name, pad_id=pad_id)
        if not ids:
            raise ValueError(f"embedding name {name!r} has no tokens")
        if not 1 <= len(vectors) <= CHUNK:
            raise ValueError(f"embedding {name!r} has {len(vectors)} vectors; 1 to {CHUNK} fit a chunk")
        lookup.setdefault(ids[0], []).append((ids, vectors))
    for entries in lookup.values():
        entries.sort(key=lambda e: len(e[0]), reverse=True)
    return lookup


def tokenize_prompt(text: str, tok: ClipTokenizer, *, pad_id: int = 49407, lookup: EmbeddingLookup | None = None,
                    comma_backtrack: int = COMMA_BACKTRACK) -> list[Chunk]:
    """A prompt in A1111 syntax (LoRA tags already removed) -> framed chunks of 77 tokens."""
    comma = tok.encoder[",</w>"]
    chunks: list[Chunk] = []
    chunk, last_comma = Chunk(), -1

    def close() -> None:
        nonlocal chunk, last_comma
        chunks.append(chunk.framed(tok, pad_id))
        chunk, last_comma = Chunk(), -1

    for piece in parse_prompt_attention(text):
        if piece is BREAK:
            close()
            continue
        words, weight = piece
        ids = tok.encode(words, pad_id=pad_id)
        pos = 0
        while pos < len(ids):
            if ids[pos] == comma:
                last_comma = len(chunk)
            elif comma_backtrack and len(chunk) == CHUNK and last_comma != -1 and CHUNK - last_comma <= comma_backtrack:
                tail = chunk.split(last_comma + 1)  # the words after the comma move on
                close()
                chunk = tail
            if len(chunk) == CHUNK:
                close()
            vectors, n_ids = find_embedding(lookup, ids, pos)
            if vectors is None:
                chunk.append(ids[pos], weight)
                pos += 1
                continue
            if len(chunk) + len(vectors) > CHUNK:
                close()
            for v in vectors:
                chunk.append(0, weight, v)  # id 0: a placeholder, its embedding is replaced
            pos += n_ids
    if len(chunk) or not chunks:
        close()
    return chunks


def find_embedding(lookup: EmbeddingLookup | None, ids: list[int], pos: int) -> tuple[torch.Tensor | None, int]:
    """The embedding whose name's tokens start at ids[pos] (longest match) and its token count."""
    for name_ids, vectors in (lookup or {}).get(ids[pos], []):
        if ids[pos : pos + len(name_ids)] == name_ids:
            return vectors, len(name_ids)
    return None, 1


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """A1111's "Original" emphasis. z: (B, L, D) encoder output; weights: (B, L).
    Scale each token's state by its weight, then each prompt's states so their mean is unchanged."""
    if bool((weights == 1).all()):
        return z
    mean = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights[..., None].to(z)
    return z * (mean / z.mean(dim=(1, 2), keepdim=True))


def encode_chunks(clip, batch: list[list[Chunk]], empty: Chunk, clip_skip: int | None = None) -> torch.Tensor:
    """Encode each prompt's framed chunks; prompts with fewer chunks get `empty` chunks (as A1111
    does), so every row has the same length. Returns (B, 77·k, D) in float32. The gradient reaches
    the chunks' vectors (textual-inversion training); `Pipeline.encode_prompt` runs it without one."""
    return encode_chunks_pooled(clip, batch, empty, clip_skip, pooled=False)[0]


def encode_chunks_pooled(clip, batch: list[list[Chunk]], empty: Chunk, clip_skip: int | None = None, *,
                         pooled: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`encode_chunks` and, for encoders with a text projection (SDXL's bigG), the pooled output of
    each prompt's first chunk (as A1111; emphasis does not touch it), else None."""
    device = clip.text_model.embeddings.token_embedding.weight.device
    out, first = [], None
    for i in range(max(len(chunks) for chunks in batch)):
        row = [chunks[i] if i < len(chunks) else empty for chunks in batch]
        tokens = torch.tensor([c.tokens for c in row], device=device)
        embeds = None
        if any(v is not None for c in row for v in c.vectors):
            embeds = clip.text_model.embeddings.token_embedding(tokens)  # (B, 77, D)
            for b, c in enumerate(row):
                for j, v in enumerate(c.vectors):
                    if v is not None:
                        embeds[b, j] = v.to(embeds)
        z, p = clip.encode(tokens, clip_skip, token_embeds=embeds, pooled=pooled and i == 0)
        first = p.float() if p is not None else first
        out.append(emphasize(z.float(), torch.tensor([c.weights for c in row], device=device)))
    return torch.cat(out, dim=1), first


def pad_to_same_length(cond: torch.Tensor, uncond: torch.Tensor, empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append encoded empty chunks `empty` (1, 77, D) to the shorter of cond / uncond (B, 77·k, D),
    as A1111 pads them, so guidance runs both in one UNet batch."""
    cond, uncond = pad_all([cond, uncond], empty)
    return cond, uncond


def pad_all(states: list[torch.Tensor], empty: torch.Tensor) -> list[torch.Tensor]:
    """Every (B, 77·k, D) tensor padded with encoded empty chunks to the longest one's length."""
    n = max(x.shape[1] for x in states)

    def pad(x: torch.Tensor) -> torch.Tensor:
        k = (n - x.shape[1]) // empty.shape[1]
        return torch.cat([x, empty.to(x).expand(x.shape[0], -1, -1).repeat(1, k, 1)], dim=1) if k else x

    return [pad(x) for x in states]
