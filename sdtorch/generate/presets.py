"""Few-step presets: the settings few-step models were distilled for, as data. A preset fills in
what the user did not set (`sdtorch generate --preset sd-turbo`); explicit options win.

- sd-turbo / sdxl-turbo: the scheduler configs stabilityai ships with the models (Euler, resp.
  Euler ancestral, with "trailing" timestep spacing), 1 step (up to 4), no guidance.
- lcm: LCM models and LCM-LoRAs (diffusers' LCMScheduler), 4 steps (2-8), guidance 1 (up to 2).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    sampler: str
    steps: int
    cfg: float
    timestep_spacing: str | None = None


PRESETS = {
    "sd-turbo": Preset("euler", 1, 0.0, "trailing"),
    "sdxl-turbo": Preset("euler_a", 1, 0.0, "trailing"),
    "lcm": Preset("lcm", 4, 1.0),
}
