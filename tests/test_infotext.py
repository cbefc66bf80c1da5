"""Infotext round trips: every PNG sdtorch writes is read back by the `sd-parsers` package into
the same parameters; A1111-written infotexts (in its documented format) are reproduced by
`sdtorch generate --from-png`; A1111 styles.csv applied by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from sdtorch.cli import main
from sdtorch.conditioning.styles import Style, apply_styles
from sdtorch.generate.infotext import parse_infotext

sd_parsers = pytest.importorskip("sd_parsers")
GOLDEN = Path(__file__).parent / "data" / "golden"

RUNS = {
    "plain": ["generate", "a red apple", "--seed", "5"],
    "negative-clip-skip": ["generate", "a (green:1.2) frog, smiling", "--negative", "blurry, dark", "--clip-skip", "2",
                           "--seed", "6", "--cfg", "5.5"],
    "schedule": ["generate", "a [cat:dog:0.5]", "--sampler", "euler_a", "--scheduler", "exponential", "--seed", "7"],
    "lora": ["generate", "a red apple <lora:starry:0.6>", "--lora-dir", str(GOLDEN), "--seed", "8"],
    "img2img": ["img2img", str(GOLDEN / "input.png"), "a blue square", "--strength", "0.5", "--seed", "9"],
}


def run(argv: list[str], out: Path) -> list[Path]:
    assert main([*argv, "--steps", "3", "--out", str(out)]) == 0
    return sorted(out.glob("*.png"))


@pytest.mark.parametrize("name", list(RUNS))
def test_sd_parsers_reads_back_what_sdtorch_writes(name, tmp_path):
    (png,) = run(RUNS[name], tmp_path)
    ours = parse_infotext(Image.open(png).info["parameters"])
    info = sd_parsers.ParserManager().parse(Image.open(png))
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    (sampler,) = info.samplers
    assert [p.value for p in sampler.prompts] == [ours["Prompt"]]
    assert [p.value for p in sampler.negative_prompts] == ([ours["Negative prompt"]] if ours["Negative prompt"] else [])
    assert sampler.name == ours["Sampler"]
    assert sampler.parameters["steps"] == ours["Steps"] == "3"
    assert sampler.parameters["seed"] == ours["Seed"] and sampler.parameters["cfg_scale"] == ours["CFG scale"]
    assert sampler.parameters.get("scheduler") == ours.get("Schedule type")
    assert sampler.model.name == "emoji" and sampler.model.hash == ours["Model hash"]
    assert info.metadata["Size"] == ours["Size"] == "64x64"
    if "Clip skip" in ours:
        assert sampler.parameters.get("clip_skip", info.metadata.get("Clip skip")) == "2"
    if name == "lora":
        assert ours["Lora hashes"].startswith("starry: ") and len(ours["Lora hashes"]) == len("starry: ") + 12


# Written by hand in A1111's documented infotext format (prompt, "Negative prompt:", one line of fields).
A1111_TEXTS = [
    "a cute cat, (masterpiece:1.2)\nNegative prompt: lowres, blurry\nSteps: 5, Sampler: Euler a, Schedule type: "
    "Automatic, CFG scale: 6.5, Seed: 1234, Size: 64x64, Model hash: 0123456789, Model: someone-else, Version: v1.10.0",
    "a red apple on a table\nSteps: 4, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 99, Size: 64x48, "
    "Model hash: abcdefabcd, Model: sd15, Clip skip: 2, Version: v1.10.0",
    "portrait\nNegative prompt: ugly\nSteps: 3, Sampler: DDIM, CFG scale: 4, Seed: 7, Size: 64x64, Model: x",
]


@pytest.mark.parametrize("text", A1111_TEXTS)
def test_from_png_reproduces_an_a1111_infotext(text, tmp_path):
    src = tmp_path / "a1111.png"
    meta = PngInfo()
    meta.add_text("parameters", text)
    Image.new("RGB", (8, 8)).save(src, pnginfo=meta)
    (png,) = run(["generate", "--from-png", str(src)], tmp_path / "out")
    want, got = parse_infotext(text), parse_infotext(Image.open(png).info["parameters"])
    for key in ("Prompt", "Negative prompt", "Seed", "Size", "Sampler", "Clip skip"):
        assert got.get(key) == want.get(key), key
    assert float(got["CFG scale"]) == float(want["CFG scale"])
    assert got.get("Schedule type", "Automatic") == want.get("Schedule type", "Automatic")
    assert got["Steps"] == "3"  # the command line's --steps wins over the file's
    assert Image.open(png).size == tuple(int(v) for v in want["Size"].split("x"))


def test_from_png_of_an_sdtorch_png_gives_the_same_image(tmp_path):
    (first,) = run(RUNS["negative-clip-skip"], tmp_path / "a")
    (again,) = run(["generate", "--from-png", str(first)], tmp_path / "b")
    assert Image.open(first).info["parameters"] == Image.open(again).info["parameters"]
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


def test_styles_apply_as_a1111(tmp_path):
    styles = {"cinematic": Style("cinematic", "cinematic still of {prompt}, film grain", "cartoon"),
              "sharp": Style("sharp", "highly detailed", "")}
    assert apply_styles("a cat", "", ["cinematic"], styles) == ("cinematic still of a cat, film grain", "cartoon")
    assert apply_styles("a cat", "dog", ["sharp", "cinematic"], styles) == (
        "cinematic still of a cat, highly detailed, film grain", "dog, cartoon")
    with pytest.raises(ValueError, match="unknown style 'nope'"):
        apply_styles("a cat", "", ["nope"], styles)
    csv = tmp_path / "styles.csv"
    csv.write_text('name,prompt,negative_prompt\ncinematic,"cinematic still of {prompt}, film grain",cartoon\n')
    (styled,) = run(["generate", "a cat", "--styles-file", str(csv), "--style", "cinematic", "--seed", "3"], tmp_path / "s")
    (typed,) = run(["generate", "cinematic still of a cat, film grain", "--negative", "cartoon", "--seed", "3"],
                   tmp_path / "t")
    assert Image.open(styled).info["parameters"] == Image.open(typed).info["parameters"]
    assert np.array_equal(np.asarray(Image.open(styled)), np.asarray(Image.open(typed)))
