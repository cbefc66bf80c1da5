"""Condition encoders: any module that turns an input tensor into the tokens the UNet's
cross-attention reads, in place of the text encoder's states or beside them.

`ConditionEncoder` wraps a backbone (a module mapping (B, *input_shape) to a code (B, C, *cells)
or to tokens (B, T, C)) and adds what every such seam needs: a linear projection to the UNet's
context width, a learned position per token, a layer norm, an optional pooled vector, and the
"empty" condition classifier-free guidance pairs it with (learned, trained by condition dropout,
or fixed zeros). `mode` says whether the tokens replace the text states ("replace") or are
appended to them along the token axis ("join").

Backbones are data: `BACKBONES` names each kind with its module and config class, so an encoder
saved into a checkpoint (`sdtorch.formats.checkpoint.save(..., condition_encoder=)`: its
`state_dict` under `condition_encoder.*`, `spec()` in the metadata)
loads strictly without code naming it (`build(spec)`). `register_backbone` adds a kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from sdtorch.models.condition import Condition
from sdtorch.models.voxel import VoxelAEConfig, VoxelEncoder

Mode = Literal["replace", "join"]


@dataclass(frozen=True)
class Backbone:
    module: type[nn.Module]  # module(config)
    config: type  # a dataclass with to_dict / from_dict
    input_shape: object  # config -> the shape of one input, without the batch axis


BACKBONES: dict[str, Backbone] = {
    "voxel": Backbone(VoxelEncoder, VoxelAEConfig, lambda c: (c.depth, c.size, c.size)),
}


def register_backbone(kind: str, backbone: Backbone) -> None:
    BACKBONES[kind] = backbone


class ConditionEncoder(nn.Module):
    """backbone output -> (B, tokens, dim) cross-attention tokens (+ a pooled (B, pooled) vector)."""

    def __init__(self, kind: str, config, *, dim: int, tokens: int, code_dim: int, pooled: int = 0,
                 mode: Mode = "replace", learned_empty: bool = True):
        super().__init__()
        if kind not in BACKBONES:
            raise ValueError(f"unknown condition-encoder backbone {kind!r}; known: {', '.join(sorted(BACKBONES))}")
        if mode not in ("replace", "join"):
            raise ValueError(f"mode must be 'replace' or 'join', got {mode!r}")
        self.kind, self.config, self.mode = kind, config, mode
        self.input_shape = tuple(BACKBONES[kind].input_shape(config))
        self.backbone = BACKBONES[kind].module(config)
        self.proj = nn.Linear(code_dim, dim)
        self.position = nn.Parameter(torch.randn(tokens, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.pool = nn.Linear(dim, pooled) if pooled else None
        empty = torch.zeros(tokens, dim)
        if learned_empty:
            self.empty_tokens = nn.Parameter(empty)
        else:
            self.register_buffer("empty_tokens", empty)
        self.dims = dict(dim=dim, tokens=tokens, code_dim=code_dim, pooled=pooled, learned_empty=learned_empty)

    def spec(self) -> dict:
        """What `build` needs to make this encoder again (JSON-serialisable)."""
        return {"kind": self.kind, "config": self.config.to_dict(), "mode": self.mode, **self.dims}

    def batched(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """One input (*input_shape) or a batch (1 or `batch`, *input_shape) -> (batch, *input_shape)."""
        x = torch.as_tensor(x)
        if tuple(x.shape) == self.input_shape:
            x = x.unsqueeze(0)
        if tuple(x.shape[1:]) != self.input_shape or x.shape[0] not in (1, batch):
            raise ValueError(f"condition input must have shape {self.input_shape} or (1 or {batch}, "
                             f"{', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}")
        return x.expand(batch, *self.input_shape)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        code = self.backbone(x)
        if code.dim() > 3:  # (B, C, *cells): one token per cell
            code = code.flatten(2).transpose(1, 2)
        if code.shape[1] != self.position.shape[0]:
            raise ValueError(f"backbone gave {code.shape[1]} tokens, the encoder was built for {self.position.shape[0]}")
        return self.norm(self.proj(code) + self.position)

    def _condition(self, tokens: torch.Tensor) -> Condition:
        vector = self.pool(tokens.mean(1)) if self.pool is not None else None
        return Condition(tokens, vector)

    def forward(self, x: torch.Tensor) -> Condition:
        return self._condition(self.tokens(x))

    def empty(self, batch: int) -> Condition:
        """The unconditional condition guidance pairs with (and condition dropout trains)."""
        return self._condition(self.empty_tokens.unsqueeze(0).expand(batch, -1, -1))

    def dropped(self, x: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        """Tokens of `x`, with the rows where `drop` (B,) is true replaced by the empty tokens."""
        tokens = self.tokens(x)
        return torch.where(drop.view(-1, 1, 1), self.empty_tokens.to(tokens.dtype).expand_as(tokens), tokens)


def build(spec: dict) -> ConditionEncoder:
    """The encoder `spec()` describes (weights random until loaded)."""
    spec = dict(spec)
    kind = spec.pop("kind")
    if kind not in BACKBONES:
        raise ValueError(f"unknown condition-encoder backbone {kind!r}; known: {', '.join(sorted(BACKBONES))}")
    config = BACKBONES[kind].config.from_dict(spec.pop("config"))
    return ConditionEncoder(kind, config, **spec)


def for_backbone(kind: str, config, dim: int, **options) -> ConditionEncoder:
    """An encoder whose token count and code width are read off the backbone's output."""
    probe = BACKBONES[kind].module(config).eval()
    with torch.no_grad():
        code = probe(torch.zeros(1, *BACKBONES[kind].input_shape(config)))
    tokens, code_dim = (code.shape[2:].numel(), code.shape[1]) if code.dim() > 3 else (code.shape[1], code.shape[2])
    return ConditionEncoder(kind, config, dim=dim, tokens=int(tokens), code_dim=int(code_dim), **options)
