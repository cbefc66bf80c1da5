"""Reading weight files: the one reader of .safetensors (plain reads into owned memory) and of
PyTorch pickles (weights only: a pickle that asks to run code is refused)."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import torch

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model."""


def read_state_dict(path: str | Path, lazy: Callable[[str], bool] | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a single file. Pickles are loaded with weights_only=True.
    lazy(name) True: that tensor is not read; a meta tensor of its shape and dtype stands for it."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return _read_safetensors(path, lazy or (lambda name: False))
    if path.suffix not in SUFFIXES:
        raise CheckpointError(f"unknown checkpoint type {path.suffix!r} for {path}; expected one of {SUFFIXES}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refused to load {path}: its pickle asks to run code or build objects other than tensors "
            f"({first}); only plain weights are loaded"
        ) from None
    except Exception as e:  # zip/EOF/format errors from a truncated or foreign file
        raise CheckpointError(f"cannot read {path}: not a valid PyTorch checkpoint ({e})") from None
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values() if v is not None):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return {k: v.to("meta") if lazy and lazy(k) else v for k, v in sd.items() if isinstance(v, torch.Tensor)}, {}


# safetensors' dtype names (https://github.com/huggingface/safetensors, format description).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def _read_safetensors(path: Path, lazy: Callable[[str], bool]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A .safetensors file read with plain reads, tensor by tensor, into memory this process
    owns. (Memory-mapping it would keep the whole file resident in the process next to the
    converted weights: a 2 GB file loaded as bf16 would peak at 4 GB instead of 2.)

    Layout: 8 bytes little-endian header length n, n bytes of JSON {name: {dtype, shape,
    data_offsets: [begin, end]}, "__metadata__": {str: str}}, then the tensors' bytes."""
    size = path.stat().st_size

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"cannot read {path}: corrupt or not a safetensors file ({why})")

    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= size - 8:
            raise corrupt(f"header length {n} for a file of {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise corrupt(f"header is not JSON: {e}") from None
        if not isinstance(header, dict):
            raise corrupt("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        sd = {}
        try:
            entries = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])  # file order
            for name, info in entries:
                dtype, shape, (begin, end) = SAFETENSORS_DTYPES.get(info["dtype"]), info["shape"], info["data_offsets"]
                if dtype is None:
                    raise corrupt(f"{name}: unknown dtype {info['dtype']!r}")
                numel = 1
                for d in shape:
                    numel *= d
                if not 0 <= begin <= end <= size - 8 - n or end - begin != numel * dtype.itemsize:
                    raise corrupt(f"{name}: bytes {begin}..{end} do not hold {info['dtype']} {shape}")
                if lazy(name):
                    sd[name] = torch.empty(shape, dtype=dtype, device="meta")
                    continue
                f.seek(8 + n + begin)
                buf = bytearray(end - begin)
                if f.readinto(buf) != len(buf):
                    raise corrupt(f"{name}: file ends early")
                sd[name] = torch.frombuffer(buf, dtype=dtype).reshape(shape) if buf else torch.empty(shape, dtype=dtype)
        except (KeyError, TypeError, ValueError) as e:
            raise corrupt(f"malformed header entry ({type(e).__name__}: {e})") from None
    return sd, {str(k): str(v) for k, v in meta.items()}


_HASHES: dict[tuple, str] = {}


def sha256(path: str | Path) -> str:
    """The file's SHA-256 (hex), read in 16 MiB blocks and remembered by path, size and
    modification time. AUTOMATIC1111's short model hash is its first 10 digits."""
    import hashlib

    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        _HASHES[key] = _sha256(path, hashlib.sha256())
    return _HASHES[key]


def _sha256(path, h) -> str:
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def read_tensor(path: str | Path) -> torch.Tensor:
    """The one tensor of a .npy, .pt / .pth or .safetensors file (a condition input, say), read safely."""
    import numpy as np

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"condition file {path} does not exist")
    try:
        if p.suffix == ".npy":
            return torch.from_numpy(np.load(p, allow_pickle=False))
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = list(load_file(p).values())
            if len(tensors) != 1:
                raise ValueError(f"{path} holds {len(tensors)} tensors; a condition file holds one")
            return tensors[0]
        value = torch.load(p, map_location="cpu", weights_only=True)
    except (OSError, ValueError, RuntimeError, EOFError) as e:
        raise ValueError(f"cannot read condition file {path}: {e}") from None
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{path} does not hold a tensor")
    return value
