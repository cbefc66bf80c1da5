"""Checkpoint files: safe reading, the one key-prefix table, model detection, strict loading.

The original single-file (CompVis/LDM) layout is canonical: each model's module paths equal the
file's keys minus a prefix from `PREFIXES`. Other layouts (OpenCLIP text encoders, diffusers
folders) go through exactly one converter each, in `sdtorch.formats.diffusers`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from sdtorch.config import ClipConfig, ModelConfig, Prediction, ScheduleConfig, UNetConfig, VAEConfig
from sdtorch.families import (
    CONCAT,
    FAMILIES,
    KIND_FACTS,
    MICRO_VALUES,
    PREFIXES,
    Family,
    TextSlot,
    concat_kind,
    family_by_layout,
    family_of,
)
from sdtorch.formats import diffusers as convert
from sdtorch.formats.atomic import save_safetensors
from sdtorch.formats.files import SUFFIXES, CheckpointError, read_state_dict  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

# Keys real files carry that Stable Diffusion inference does not use: the training schedule's
# buffers, EMA copies, CLIP's position ids, OpenCLIP's contrastive head, the `v_pred` marker
# some tools add (read by `read` before this filter), and the MiDaS depth estimator SD 2
# depth-to-image files carry (`depth_model.*`: sdtorch takes the depth map from the caller).
IGNORED = re.compile(
    r"^(v_pred$|model_ema\.|depth_model\.|betas$|alphas_cumprod|sqrt_|log_one_minus|posterior_|lvlb_weights$|logvar$"
    r"|cond_stage_model\.transformer\.text_model\.embeddings\.position_ids$"
    r"|cond_stage_model\.model\.(logit_scale|text_projection)$"
    r"|conditioner\.embedders\.\d+\.(transformer\.text_model\.embeddings\.position_ids|model\.logit_scale)$)"
)
# The file prefixes of the parts `read` can leave unread.
LAZY = {"unet": (PREFIXES["unet"],), "vae": (PREFIXES["vae"],),
        "text": (PREFIXES["clip"], PREFIXES["openclip"], PREFIXES["sgm"])}
CONFIG_KEY = "sdtorch_config"  # safetensors metadata written by `save`
# A UNet-only file's base (`save_unet`): the file, beside it or in the package's data folder, whose
# VAE and text encoders it shares.
BASE_KEY = "sdtorch_base"
ENCODER_PREFIX = "condition_encoder."  # a condition encoder's keys (sdtorch.conditioning.encoders)
ENCODER_KEY = "sdtorch_condition_encoder"  # its spec (JSON) in the metadata


@dataclass
class Checkpoint:
    """What a file holds: per-model state dicts in sdtorch naming, and how it was identified."""

    config: ModelConfig
    unet: dict[str, torch.Tensor]
    vae: dict[str, torch.Tensor]
    clip: dict[str, torch.Tensor]
    dtype: torch.dtype  # of the stored weights
    prediction_source: str  # "given", "metadata", "marker key", "diffusers config" or "guessed: ..."
    path: Path
    # A condition encoder stored with the model (keys `condition_encoder.*`, its spec in the metadata).
    encoder: dict[str, torch.Tensor] = field(default_factory=dict)
    encoder_spec: dict | None = None
    clip2: dict[str, torch.Tensor] = field(default_factory=dict)  # SDXL's second text encoder


def split(sd: dict[str, torch.Tensor]) -> tuple[dict, dict, list[dict], Family]:
    """Full-file keys -> (unet, vae, [text encoders]) state dicts in sdtorch naming, and the family
    whose text-encoder prefixes the file uses."""
    parts: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "vae": {}}
    rest = {}
    for key, value in sd.items():
        if IGNORED.match(key):
            continue
        name = next((n for n in parts if key.startswith(PREFIXES[n])), None)
        if name is None:
            rest[key] = value
        else:
            parts[name][key[len(PREFIXES[name]) :]] = value
    for name in ("unet", "vae"):
        if not parts[name]:
            raise CheckpointError(f"no {name.upper()} weights (keys starting {PREFIXES[name]!r}) in the file")
    family = next((f for f in FAMILIES.values() if all(any(k.startswith(t.prefix) for k in rest) for t in f.text)),
                  None)
    if family is None:
        raise CheckpointError("no text-encoder weights (cond_stage_model.* or conditioner.embedders.*) in the file")
    texts = []
    for slot in family.text:
        texts.append({k[len(slot.prefix):]: rest.pop(k) for k in [k for k in rest if k.startswith(slot.prefix)]})
    if rest:
        raise CheckpointError(f"unexpected keys outside the UNet, VAE and text encoders: {_few(list(rest))}")
    texts = [convert.text_to_hf(slot.layout, t, projection=slot.pooled) for slot, t in zip(family.text, texts)]
    return parts["unet"], parts["vae"], texts, family


def _few(keys: list[str], n: int = 8) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" ... ({len(keys)} in all)" if len(keys) > n else "")


def indices(sd: dict, pattern: str) -> list[int]:
    """The sorted distinct integers that `pattern`'s first group matches at the start of keys."""
    return sorted({int(m.group(1)) for k in sd if (m := re.match(pattern, k))})


