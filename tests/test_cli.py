"""The command line and the Python API, as a user meets them."""

from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

import sdtorch
from sdtorch.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sdtorch.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_writes_pngs_with_a1111_parameters(tiny_file, tmp_path):
    out = tmp_path / "out"
    r = run_cli("generate", "a red apple", "--checkpoint", str(tiny_file), "--negative", "blurry",
                "--steps", "4", "--sampler", "euler_a", "--cfg", "5", "--seed", "42", "--width", "32",
                "--height", "48", "--batch", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    files = sorted(out.glob("*.png"))
    assert [f.name for f in files] == ["00000-42.png", "00001-42.png"]
    assert "4/4" in r.stderr  # the progress bar
    image = Image.open(files[0])
    assert image.size == (32, 48)
    text = image.text["parameters"]
    lines = text.split("\n")
    assert lines[0] == "a red apple"
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith("Steps: 4, Sampler: Euler a, CFG scale: 5.0, Seed: 42, Size: 32x48, Model hash: ")
    assert lines[2].endswith(", Model: tiny, Version: sdtorch-0.1.0")


def test_same_seed_same_image_and_info(tiny_file, tmp_path):
    a = run_cli("generate", "x", "-c", str(tiny_file), "--steps", "2", "--seed", "7", "--out", str(tmp_path / "a"))
    b = run_cli("generate", "x", "-c", str(tiny_file), "--steps", "2", "--seed", "7", "--out", str(tmp_path / "b"))
    assert a.returncode == b.returncode == 0
    img_a = Image.open(next((tmp_path / "a").glob("*.png")))
    img_b = Image.open(next((tmp_path / "b").glob("*.png")))
    assert img_a.tobytes() == img_b.tobytes()
    info = run_cli("info", str(tiny_file))
    assert info.returncode == 0
    assert "prediction: eps (metadata)" in info.stdout and "text encoder: hf layout, 2 layers" in info.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--checkpoint", "/nonexistent/model.safetensors"], "checkpoint not found"),
        (["--sampler", "nope"], "unknown sampler 'nope'"),
        (["--width", "100"], "width must be a positive multiple of 8, got 100"),
        (["--steps", "0"], "steps must be a positive integer, got 0"),
        (["--sampler", "euler", "--eta", "0.5"], "takes no eta"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_file, tmp_path, args, message, capsys):
    base = ["generate", "a cat", "--checkpoint", str(tiny_file), "--steps", "2", "--width", "32", "--height", "32",
            "--out", str(tmp_path)]
    assert main([*base, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdtorch: error: ") and message in err
    assert len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("*.png"))


def test_bad_input_in_a_real_process_has_no_traceback():
    r = run_cli("generate", "a cat", "--checkpoint", "/nonexistent/model.safetensors")
    assert r.returncode == 2
    assert r.stderr.strip() == "sdtorch: error: checkpoint not found: /nonexistent/model.safetensors"


def test_corrupt_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 100)
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdtorch: error: cannot read") and len(err.strip().splitlines()) == 1


def test_python_api_callback_and_errors(tiny_file):
    pipe = sdtorch.load(tiny_file)
    seen = []
    images = pipe.generate("an apple", steps=3, sampler="euler", seed=1, width=32, height=32, batch_size=2,
                           callback=lambda d: seen.append((d["i"], tuple(d["denoised"].shape))), progress=False)
    assert len(images) == 2 and images[0].size == (32, 32)
    assert seen == [(0, (2, 4, 16, 16)), (1, (2, 4, 16, 16)), (2, (2, 4, 16, 16))]
    assert "Seed: 1" in images[0].info["parameters"]
    with pytest.raises(TypeError, match="prompt"):
        pipe.generate(["a list"], steps=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="height must be a positive multiple of 8"):
        pipe.generate("x", steps=1, height=30)
    with pytest.raises(ValueError, match="unknown sampler"):
        pipe.generate("x", steps=1, sampler="k_euler")


def test_guidance_off_runs_a_single_pass(tiny_file):
    pipe = sdtorch.load(tiny_file)
    calls = []
    hook = pipe.unet.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    pipe.generate("x", steps=2, cfg_scale=1.0, seed=0, width=32, height=32, progress=False)
    pipe.generate("x", steps=2, cfg_scale=3.0, seed=0, width=32, height=32, progress=False)
    hook.remove()
    assert calls == [1, 1, 2, 2]


def test_img2img_and_inpaint_commands(tiny_file, tmp_path, capsys):
    from PIL import ImageDraw

    image = Image.new("RGB", (32, 32), "white")
    ImageDraw.Draw(image).ellipse((8, 8, 24, 24), fill=(200, 20, 20))
    image.save(tmp_path / "in.png")
    mask = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).rectangle((0, 0, 15, 31), fill=255)
    mask.save(tmp_path / "mask.png")
    base = ["-c", str(tiny_file), "--steps", "3", "--seed", "5", "--out", str(tmp_path / "out")]
    assert main(["img2img", str(tmp_path / "in.png"), "a red ball", "--strength", "0.5", *base]) == 0
    assert main(["inpaint", str(tmp_path / "in.png"), "a red ball", "--mask", str(tmp_path / "mask.png"), *base]) == 0
    assert main(["inpaint", str(tmp_path / "in.png"), "a red ball", "--extend", "8,8,0,0", *base]) == 0
    files = sorted((tmp_path / "out").glob("*.png"))
    assert [Image.open(f).size for f in files] == [(32, 32), (32, 32), (48, 32)]
    assert "Denoising strength: 0.5" in Image.open(files[0]).text["parameters"]
    capsys.readouterr()
    assert main(["img2img", str(tmp_path / "in.png"), "x", "--strength", "2", *base]) == 2
    assert "strength must be in [0, 1], got 2.0" in capsys.readouterr().err
    assert main(["inpaint", str(tmp_path / "in.png"), "x", *base]) == 2
    assert "exactly one of --mask" in capsys.readouterr().err
    small = Image.new("L", (16, 16), 255)
    small.save(tmp_path / "small.png")
    assert main(["inpaint", str(tmp_path / "in.png"), "x", "--mask", str(tmp_path / "small.png"), *base]) == 2
    assert "mask is 16x16 but the image is 32x32" in capsys.readouterr().err


