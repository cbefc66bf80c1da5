"""The CPU fast path's pieces: channels-last weights and torch.compile with an eager fallback."""

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
