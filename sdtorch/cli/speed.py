"""Speed options of the generating commands: compilation, DeepCache, timestep spacing, few-step
presets (`sdtorch.generate.presets`, filled in where the command line did not set a value) and
token merging."""

from __future__ import annotations

import argparse

from sdtorch.cli.recall import given
from sdtorch.generate.presets import PRESETS


def speed_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compile", nargs="?", const="inductor", choices=["inductor", "openvino"], default=None,
                   help="inductor (the default when given): torch.compile the UNet (no faster here, see README "
                   "Speed); openvino: the UNet run by OpenVINO's CPU runtime (pip install openvino; converted "
                   "once per shape, kept in ~/.cache/sdtorch)")
    p.add_argument("--deep-cache", type=int, default=0, metavar="N",
                   help="DeepCache: run the whole UNet every N-th call, reuse its deep features in between "
                   "(an approximation, faster; default 0: off)")
    p.add_argument("--deep-cache-branch", type=int, default=0, metavar="B",
                   help="DeepCache: how many skip levels the cached calls still compute (default 0: the shallowest)")
    p.add_argument("--timestep-spacing", choices=["leading", "linspace", "trailing"], default=None,
                   help="where the steps fall on the model's 1000 timesteps (default: the model's; turbo "
                   "models: trailing)")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="few-step settings (sampler, steps, CFG, spacing) for turbo / LCM models; "
                   "options given explicitly win")
    p.add_argument("--tome", type=float, default=0.0, metavar="RATIO",
                   help="token merging (ToMe for SD): merge this share of the tokens before self-attention at "
                   "full latent resolution (faster, approximate; 0.5 is ToMe's default; default 0: off)")
    p.add_argument("--tome-max-downsample", type=int, default=1, choices=[1, 2, 4, 8],
                   help="merge at levels down to this downsampling (1: full resolution only)")


def apply_preset(args: argparse.Namespace, argv: list[str]) -> None:
    preset = PRESETS[args.preset]
    for dest, flags in (("sampler", ("--sampler",)), ("steps", ("--steps",)), ("cfg", ("--cfg",)),
                        ("timestep_spacing", ("--timestep-spacing",))):
        if not given(argv, flags):
            setattr(args, dest, getattr(preset, dest))
