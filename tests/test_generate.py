"""The Python API: GenerationRequest, Pipeline.run, on_step and cancel, thread safety."""

from __future__ import annotations

import threading
from dataclasses import FrozenInstanceError, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sdtorch
from sdtorch.generate import Cancelled, CancelToken, GenerationRequest, RequestError

LORA = str(Path(__file__).parent / "data" / "golden" / "starry.safetensors")


@pytest.fixture(scope="module")
def pipe():
    return sdtorch.load()


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(im) for im in result.images]


def test_request_is_frozen_and_validates_each_field():
    r = GenerationRequest("a cat")
    with pytest.raises(FrozenInstanceError):
        r.steps = 3
    bad = {"steps": 0, "width": 100, "batch_size": 0, "sampler": "nope", "scheduler": "nope", "eta": 0.5,
           "clip_skip": 0, "prompt_syntax": "x", "strength": 2.0, "loras": (("a",),), "deep_cache": -1,
           "cfg_scale": "high", "seed": -5, "mask": Image.new("L", (8, 8))}
    for name, value in bad.items():
        with pytest.raises(RequestError) as e:
            replace(r, **{name: value}).validate()
        assert e.value.field == ("sampler" if name == "sampler" else name), (name, str(e.value))
    with pytest.raises(RequestError, match="mask is 8x8 but the image is 16x16"):
        replace(r, init_image=Image.new("RGB", (16, 16)), mask=Image.new("L", (8, 8))).validate()


def test_run_reports_every_step_and_resolves_the_seed(pipe):
    seen = []
    result = pipe.run(GenerationRequest("a red apple", steps=5, sampler="euler", scheduler="exponential"),
                      on_step=lambda step, total, latents: seen.append((step, total, tuple(latents.shape))))
    assert seen == [(i, 5, (1, 4, 16, 16)) for i in range(1, 6)]
    assert result.request.seed >= 0 and result.seeds == [result.request.seed]
    assert f"Seed: {result.request.seed}" in result.infotexts[0]
    again = pipe.run(result.request)
    assert [a.tobytes() for a in pixels(again)] == [a.tobytes() for a in pixels(result)]


def test_img2img_reports_the_steps_it_runs(pipe):
    steps = []
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    pipe.run(GenerationRequest("a red square", steps=10, strength=0.5, seed=1, init_image=init),
             on_step=lambda s, t, x: steps.append((s, t)))
    assert steps == [(i, 5) for i in range(1, 6)]


def test_cancel_stops_at_the_next_step(pipe):
    token, seen = CancelToken(), []

    def on_step(step, total, latents):
        seen.append(step)
        if step == 2:
            token.cancel()

    with pytest.raises(Cancelled):
        pipe.run(GenerationRequest("a red apple", steps=8, seed=0), on_step=on_step, cancel=token)
    assert seen == [1, 2]
    assert pipe.run(GenerationRequest("a red apple", steps=2, seed=0)).images  # the pipeline still works


def test_schedulers_give_different_grids_and_aliases_the_same_image(pipe):
    base = GenerationRequest("a flag", steps=4, seed=3, sampler="dpmpp_2m")
    combined = pipe.run(replace(base, sampler="dpmpp_2m_karras", scheduler="automatic"))
    split = pipe.run(replace(base, scheduler="karras"))
    assert pixels(combined)[0].tobytes() == pixels(split)[0].tobytes()
    others = {s: pixels(pipe.run(replace(base, scheduler=s)))[0] for s in ("automatic", "exponential", "sgm_uniform")}
    assert len({a.tobytes() for a in others.values()}) == 3


def test_two_threads_on_one_pipeline_equal_one_after_the_other(pipe):
    a = GenerationRequest("a red apple", steps=6, seed=5, sampler="euler_a", scheduler="automatic",
                          loras=((LORA, 0.8),), clip_skip=2, batch_size=2)
    b = GenerationRequest("a blue car", steps=6, seed=6, sampler="dpmpp_2m", scheduler="karras",
                          deep_cache=2, prompt_syntax="plain")
    alone = {"a": pixels(pipe.run(a)), "b": pixels(pipe.run(b))}
    together: dict[str, list] = {}

    def go(key, request, n=3):
        together[key] = [pixels(pipe.run(request)) for _ in range(n)]

    threads = [threading.Thread(target=go, args=("a", a)), threading.Thread(target=go, args=("b", b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    for key in ("a", "b"):
        for run in together[key]:
            assert [x.tobytes() for x in run] == [x.tobytes() for x in alone[key]]
    # Nothing of a request stays on the pipeline: a plain run is as before any of them.
    plain = GenerationRequest("a red apple", steps=6, seed=5, sampler="euler_a", scheduler="automatic")
    assert pipe.loras.applied == [] and pipe.deep_cache is None and pipe.prompt_syntax == "a1111"
    assert len(pipe.lora_cache) == 1  # the LoRA file was read once for all seven runs
    assert pixels(pipe.run(plain))[0].tobytes() != alone["a"][0].tobytes()