def detect_unet(sd: dict[str, torch.Tensor], out_channels: int | None = None) -> UNetConfig:
    """UNet hyper-parameters from key names and shapes (SD1/SD2 head conventions assumed).
    out_channels: for encoder halves without an output layer (ControlNets)."""
    first = sd["input_blocks.0.0.weight"]
    mc = first.shape[0]
    mults, attn, ds, res_per_level = [], [], 1, []
    count = 0
    for i in indices(sd, r"input_blocks\.(\d+)\.")[1:]:
        if f"input_blocks.{i}.0.op.weight" in sd:
            res_per_level.append(count)
            count, ds = 0, ds * 2
            continue
        mult = sd[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] // mc
        if count == 0:
            mults.append(mult)
        count += 1
        if f"input_blocks.{i}.1.proj_in.weight" in sd and ds not in attn:
            attn.append(ds)
    res_per_level.append(count)
    depths = _level_depths(sd, len(mults), res_per_level[0])
    proj = sd["middle_block.1.proj_in.weight"]
    context_dim = sd["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1]
    sd2 = proj.ndim == 2 or context_dim == 1024
    facts = KIND_FACTS.get(CONCAT.get((first.shape[1], "label_emb.weight" in sd), ""), {})
    heads = (facts["num_heads"], -1) if "num_heads" in facts else (-1, 64) if sd2 else (8, -1)
    return UNetConfig(
        in_channels=first.shape[1],
        out_channels=out_channels or sd["out.2.weight"].shape[0],
        model_channels=mc,
        channel_mult=tuple(mults),
        num_res_blocks=res_per_level[0],
        attention_resolutions=tuple(sorted(attn, reverse=True)),  # as the YAML configs list them
        num_heads=heads[0],
        num_head_channels=heads[1],
        transformer_depth=depths,
        context_dim=context_dim,
        use_linear_in_transformer=proj.ndim == 2,
        adm_in_channels=sd["label_emb.0.0.weight"].shape[1] if "label_emb.0.0.weight" in sd else 0,
        num_classes=sd["label_emb.weight"].shape[0] if "label_emb.weight" in sd else 0,
        disable_self_attentions=_cross_only(sd, len(mults), res_per_level[0], context_dim),
    )


def _cross_only(sd: dict, levels: int, per_level: int, context_dim: int) -> tuple[bool, ...]:
    """Per level, whether attn1 attends to the context (its keys are context-wide, not pixel-wide)."""
    def cross(level: int) -> bool:
        key = f"input_blocks.{1 + level * (per_level + 1)}.1.transformer_blocks.0.attn1.to_k.weight"
        return key in sd and sd[key].shape[1] == context_dim != sd[key].shape[0]

    found = tuple(cross(level) for level in range(levels))
    return found if any(found) else ()


def _level_depths(sd: dict, levels: int, per_level: int) -> int | tuple[int, ...]:
    """Transformer blocks per attention layer: one number, or one per level (SDXL) where they
    differ; levels without attention count 1 (as SGM's configs write them)."""
    def count(block: str) -> int:
        return len(indices(sd, rf"{block}\.1\.transformer_blocks\.(\d+)\."))

    counts = [count(f"input_blocks.{1 + level * (per_level + 1)}") for level in range(levels)]
    middle = count("middle_block")
    if len({c for c in counts if c} | {middle}) == 1:
        return middle
    depths = [c or 1 for c in counts]
    if depths[-1] != middle:
        raise CheckpointError(f"the middle block's transformer depth {middle} differs from the last level's "
                              f"{depths[-1]}: not a supported UNet")
    return tuple(depths)


def detect_vae(sd: dict[str, torch.Tensor], scaling_factor: float = 0.18215) -> VAEConfig:
    ch = sd["encoder.conv_in.weight"].shape[0]
    levels = indices(sd, r"encoder\.down\.(\d+)\.")
    return VAEConfig(
        in_channels=sd["encoder.conv_in.weight"].shape[1],
        out_ch=sd["decoder.conv_out.weight"].shape[0],
        ch=ch,
        ch_mult=tuple(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in levels),
        num_res_blocks=len(indices(sd, r"encoder\.down\.0\.block\.(\d+)\.")),
        z_channels=sd["decoder.conv_in.weight"].shape[1],
        embed_dim=sd["post_quant_conv.weight"].shape[1],
        scaling_factor=scaling_factor,
    )


def detect_clip(sd: dict[str, torch.Tensor], slot: TextSlot | str) -> ClipConfig:
    """The text encoder's config; `slot` is the family's text slot (a layout name: its first)."""
    slot = family_by_layout(slot).text[0] if isinstance(slot, str) else slot
    tok = sd["text_model.embeddings.token_embedding.weight"]
    width = tok.shape[1]
    projection = sd.get("text_projection.weight")
    return ClipConfig(
        vocab_size=tok.shape[0],
        max_length=sd["text_model.embeddings.position_embedding.weight"].shape[0],
        width=width,
        layers=len(indices(sd, r"text_model\.encoder\.layers\.(\d+)\.")),
        heads=width // 64,
        mlp_ratio=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0] // width,
        act=slot.act,
        pad_token_id=slot.pad_token_id,
        clip_skip=slot.clip_skip,
        final_norm=slot.final_norm,
        projection_dim=0 if projection is None else projection.shape[0],
    )


