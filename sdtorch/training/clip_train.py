"""Contrastive training of the CLIP text encoder with a small image tower (Radford et al. 2021).

The text tower is exactly the `ClipTextModel` that conditions Stable Diffusion (same module paths,
same tokenizer), so the trained text encoder drops into a model unchanged; the image tower is a
small ViT that exists only to give the text tower something to agree with (and, later, image
features for retrieval and FID).

Negatives are the other captions of the *local* micro-batch: under DistributedDataParallel each
process contrasts its own batch_size / (world * grad_accum) pairs and nothing is all-gathered,
so more processes give more, not larger, contrastive batches. A repeated caption or image in a
batch counts as a negative like any other.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sdtorch.conditioning.tokenizer import ClipTokenizer
from sdtorch.config import ClipConfig
from sdtorch.formats.atomic import save_safetensors
from sdtorch.formats.checkpoint import CheckpointError, load_strict, read_state_dict
from sdtorch.models.clip import ClipTextModel

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps the logit multiplier at 100 for stability
METADATA_KEYS = {"text": "clip_config", "image": "image_tower_config"}  # configs in the file's metadata


@dataclass(frozen=True)
class ImageTowerConfig:
    """A small Vision Transformer (Dosovitskiy et al. 2021) and the joint embedding size."""

    image_size: int = 64  # input side in pixels (square images)
    patch_size: int = 8  # side of each patch; image_size must be a multiple of it
    width: int = 256  # token width, and the size of the tower's (B, width) feature
    layers: int = 6  # transformer blocks
    heads: int = 4  # attention heads (width must be a multiple)
    mlp_ratio: int = 4  # MLP hidden size = mlp_ratio * width
    embed_dim: int = 256  # size of the joint text-image space the projections map to


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block, no mask: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        hidden = width * mlp_ratio
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, hidden), gelu=nn.GELU(), c_proj=nn.Linear(hidden, width)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ImageTower(nn.Module):
    """images (B, 3, S, S) in [-1, 1] -> class-token features (B, width).

    Module paths follow OpenAI CLIP's `VisionTransformer` (conv1, class_embedding, ln_pre,
    transformer.resblocks, ln_post), without its output projection (that is `ClipModel.image_projection`).
    """

    def __init__(self, cfg: ImageTowerConfig):
        super().__init__()
        if cfg.image_size % cfg.patch_size or cfg.width % cfg.heads:
            raise ValueError(f"image_size must be a multiple of patch_size and width of heads, got {cfg}")
        self.cfg = cfg
        n = (cfg.image_size // cfg.patch_size) ** 2
        self.conv1 = nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size, bias=False)
        scale = cfg.width**-0.5  # OpenAI's init of the class and position embeddings
        self.class_embedding = nn.Parameter(scale * torch.randn(cfg.width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(n + 1, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(
            *(ResidualAttentionBlock(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.layers)))
        self.ln_post = nn.LayerNorm(cfg.width)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        s = self.cfg.image_size
        if images.shape[1:] != (3, s, s):
            raise ValueError(f"expected images (B, 3, {s}, {s}), got {tuple(images.shape)}")
        x = self.conv1(images).flatten(2).transpose(1, 2)  # (B, N, D) patch tokens
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, N + 1, D)
        x = self.transformer.resblocks(self.ln_pre(x))
        return self.ln_post(x[:, 0])  # (B, D): the class token


class ClipModel(nn.Module):
    """Text tower (the SD text encoder) + image tower, projected into one normalised space."""

    def __init__(self, clip_cfg: ClipConfig, tower_cfg: ImageTowerConfig):
        super().__init__()
        self.text = ClipTextModel(clip_cfg)
        self.image = ImageTower(tower_cfg)
        self.text_projection = nn.Linear(clip_cfg.width, tower_cfg.embed_dim, bias=False)
        self.image_projection = nn.Linear(tower_cfg.width, tower_cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # log of the logit multiplier

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, L) -> unit-norm embeddings (B, embed_dim) of the end-token states.

        Attention is causal, so the end token never sees the padding after it: cutting the
        columns after the batch's last end token saves work and changes nothing.
        """
        tokens = tokens[:, : int(tokens.argmax(dim=-1).max()) + 1]
        pooled = self.text.pooled(tokens, self.text(tokens, clip_skip=1))  # (B, width)
        return F.normalize(self.text_projection(pooled).float(), dim=-1)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, S, S) in [-1, 1] -> unit-norm embeddings (B, embed_dim)."""
        return F.normalize(self.image_projection(self.image(images)).float(), dim=-1)

    def forward(self, tokens: torch.Tensor, images: torch.Tensor):
        """-> (text_emb (B, E), image_emb (B, E), log logit scale () clamped at log(100))."""
        return self.encode_text(tokens), self.encode_image(images), self.logit_scale.clamp(max=MAX_LOGIT_SCALE)


def contrastive_loss(text_emb: torch.Tensor, image_emb: torch.Tensor, logit_scale: torch.Tensor):
    """Symmetric InfoNCE: pair i is the positive of row and column i of the (B, B) logits.

    Returns (loss, image->text top-1 accuracy). Computed in float32 even under autocast (a bf16
    logit at scale 100 would be off by ~0.5).
    """
    with torch.autocast(text_emb.device.type, enabled=False):
        logits = logit_scale.float().exp() * image_emb.float() @ text_emb.float().T  # (B images, B captions)
        labels = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return loss, (logits.argmax(dim=1) == labels).float().mean()


class ClipJob:
    """Train `ClipModel` contrastively on image-caption batches (see the module docstring)."""

    def __init__(self, clip_cfg: ClipConfig, tower_cfg: ImageTowerConfig, *, preview: dict | None = None):
        self.clip_cfg, self.tower_cfg = clip_cfg, tower_cfg
        self.clip = ClipModel(clip_cfg, tower_cfg)
        self.modules = {"clip": self.clip}
        self.tokenizer = ClipTokenizer()
        self.preview = preview  # {"image": (N, 3, S, S), "text": N captions}: pictured by `samples`

    def tokens(self, texts: list[str]) -> torch.Tensor:  # (B, 77)
        return self.tokenizer(texts, pad_id=self.clip_cfg.pad_token_id)

    def loss(self, batch: dict, seeds: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        text_emb, image_emb, logit_scale = batch["models"]["clip"](self.tokens(batch["text"]), batch["image"])
        loss, acc = contrastive_loss(text_emb, image_emb, logit_scale)
        return loss, {"acc": acc.item(), "logit_scale": logit_scale.exp().item()}  # the multiplier itself

    @torch.no_grad()
    def samples(self, ema: dict[str, nn.Module], step: int):
        """The preview's cosine similarities: image i's thumbnail, then its row against captions 0..N-1
        (white = 1, black = -1); a trained model shows a bright diagonal."""
        if self.preview is None:
            return None
        images = self.preview["image"]
        text_emb, image_emb, _ = ema["clip"](self.tokens(list(self.preview["text"])), images)
        return similarity_picture(images, image_emb @ text_emb.T)

    def export(self, ema: dict[str, nn.Module], path: Path) -> Path:
        return save_clip_model(ema["clip"], path)


def similarity_picture(images: torch.Tensor, sim: torch.Tensor):  # -> PIL.Image
    """images (N, 3, S, S) in [-1, 1], sim (N, N) in [-1, 1] -> one (N*S, (N+1)*S) RGB picture."""
    from sdtorch.generate.pipeline import to_pil

    n, s = sim.shape[0], images.shape[-1]
    cells = ((sim.float().cpu().clamp(-1, 1) + 1) / 2).repeat_interleave(s, 0).repeat_interleave(s, 1)
    thumbs = torch.cat(list((images.float().cpu().clamp(-1, 1) + 1) / 2), dim=1)  # (3, N*S, S)
    return to_pil(torch.cat([thumbs, cells.expand(3, n * s, n * s)], dim=2)[None])[0]


def save_clip_model(model: ClipModel, path: str | Path) -> Path:
    """One .safetensors, atomically: the text encoder under HF names (`text_model.*`), `image.*`,
    `text_projection.weight`, `image_projection.weight`, `logit_scale`; both configs in the metadata."""
    path = Path(path)
    sd = {k.removeprefix("text."): v.contiguous() for k, v in model.state_dict().items()}
    metadata = {METADATA_KEYS["text"]: json.dumps(asdict(model.text.cfg)),
                METADATA_KEYS["image"]: json.dumps(asdict(model.image.cfg))}
    return save_safetensors(sd, path, metadata)


def load_clip_model(path: str | Path) -> ClipModel:
    """A file written by `save_clip_model` (or `ClipJob.export`) -> ClipModel in eval mode, strictly loaded."""
    sd, metadata = read_state_dict(path)
    if any(key not in metadata for key in METADATA_KEYS.values()):
        raise CheckpointError(f"{path} has no {' / '.join(METADATA_KEYS.values())} metadata: not a ClipJob export")
    clip_cfg = ClipConfig(**json.loads(metadata[METADATA_KEYS["text"]]))
    tower_cfg = ImageTowerConfig(**json.loads(metadata[METADATA_KEYS["image"]]))
    with torch.device("meta"):  # no random init: every weight comes from the file
        model = ClipModel(clip_cfg, tower_cfg)
    sd = {("text." + k if k.startswith("text_model.") else k): v for k, v in sd.items()}
    load_strict(model, sd, "CLIP", next(iter(sd.values())).dtype)
    return model.eval()


def load_text_encoder(path: str | Path) -> ClipTextModel:
    """Only the text tower of a `save_clip_model` file, as the ClipTextModel that conditions SD."""
    model = load_clip_model(path)
    return model.text
