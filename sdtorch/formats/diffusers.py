"""Converters between the original (CompVis/LDM) layout and the Hugging Face formats.

The original single-file layout is canonical in sdtorch; every other format has exactly one
converter here. All functions are pure: state dicts (`dict[str, Tensor]`) and config dicts in,
new dicts out; tensors are shared, not copied, except where a reshape or split is needed.

Sides of each converter:
- UNet: original keys without `model.diffusion_model.`  <->  diffusers `UNet2DConditionModel`.
- VAE: original keys without `first_stage_model.`  <->  diffusers `AutoencoderKL`.
- SD2 text encoder: OpenCLIP keys without `cond_stage_model.model.`  <->  HF `text_model.…`.
  (SD1 files already store HF `CLIPTextModel` names under `cond_stage_model.transformer.`.)

Renaming is by module prefix: a table maps original module paths to diffusers module paths and a
key is renamed by its longest prefix found in the table. A key that matches nothing is an error.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from sdtorch.config import ModelConfig, UNetConfig, VAEConfig
from sdtorch.families import PREFIXES, family_of
from sdtorch.formats.diffusers_config import config_from_diffusers
from sdtorch.formats.files import read_state_dict

StateDict = dict[str, Tensor]

# ---------------------------------------------------------------------------------------------
# Generic prefix renaming


def rename_keys(sd: StateDict, table: dict[str, str]) -> StateDict:
    """Rename every key by its longest module prefix found in `table`."""
    out = {}
    for key, value in sd.items():
        parts = key.split(".")
        for i in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:i])
            if prefix in table:
                out[".".join([table[prefix], *parts[i:]])] = value
                break
        else:
            raise KeyError(f"no conversion rule for key {key!r}")
    return out


def invert(table: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in table.items()}


def _expand(pairs: list[tuple[str, str]], inner: dict[str, str]) -> dict[str, str]:
    """For each (original, diffusers) module pair, map each inner submodule name."""
    return {f"{o}.{a}": f"{d}.{b}" for o, d in pairs for a, b in inner.items()}


# ---------------------------------------------------------------------------------------------
# UNet

_UNET_RESNET = {  # ldm ResBlock -> diffusers ResnetBlock2D
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}


def unet_table(cfg: UNetConfig) -> dict[str, str]:
    """Original module path -> diffusers module path for one UNet configuration.

    Original input blocks: 0 is conv_in, then per level `num_res_blocks` (ResBlock[, attention])
    blocks followed by one downsampler block (not on the last level). Output blocks: per level,
    from the deepest up, `num_res_blocks + 1` (ResBlock[, attention][, upsampler]) blocks.
    """
    n, levels = cfg.num_res_blocks, len(cfg.channel_mult)
    has_attn = [2**level in cfg.attention_resolutions for level in range(levels)]
    table = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "middle_block.1": "mid_block.attentions.0",
        "out.0": "conv_norm_out",
        "out.2": "conv_out",
    }
    if cfg.adm_in_channels:  # SDXL's vector embedding
        table |= {"label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2"}
    if cfg.num_classes:  # class labels (the x4 upscaler's noise level)
        table["label_emb"] = "class_embedding"
    resnets = [("middle_block.0", "mid_block.resnets.0"), ("middle_block.2", "mid_block.resnets.1")]
    for level in range(levels):
        for j in range(n):
            i = 1 + level * (n + 1) + j
            resnets.append((f"input_blocks.{i}.0", f"down_blocks.{level}.resnets.{j}"))
            if has_attn[level]:
                table[f"input_blocks.{i}.1"] = f"down_blocks.{level}.attentions.{j}"
        if level < levels - 1:
            i = 1 + level * (n + 1) + n
            table[f"input_blocks.{i}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
    for up in range(levels):  # diffusers up_blocks.up is level (levels - 1 - up)
        attn = has_attn[levels - 1 - up]
        for j in range(n + 1):
            i = up * (n + 1) + j
            resnets.append((f"output_blocks.{i}.0", f"up_blocks.{up}.resnets.{j}"))
            if attn:
                table[f"output_blocks.{i}.1"] = f"up_blocks.{up}.attentions.{j}"
        if up < levels - 1:
            i = up * (n + 1) + n
            table[f"output_blocks.{i}.{2 if attn else 1}.conv"] = f"up_blocks.{up}.upsamplers.0.conv"
    return table | _expand(resnets, _UNET_RESNET)


def unet_from_diffusers(sd: StateDict, cfg: UNetConfig) -> StateDict:
    """diffusers `UNet2DConditionModel` state dict -> original keys (no `model.diffusion_model.`).

    Transformer internals (attn1/attn2/ff/norm1-3, proj_in/proj_out) keep their names and shapes:
    proj_in/proj_out are 1x1 convs in both formats for SD1 and Linear in both for SD2.
    """
    return rename_keys(sd, invert(unet_table(cfg)))


def unet_to_diffusers(sd: StateDict, cfg: UNetConfig) -> StateDict:
    """Original UNet keys (no `model.diffusion_model.`) -> diffusers `UNet2DConditionModel`."""
    return rename_keys(sd, unet_table(cfg))


# ---------------------------------------------------------------------------------------------
# VAE

_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "nin_shortcut": "conv_shortcut"}
_VAE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_VAE_ATTN_1X1 = ("to_q", "to_k", "to_v", "to_out.0")  # 1x1 Conv2d in ldm, Linear in diffusers


def _vae_table(cfg: VAEConfig) -> dict[str, str]:
    """Original module path -> diffusers module path. The decoder's `up.i` is diffusers'
    `up_blocks.(levels - 1 - i)`: ldm builds the decoder from the deepest level down by index."""
    n, levels = cfg.num_res_blocks, len(cfg.ch_mult)
    table = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    resnets = []
    for part in ("encoder", "decoder"):
        for name in ("conv_in", "conv_out"):
            table[f"{part}.{name}"] = f"{part}.{name}"
        table[f"{part}.norm_out"] = f"{part}.conv_norm_out"
        resnets += [(f"{part}.mid.block_{k + 1}", f"{part}.mid_block.resnets.{k}") for k in (0, 1)]
        table |= _expand([(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0")], _VAE_ATTN)
    for i in range(levels):
        resnets += [(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}") for j in range(n)]
        if i < levels - 1:
            table[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
        up = levels - 1 - i
        resnets += [(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{up}.resnets.{j}")
                    for j in range(n + 1)]
        if i > 0:
            table[f"decoder.up.{i}.upsample.conv"] = f"decoder.up_blocks.{up}.upsamplers.0.conv"
    return table | _expand(resnets, _VAE_RESNET)


def _is_vae_attn_weight(diffusers_key: str) -> bool:
    return ".mid_block.attentions.0." in diffusers_key and diffusers_key.endswith(
        tuple(f"{name}.weight" for name in _VAE_ATTN_1X1)
    )


def vae_from_diffusers(sd: StateDict, cfg: VAEConfig) -> StateDict:
    """diffusers `AutoencoderKL` state dict -> original keys (no `first_stage_model.`).

    Mid-block attention q/k/v/proj_out weights: Linear (C, C) -> 1x1 conv (C, C, 1, 1).
    """
    sd = {k: v[:, :, None, None] if _is_vae_attn_weight(k) else v for k, v in sd.items()}
    return rename_keys(sd, invert(_vae_table(cfg)))


def vae_to_diffusers(sd: StateDict, cfg: VAEConfig) -> StateDict:
    """Original VAE keys (no `first_stage_model.`) -> diffusers `AutoencoderKL`."""
    out = rename_keys(sd, _vae_table(cfg))
    return {k: v[:, :, 0, 0] if _is_vae_attn_weight(k) else v for k, v in out.items()}


# ---------------------------------------------------------------------------------------------
# OpenCLIP text encoder (SD2)

_OPENCLIP = {  # OpenCLIP module path -> HF CLIPTextModel module path (per layer: see _OPENCLIP_LAYER)
    "token_embedding": "text_model.embeddings.token_embedding",
    "ln_final": "text_model.final_layer_norm",
}
_OPENCLIP_LAYER = {"ln_1": "layer_norm1", "attn.out_proj": "self_attn.out_proj", "ln_2": "layer_norm2",
                   "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
_POSITIONAL = ("positional_embedding", "text_model.embeddings.position_embedding.weight")
OPENCLIP_UNUSED = ("text_projection", "logit_scale")  # the CLIP loss head; SD never uses it


def _openclip_table(layers: int) -> dict[str, str]:
    pairs = [(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}") for i in range(layers)]
    return _OPENCLIP | _expand(pairs, _OPENCLIP_LAYER)


def _count_layers(sd: StateDict, marker: str) -> int:
    return len({k[len(marker) :].split(".")[0] for k in sd if k.startswith(marker)})


def openclip_to_hf(sd: StateDict, *, projection: bool = False) -> StateDict:
    """OpenCLIP text tower (keys without `cond_stage_model.model.`) -> HF `text_model.…` keys.

    The fused attention `in_proj_weight` (3W, W) is split into q/k/v in that order.
    `logit_scale` is dropped, and `text_projection` too unless `projection` (SDXL's bigG uses it:
    OpenCLIP applies it as `x @ W`, so it becomes the Linear weight `text_projection.weight` = W.T).
    """
    out = {"text_projection.weight": sd["text_projection"].T.contiguous()} if projection else {}
    sd = {k: v for k, v in sd.items() if k not in OPENCLIP_UNUSED}
    out[_POSITIONAL[1]] = sd.pop(_POSITIONAL[0])
    for key in [k for k in sd if ".attn.in_proj_" in k]:
        layer, kind = key.split(".attn.in_proj_")  # kind: "weight" | "bias"
        hf = layer.replace("transformer.resblocks.", "text_model.encoder.layers.")
        for name, part in zip("qkv", sd.pop(key).chunk(3, dim=0)):
            out[f"{hf}.self_attn.{name}_proj.{kind}"] = part
    layers = _count_layers(sd, "transformer.resblocks.")
    return out | rename_keys(sd, _openclip_table(layers))


def hf_to_openclip(
    sd: StateDict, *, text_projection: Tensor | None = None, logit_scale: Tensor | None = None
) -> StateDict:
    """HF `text_model.…` keys -> OpenCLIP (keys without `cond_stage_model.model.`).

    q/k/v are fused into `in_proj_weight`/`in_proj_bias`. `text_projection` (W, W, applied as
    `x @ text_projection`) and `logit_scale` (a scalar) appear only when passed.
    """
    sd = dict(sd)
    if "text_projection.weight" in sd:  # a projecting encoder (SDXL's bigG): OpenCLIP's x @ W
        text_projection = sd.pop("text_projection.weight").T.contiguous()
    out = {_POSITIONAL[0]: sd.pop(_POSITIONAL[1])}
    layers = _count_layers(sd, "text_model.encoder.layers.")
    for i in range(layers):
        hf, oc = f"text_model.encoder.layers.{i}.self_attn", f"transformer.resblocks.{i}.attn"
        for kind in ("weight", "bias"):
            out[f"{oc}.in_proj_{kind}"] = torch.cat([sd.pop(f"{hf}.{n}_proj.{kind}") for n in "qkv"])
    out |= rename_keys(sd, invert(_openclip_table(layers)))
    extras = {"text_projection": text_projection, "logit_scale": logit_scale}
    return out | {k: v for k, v in extras.items() if v is not None}


# ---------------------------------------------------------------------------------------------
# Diffusers folders

_WEIGHT_NAMES = (  # preferred over other files (e.g. fp16 variants) in a component folder
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
)


def _load_weights(folder: Path) -> StateDict:
    """A component folder's weights: its standard file, else its only *.safetensors / *.bin file.
    (Sharded components are not read: SD 1/2 components are far below diffusers' shard size.)"""
    standard = [folder / n for n in _WEIGHT_NAMES if (folder / n).is_file()]
    found = standard[:1] or sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if len(found) != 1:
        raise FileNotFoundError(f"expected one weights file in {folder}, found {[f.name for f in found]}")
    return read_state_dict(found[0])[0]


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path}")
    return json.loads(path.read_text())


