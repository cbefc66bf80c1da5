"""AUTOMATIC1111's prompt editing, alternation and AND: the parser against A1111's documented
examples, and the sampling semantics against runs whose conditions are switched or combined by
hand, on the built-in model and on a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import sdtorch
from sdtorch.conditioning.schedule import prompt_schedule, split_and
from sdtorch.config import TINY
from sdtorch.generate import GenerationRequest, to_pil
from sdtorch.sampling import samplers

# prompt_parser's doctests (steps = 10)
DOCUMENTED = {
    "test": [(10, "test")],
    "a [b:3]": [(3, "a "), (10, "a b")],
    "a [b: 3]": [(3, "a "), (10, "a b")],
    "a [[[b]]:2]": [(2, "a "), (10, "a [[b]]")],
    "[(a:2):3]": [(3, ""), (10, "(a:2)")],
    "a [b : c : 1] d": [(1, "a b  d"), (10, "a  c  d")],
    "a[b:[c:d:2]:1]e": [(1, "abe"), (2, "ace"), (10, "ade")],
    "a [unbalanced": [(10, "a [unbalanced")],
    "a [b:.5] c": [(5, "a  c"), (10, "a b c")],
    "((a][:b:c [d:3]": [(3, "((a][:b:c "), (10, "((a][:b:c d")],
    "[a|(b:1.1)]": [(t, "a" if t % 2 else "(b:1.1)") for t in range(1, 11)],
    "a (red:1.2) [apple] <lora:x:0.5>": [(10, "a (red:1.2) [apple] <lora:x:0.5>")],
    "[from::4] to": [(4, "from to"), (10, " to")],
}


@pytest.mark.parametrize("prompt", list(DOCUMENTED))
def test_schedules_match_a1111(prompt):
    assert prompt_schedule(prompt, 10) == DOCUMENTED[prompt]


def test_fractions_are_of_the_steps_and_capped():
    assert prompt_schedule("[a:b:0.25]", 20) == [(5, "a"), (20, "b")]
    assert prompt_schedule("[a:b:50]", 20) == [(20, "a")]  # capped: never switches


def test_and_weights():
    assert split_and("a cat AND a dog :1.2 AND bird:-0.5") == [("a cat", 1.0), (" a dog", 1.2), (" bird", -0.5)]
    assert split_and("a cat") == [("a cat", 1.0)]
    assert split_and("ANDROID") == [("ANDROID", 1.0)]


@pytest.fixture(scope="module", params=["builtin", "tiny"])
def pipe(request, tmp_path_factory):
    if request.param == "builtin":
        return sdtorch.load()
    tiny = request.getfixturevalue("tiny_reference")
    return sdtorch.load(tiny.checkpoint, config=TINY)


def hand_run(pipe, pick, steps: int, seed: int, cfg: float, size: int, sampler: str = "euler"):
    """Sample with a denoiser that, at call k, guides with the (weights, conds) pick(k) returns."""
    empty = pipe.encode_prompt([""])
    inner = pipe.denoiser(cfg).denoiser  # the unguided DiscreteDenoiser

    class Hand:
        calls = 0

        def __call__(self, x, sigma, cond=None, uncond=None):
            k, Hand.calls = Hand.calls, Hand.calls + 1
            parts = pick(k)
            x0_u = inner(x, sigma, empty)
            return x0_u + cfg * sum(w * (inner(x, sigma, c) - x0_u) for w, c in parts)

    generator = torch.Generator("cpu").manual_seed(seed)
    f = pipe.vae.downscale
    noise = torch.randn((1, pipe.config.unet.out_channels, size // f, size // f), generator=generator)
    latents = samplers.sample(sampler, lambda q: Hand(), noise, steps, pipe.config.schedule, extra_args={},
                              generator=generator, disable=True, prediction=pipe.config.prediction,
                              scheduler="automatic")
    return np.asarray(to_pil(pipe.decode(latents))[0], dtype=np.int16)


def run(pipe, prompt: str, steps: int, seed: int, cfg: float, size: int, sampler: str = "euler"):
    image = pipe.run(GenerationRequest(prompt, steps=steps, seed=seed, cfg_scale=cfg, sampler=sampler,
                                       scheduler="automatic", width=size, height=size)).images[0]
    return np.asarray(image, dtype=np.int16)


def size_of(pipe) -> int:
    return min(pipe.config.sample_size, 64)


def test_prompt_editing_switches_the_condition_at_its_step(pipe):
    cat, dog = pipe.encode_prompt(["a cat"]), pipe.encode_prompt(["a dog"])
    s = size_of(pipe)
    got = run(pipe, "[a cat:a dog:5]", 10, 11, 7.0, s)
    want = hand_run(pipe, lambda k: [(1.0, cat if k <= 5 else dog)], 10, 11, 7.0, s)
    assert np.abs(got - want).max() <= 1
    assert np.abs(got - run(pipe, "a cat", 10, 11, 7.0, s)).max() > 0  # it did change something


def test_alternation_switches_every_step(pipe):
    cat, dog = pipe.encode_prompt(["cat"]), pipe.encode_prompt(["dog"])
    s = size_of(pipe)
    got = run(pipe, "[cat|dog]", 6, 3, 7.0, s, sampler="euler_a")
    # the schedule is [(1, cat), (2, dog), (3, cat), ...]; denoiser call k takes the first entry
    # with k <= its step: calls 0 and 1 'cat', 2 'dog', 3 'cat', ...
    want = hand_run(pipe, lambda k: [(1.0, cat if max(k, 1) % 2 == 1 else dog)], 6, 3, 7.0, s, sampler="euler_a")
    assert np.abs(got - want).max() <= 1
    assert np.abs(got - run(pipe, "cat", 6, 3, 7.0, s, sampler="euler_a")).max() > 0


def test_and_is_the_weighted_sum_of_guided_predictions(pipe):
    a, b = pipe.encode_prompt(["a red apple"]), pipe.encode_prompt(["a green frog"])
    s = size_of(pipe)
    got = run(pipe, "a red apple AND a green frog :0.6", 8, 5, 6.0, s)
    want = hand_run(pipe, lambda k: [(1.0, a), (0.6, b)], 8, 5, 6.0, s)
    assert np.abs(got - want).max() <= 1
