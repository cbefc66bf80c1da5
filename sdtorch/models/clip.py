"""CLIP text transformer (the text tower of OpenAI CLIP ViT-L/14 and OpenCLIP ViT-H/14).

Module paths follow Hugging Face `CLIPTextModel`, which is how SD 1.x checkpoints store the text
encoder under `cond_stage_model.transformer.`. SD 2.x files store OpenCLIP names under
`cond_stage_model.model.`; `sdtorch.formats.diffusers.openclip_to_hf` renames them on load.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sdtorch.config import ClipConfig


class ClipAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, L, D)
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # text is read left to right
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """The sigmoid approximation of GELU that OpenAI CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


class ClipMLP(nn.Module):
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = quick_gelu if act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ClipEncoderLayer(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.self_attn = ClipAttention(cfg.width, cfg.heads)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)
        self.mlp = ClipMLP(cfg.width, cfg.width * cfg.mlp_ratio, cfg.act)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.layers = nn.ModuleList(ClipEncoderLayer(cfg) for _ in range(cfg.layers))


class ClipEmbeddings(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        token = torch.empty(cfg.vocab_size, cfg.width)
        position = torch.empty(cfg.max_length, cfg.width)
        if token.device.type != "meta":  # CLIP's init; on meta (about to load) initialising costs ~1 s
            nn.init.normal_(token, std=0.02)
            nn.init.normal_(position, std=0.01)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width, _weight=token)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width, _weight=position)

    def forward(self, tokens: torch.Tensor, token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L) -> (B, L, D). token_embeds (B, L, D): used instead of the token table's rows
        (textual inversion puts its learned vectors there)."""
        x = self.token_embedding(tokens) if token_embeds is None else token_embeds
        return x + self.position_embedding.weight[: tokens.shape[1]]


class ClipTextTransformer(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.embeddings = ClipEmbeddings(cfg)
        self.encoder = ClipEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width, eps=cfg.layer_norm_eps)


class ClipTextModel(nn.Module):
    """tokens (B, L) -> hidden states (B, L, width) that condition the UNet."""

    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg
        self.text_model = ClipTextTransformer(cfg)
        if cfg.projection_dim:  # CLIPTextModelWithProjection (SDXL's bigG): the pooled output's projection
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def forward(self, tokens: torch.Tensor, clip_skip: int | None = None, *,
                token_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """clip_skip counts as AUTOMATIC1111 does: 1 = last layer, 2 = penultimate, ...

        The final layer norm is applied to whichever layer is taken (as SD2 and A1111 do) unless
        the config says otherwise (SDXL). token_embeds (B, L, D): the token embeddings to use
        instead of looking `tokens` up.
        """
        return self.encode(tokens, clip_skip, token_embeds=token_embeds, pooled=False)[0]

    def encode(self, tokens: torch.Tensor, clip_skip: int | None = None, *, token_embeds: torch.Tensor | None = None,
               pooled: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden states as `forward`, the projected pooled output (B, projection_dim) or None).
        The pooled output is the last layer's, after the final norm, at each end token, through
        `text_projection` (CLIPTextModelWithProjection's `text_embeds`)."""
        skip = clip_skip or self.cfg.clip_skip
        layers = self.text_model.encoder.layers
        if not 1 <= skip <= len(layers):
            raise ValueError(f"clip_skip must be in 1..{len(layers)}, got {skip}")
        pooled = pooled and self.cfg.projection_dim > 0
        x = self.text_model.embeddings(tokens, token_embeds)
        hidden = None
        for i, layer in enumerate(layers[: len(layers) if pooled else len(layers) - skip + 1]):
            x = layer(x)
            if i == len(layers) - skip:
                hidden = x
        norm = self.text_model.final_layer_norm
        hidden = norm(hidden) if self.cfg.final_norm else hidden
        if not pooled:
            return hidden, None
        return hidden, self.text_projection(self.pooled(tokens, norm(x)))

    def pooled(self, tokens: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The state at each sequence's end token (the highest id, 49407): (B, width)."""
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), tokens.argmax(dim=-1)]