def _pad_token(tokenizer: Path) -> str | None:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (tokenizer / name).is_file():
            pad = json.loads((tokenizer / name).read_text()).get("pad_token")
            return pad["content"] if isinstance(pad, dict) else pad
    return None


def read_diffusers_folder(folder: str | Path) -> tuple[StateDict, StateDict, list[StateDict], ModelConfig]:
    """A diffusers Stable Diffusion folder -> (unet, vae, [text encoders]) state dicts in sdtorch's
    naming (the text encoders stay in Hugging Face's names, which sdtorch's are) and the ModelConfig.
    SDXL folders have `text_encoder` and `text_encoder_2` (the refiner only the second). A text
    encoder has the folder's layers only (see `diffusers_configs`); `position_ids` buffers that
    older text-encoder files carry are dropped."""
    folder = Path(folder)
    _read_json(folder / "model_index.json")
    texts = [t for t in ("text_encoder", "text_encoder_2") if (folder / t).is_dir()]
    if not texts:
        raise FileNotFoundError(f"missing {folder / 'text_encoder'}")
    configs = [_read_json(folder / part / "config.json") for part in ("unet", "vae")]
    text_cfgs = [_read_json(folder / t / "config.json") for t in texts]
    scheduler = _read_json(folder / "scheduler" / "scheduler_config.json")
    pads = [_pad_token(folder / t.replace("text_encoder", "tokenizer")) for t in texts]
    cfg = config_from_diffusers(*configs, text_cfgs, scheduler, pad_tokens=pads, name=folder.name,
                                texts=tuple(texts))

    unet = unet_from_diffusers(_load_weights(folder / "unet"), cfg.unet)
    vae = vae_from_diffusers(_load_weights(folder / "vae"), cfg.vae)
    return unet, vae, [_text_weights(folder / t) for t in texts], cfg


