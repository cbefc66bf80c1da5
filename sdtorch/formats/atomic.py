"""One way to write a file that a reader never sees half-written: write a sibling, then rename."""

from __future__ import annotations

import os
from pathlib import Path

import torch


def atomic_write(path: str | Path, write) -> Path:
    """write(tmp_path) fills a temporary sibling of `path`; it then replaces `path` in one rename
    (POSIX and Windows). On an error the temporary file is removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """A .safetensors file, written atomically."""
    from safetensors.torch import save_file

    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_torch(obj, path: str | Path) -> Path:
    """torch.save, written atomically (training checkpoints)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
