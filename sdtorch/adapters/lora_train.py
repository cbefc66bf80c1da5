"""LoRA networks made for training, and LoRA files written in kohya's format (what A1111, ComfyUI,
Civitai and diffusers load)."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

from sdtorch.adapters.lora import LAYERS, TEXT_LAYERS, LoRA, LoRANetwork, _kohya, _layers, diffusers_paths
from sdtorch.config import UNetConfig
from sdtorch.formats.atomic import save_safetensors
from sdtorch.models.clip import ClipTextModel
from sdtorch.models.unet import UNetModel


def new_network(unet: UNetModel, clip: ClipTextModel, *, rank: int = 4, alpha: float | None = None,
                layers: tuple[str, ...] = ("attn",), text_encoder: bool = False,
                generator: torch.Generator | None = None) -> LoRANetwork:
    """A trainable network (kohya's initialisation: every LoRA starts as the identity).

    layers: groups of UNet layers from `LAYERS`; text_encoder: also the text encoder's attention
    and MLP Linears, in the layers its output is read from (clip skip).
    """
    unknown = set(layers) - set(LAYERS)
    if unknown or not layers:
        raise ValueError(f"unknown LoRA layer group(s) {sorted(unknown)}; choose from {', '.join(LAYERS)}")
    pattern = "|".join(f"(?:{LAYERS[g]})" for g in layers)
    targets = [("unet", p) for p in _layers(unet) if re.search(pattern, p)]
    if text_encoder:
        used = len(clip.text_model.encoder.layers) - clip.cfg.clip_skip + 1  # later layers never run
        keep = tuple(f"text_model.encoder.layers.{i}." for i in range(used))
        targets += [("clip", p) for p in _layers(clip) if p.startswith(keep) and re.search(TEXT_LAYERS, p)]
    models = {"unet": unet, "clip": clip}
    loras = [LoRA.new(models[m].get_submodule(p), rank, alpha, generator=generator) for m, p in targets]
    return LoRANetwork(targets, loras, name="lora")


def kohya_state_dict(network: LoRANetwork, cfg: UNetConfig) -> dict[str, Tensor]:
    """The network as kohya's sd-scripts saves it (`lora_unet_<diffusers path>`, `lora_te_...`; for
    SDXL UNets, as its sdxl scripts do, the original-layout path)."""
    paths = [p for m, p in network.targets if m == "unet"]
    unet_paths = {p: p for p in paths} if cfg.adm_in_channels else diffusers_paths(cfg, paths)
    sd = {}
    for (model, path), lora in zip(network.targets, network.loras):
        name = _kohya(model, unet_paths[path] if model == "unet" else path)
        sd[f"{name}.lora_down.weight"] = lora.down.detach().contiguous()
        sd[f"{name}.lora_up.weight"] = lora.up.detach().contiguous()
        sd[f"{name}.alpha"] = torch.tensor(lora.alpha)
    return sd


def save(network: LoRANetwork, path: str | Path, cfg: UNetConfig, *, v2: bool = False,
         metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write a kohya-format .safetensors (what A1111, ComfyUI, Civitai and diffusers load), with
    kohya's `ss_network_*` metadata, atomically."""

    sd = {k: (v.to(dtype) if dtype and k.endswith(".weight") else v) for k, v in kohya_state_dict(network, cfg).items()}
    linear = [lora for lora in network.loras if lora.conv is None or lora.down.shape[2:] == (1, 1)]
    conv = [lora for lora in network.loras if lora not in linear]
    meta = {"ss_network_module": "networks.lora", "ss_v2": str(v2), "ss_base_model_version": "sd_v2" if v2 else "sd_v1"}
    if linear:
        meta["ss_network_dim"], meta["ss_network_alpha"] = _most_common(linear)
    if conv:
        dim, alpha = _most_common(conv)
        meta["ss_network_args"] = json.dumps({"conv_dim": dim, "conv_alpha": alpha})
    meta |= metadata or {}
    return save_safetensors(sd, path, meta)


def _most_common(loras: list[LoRA]) -> tuple[str, str]:
    rank, alpha = Counter((lora.rank, lora.alpha) for lora in loras).most_common(1)[0][0]
    return str(rank), f"{alpha:g}"