def _text_weights(folder: Path) -> StateDict:
    """transformers >= 5.6 saves CLIPTextModel without the `text_model.` level; older files and
    CLIPTextModelWithProjection have it (its `text_projection` sits beside it)."""
    text = {k.removeprefix("text_model."): v for k, v in _load_weights(folder).items()}
    return {k if k.startswith("text_projection") else f"text_model.{k}": v for k, v in text.items()
            if not k.endswith("position_ids")}


def text_to_hf(layout: str, sd: StateDict, projection: bool = False) -> StateDict:
    """One text encoder's single-file keys (its prefix removed, in `layout`) -> Hugging Face names."""
    return openclip_to_hf(sd, projection=projection) if layout == "openclip" else sd


def text_from_hf(layout: str, sd: StateDict) -> StateDict:
    """Hugging Face names -> one text encoder's single-file keys in `layout` (no prefix)."""
    return hf_to_openclip(sd) if layout == "openclip" else sd


def original_keys(unet: StateDict, vae: StateDict, texts: list[StateDict], cfg: ModelConfig) -> StateDict:
    """sdtorch-named state dicts -> one original-layout single-file state dict (the family's
    prefixes and text-encoder layouts)."""
    family = family_of(cfg)
    sd = {PREFIXES["unet"] + k: v for k, v in unet.items()}
    sd |= {PREFIXES["vae"] + k: v for k, v in vae.items()}
    for slot, text in zip(family.text, texts, strict=True):
        sd |= {slot.prefix + k: v for k, v in text_from_hf(slot.layout, text).items()}
    return sd


def diffusers_folder_to_original(folder: str | Path) -> tuple[StateDict, ModelConfig]:
    """A diffusers Stable Diffusion folder as one original-layout state dict (keys with their
    prefixes: `model.diffusion_model.`, `first_stage_model.`, and `cond_stage_model.transformer.`
    or, for OpenCLIP models, `cond_stage_model.model.`) and its ModelConfig."""
    unet, vae, texts, cfg = read_diffusers_folder(folder)
    return original_keys(unet, vae, texts, cfg), cfg
