"""ControlNet files: the original layout (`control_model.*`, lllyasviel's control_v11 .pth and
.safetensors files, or the same keys without the prefix), diffusers `ControlNetModel` folders
(config.json + weights) and diffusers-keyed single files (as many SDXL ControlNets are shared).

The hyper-parameters are read from key names and shapes; what shapes cannot tell (the attention
head layout, the GroupNorm groups) comes from the UNet the ControlNet is to control, and a
ControlNet whose blocks do not match that UNet is refused, naming both families.
"""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import torch

from sdtorch.config import UNetConfig
from sdtorch.families import FAMILIES
from sdtorch.formats import diffusers as convert
from sdtorch.formats.checkpoint import indices, detect_unet, load_strict
from sdtorch.formats.files import CheckpointError, read_state_dict
from sdtorch.models.controlnet import ControlNet, ControlNetConfig

PREFIX = "control_model."  # the original files' prefix (cldm's `control_model`)
StateDict = dict[str, torch.Tensor]


def _hint_table(cfg: ControlNetConfig) -> dict[str, str]:
    """Original -> diffusers module paths of what a ControlNet has beyond a UNet's encoder."""
    n = len(cfg.embed_channels) - 1
    table = {"input_hint_block.0": "controlnet_cond_embedding.conv_in",
             f"input_hint_block.{4 * n + 2}": "controlnet_cond_embedding.conv_out",
             "middle_block_out.0": "controlnet_mid_block"}
    table |= {f"input_hint_block.{2 * (j + 1)}": f"controlnet_cond_embedding.blocks.{j}" for j in range(2 * n)}
    blocks = 1 + len(cfg.unet.channel_mult) * (cfg.unet.num_res_blocks + 1) - 1
    return table | {f"zero_convs.{i}.0": f"controlnet_down_blocks.{i}" for i in range(blocks)}


def to_diffusers(sd: StateDict, cfg: ControlNetConfig) -> StateDict:
    """Original ControlNet keys (no `control_model.`) -> diffusers `ControlNetModel` keys."""
    return convert.rename_keys(sd, convert.unet_table(cfg.unet) | _hint_table(cfg))


def from_diffusers(sd: StateDict, cfg: ControlNetConfig) -> StateDict:
    """diffusers `ControlNetModel` keys -> original keys (no `control_model.`)."""
    return convert.rename_keys(sd, convert.invert(convert.unet_table(cfg.unet) | _hint_table(cfg)))


def detect(sd: StateDict, like: UNetConfig | None = None) -> ControlNetConfig:
    """The config of original-layout ControlNet weights (no prefix). `like`: the controlled UNet's
    config, whose head layout and GroupNorm groups the ControlNet shares."""
    hint = indices(sd, r"input_hint_block\.(\d+)\.weight")
    outs = [sd[f"input_hint_block.{i}.weight"].shape[0] for i in hint[:-1]]
    unet = detect_unet(sd, out_channels=4)
    if like is not None:
        unet = replace(unet, num_heads=like.num_heads, num_head_channels=like.num_head_channels,
                       norm_groups=like.norm_groups)
    return ControlNetConfig(unet, sd["input_hint_block.0.weight"].shape[1], tuple(outs[0::2]))