def guess_prediction(unet_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[Prediction, str]:
    """Keys cannot tell eps from v; a kind's known prediction (`KIND_FACTS`), else guess as ComfyUI
    does for SD2 (v-models' last transformer norm bias has a wide spread) and assume eps otherwise."""
    kind = concat_kind(cfg)
    if "prediction" in KIND_FACTS.get(kind, {}):
        return KIND_FACTS[kind]["prediction"], f"the {kind}'s"
    family = family_of(cfg)
    key = family.v_hint
    if key is None:
        return "eps", f"guessed: eps ({family.label})"
    if key in unet_sd and not concat_kind(cfg):
        spread = unet_sd[key].float().std(unbiased=False).item()
        if spread > 0.09:
            return "v", f"guessed: v ({family.label}, std of {key} = {spread:.3f} > 0.09)"
        return "eps", f"guessed: eps ({family.label}, std of {key} = {spread:.3f} <= 0.09)"
    return "eps", f"guessed: eps ({family.label}, no hint)"


def read(
    path: str | Path,
    *,
    config: ModelConfig | None = None,
    prediction: Prediction | None = None,
    lazy: tuple[str, ...] = (),
) -> Checkpoint:
    """Read a single file or a diffusers folder and work out what model it holds. lazy: parts
    ("unet", "vae", "text") of a single file left unread, as meta tensors (folders are read whole)."""
    path = Path(path)
    source = "given config" if config is not None else ""
    if path.is_dir():  # already in sdtorch's names: no detour through the single-file layout
        unet, vae, texts, folder_cfg = convert.read_diffusers_folder(path)
        sd, meta, source, family = {}, {}, source or "diffusers config", family_of(folder_cfg)
        encoder, encoder_spec = {}, None
        config = config or folder_cfg
    else:
        unread = tuple(p for n in lazy for p in LAZY[n])
        sd, meta = read_state_dict(path, lambda key: key.startswith(unread))  # () starts no key
        if BASE_KEY in meta:
            sd = _with_base(sd, meta[BASE_KEY], path)
        encoder, encoder_spec = _condition_encoder(sd, meta, path)
        unet, vae, texts, family = split(sd)
    if config is None and CONFIG_KEY in meta:
        config, source = ModelConfig.from_dict(json.loads(meta[CONFIG_KEY])), "metadata"
    if config is None:
        config = _detect(unet, vae, texts, family, path)
    if prediction is not None:
        config, source = replace(config, prediction=prediction), "given"
    elif "v_pred" in sd:
        config, source = replace(config, prediction="v"), "marker key"
    elif not source:
        pred, source = guess_prediction(_hint_read(unet, config, path), config)
        v_sd2 = pred == "v" and not concat_kind(config)  # SD 2's v-models are the 768 ones
        config = replace(config, prediction=pred, sample_size=768 if v_sd2 else config.sample_size)
    dtype = next(iter(unet.values())).dtype
    clip2 = texts[1] if len(texts) > 1 else {}
    return Checkpoint(config, unet, vae, texts[0], dtype, source, path, encoder, encoder_spec, clip2)


def _hint_read(unet: dict, cfg: ModelConfig, path: Path) -> dict:
    """`unet` with the tensor `guess_prediction` looks at read, where it was left unread (lazy)."""
    key = family_of(cfg).v_hint
    if key not in unet or not unet[key].is_meta:
        return unet
    full = PREFIXES["unet"] + key
    return unet | {key: read_state_dict(path, lambda k: k != full)[0][full]}


def _with_base(sd: dict, base: str, path: Path) -> dict:
    """A UNet-only file's tensors completed by its base's VAE and text encoders (the base is found
    by name beside the file or in the package's data folder, never by a path in the file)."""
    name = Path(base).name
    found = next((p for p in (path.parent / name, Path(__file__).parents[1] / "data" / name) if p.is_file()), None)
    if found is None:
        raise CheckpointError(f"{path} holds a UNet for {name!r}, which is neither beside it nor in sdtorch's data")
    base_sd, _ = read_state_dict(found)
    return {k: v for k, v in base_sd.items() if not k.startswith(PREFIXES["unet"])} | sd


def _condition_encoder(sd: dict, meta: dict, path: Path) -> tuple[dict, dict | None]:
    """Take the condition encoder's keys out of `sd` (in place), with its spec from the metadata."""
    prefix = ENCODER_PREFIX
    keys = [k for k in sd if k.startswith(prefix)]
    if not keys:
        return {}, None
    if ENCODER_KEY not in meta:
        raise CheckpointError(f"{path} has condition-encoder weights ({prefix}*) but no {ENCODER_KEY!r} metadata "
                              "saying what encoder they belong to")
    return {k[len(prefix):]: sd.pop(k) for k in keys}, json.loads(meta[ENCODER_KEY])


def _detect(unet: dict, vae: dict, texts: list[dict], family: Family, path: Path) -> ModelConfig:
    try:
        clips = [detect_clip(t, slot) for t, slot in zip(texts, family.text)]
        unet_cfg = detect_unet(unet)
        micro, micro_dim = (), 256
        if unet_cfg.adm_in_channels:
            micro = family.micro
            values = sum(MICRO_VALUES[m] for m in micro)
            pooled = sum(c.projection_dim for c in clips)
            if not values or (unet_cfg.adm_in_channels - pooled) % values:
                raise CheckpointError(f"{path}: a UNet vector of {unet_cfg.adm_in_channels} does not fit "
                                      f"{family.label}'s pooled text ({pooled}) and conditions {micro}")
            micro_dim = (unet_cfg.adm_in_channels - pooled) // values
        facts = KIND_FACTS.get(CONCAT.get((unet_cfg.in_channels, bool(unet_cfg.num_classes)), ""), {})
        schedule = {k: facts[k] for k in ("beta_start", "beta_end") if k in facts}
        return ModelConfig(
            name=path.stem,
            clip=clips[0],
            clip2=clips[1] if len(clips) > 1 else None,
            unet=unet_cfg,
            vae=detect_vae(vae, facts.get("latent_scale", family.latent_scale)),
            schedule=ScheduleConfig(**schedule),
            clip_layout=family.layout,  # type: ignore[arg-type]
            sample_size=facts.get("sample_size", 1024 if family.micro else 512),
            micro=micro,
            micro_dim=micro_dim,
        )
    except KeyError as e:
        raise CheckpointError(f"{path} is not a Stable Diffusion checkpoint: key {e} is missing") from None


def load_strict(module: nn.Module, sd: dict[str, torch.Tensor], what: str, dtype: torch.dtype, *,
                consume: bool = False) -> None:
    """Load every parameter, or raise naming the missing, unexpected and mis-shaped keys.
    consume: empty `sd` while converting, so each file tensor can be freed as soon as its
    converted copy exists (peak memory: the file plus one tensor, not the file plus the model)."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    shapes = [
        f"{k} {tuple(sd[k].shape)} != {tuple(v.shape)}"
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape and not _linear_as_1x1(sd[k].shape, v.shape)
    ]
    if missing or unexpected or shapes:
        lines = [f"the {what} weights do not fit the {what} model"]
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if keys:
                lines.append(f"{label} ({len(keys)}): {_few(keys)}")
        raise CheckpointError("; ".join(lines))
    # 1x1 convolutions stored as Linear (some converted VAEs) differ only by a reshape.
    if consume:
        fixed = {k: sd.pop(k).reshape(expected[k].shape).to(dtype) for k in list(sd)}
    else:
        fixed = {k: v.reshape(expected[k].shape).to(dtype) for k, v in sd.items()}
    module.load_state_dict(fixed, strict=True, assign=True)


def _linear_as_1x1(given: torch.Size, expected: torch.Size) -> bool:
    """A 1x1 convolution's weight stored as a Linear one (some converted VAEs): (o, i) vs (o, i, 1, 1)."""
    return len(given) == 2 and tuple(expected) == (*given, 1, 1)


def original_state_dict(unet: nn.Module, vae: nn.Module, clip: nn.Module, cfg: ModelConfig,
                        clip2: nn.Module | None = None) -> dict:
    """The models' weights under the original single-file keys."""
    texts = [m.state_dict() for m in (clip, clip2) if m is not None]
    return convert.original_keys(unet.state_dict(), vae.state_dict(), texts, cfg)


def save(path: str | Path, unet: nn.Module, vae: nn.Module, clip: nn.Module, cfg: ModelConfig, dtype=None, *,
         condition_encoder: nn.Module | None = None, clip2: nn.Module | None = None) -> Path:
    """Write one original-layout .safetensors file with the config in its metadata, atomically;
    a condition encoder goes in under `condition_encoder.*` with its spec in the metadata."""
    sd = original_state_dict(unet, vae, clip, cfg, clip2)
    meta = {CONFIG_KEY: json.dumps(cfg.to_dict())}
    if condition_encoder is not None:
        sd |= {ENCODER_PREFIX + k: v for k, v in condition_encoder.state_dict().items()}
        meta[ENCODER_KEY] = json.dumps(condition_encoder.spec())
    sd = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    return save_safetensors(sd, path, meta)


def save_unet(path: str | Path, unet: nn.Module, cfg: ModelConfig, base: str, dtype=None) -> Path:
    """Write a UNet alone (original keys, config in the metadata) for a model that shares the VAE and
    text encoders of `base` (a file name: `read` finds it beside this file or in the package's data)."""
    sd = {PREFIXES["unet"] + k: v for k, v in unet.state_dict().items()}
    sd = {k: (v.to(dtype) if dtype and v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    return save_safetensors(sd, path, {CONFIG_KEY: json.dumps(cfg.to_dict()), BASE_KEY: base})
