"""Textual-inversion embeddings (Gal et al. 2022): files and folders of learned token vectors.

Formats read, as AUTOMATIC1111 reads them:
- A1111 `.pt` / `.bin`: a dict with `string_to_param = {"*": vectors (n, D)}`, `name`, `step`, ...
  read with `torch.load(weights_only=True)`; a pickle that needs anything but tensors and plain
  containers is refused, never executed.
- `.safetensors` with one tensor: `emb_params` (kohya / A1111) or `{token: vectors}`.
- diffusers' `learned_embeds.bin` `{token: vectors (D,) or (n, D)}`.
- SDXL `.safetensors`: `clip_l` (n, 768) and `clip_g` (n, 1280), one set per text encoder.
In a folder of embeddings each file's stem is its trigger word (as in A1111), whatever name the
file stores. `save_embedding` writes A1111's `.pt` or a `.safetensors` by the path's suffix.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sdtorch.formats.atomic import save_safetensors, save_torch
from sdtorch.formats.files import read_state_dict

log = logging.getLogger(__name__)

SUFFIXES = (".pt", ".bin", ".safetensors")


@dataclass
class Embedding:
    name: str  # the name stored in the file, else the file's stem
    vectors: torch.Tensor  # (n, D) float32: one vector per token slot
    step: int | None = None  # training step, when the file says
    vectors2: torch.Tensor | None = None  # SDXL: the second text encoder's (clip_g); `vectors` are clip_l


def load_embedding(path: str | Path) -> Embedding:
    """Read one embedding file (.pt / .bin / .safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embedding not found: {path}")
    if path.suffix == ".safetensors":
        try:
            data, meta = read_state_dict(path)
        except ValueError as e:
            raise ValueError(f"cannot read embedding {path}: not a safetensors file ({e})") from None
        emb = _from_data(data, path, meta.get("name"))
        if emb.step is None and meta.get("step", "").isdigit():
            emb.step = int(meta["step"])
        return emb
    if path.suffix not in SUFFIXES:
        raise ValueError(f"unknown embedding file type {path.suffix!r} for {path}; expected one of {SUFFIXES}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        wanted = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if wanted is None:
            raise ValueError(f"cannot read embedding {path}: not a PyTorch file, or a pickle that "
                             f"torch.load(weights_only=True) refuses") from None
        raise ValueError(
            f"refused to load embedding {path}: its pickle asks for {wanted.group(1)}, more than tensors "
            f"and plain containers; only weights are loaded. Convert it to .safetensors with a tool you trust."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # a truncated or foreign file
        raise ValueError(f"cannot read embedding {path}: not a PyTorch file ({e})") from None
    return _from_data(data, path, None)


def _from_data(data, path: Path, name: str | None) -> Embedding:
    if not isinstance(data, dict):
        raise TypeError(f"{path} is not an embedding: expected a dict, got {type(data).__name__}")
    if "string_to_param" in data:  # A1111
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise ValueError(f"embedding {path} must hold exactly one term in string_to_param")
        vectors = next(iter(params.values()))
        name = data.get("name") if isinstance(data.get("name"), str) else name
        step = data.get("step") if isinstance(data.get("step"), int) else None
    elif "clip_l" in data and "clip_g" in data:  # SDXL: one set of vectors per text encoder
        l, g = (_vectors(data[k], path) for k in ("clip_l", "clip_g"))
        if l.shape[0] != g.shape[0]:
            raise ValueError(f"embedding {path}: clip_l has {l.shape[0]} vectors but clip_g {g.shape[0]}")
        return Embedding(name or path.stem, l, None, g)
    elif len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):  # emb_params / diffusers
        key, vectors = next(iter(data.items()))
        name, step = name or (None if key == "emb_params" else key), None
    else:
        raise ValueError(f"{path} is not an embedding: no string_to_param and not a single tensor "
                         f"(keys: {', '.join(map(str, list(data)[:8]))})")
    return Embedding(name or path.stem, _vectors(vectors, path), step)


def _vectors(vectors, path: Path) -> torch.Tensor:
    if not isinstance(vectors, torch.Tensor) or vectors.ndim not in (1, 2) or 0 in vectors.shape:
        raise ValueError(f"embedding {path}: expected vectors (n, D), got {getattr(vectors, 'shape', vectors)}")
    return vectors.detach().float().reshape(-1, vectors.shape[-1])  # (D,) -> (1, D)


def save_embedding(path: str | Path, name: str, vectors: torch.Tensor, *, step: int | None = None) -> Path:
    """Write vectors (n, D) as A1111's `.pt` (or `.bin`) or as `.safetensors` (`emb_params`)."""
    path = Path(path)
    vectors = vectors.detach().cpu().contiguous()
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be (n, D), got shape {tuple(vectors.shape)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        meta = {"name": name} | ({"step": str(step)} if step is not None else {})
        save_safetensors({"emb_params": vectors}, path, meta)
    elif path.suffix in (".pt", ".bin"):
        save_torch({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": name,
                    "step": step, "sd_checkpoint": None, "sd_checkpoint_name": None}, path)
    else:
        raise ValueError(f"embedding files end in .pt, .bin or .safetensors, got {path.name!r}")
    return path


def load_embeddings(path: str | Path, width: int | None = None, width2: int | None = None) -> dict:
    """{trigger word: vectors (n, D)} from one file (its stem is the trigger) or a folder (searched
    recursively); with `width2` (a model with two text encoders, SDXL) {trigger word: (clip_l
    vectors, clip_g vectors)}. In a folder, embeddings that do not fit (another model family) are
    skipped with a log message; a single file that does not fit is an error."""
    path = Path(path)
    if path.is_file():
        emb = load_embedding(path)
        problem = _misfit(emb, width, width2)
        if problem:
            raise ValueError(f"embedding {path} {problem}")
        return {path.stem: _value(emb, width2)}
    if not path.is_dir():
        raise FileNotFoundError(f"embeddings folder not found: {path}")
    found: dict = {}
    for file in sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES and p.is_file()):
        emb = load_embedding(file)
        problem = _misfit(emb, width, width2)
        if problem:
            log.info("skipped embedding %s: it %s", file, problem)
        elif file.stem in found:
            log.warning("embedding %s: the trigger word %r is taken by another file; skipped", file, file.stem)
        else:
            found[file.stem] = _value(emb, width2)
    return found


def _misfit(emb: Embedding, width: int | None, width2: int | None) -> str:
    """Why an embedding does not fit a model with text encoders of these widths ("" if it does)."""
    if (emb.vectors2 is None) != (width2 is None):
        return ("is an SDXL embedding (clip_l + clip_g); this model has one text encoder" if width2 is None
                else "has one set of vectors; this model (SDXL) needs clip_l and clip_g")
    widths = (emb.vectors.shape[-1], None if emb.vectors2 is None else emb.vectors2.shape[-1])
    if width is not None and widths != (width, width2):
        return f"has vectors of width {widths[0] if width2 is None else widths}, the text encoder {width if width2 is None else (width, width2)}"
    return ""


def _value(emb: Embedding, width2: int | None):
    return emb.vectors if width2 is None else (emb.vectors, emb.vectors2)