def detect_diffusers(sd: StateDict) -> ControlNetConfig:
    """Enough of a config to rename diffusers keys (levels, blocks per level, attention, hint widths)."""
    levels = indices(sd, r"down_blocks\.(\d+)\.")
    mc = sd["conv_in.weight"].shape[0]
    mult = tuple(sd[f"down_blocks.{lv}.resnets.0.conv2.weight"].shape[0] // mc for lv in levels)
    attn = tuple(2**lv for lv in levels if f"down_blocks.{lv}.attentions.0.proj_in.weight" in sd)
    blocks = len(indices(sd, r"controlnet_cond_embedding\.blocks\.(\d+)\."))
    embed = [sd["controlnet_cond_embedding.conv_in.weight"].shape[0]]
    embed += [sd[f"controlnet_cond_embedding.blocks.{j}.weight"].shape[0] for j in range(1, blocks, 2)]
    adm = sd["add_embedding.linear_1.weight"].shape[1] if "add_embedding.linear_1.weight" in sd else 0
    unet = UNetConfig(model_channels=mc, channel_mult=mult, attention_resolutions=attn, adm_in_channels=adm,
                      num_res_blocks=len(indices(sd, r"down_blocks\.0\.resnets\.(\d+)\.")))
    return ControlNetConfig(unet, embed_channels=tuple(embed))


def read(path: str | Path) -> StateDict:
    """Original-layout state dict (no prefix) of a ControlNet file or diffusers folder."""
    path = Path(path)
    if path.is_dir():
        weights = [path / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")]
        found = next((w for w in weights if w.exists()), None)
        if found is None:
            raise CheckpointError(f"{path} is not a diffusers ControlNet folder (no diffusion_pytorch_model weights)")
        path = found
    sd, _ = read_state_dict(path)
    if any(k.startswith(PREFIX) for k in sd):
        sd = {k[len(PREFIX):]: v for k, v in sd.items() if k.startswith(PREFIX)}
    elif "controlnet_cond_embedding.conv_in.weight" in sd:
        sd = from_diffusers(sd, detect_diffusers(sd))
    if "input_hint_block.0.weight" not in sd:
        unet = " (it looks like a Stable Diffusion checkpoint)" if any(k.startswith("model.diffusion_model.") for k in sd) else ""
        raise CheckpointError(f"{path} is not a ControlNet{unet}: no input_hint_block / controlnet_cond_embedding keys")
    return sd


def family_label(cfg: UNetConfig) -> str:
    """The family whose UNets a config's context width and vector fit ('SD 1.x', 'SDXL', or 'custom')."""
    for family in FAMILIES.values():
        if family.context_dim == cfg.context_dim and family.model_channels == cfg.model_channels:
            return family.label
    return f"custom (context {cfg.context_dim}, {cfg.model_channels} channels)"


def check_fits(cfg: ControlNetConfig, unet: UNetConfig, name: str = "the ControlNet") -> None:
    """Refuse a ControlNet whose residuals cannot be added to this UNet's skip connections."""
    fields = ("model_channels", "channel_mult", "num_res_blocks", "context_dim", "adm_in_channels")
    diff = [f for f in fields if getattr(cfg.unet, f) != getattr(unet, f)]
    if diff:
        theirs, ours = family_label(cfg.unet), family_label(unet)
        what = f"a ControlNet for {theirs}" if theirs != ours else "a ControlNet of another shape"
        raise CheckpointError(f"{name} is {what} and cannot control this {ours} model "
                              f"(differs in {', '.join(diff)})")


def load(path: str | Path, like: UNetConfig, *, dtype: torch.dtype = torch.float32,
         device: str | torch.device = "cpu") -> ControlNet:
    """A ControlNet file or folder -> a `ControlNet` that fits the UNet of config `like`."""
    sd = read(path)
    cfg = detect(sd, like)
    check_fits(cfg, like, Path(path).name)
    with torch.device("meta"):
        model = ControlNet(cfg)
    load_strict(model, sd, "ControlNet", dtype, consume=True)
    model.title = name_of(path)
    return model.to(device).eval()


def name_of(path: str | Path) -> str:
    """A1111's model name of a ControlNet file: its stem ('control_v11p_sd15_canny')."""
    return re.sub(r"\.(safetensors|pth|ckpt|pt|bin)$", "", Path(path).name)


def save(path: str | Path, model: ControlNet, dtype: torch.dtype | None = None) -> Path:
    """Write a ControlNet in the original layout (`control_model.*`), as .safetensors, atomically."""
    from sdtorch.formats.atomic import save_safetensors

    sd = {PREFIX + k: (v.to(dtype) if dtype and v.is_floating_point() else v).contiguous()
          for k, v in model.state_dict().items()}
    return save_safetensors(sd, path, {})
