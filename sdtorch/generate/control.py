"""A request's ControlNet units made ready for one model and one sampling run."""

from __future__ import annotations

from typing import Callable

from sdtorch.adapters.control import ControlledUNet, control_hint
from sdtorch.formats.controlnet import check_fits
from sdtorch.generate.request import RequestError
from sdtorch.sampling import samplers
from sdtorch.sampling.schedule import sigma_to_t, training_sigmas
from sdtorch.sampling.schedulers import grid


def controlled_unet(pipe, params, start: int, stop: int | None) -> Callable[[bool], ControlledUNet]:
    """The units checked against the pipeline's UNet, their images at the output size, and a
    factory of the wrapper given whether the sampler quantizes timesteps: each sampler step's
    timestep (grid points start .. stop) tells the wrapper which step a UNet call belongs to."""
    units = []
    for unit in params.controls:
        try:
            check_fits(unit.model.cfg, pipe.config.unet)
        except ValueError as e:
            raise RequestError("controls", str(e)) from None
        hint = control_hint(unit, params.width, params.height)
        units.append((unit, hint.to(pipe.device, unit.model.dtype)))
    schedule = pipe.config.schedule
    sigmas, _ = grid(*samplers.resolve(params.sampler, params.scheduler), params.steps, schedule)
    sigmas = sigmas[start : (stop if stop is not None else len(sigmas) - 1)]

    def make(quantize: bool) -> ControlledUNet:
        return ControlledUNet(pipe.unet, units, sigma_to_t(sigmas, training_sigmas(schedule), quantize),
                              params.batch_size)

    return make
