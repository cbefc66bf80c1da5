"""LoRA: low-rank updates of Linear and Conv2d layers, in the file formats people share.

A LoRA adds `strength * alpha / rank * up(down(x))` to a layer's output (Hu et al. 2021); for a
convolution `down` is a conv with the layer's kernel, stride and padding and `up` a 1x1 conv
(kohya's LoCon). Files name the layer in one of these spellings:

- kohya / AUTOMATIC1111 / ComfyUI / Civitai: `lora_unet_<diffusers module path, "." -> "_">` and
  `lora_te_<transformers CLIPTextModel path, "." -> "_">` (SD 2's OpenCLIP encoder too; SDXL's two
  encoders are `lora_te1_` and `lora_te2_`), each with `.lora_down.weight`, `.lora_up.weight` and
  `.alpha`; UNet names in the original layout (`lora_unet_input_blocks_4_1_proj_in`, as kohya
  writes SDXL LoRAs) are accepted as well.
- diffusers / PEFT: `unet.<diffusers path>.lora_A.weight` / `.lora_B.weight` and
  `text_encoder.<transformers path>...` (SDXL's second: `text_encoder_2.`; older diffusers:
  `.lora.down.weight` / `.lora.up.weight`).
  The scale comes from `.alpha` keys, else from the `lora_adapter_metadata` JSON diffusers writes
  (`lora_alpha`, `alpha_pattern`, `use_rslora`), else it is 1.

Every spelling is looked up in a table built from the models themselves (the UNet's diffusers
names come from `sdtorch.formats.diffusers`), so a key either names a real layer or is an error.

A LoRA is applied dynamically, as a forward hook that adds its output to the layer's (module
paths, and so checkpoint keys, stay unchanged), or merged into the weights; merging keeps the
replaced weights, so unmerging restores them bit for bit.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sdtorch.config import UNetConfig
from sdtorch.formats import diffusers as convert
from sdtorch.formats.checkpoint import _few, read_state_dict
from sdtorch.formats.files import sha256
from sdtorch.models.clip import ClipTextModel
from sdtorch.models.unet import UNetModel

Target = tuple[str, str]  # ("unet" | "clip" | "clip2", module path in sdtorch = the original checkpoint layout)
SUFFIXES = (".safetensors", ".pt", ".ckpt")  # what `resolve_lora` looks for, in this order
PEFT_METADATA = "lora_adapter_metadata"  # diffusers' safetensors metadata key (a LoraConfig per model)
_KINDS = {  # key suffix -> what the tensor is
    ".lora_down.weight": "down", ".lora_up.weight": "up",  # kohya
    ".lora_A.weight": "down", ".lora_B.weight": "up",  # PEFT
    ".lora.down.weight": "down", ".lora.up.weight": "up",  # diffusers before PEFT
    ".alpha": "alpha",
}
_KOHYA_PREFIXES = {"unet": "lora_unet_", "clip": "lora_te_"}
_KOHYA_TWO_ENCODERS = {"clip": "lora_te1_", "clip2": "lora_te2_"}  # SDXL
_DIFFUSERS_TEXT = {"clip": "text_encoder", "clip2": "text_encoder_2"}
_UNSUPPORTED = {"hada_": "LyCORIS LoHa", "lokr_": "LyCORIS LoKr", "lora_mid": "LoCon with a Tucker core",
                "dora_scale": "DoRA"}
_SDXL_ONLY = ("lora_te1_", "lora_te2_", "text_encoder_2.")  # keys of LoRAs for two text encoders

# Layers a trained LoRA adapts, by group (`sdtorch train lora --layers`). kohya's default network
# is attn + ff + proj (every Linear / 1x1 conv of the transformers); its `conv_dim` adds "conv".
LAYERS = {
    "attn": r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$",
    "ff": r"\.ff\.net\.(0\.proj|2)$",
    "proj": r"\.(proj_in|proj_out)$",
    "conv": r"\.(in_layers\.2|out_layers\.3|emb_layers\.1|skip_connection|op|\d+\.conv)$",  # ResBlocks, resamplers
}
TEXT_LAYERS = r"\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$"  # kohya: CLIPAttention and CLIPMLP


class LoRAError(ValueError):
    """A LoRA file cannot be read or does not fit the model."""


class LoRA(nn.Module):
    """One low-rank update beside one Linear or Conv2d: delta(x) = up(down(x)) * alpha / rank.

    down: (rank, in) or (rank, in, kh, kw), applied with the base conv's stride and padding;
    up: (out, rank) or (out, rank, 1, 1).
    """

    def __init__(self, down: Tensor, up: Tensor, alpha: float | None = None, *, conv: dict | None = None):
        super().__init__()
        self.down, self.up = nn.Parameter(down), nn.Parameter(up)
        self.alpha = float(alpha) if alpha else float(down.shape[0])  # kohya: no / zero alpha = rank
        self.conv = conv  # stride, padding, dilation of the base Conv2d; None for a Linear

    @classmethod
    def new(cls, base: nn.Linear | nn.Conv2d, rank: int, alpha: float | None = None, *,
            generator: torch.Generator | None = None) -> LoRA:
        """kohya's initialisation: down as nn.Linear / nn.Conv2d's default, up zero (an identity)."""
        w = base.weight
        down = torch.empty(rank, *w.shape[1:], dtype=w.dtype, device=w.device)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        up = torch.zeros(w.shape[0], rank, *(1,) * (w.ndim - 2), dtype=w.dtype, device=w.device)
        return cls(down, up, alpha, conv=_conv_args(base))

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: Tensor) -> Tensor:
        """up(down(x)) without the scale: x is the base layer's input."""
        if self.conv is None:
            return F.linear(F.linear(x, self.down), self.up)
        return F.conv2d(F.conv2d(x, self.down, **self.conv), self.up)

    def delta_weight(self) -> Tensor:
        """scale * up @ down in float32, shaped as the base weight: (out, in[, kh, kw])."""
        up, down = self.up.float().flatten(1), self.down.float()
        return (up @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:]) * self.scale


