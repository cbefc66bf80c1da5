"""What conditions a run's denoiser: the pipeline's condition encoder's tokens when the request
gives its input (`encoder_conditions`), else the prompt read once (`parse_prompt`): the prompt's
LoRA tags handed to the pipeline's LoRA loader, each distinct text of the prompt's and the
negative prompt's schedules encoded once, and the result as `Condition`s: one cond / uncond pair
for a plain prompt (`CFGDenoiser`), or schedules of them for A1111's prompt editing, alternation
and AND (`ScheduledCFG`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdtorch.conditioning.micro import micro_vector
from sdtorch.conditioning.prompts import pad_all
from sdtorch.conditioning.schedule import ParsedPrompt, parse_prompt
from sdtorch.families import family_of
from sdtorch.generate.request import RequestError
from sdtorch.models.condition import Condition
from sdtorch.sampling.denoisers import Schedule


@dataclass
class TextConditions:
    cond: Condition | None  # None when `scheduled` replaces the pair
    uncond: Condition | None
    scheduled: tuple[list[tuple[float, Schedule]], Schedule] | None = None  # (parts, negative schedule)


def conditions(pipe, params, concat: torch.Tensor | None) -> TextConditions:
    """The run's cond / uncond pair (or schedules): from the condition encoder or from text."""
    encoder = pipe.condition_encoder
    if params.condition is None:
        if encoder is not None and encoder.mode == "replace":
            raise RequestError("condition", "this model is conditioned by its condition encoder, not by text: "
                                            "give the encoder's input (--condition FILE)")
        return text_conditions(pipe, params, concat)
    if encoder is None:
        raise RequestError("condition", "this model has no condition encoder; it is conditioned by text only")
    return encoder_conditions(pipe, encoder, params, concat)


def encoder_conditions(pipe, encoder, params, concat: torch.Tensor | None) -> TextConditions:
    """Tokens of the encoder's input against its empty condition; in "join" mode appended to the
    prompt's (and the negative prompt's) text states."""
    b = params.batch_size
    try:
        x = encoder.batched(params.condition, b).to(pipe.device, torch.float32)
    except ValueError as e:
        raise RequestError("condition", str(e)) from None
    with torch.autocast(pipe.device.type, dtype=pipe.dtype, enabled=pipe.dtype != torch.float32):
        cond, uncond = encoder(x), encoder.empty(b)
    if encoder.mode == "replace":
        if params.prompt or params.negative_prompt:
            raise RequestError("prompt", "this model's condition encoder replaces the text: leave the prompt empty")
        return TextConditions(_with(cond, concat), _with(uncond, concat))
    text = text_conditions(pipe, params, concat)
    if text.scheduled is not None:
        raise RequestError("prompt", "prompt schedules and AND do not combine with a condition encoder's input")
    return TextConditions(_joined(text.cond, cond), _joined(text.uncond, uncond))


def _with(c: Condition, concat) -> Condition:
    return Condition(c.crossattn.to(torch.float32), None if c.vector is None else c.vector.float(), concat)


def _joined(text: Condition, extra: Condition) -> Condition:
    tokens = extra.crossattn.to(text.crossattn.dtype)
    return Condition(torch.cat([text.crossattn, tokens], 1), extra.vector if text.vector is None else text.vector,
                     text.concat)


def text_conditions(pipe, params, concat: torch.Tensor | None) -> TextConditions:
    b, skip = params.batch_size, params.clip_skip
    if pipe.prompt_syntax != "a1111":  # the reference's encoding: no syntax at all
        cond, uncond = (pipe.encode_text([t] * b, skip) for t in (params.prompt, params.negative_prompt))
        return TextConditions(_condition(pipe, params, *cond, concat),
                              _condition(pipe, params, *uncond, concat, negative=params.negative_prompt))
    parsed = parse_prompt(params.prompt, params.negative_prompt, params.steps)
    _apply_loras(pipe, parsed)
    texts = parsed.texts
    encoded = [pipe.encode_text([t] * b, skip, tags_removed=True) for t in texts]
    states = [s for s, _ in encoded]
    if len(states) > 1:  # one UNet batch: pad to the longest with encodings of the empty prompt (A1111)
        states = pad_all(states, pipe.encode_prompt([""], skip))
    pooled = {t: p for t, (_, p) in zip(texts, encoded)}
    positive = {t: _condition(pipe, params, s, pooled[t], concat) for t, s in zip(texts, states)}
    negative = {t: _condition(pipe, params, s, pooled[t], concat, negative=t) for t, s in zip(texts, states)}
    if parsed.plain:
        return TextConditions(positive[parsed.parts[0][1][0][1]], negative[parsed.negative[0][1]])

    def conditions(schedule, encoded) -> Schedule:
        return [(end, encoded[t]) for end, t in schedule]

    return TextConditions(None, None, ([(w, conditions(s, positive)) for w, s in parsed.parts],
                                       conditions(parsed.negative, negative)))


def _condition(pipe, params, states: torch.Tensor, pooled: torch.Tensor | None, concat: torch.Tensor | None,
               negative: str | None = None) -> Condition:
    """Text states as a `Condition`; for UNets with a vector embedding (SDXL) with the pooled text and
    the micro-conditioning of its side. `negative`: the negative prompt's text, for that side: an
    empty one is zeros where the family says so (SDXL base, as diffusers and A1111)."""
    cfg = pipe.config
    if not cfg.unet.adm_in_channels:
        return Condition(states, concat=concat)
    if pooled is None:
        raise ValueError("this UNet takes a pooled text vector but no text encoder projects one")
    if negative == "" and family_of(cfg).zero_negative:
        states, pooled = torch.zeros_like(states), torch.zeros_like(pooled)
    return Condition(states, micro_vector(cfg, pooled, params.micro_of(negative is not None)), concat)


def _apply_loras(pipe, parsed: ParsedPrompt) -> None:
    """As A1111, only the prompt's tags apply; the loader makes exactly those active."""
    if pipe.lora_loader is not None:
        pipe.lora_loader(list(parsed.loras))
    elif parsed.loras:
        raise ValueError(f"prompt names LoRA {parsed.loras[0][0]!r} but no LoRA directory was given")
