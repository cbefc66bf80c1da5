"""diffusers / transformers config dicts <-> sdtorch `ModelConfig`.

Used to read diffusers folders (`config_from_diffusers`) and to build reference models in the
tests (`diffusers_configs`). Pure functions on dicts and dataclasses.
"""

from __future__ import annotations

from sdtorch.config import ClipConfig, ModelConfig, ScheduleConfig, UNetConfig, VAEConfig
from sdtorch.families import FAMILIES, family_by_layout

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
    depth = d.get("transformer_layers_per_block", 1)
    if not isinstance(depth, int):  # per level (SDXL); the mid block takes the last, the up blocks mirror
        depth = tuple(depth)
        if d.get("reverse_transformer_layers_per_block") is not None:
            raise ValueError("reverse_transformer_layers_per_block is not supported")
    if d.get("addition_embed_type") not in (None, "text_time"):
        raise ValueError(f"addition_embed_type {d['addition_embed_type']!r} is not supported")
    if d.get("class_embed_type") is not None:
        raise ValueError(f"class_embed_type {d['class_embed_type']!r} is not supported (only num_class_embeds)")
    cross_only = d.get("only_cross_attention", False)
    cross_only = tuple(cross_only) if isinstance(cross_only, (list, tuple)) else (True,) * len(down) if cross_only else ()
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
    fields = _fields(d, _UNET_FIELDS) | {"transformer_depth": depth, "num_classes": d.get("num_class_embeds") or 0,
                                         "disable_self_attentions": cross_only if any(cross_only) else ()}
    return UNetConfig(
        **fields,
        adm_in_channels=d.get("projection_class_embeddings_input_dim") or 0 if d.get("addition_embed_type") else 0,
        model_channels=model_channels,
        channel_mult=channel_mult,
        attention_resolutions=attention,
        num_heads=num_heads,
        num_head_channels=num_head_channels,
    )


def _vae_config(d: dict) -> VAEConfig:
    ch, ch_mult = _channels(list(d["block_out_channels"]))
    return VAEConfig(**_fields(d, _VAE_FIELDS), ch=ch, ch_mult=ch_mult, embed_dim=d["latent_channels"])


def _clip_config(d: dict, pad_token: str | None, final_norm: bool = True) -> ClipConfig:
    if d["intermediate_size"] % d["hidden_size"]:
        raise ValueError(f"intermediate_size {d['intermediate_size']} is not a multiple of the width")
    if pad_token is not None and pad_token not in _PAD_TOKENS:
        raise ValueError(f"unknown pad token {pad_token!r}; expected one of {list(_PAD_TOKENS)}")
    pad = _PAD_TOKENS[pad_token] if pad_token is not None else d["pad_token_id"]
    # A diffusers SD 1/2 text encoder holds only the layers that are used, so clip_skip is 1; SDXL's
    # hold all of them and take the penultimate one without the final norm.
    projection = d.get("projection_dim", 0) if "CLIPTextModelWithProjection" in d.get("architectures", ()) else 0
    return ClipConfig(
        **_fields(d, _CLIP_FIELDS),
        layers=d["num_hidden_layers"],
        clip_skip=1 if final_norm else 2,
        final_norm=final_norm,
        projection_dim=projection,
        mlp_ratio=d["intermediate_size"] // d["hidden_size"],
        pad_token_id=pad,
    )


