"""diffusers / transformers config dicts <-> sdtorch `ModelConfig`.

Used to read diffusers folders (`config_from_diffusers`) and to build reference models in the
tests (`diffusers_configs`). Pure functions on dicts and dataclasses.
"""

from __future__ import annotations

from sdtorch.config import ClipConfig, ModelConfig, ScheduleConfig, UNetConfig, VAEConfig
from sdtorch.families import FAMILIES

# Configs: sdtorch field -> diffusers / transformers config key, for the fields that map 1:1.
# A key missing from a config dict takes the sdtorch default, which is also the diffusers default.

_UNET_FIELDS = {
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "num_res_blocks": "layers_per_block",
    "transformer_depth": "transformer_layers_per_block",
    "context_dim": "cross_attention_dim",
    "use_linear_in_transformer": "use_linear_projection",
    "norm_groups": "norm_num_groups",
    "dropout": "dropout",
}
_VAE_FIELDS = {
    "in_channels": "in_channels",
    "out_ch": "out_channels",
    "num_res_blocks": "layers_per_block",
    "z_channels": "latent_channels",  # diffusers also ties embed_dim to it
    "norm_groups": "norm_num_groups",
    "scaling_factor": "scaling_factor",
}
_CLIP_FIELDS = {
    "vocab_size": "vocab_size",
    "max_length": "max_position_embeddings",
    "width": "hidden_size",
    "heads": "num_attention_heads",
    "act": "hidden_act",
    "layer_norm_eps": "layer_norm_eps",
}
_PREDICTION = {"eps": "epsilon", "v": "v_prediction"}
_PAD_TOKENS = {"<|endoftext|>": 49407, "!": 0}  # SD1 pads with <end>, SD2 with "!"


def _fields(d: dict, table: dict[str, str]) -> dict:
    return {field: d[key] for field, key in table.items() if key in d}


