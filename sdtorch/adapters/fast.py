"""The CPU fast path's pieces: channels-last weights, torch.compile with an eager fallback, and
the check that a compiled snapshot of the UNet (OpenVINO, int8) still is its forward."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


class CompiledModule:
    """module(*args), through torch.compile; on any compile-time failure, a warning and the
    eager module from then on (a failure of the module itself then raises as usual)."""

    def __init__(self, module: torch.nn.Module):
        self.module = module
        self.compiled: Callable | None = None
        try:
            self.compiled = torch.compile(module)
        except Exception as e:  # e.g. a Python or platform torch.compile does not support
            log.warning("torch.compile is unavailable (%s); running eagerly", e)

    def __call__(self, *args):
        if self.compiled is not None:
            try:
                return self.compiled(*args)
            except Exception as e:
                log.warning("torch.compile failed (%s: %s); running eagerly", type(e).__name__, str(e)[:300])
                self.compiled = None
        return self.module(*args)


def fast_layout(module: torch.nn.Module) -> torch.nn.Module:
    """Channels-last weights for a module run in bfloat16/float16 on the CPU: oneDNN's
    convolutions then skip two layout conversions per call (measured in benchmarks/speed.py)."""
    return module.to(memory_format=torch.channels_last)


def snapshot_holds(module: torch.nn.Module) -> str | None:
    """Why a converted graph would not be this module's forward right now, or None."""
    for name, m in module.named_modules():
        if m._forward_hooks or m._forward_pre_hooks:
            return f"{name or 'the UNet'} has forward hooks (LoRA, ControlNet or an editing hook)"
        if getattr(m, "hook", None) is not None:
            return f"{name} has an attention hook"
        if getattr(m, "tome", None) is not None:
            return "token merging is on"
        if isinstance(m, torch.nn.Conv2d) and m.padding_mode != "zeros":
            return "its convolutions pad circularly (seamless tiling)"
    return None