def config_from_diffusers(
    unet_cfg: dict,
    vae_cfg: dict,
    text_cfg: dict | list[dict],
    scheduler_cfg: dict,
    *,
    pad_token: str | None = None,
    name: str = "diffusers",
    pad_tokens: list[str | None] | None = None,
    texts: tuple[str, ...] = ("text_encoder",),
) -> ModelConfig:
    """ModelConfig from the config.json dicts of a diffusers Stable Diffusion folder.

    text_cfg: the text encoder's config, or each one's (SDXL: `text_encoder`, `text_encoder_2`,
    named in `texts`; the refiner has only `text_encoder_2`).
    pad_token: the tokenizer's pad token ("<|endoftext|>" or "!"; `pad_tokens`: each tokenizer's).
    Real text_encoder configs carry a meaningless `pad_token_id` (1), so pass the tokenizer's when
    there is one; without it `text_cfg["pad_token_id"]` is used (as `diffusers_configs` writes it).
    A single text encoder is stored as OpenCLIP ("openclip" layout) when it uses plain gelu: among SD
    models only OpenCLIP ViT-H (SD2) does; OpenAI CLIP ViT-L (SD1) uses quick_gelu.
    """
    prediction_type = scheduler_cfg.get("prediction_type", "epsilon")
    prediction = {v: k for k, v in _PREDICTION.items()}.get(prediction_type)
    if prediction is None:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}")
    text_cfgs = [text_cfg] if isinstance(text_cfg, dict) else list(text_cfg)
    pads = pad_tokens or [pad_token] * len(text_cfgs)
    sgm = "text_encoder_2" in texts
    clips = [_clip_config(d, pad, final_norm=not sgm) for d, pad in zip(text_cfgs, pads)]
    vae = _vae_config(vae_cfg)
    schedule = {k: scheduler_cfg[k] for k in ScheduleConfig.__dataclass_fields__ if k in scheduler_cfg}
    if sgm:
        layout = "sdxl" if len(clips) == 2 else "sdxl-refiner"
    else:
        layout = next((f.layout for f in FAMILIES.values() if len(f.text) == 1 and f.text[0].act == clips[0].act
                       and not f.micro), "hf")
    unet = _unet_config(unet_cfg)
    micro = family_by_layout(layout).micro if unet.adm_in_channels else ()
    return ModelConfig(
        name=name,
        clip=clips[0],
        clip2=clips[1] if len(clips) > 1 else None,
        unet=unet,
        vae=vae,
        schedule=ScheduleConfig(**schedule),
        prediction=prediction,
        clip_layout=layout,
        sample_size=unet_cfg["sample_size"] * 2 ** (len(vae.ch_mult) - 1),
        micro=micro,
        micro_dim=unet_cfg.get("addition_time_embed_dim") or 256,
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
    unet = {key: getattr(u, field) for field, key in _UNET_FIELDS.items()}
    if not isinstance(u.transformer_depth, int):
        unet["transformer_layers_per_block"] = list(u.transformer_depth)
    if u.adm_in_channels:
        unet |= {"addition_embed_type": "text_time", "addition_time_embed_dim": cfg.micro_dim,
                 "projection_class_embeddings_input_dim": u.adm_in_channels}
    if u.num_classes:
        unet["num_class_embeds"] = u.num_classes
    if u.disable_self_attentions:
        unet["only_cross_attention"] = list(u.disable_self_attentions)
    unet |= {
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
    texts = {"text_encoder": _text_encoder(c)} if cfg.clip2 is None else {
        "text_encoder": _text_encoder(c), "text_encoder_2": _text_encoder(cfg.clip2)}
    if cfg.clip_layout == "sdxl-refiner":  # the refiner's one text encoder is diffusers' text_encoder_2
        texts = {"text_encoder_2": texts["text_encoder"]}
    scheduler = {k: getattr(s, k) for k in ScheduleConfig.__dataclass_fields__} | {
        "_class_name": "PNDMScheduler",
        "skip_prk_steps": True,
        "set_alpha_to_one": False,
        "clip_sample": False,  # not a PNDM argument, but a DDIM built from_config reads it
        "prediction_type": _PREDICTION[cfg.prediction],
    }
    return {"unet": unet, "vae": vae, **texts, "scheduler": scheduler}


def _text_encoder(c: ClipConfig) -> dict:
    """CLIPTextConfig kwargs. With the final norm on the used layer (SD 1/2) only the layers that
    are used are kept; SDXL's encoders keep all (the reference takes `hidden_states[-2]`)."""
    d = {key: getattr(c, field) for field, key in _CLIP_FIELDS.items()} | {
        "intermediate_size": c.width * c.mlp_ratio,
        "num_hidden_layers": c.layers - c.clip_skip + 1 if c.final_norm else c.layers,
        "pad_token_id": c.pad_token_id,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
    }
    return d | ({"projection_dim": c.projection_dim} if c.projection_dim else {})