def _channels(block_out_channels: list[int]) -> tuple[int, tuple[int, ...]]:
    """(base channels, multipliers) from diffusers' per-level channel list."""
    return block_out_channels[0], tuple(c // block_out_channels[0] for c in block_out_channels)


def _unet_config(d: dict) -> UNetConfig:
    channels, down = list(d["block_out_channels"]), list(d["down_block_types"])
    if [t.replace("Down", "Up") for t in reversed(down)] != list(d["up_block_types"]):
        raise ValueError(f"up_block_types {d['up_block_types']} do not mirror down_block_types {down}")
    if not isinstance(depth := d.get("transformer_layers_per_block", 1), int):
        raise ValueError(f"per-block transformer_layers_per_block {depth} is not supported")
    # diffusers' `attention_head_dim` is the head COUNT (a misnomer diffusers keeps for old configs).
    # Its SD2 conversion writes per-block counts, channels // 64: that is a fixed head width.
    heads = d.get("num_attention_heads") or d["attention_head_dim"]
    num_heads, num_head_channels = heads, -1
    if isinstance(heads, (list, tuple)):
        widths = {c // h for c, h in zip(channels, heads)}
        if len(widths) != 1 or any(c % h for c, h in zip(channels, heads)):
            raise ValueError(f"per-block attention heads {heads} do not give one head width")
        num_heads, num_head_channels = -1, widths.pop()
    model_channels, channel_mult = _channels(channels)
    attention = tuple(2**i for i, t in reversed(list(enumerate(down))) if t.startswith("CrossAttn"))
    return UNetConfig(
        **_fields(d, _UNET_FIELDS),
        model_channels=model_channels,
        channel_mult=channel_mult,
        attention_resolutions=attention,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
    )


def _vae_config(d: dict) -> VAEConfig:
    ch, ch_mult = _channels(list(d["block_out_channels"]))
    return VAEConfig(**_fields(d, _VAE_FIELDS), ch=ch, ch_mult=ch_mult, embed_dim=d["latent_channels"])


def _clip_config(d: dict, pad_token: str | None) -> ClipConfig:
    if d["intermediate_size"] % d["hidden_size"]:
        raise ValueError(f"intermediate_size {d['intermediate_size']} is not a multiple of the width")
    if pad_token is not None and pad_token not in _PAD_TOKENS:
        raise ValueError(f"unknown pad token {pad_token!r}; expected one of {list(_PAD_TOKENS)}")
    pad = _PAD_TOKENS[pad_token] if pad_token is not None else d["pad_token_id"]
    # A diffusers text encoder holds only the layers that are used, so clip_skip is 1.
    return ClipConfig(
        **_fields(d, _CLIP_FIELDS),
        layers=d["num_hidden_layers"],
        clip_skip=1,
        mlp_ratio=d["intermediate_size"] // d["hidden_size"],
        pad_token_id=pad,
    )


def config_from_diffusers(
    unet_cfg: dict,
    vae_cfg: dict,
    text_cfg: dict,
    scheduler_cfg: dict,
    *,
    pad_token: str | None = None,
    name: str = "diffusers",
) -> ModelConfig:
    """ModelConfig from the config.json dicts of a diffusers Stable Diffusion folder.

    pad_token: the tokenizer's pad token ("<|endoftext|>" or "!"). Real text_encoder configs carry
    a meaningless `pad_token_id` (1), so pass the tokenizer's when there is one; without it
    `text_cfg["pad_token_id"]` is used (as `diffusers_configs` writes it).
    The text encoder is stored as OpenCLIP ("openclip" layout) when it uses plain gelu: among SD
    models only OpenCLIP ViT-H (SD2) does; OpenAI CLIP ViT-L (SD1) uses quick_gelu.
    """
    prediction_type = scheduler_cfg.get("prediction_type", "epsilon")
    prediction = {v: k for k, v in _PREDICTION.items()}.get(prediction_type)
    if prediction is None:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    clip, vae = _clip_config(text_cfg, pad_token), _vae_config(vae_cfg)
    schedule = {k: scheduler_cfg[k] for k in ScheduleConfig.__dataclass_fields__ if k in scheduler_cfg}
    return ModelConfig(
        name=name,
        clip=clip,
        unet=_unet_config(unet_cfg),
        vae=vae,
        schedule=ScheduleConfig(**schedule),
        prediction=prediction,
        clip_layout=next((f.text_layout for f in FAMILIES.values() if f.text_act == clip.act), "hf"),
        sample_size=unet_cfg["sample_size"] * 2 ** (len(vae.ch_mult) - 1),
    )


def diffusers_configs(cfg: ModelConfig) -> dict:
    """{"unet", "vae", "text_encoder", "scheduler"} kwargs for `UNet2DConditionModel`,
    `AutoencoderKL`, `CLIPTextConfig` and `PNDMScheduler.from_config`.

    The text encoder keeps only the layers that condition the UNet: `layers - clip_skip + 1`
    (SD2: 23 of OpenCLIP's 24), as diffusers' own conversion does; the final layer norm is
    applied to its output either way. The scheduler is SD's PNDM default.
    """
    u, v, c, s = cfg.unet, cfg.vae, cfg.clip, cfg.schedule
    if v.embed_dim != v.z_channels:
        raise ValueError(f"diffusers needs embed_dim == z_channels, got {v.embed_dim} != {v.z_channels}")
    attn = [2**i in u.attention_resolutions for i in range(len(u.channel_mult))]
    channels = [u.model_channels * m for m in u.channel_mult]
    # head COUNT, see _unet_config
    heads = u.num_heads if u.num_head_channels == -1 else [ch // u.num_head_channels for ch in channels]
    unet = {key: getattr(u, field) for field, key in _UNET_FIELDS.items()} | {
        "sample_size": cfg.sample_size // 2 ** (len(v.ch_mult) - 1),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": channels,
        "attention_head_dim": heads,
    }
    vae = {key: getattr(v, field) for field, key in _VAE_FIELDS.items()} | {
        "sample_size": cfg.sample_size,
        "down_block_types": ["DownEncoderBlock2D"] * len(v.ch_mult),
        "up_block_types": ["UpDecoderBlock2D"] * len(v.ch_mult),
        "block_out_channels": [v.ch * m for m in v.ch_mult],
    }
    text_encoder = {key: getattr(c, field) for field, key in _CLIP_FIELDS.items()} | {
        "intermediate_size": c.width * c.mlp_ratio,
        "num_hidden_layers": c.layers - c.clip_skip + 1,
        "pad_token_id": c.pad_token_id,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
    }
    scheduler = {k: getattr(s, k) for k in ScheduleConfig.__dataclass_fields__} | {
        "_class_name": "PNDMScheduler",
        "skip_prk_steps": True,
        "set_alpha_to_one": False,
        "clip_sample": False,  # not a PNDM argument, but a DDIM built from_config reads it
        "prediction_type": _PREDICTION[cfg.prediction],
    }
    return {"unet": unet, "vae": vae, "text_encoder": text_encoder, "scheduler": scheduler}
