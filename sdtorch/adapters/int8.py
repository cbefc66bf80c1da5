"""int8 post-training quantization of the UNet with PyTorch's own flow: PT2E (torch.export, the
x86 Inductor quantizer's static int8 config: per-channel weights, per-tensor activations),
calibrated on UNet inputs recorded from real sampling runs, then compiled by Inductor with
freezing so the int8 convolutions and linears run as oneDNN kernels. An approximation.

`torchao` (PyPI) holds the PT2E flow since PyTorch moved it out of torch.ao; it is optional.
`--dtype int8` (`sdtorch.generate.quantized`) loads the model in float32, samples the calibration
prompts at the request's size, quantizes, and runs the UNet int8 from then on; like every compiled graph it is a snapshot, so a
request that changes the UNet (LoRA hooks, tiling, token merging) runs eagerly in float32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from sdtorch.adapters.fast import snapshot_holds

log = logging.getLogger(__name__)


class Recorder:
    """module(*args) as it is, keeping the inputs of every call (for calibration)."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.calls = module, []

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(a.detach().clone() for a in args))
        return self.module(*args)


def quantize(module: torch.nn.Module, calibration: list[tuple[torch.Tensor, ...]]) -> Callable:
    """The int8 module (compiled) for inputs shaped like calibration[0]; module in float32."""
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
            X86InductorQuantizer,
            get_default_x86_inductor_quantization_config,
        )
    except ImportError as e:
        raise ImportError(f"int8 needs torchao's PT2E flow: pip install torchao ({e})") from None
    if not calibration:
        raise ValueError("int8 calibration needs at least one recorded call")
    with torch.no_grad():
        exported = torch.export.export(module, calibration[0], strict=False).module()
        quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        for args in calibration:
            prepared(*args)
        converted = convert_pt2e(prepared)
    log.info("int8: calibrated on %d UNet calls", len(calibration))
    import torch._inductor.config as inductor_config

    compiled = torch.compile(converted)

    def run(*args: torch.Tensor) -> torch.Tensor:
        # freezing: weights folded and prepacked (the int8 kernels need constant weights)
        with torch.no_grad(), inductor_config.patch(freezing=True):
            return compiled(*args)

    return run


CALIBRATION = ("a castle on a hill at sunset", "a bowl of fruit on a wooden table", "a portrait of a woman")


class Int8UNet:
    """The int8 graph where it is the UNet's forward (`fast.snapshot_holds`), eager otherwise."""

    backend = "int8 PT2E"  # written into the infotext: it changes the image

    def __init__(self, module: torch.nn.Module, graph: Callable, shapes: tuple):
        self.module, self.graph, self.shapes = module, graph, shapes

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if tuple(tuple(a.shape) for a in args) != self.shapes or snapshot_holds(self.module) is not None:
            return self.module(*args)
        return self.graph(*args)