def test_attention_and_process_commands(tiny_file, tmp_path):
    base = ["-c", str(tiny_file), "--steps", "3", "--seed", "2", "--width", "32", "--height", "32"]
    assert main(["attention", "a red ball", *base, "--out", str(tmp_path / "att")]) == 0
    grid = Image.open(tmp_path / "att" / "attention-2-0.png")
    assert grid.size == (32 * 4, 32 + 14)  # the image + "a", "red", "ball"
    assert main(["generate", "a red ball", *base, "--out", str(tmp_path / "gen"),
                 "--process", str(tmp_path / "process.gif")]) == 0
    gif = Image.open(tmp_path / "process.gif")
    assert gif.n_frames == 3


def test_edit_command(tiny_file, tmp_path, capsys):
    base = ["-c", str(tiny_file), "--steps", "3", "--seed", "4", "--width", "32", "--height", "32", "--out", str(tmp_path)]
    assert main(["edit", "a red ball", "a blue ball", *base]) == 0
    source, edited = sorted(tmp_path.glob("*.png"))
    assert "Edit: replace from 'a red ball'" in Image.open(edited).text["parameters"]
    assert Image.open(source).text["parameters"].startswith("a red ball\n")
    capsys.readouterr()
    assert main(["edit", "a red ball", "a big blue ball", *base]) == 2
    assert "same token count" in capsys.readouterr().err
    assert main(["edit", "a red ball", "a red ball", "--mode", "reweight", "--weight", "red=x", *base]) == 2
    assert "--weight takes WORD=NUMBER" in capsys.readouterr().err
