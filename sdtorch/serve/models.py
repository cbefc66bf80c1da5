"""The checkpoints a server offers: the built-in model, `--checkpoint`, and every checkpoint in
`--models-dir` (single files and diffusers folders), each with A1111's title "name [shorthash]".
Only these can be loaded through the API: a request names a model, never a path.

Hashes (the file's SHA-256, A1111's short hash is its first 10 hex digits) are cached in the data
directory by path, size and modification time, so a restart does not read every file again.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from sdtorch.families import CONCAT
from sdtorch.formats.atomic import atomic_write
from sdtorch.formats.files import sha256
from sdtorch.generate import Pipeline, load
from sdtorch.generate.loading import BUILTIN
from sdtorch.serve.controlnet import ControlNets

log = logging.getLogger(__name__)

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


@dataclass(frozen=True)
class Checkpoint:
    name: str  # file name relative to its folder ("emoji.safetensors", "sub/model.ckpt")
    path: Path
    sha256: str | None  # None for a diffusers folder

    @property
    def model_name(self) -> str:
        return Path(self.name).with_suffix("").as_posix() if self.path.is_file() else self.name

    @property
    def shorthash(self) -> str:
        return (self.sha256 or "")[:10]

    @property
    def title(self) -> str:
        return f"{self.name} [{self.shorthash}]" if self.sha256 else self.name

    def a1111(self) -> dict:
        return {"title": self.title, "model_name": self.model_name, "hash": self.shorthash or None,
                "sha256": self.sha256, "filename": str(self.path), "config": None}


class HashCache:
    def __init__(self, path: Path | None):
        self.path = path
        self._data: dict = {}
        if path is not None and path.is_file():
            try:
                self._data = json.loads(path.read_text())
            except (OSError, ValueError):
                self._data = {}

    def sha256(self, path: Path) -> str:
        st = path.stat()
        key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in self._data:
            self._data[key] = sha256(path)
            if self.path is not None:
                atomic_write(self.path, lambda tmp: tmp.write_text(json.dumps(self._data, indent=0)))
        return self._data[key]


class Models:
    """The offered checkpoints and the one that is loaded (switching loads another)."""

    def __init__(self, checkpoint: str | Path | None = None, models_dir: str | Path | None = None,
                 cache_dir: Path | None = None, dtype: str = "fp32", lora_dir: Path | None = None,
                 embeddings_dir: Path | None = None, controlnet_dir: str | Path | None = None):
        self.models_dir = Path(models_dir) if models_dir else None
        self.default_path = Path(checkpoint) if checkpoint else BUILTIN
        if not self.default_path.exists():
            raise FileNotFoundError(f"checkpoint not found: {self.default_path}")
        if self.models_dir is not None and not self.models_dir.is_dir():
            raise FileNotFoundError(f"models directory not found: {self.models_dir}")
        self.hashes = HashCache(cache_dir / "hashes.json" if cache_dir else None)
        self.dtype, self.lora_dir, self.embeddings_dir = dtype, lora_dir, embeddings_dir
        if controlnet_dir is None and self.models_dir is not None:
            controlnet_dir = self.models_dir / "ControlNet"  # A1111's models/ControlNet
        self.controlnets = ControlNets(controlnet_dir)
        self._lock = threading.Lock()
        self._loaded: tuple[str, Pipeline] | None = None
        # Second models requests name (the SDXL refiner, an x4 upscaler): one per role kept loaded.
        self._companions: dict[str, tuple[str, Pipeline]] = {}
        self._upscaler_files: dict[Path, bool] = {}
        self.refresh()
        self.default = self._by_path(self.default_path).title

    def refresh(self) -> None:
        found = [self._entry(self.default_path.name, self.default_path)]
        if self.models_dir is not None:
            for path in sorted(self.models_dir.rglob("*")):
                rel = path.relative_to(self.models_dir).as_posix()
                if self._elsewhere(path):
                    continue
                if path.is_file() and path.suffix in SUFFIXES:
                    found.append(self._entry(rel, path))
                elif path.is_dir() and (path / "model_index.json").is_file():
                    found.append(Checkpoint(rel, path, None))
        seen, self.entries = set(), []
        for c in found:
            if c.path.resolve() not in seen:
                seen.add(c.path.resolve())
                self.entries.append(c)

    def _elsewhere(self, path: Path) -> bool:
        """LoRA and ControlNet files are not checkpoints."""
        cn = self.controlnets.directory
        return "Lora" in path.parts or (cn is not None and path.is_relative_to(cn))

    def _entry(self, name: str, path: Path) -> Checkpoint:
        return Checkpoint(name, path, self.hashes.sha256(path) if path.is_file() else None)

    def _by_path(self, path: Path) -> Checkpoint:
        return next(c for c in self.entries if c.path.resolve() == path.resolve())

    def find(self, name: str) -> Checkpoint:
        """By title, file name, model name or (short) hash, as A1111 matches sd_model_checkpoint."""
        for c in self.entries:
            if name in (c.title, c.name, c.model_name) or (c.sha256 and len(name) >= 8 and c.sha256.startswith(name)):
                return c
        raise KeyError(f"unknown model {name!r}; this server offers: {', '.join(c.title for c in self.entries)}")

    def get(self, title: str) -> Pipeline:
        """The loaded pipeline of a model, loading it (and dropping the previous one) if needed."""
        with self._lock:
            if self._loaded is not None and self._loaded[0] == title:
                return self._loaded[1]
            entry = self.find(title)
            self._loaded = None  # free the old model before loading the new one
            log.warning("loading %s", entry.path)
            pipe = load(entry.path, dtype=self.dtype)
            if self.lora_dir is not None:
                pipe.set_lora_dir(self.lora_dir)
            if self.embeddings_dir is not None:
                pipe.load_embeddings(self.embeddings_dir)
            self._loaded = (entry.title, pipe)
            return pipe

    def companion(self, name: str, role: str = "refiner") -> Pipeline:
        """A second model a request names (A1111's refiner_checkpoint; an x4 upscaler as hr_upscaler),
        loading it if needed; one per role is kept beside the main model."""
        with self._lock:
            entry = self.find(name)
            held = self._companions.get(role)
            if held is None or held[0] != entry.title:
                self._companions.pop(role, None)
                log.warning("loading %s %s", role, entry.path)
                self._companions[role] = (entry.title, load(entry.path, dtype=self.dtype))
            return self._companions[role][1]

    def upscalers(self) -> list[Checkpoint]:
        """The offered checkpoints that are SD x4 upscalers (told from a .safetensors header or a
        diffusers folder's UNet config: 7 input channels and class labels; .ckpt files are not read)."""
        for c in self.entries:
            if c.path not in self._upscaler_files:
                self._upscaler_files[c.path] = _is_upscaler(c.path)
        return [c for c in self.entries if self._upscaler_files[c.path]]

    def find_upscaler(self, name: str) -> Checkpoint:
        found = next((c for c in self.upscalers() if name in (c.model_name, c.title, c.name)), None)
        if found is None:
            names = ", ".join(c.model_name for c in self.upscalers()) or "none"
            raise KeyError(f"unknown hires upscaler {name!r}; this server's upscaler models: {names}")
        return found

    @property
    def loaded(self) -> tuple[str, Pipeline] | None:
        return self._loaded


def _is_upscaler(path: Path) -> bool:
    """Whether a checkpoint's UNet is of the x4-upscaler kind (`families.CONCAT`), from its input
    channels and whether it has a class embedding."""
    if path.is_dir():
        config = path / "unet" / "config.json"
        d = json.loads(config.read_text()) if config.is_file() else {}
        shape = (d.get("in_channels"), bool(d.get("num_class_embeds")))
    elif path.suffix == ".safetensors":
        from safetensors import safe_open

        key = "model.diffusion_model.input_blocks.0.0.weight"
        with safe_open(str(path), "pt") as f:
            keys = set(f.keys())
            channels = f.get_slice(key).get_shape()[1] if key in keys else None
        shape = (channels, "model.diffusion_model.label_emb.weight" in keys)
    else:
        return False
    return CONCAT.get(shape) == "x4-upscaler"


def default_lora_dir(models_dir: str | None) -> Path | None:
    if models_dir is None:
        return None
    for name in ("Lora", "lora", "loras"):
        if (Path(models_dir) / name).is_dir():
            return Path(models_dir) / name
    return None