def _conv_args(base: nn.Module) -> dict | None:
    if not isinstance(base, nn.Conv2d):
        return None
    if base.groups != 1:
        raise LoRAError("LoRA on grouped convolutions is not supported")
    return {"stride": base.stride, "padding": base.padding, "dilation": base.dilation}


class LoRANetwork(nn.Module):
    """A set of LoRAs for one UNet + text encoder: `loras[i]` adapts the layer `targets[i]`.

    The LoRAs act through forward hooks on the base models (see `LoRAStack`). The network's own
    forward only runs `fn`: training calls its step through it, because DistributedDataParallel
    synchronises the gradients of the module whose forward ran.
    """

    def __init__(self, targets: list[Target], loras: list[LoRA], *, name: str = "", metadata: dict | None = None):
        super().__init__()
        if len(targets) != len(loras) or len(set(targets)) != len(targets):
            raise LoRAError("a LoRA network needs exactly one LoRA per target layer")
        self.targets = list(targets)
        self.loras = nn.ModuleList(loras)
        self.name = name
        self.metadata = dict(metadata or {})
        self.shorthash = ""  # of the file it was read from

    def forward(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


# ---------------------------------------------------------------------------------------------
# Names


def diffusers_paths(cfg: UNetConfig, paths: list[str]) -> dict[str, str]:
    """Original UNet module paths -> diffusers module paths (via `convert.unet_to_diffusers`,
    which renames keys by module prefix: here the "state dict" maps each key to its own path)."""
    renamed = convert.unet_to_diffusers({f"{p}.weight": p for p in paths}, cfg)  # type: ignore[dict-item]
    return {p: key.removesuffix(".weight") for key, p in renamed.items()}


def _layers(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def layer_names(unet: UNetModel, clip: ClipTextModel, clip2: ClipTextModel | None = None) -> dict[str, Target]:
    """Every spelling LoRA files use for every adaptable layer -> the layer."""
    names: dict[str, Target] = {}

    def add(spellings: list[str], target: Target) -> None:
        for s in spellings:
            assert names.setdefault(s, target) == target, f"LoRA name {s} is ambiguous"

    for path, diffusers in diffusers_paths(unet.cfg, list(_layers(unet))).items():
        add([_kohya("unet", diffusers), _kohya("unet", path), f"unet.{diffusers}", diffusers], ("unet", path))
    kohya = _KOHYA_PREFIXES if clip2 is None else _KOHYA_TWO_ENCODERS
    for model, encoder in (("clip", clip), ("clip2", clip2)):
        for path in _layers(encoder) if encoder is not None else ():
            short = path.removeprefix("text_model.")  # transformers >= 5 CLIPTextModel has no `text_model.`
            prefix, diffusers = kohya[model], _DIFFUSERS_TEXT[model]
            add([prefix + path.replace(".", "_"), prefix + short.replace(".", "_"), f"{diffusers}.{path}",
                 f"{diffusers}.{short}"], (model, path))
    return names


def _kohya(model: str, path: str) -> str:
    return _KOHYA_PREFIXES[model] + path.replace(".", "_")


# ---------------------------------------------------------------------------------------------
# Reading


def load(source: str | Path | dict[str, Tensor], unet: UNetModel, clip: ClipTextModel, *,
         metadata: dict[str, str] | None = None, name: str | None = None,
         dtype: torch.dtype | None = None, device: torch.device | str | None = None,
         clip2: ClipTextModel | None = None) -> LoRANetwork:
    """Read a LoRA file (.safetensors, or .pt/.ckpt with weights_only=True) or state dict in any
    of the formats above into a network for these models. Raises LoRAError naming the keys that
    match no layer, incomplete pairs and shapes that do not fit."""
    if isinstance(source, dict):
        sd, meta = dict(source), dict(metadata or {})
        name = name or "lora"
    else:
        if not Path(source).is_file():
            raise FileNotFoundError(f"LoRA file not found: {source}")
        sd, meta = read_state_dict(source)
        name = name or Path(source).stem
    if not sd:
        raise LoRAError(f"{name}: the file holds no tensors")
    groups, unknown = _group(sd)
    names = layer_names(unet, clip, clip2)
    unknown += [f"{g}.*" for g in groups if g not in names]
    if unknown:
        raise LoRAError(_unknown_message(name, unknown, two_encoders=clip2 is not None))
    peft = json.loads(meta[PEFT_METADATA]) if PEFT_METADATA in meta else {}
    models = {"unet": unet, "clip": clip, "clip2": clip2}
    seen: dict[Target, str] = {}
    loras = []
    for group, parts in groups.items():
        if "down" not in parts or "up" not in parts:
            raise LoRAError(f"{name}: {group} has {' and '.join(sorted(parts))} but no "
                            f"{'up' if 'down' in parts else 'down'} weight")
        target = names[group]
        if target in seen:
            raise LoRAError(f"{name}: {seen[target]} and {group} both adapt {target[1]}")
        seen[target] = group
        base = models[target[0]].get_submodule(target[1])
        down, up = _fit(f"{name}: {group}", base, parts["down"], parts["up"])
        alpha = float(parts["alpha"]) if "alpha" in parts else _peft_alpha(peft, group, down.shape[0])
        loras.append(LoRA(down, up, alpha, conv=_conv_args(base)))
    network = LoRANetwork(list(seen), loras, name=name, metadata=meta)
    if not isinstance(source, dict):  # A1111's "Lora hashes" infotext field: 12 hex digits of the file's
        network.shorthash = sha256(source)[:12]
    weight = next(unet.parameters())
    return network.to(device=device or weight.device, dtype=dtype or weight.dtype)


def _group(sd: dict[str, Tensor]) -> tuple[dict[str, dict[str, Tensor]], list[str]]:
    """Keys -> {layer name: {"down"|"up"|"alpha": tensor}}, and the keys of no known kind."""
    groups: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        suffix = next((s for s in _KINDS if key.endswith(s)), None)
        if suffix is None:
            unknown.append(key)
        else:
            groups.setdefault(key[: -len(suffix)], {})[_KINDS[suffix]] = value
    return groups, unknown


def _unknown_message(name: str, unknown: list[str], two_encoders: bool = False) -> str:
    kinds = sorted({v for k, v in _UNSUPPORTED.items() if any(k in u for u in unknown)})
    hint = f" ({', '.join(kinds)} files are not supported)" if kinds else ""
    if not two_encoders and any(u.startswith(_SDXL_ONLY) for u in unknown):
        hint += " (an SDXL LoRA, for two text encoders; this model has one)"
    return f"{name}: keys that match no LoRA layer of this model{hint}: {_few(sorted(unknown))}"


def _fit(what: str, base: nn.Module, down: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    """down/up reshaped to the layer's kind: a Linear's LoRA may be stored as 1x1 convs and a 1x1
    conv's as Linear (SD 1's proj_in/proj_out are convs, SD 2's Linear)."""
    w = base.weight
    given = f"down {tuple(down.shape)}, up {tuple(up.shape)}"
    if w.ndim == 4:
        down = down[:, :, None, None] if down.ndim == 2 else down
        up = up[:, :, None, None] if up.ndim == 2 else up
    else:
        down = down.flatten(1) if down.ndim == 4 and down.shape[2:] == (1, 1) else down
        up = up.flatten(1) if up.ndim == 4 and up.shape[2:] == (1, 1) else up
    rank = down.shape[0]
    ok = down.shape == (rank, *w.shape[1:]) and up.shape == (w.shape[0], rank, *(1,) * (w.ndim - 2))
    if not ok:
        raise LoRAError(f"{what}: LoRA weights ({given}) do not fit the layer's weight {tuple(w.shape)}")
    return down, up


def _peft_alpha(peft: dict, group: str, rank: int) -> float | None:
    """The alpha diffusers' LoRA metadata gives a layer (PEFT's LoraConfig), as kohya's alpha:
    scale = alpha / rank. None when the file has no metadata (scale 1)."""
    model, _, path = group.partition(".")
    if f"{model}.lora_alpha" not in peft:
        return None
    alpha = float(peft[f"{model}.lora_alpha"])
    for pattern, value in (peft.get(f"{model}.alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", path):  # how PEFT matches its patterns
            alpha = float(value)
            break
    if peft.get(f"{model}.use_rslora"):  # rank-stabilised LoRA: scale = alpha / sqrt(rank)
        alpha *= math.sqrt(rank)
    return alpha


def resolve_lora(name: str, directory: str | Path) -> Path:
    """The file a prompt's `<lora:NAME:...>` refers to: NAME.safetensors (then .pt, .ckpt) in
    `directory`, else in one of its subfolders (as AUTOMATIC1111 searches its Lora folder)."""
    directory = Path(directory)
    for suffix in SUFFIXES:
        if (directory / f"{name}{suffix}").is_file():
            return directory / f"{name}{suffix}"
    for suffix in SUFFIXES:
        found = sorted(directory.rglob(f"{name}{suffix}"))
        if found:
            return found[0]
    have = sorted(p.stem for s in SUFFIXES for p in directory.rglob(f"*{s}")) if directory.is_dir() else []
    raise FileNotFoundError(f"no LoRA named {name!r} in {directory} (found: {_few(have) if have else 'none'})")


# ---------------------------------------------------------------------------------------------
# Applying


@dataclass(eq=False)
class Applied:
    """One network applied to the models: as forward hooks, or merged (with the replaced weights)."""

    network: LoRANetwork
    strength: float
    merged: bool = False
    hooks: list = field(default_factory=list)
    saved: dict[Target, Tensor] = field(default_factory=dict)


class LoRAStack:
    """The LoRAs applied to a UNet and text encoder, in order; each with its own strength."""

    def __init__(self, unet: nn.Module, clip: nn.Module, clip2: nn.Module | None = None):
        self.models = {"unet": unet, "clip": clip, "clip2": clip2}
        self.applied: list[Applied] = []

    def add(self, network: LoRANetwork, strength: float = 1.0, *, merge: bool = False) -> Applied:
        applied = Applied(network, float(strength))
        self._merge(applied) if merge else self._hook(applied)
        self.applied.append(applied)
        return applied

    def remove(self, applied: Applied) -> None:
        """Take one LoRA off. Merged LoRAs applied after it are unmerged and merged again, so every
        layer's weight is restored exactly to what it was before `applied` was merged."""
        i = self.applied.index(applied)
        later = [a for a in self.applied[i + 1 :] if a.merged] if applied.merged else []
        for a in reversed(later):
            self._unmerge(a)
        self._unmerge(applied) if applied.merged else self._unhook(applied)
        del self.applied[i]
        for a in later:
            self._merge(a)

    def clear(self) -> None:
        """Take every LoRA off (merged ones in reverse order: the weights come back bit for bit)."""
        for applied in reversed(list(self.applied)):
            self.remove(applied)

    def merge(self, applied: Applied) -> None:
        """Fold an applied dynamic LoRA into the weights (faster steps; same function)."""
        if not applied.merged:
            self._unhook(applied)
            self._merge(applied)
            self.applied.remove(applied)  # merges are undone in reverse order of merging
            self.applied.append(applied)

    def unmerge(self, applied: Applied) -> None:
        """Back to a dynamic LoRA; the weights are restored exactly."""
        if applied.merged:
            self.remove(applied)
            self._hook(applied)
            self.applied.append(applied)

    def _layer(self, target: Target) -> nn.Module:
        return self.models[target[0]].get_submodule(target[1])

    def _hook(self, applied: Applied) -> None:
        for target, lora in zip(applied.network.targets, applied.network.loras):
            applied.hooks.append(self._layer(target).register_forward_hook(_add_lora(lora, applied)))

    def _unhook(self, applied: Applied) -> None:
        for hook in applied.hooks:
            hook.remove()
        applied.hooks.clear()

    @torch.no_grad()
    def _merge(self, applied: Applied) -> None:
        for target, lora in zip(applied.network.targets, applied.network.loras):
            w = self._layer(target).weight
            applied.saved[target] = w.detach().clone()
            w.copy_((w.float() + applied.strength * lora.delta_weight().to(w.device)).to(w.dtype))
        applied.merged = True

    @torch.no_grad()
    def _unmerge(self, applied: Applied) -> None:
        for target, weight in applied.saved.items():
            self._layer(target).weight.copy_(weight)
        applied.saved.clear()
        applied.merged = False


def _add_lora(lora: LoRA, applied: Applied):
    def hook(module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return output + lora(args[0]) * (lora.scale * applied.strength)

    return hook
