"""The resolved parameters of one sampling run, as written into its PNG."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from sdtorch.conditioning.micro import Micro

from sdtorch.sampling import samplers
from sdtorch.sampling.noise import image_seeds

NEGATIVE_AESTHETIC = 2.5  # the refiner's default negative aesthetic score (diffusers, A1111)


@dataclass
class GenerationParams:
    """Everything that determines an image, as written into its PNG."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 20
    sampler: str = "dpmpp_2m_karras"
    cfg_scale: float = 7.5
    seed: int = 0
    width: int | None = 512  # None: the model's native size
    height: int | None = 512
    batch_size: int = 1
    eta: float = 0.0
    clip_skip: int | None = None
    extra: dict = field(default_factory=dict)
    scheduler: str = "automatic"  # with a combined sampler name ("dpmpp_2m_karras"): automatic
    seed_mode: str = "diffusers"  # or "a1111": per-image seeds seed, seed + 1, ... (sdtorch.sampling.noise)
    subseed: int = 0  # variation seed, mixed in by slerp with subseed_strength
    subseed_strength: float = 0.0
    seed_resize_from: tuple[int, int] = (0, 0)  # (w, h): the seed's noise drawn at this size (a1111 mode)
    condition: object = None  # the condition encoder's input (a tensor), when the pipeline has one
    micro: Micro | None = None  # SDXL's size / crop / aesthetic conditioning; None: the image's size
    negative_micro: Micro | None = None  # the negative side's; None: the prompt's, aesthetic score 2.5
    controls: tuple = ()  # `sdtorch.adapters.control.ControlUnit`s
    timestep_spacing: str | None = None  # None: the model's schedule's

    def schedule(self, base):
        """The model's `ScheduleConfig` with this run's timestep spacing."""
        return base if self.timestep_spacing is None else replace(base, timestep_spacing=self.timestep_spacing)

    def micro_of(self, negative: bool = False) -> Micro:
        """The micro-conditioning of one side, defaults filled in (as diffusers' SDXL pipelines)."""
        size = (self.height, self.width)
        positive = self.micro or Micro(size)
        if positive.target_size is None:
            positive = replace(positive, target_size=size)
        if not negative:
            return positive
        if self.negative_micro is None:
            return replace(positive, aesthetic_score=NEGATIVE_AESTHETIC)
        return self.negative_micro if self.negative_micro.target_size else replace(self.negative_micro, target_size=size)

    def seeds(self) -> list[int]:
        """Each image's seed (`sampling.noise.image_seeds`)."""
        return image_seeds(self.seed, self.batch_size, self.seed_mode)

    def subseeds(self) -> list[int]:
        return image_seeds(self.subseed, self.batch_size, self.seed_mode)


def validate(p: GenerationParams, downscale: int = 8) -> None:
    """Raise TypeError/ValueError naming the first bad parameter (sizes may be None: native)."""
    if not isinstance(p.prompt, str) or not isinstance(p.negative_prompt, str):
        raise TypeError(f"prompt and negative prompt must be strings, got {type(p.prompt).__name__}")
    for name in ("width", "height"):
        v = getattr(p, name)
        if v is None:
            continue
        if not isinstance(v, int) or v <= 0 or v % 8 or v % downscale:
            raise ValueError(f"{name} must be a positive multiple of 8, got {v}")
    if not isinstance(p.steps, int) or p.steps <= 0:
        raise ValueError(f"steps must be a positive integer, got {p.steps}")
    if not isinstance(p.batch_size, int) or p.batch_size <= 0:
        raise ValueError(f"batch size must be a positive integer, got {p.batch_size}")
    sampler = samplers.SAMPLERS[samplers.resolve(p.sampler, p.scheduler)[0]]
    if p.eta and not sampler.eta:
        raise ValueError(f"sampler {p.sampler!r} takes no eta (got eta={p.eta}); only 'ddim' does")
