"""Textual inversion (Gal et al. 2022): learn n new token vectors for a name, everything else frozen.

The vectors start as the token embeddings of an init word (A1111's rule: vector i is row
i·k // n of the word's k token rows) and are trained on UNetJob's denoising loss, with captions
that hold the name: a template drawn per sample ("a {} emoji" -> "a sks-style emoji"), or the
dataset's captions with the name put in place of their `{}`. A caption is encoded exactly as
`Pipeline.encode_prompt` encodes a prompt with a loaded embedding (`sdtorch.conditioning.prompts`: the name's
tokens give way to the n vectors, chunks of 75 tokens), so the trained file reproduces in
generation the text states it was trained with. The UNet, VAE and text encoder stay bit for bit
as they were; the loop (`sdtorch.training.train`) trains, averages (EMA), checkpoints and resumes the vectors.

Output: AUTOMATIC1111's `.pt` (`string_to_param`) and a `.safetensors` (`emb_params`) through
`sdtorch.conditioning.embeddings.save_embedding`, loaded by `--embeddings DIR`, A1111, ComfyUI and diffusers.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sdtorch.conditioning.embeddings import save_embedding
from sdtorch.conditioning.prompts import embedding_lookup, encode_chunks, tokenize_prompt
from sdtorch.conditioning.tokenizer import ClipTokenizer
from sdtorch.config import ModelConfig
from sdtorch.models.clip import ClipTextModel
from sdtorch.models.unet import UNetModel
from sdtorch.models.vae import AutoencoderKL
from sdtorch.training.jobs import UNetJob
from sdtorch.training.train import grid, rand_per_sample

PLACEHOLDER = "{}"  # where a template or caption takes the embedding's name
TEMPLATE_STREAM = 6  # the template of a sample is drawn from its seed's stream 6 (UNetJob uses 1 to 4)


class LearnedEmbedding(nn.Module):
    """The n token vectors being learned (what the file's `string_to_param` holds), and the text
    states of captions that use them. The frozen text encoder is an argument, not a submodule,
    so checkpoints and EMA copies hold the vectors only."""

    def __init__(self, name: str, vectors: torch.Tensor):
        super().__init__()
        self.name = name
        self.vectors = nn.Parameter(vectors.detach().clone().float())  # (n, D)

    def forward(self, clip: ClipTextModel, texts: list[str], tokenizer: ClipTokenizer, pad_id: int) -> torch.Tensor:
        """texts (already holding the name) -> text states (B, 77·k, D); the gradient reaches the vectors."""
        lookup = embedding_lookup({self.name: self.vectors}, tokenizer, pad_id)
        chunks = [tokenize_prompt(t, tokenizer, pad_id=pad_id, lookup=lookup) for t in texts]
        empty = tokenize_prompt("", tokenizer, pad_id=pad_id)[0]
        return encode_chunks(clip, chunks, empty)


def init_vectors(clip: ClipTextModel, tokenizer: ClipTokenizer, word: str, n: int, pad_id: int) -> torch.Tensor:
    """(n, D): the init word's token embeddings spread over n vectors, as A1111's `create_embedding`."""
    ids = tokenizer.encode(word, pad_id=pad_id)
    if not ids:
        raise ValueError(f"the init word {word!r} has no tokens")
    if n < 1:
        raise ValueError(f"an embedding needs at least 1 vector, got {n}")
    rows = clip.text_model.embeddings.token_embedding.weight.detach()[ids]  # (k, D)
    return rows[[i * len(ids) // n for i in range(n)]].clone()


class EmbeddingJob:
    """Textual-inversion training for `sdtorch.training.train.train` (see the module docstring).
    templates: captions with a `{}` for the name, one drawn per sample; empty: the dataset's
    captions, each with a `{}`."""

    def __init__(self, cfg: ModelConfig, unet: UNetModel, vae: AutoencoderKL, clip: ClipTextModel, *,
                 name: str, init_word: str = "*", vectors: int = 1, templates: list[str] | tuple[str, ...] = (),
                 preview_prompts: list[str] | None = None):
        if not name.strip() or Path(name).name != name:
            raise ValueError(f"the embedding name must be a word that can be a file name, got {name!r}")
        unet.eval().requires_grad_(False)
        # UNetJob's loss on the text states computed here; no caption dropout: a dropped caption
        # holds no name and would teach the vectors nothing.
        self.base = UNetJob(cfg, vae, clip, unet=unet, caption_dropout=0.0, text_grad=True)
        self.tokenizer, self.pad_id = self.base.tokenizer, cfg.clip.pad_token_id
        self.embedding = LearnedEmbedding(name, init_vectors(clip, self.tokenizer, init_word, vectors, self.pad_id))
        self.modules = {"embedding": self.embedding}
        self.templates = list(templates)
        self._filled: dict[str, str] = {}
        for template in self.templates:
            self.fill(template)
        self.preview_prompts = [p.replace(PLACEHOLDER, name) for p in preview_prompts or []]

    @property
    def name(self) -> str:
        return self.embedding.name

    def fill(self, text: str) -> str:
        """A template or caption with the name in place of each `{}`; checked (once per text) that
        the prompt reader finds the name exactly there."""
        if text not in self._filled:
            count = text.count(PLACEHOLDER)
            if not count:
                raise ValueError(f"caption {text!r} has no {PLACEHOLDER} where the embedding's name goes (give "
                                 f"templates, e.g. \"a {PLACEHOLDER} emoji\", or put {PLACEHOLDER} in the captions)")
            filled = text.replace(PLACEHOLDER, self.name)
            n = len(self.embedding.vectors)
            lookup = embedding_lookup({self.name: torch.zeros(n, 1)}, self.tokenizer, self.pad_id)
            chunks = tokenize_prompt(filled, self.tokenizer, pad_id=self.pad_id, lookup=lookup)
            found = sum(v is not None for c in chunks for v in c.vectors) // n
            if found != count:
                raise ValueError(f"{filled!r} is read with the name {self.name!r} {found} times, not {count}: "
                                 f"choose a name that is no word of the caption and stands apart from its neighbours")
            self._filled[text] = filled
        return self._filled[text]

    def captions(self, texts: list[str], seeds: torch.Tensor) -> list[str]:
        """The batch's captions with the name: a template per sample (drawn from its seed), else its own."""
        if not self.templates:
            return [self.fill(t) for t in texts]
        n = len(self.templates)
        picks = (rand_per_sample(seeds, TEMPLATE_STREAM) * n).long().clamp(max=n - 1)  # (B,)
        return [self.fill(self.templates[i]) for i in picks.tolist()]

    def loss(self, batch: dict, seeds: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        texts = self.captions(batch["text"], seeds)
        context = batch["models"]["embedding"](self.base.clip, texts, self.tokenizer, self.pad_id)  # via DDP
        # UNetJob reads its text states from models["clip"](tokens); here they are the ones just
        # computed, and its plain tokens of the same captions go unused.
        models = {"unet": self.base.unet, "clip": lambda tokens: context}
        inner = {k: v for k, v in batch.items() if k != "models"} | {"text": texts, "models": models}
        return self.base.loss(inner, seeds)

    @torch.no_grad()
    def samples(self, ema: dict[str, nn.Module], step: int):
        if not self.preview_prompts:
            return None
        from sdtorch.generate.pipeline import Pipeline

        pipe = Pipeline(self.base.cfg, self.base.unet, self.base.vae, self.base.clip)
        pipe.embeddings = {self.name: ema["embedding"].vectors.detach().clone()}
        images = []
        for prompt in self.preview_prompts:
            images += pipe.generate(prompt, steps=20, sampler="dpmpp_2m", cfg_scale=5.0, seed=0, progress=False)
        return grid(images, cols=min(8, len(images)))

    def export(self, ema: dict[str, nn.Module], path: Path, *, step: int | None = None) -> Path:
        """The embedding as `path` (.pt: A1111's format; .safetensors: `emb_params`), float32."""
        return save_embedding(path, self.name, ema["embedding"].vectors.detach().float(), step=step)
