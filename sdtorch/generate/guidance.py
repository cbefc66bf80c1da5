"""A1111 prompt schedules and AND in a run: each distinct text of the prompt's and the negative
prompt's schedules encoded once, as `Condition` schedules for `ScheduledCFG`. A prompt without
either keeps the plain two-condition guidance (`CFGDenoiser`)."""

from __future__ import annotations

import torch

from sdtorch.conditioning.prompts import pad_all
from sdtorch.conditioning.schedule import prompt_schedule, split_and
from sdtorch.models.condition import Condition
from sdtorch.sampling.denoisers import Schedule


def scheduled_conditions(pipe, params, concat: torch.Tensor | None) -> tuple[list[tuple[float, Schedule]], Schedule] | None:
    """(parts [(weight, schedule)], negative schedule), or None for a prompt with one condition."""
    if pipe.prompt_syntax != "a1111":
        return None
    parts = [(w, prompt_schedule(text, params.steps)) for text, w in split_and(params.prompt)]
    negative = prompt_schedule(params.negative_prompt, params.steps)
    if len(parts) == 1 and parts[0][0] == 1.0 and len(parts[0][1]) == 1 and len(negative) == 1:
        return None
    texts = list(dict.fromkeys([t for _, s in parts for _, t in s] + [t for _, t in negative]))
    states = [pipe.encode_prompt([t] * params.batch_size, params.clip_skip) for t in texts]
    states = pad_all(states, pipe.encode_prompt([""], params.clip_skip))
    encoded = {t: Condition(s, concat=concat) for t, s in zip(texts, states)}

    def conditions(schedule: list[tuple[int, str]]) -> Schedule:
        return [(end, encoded[t]) for end, t in schedule]

    return [(w, conditions(s)) for w, s in parts], conditions(negative)
