"""The built-in emoji model shipped in the package: present, small, loads with no path, draws."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from PIL import Image
from safetensors import safe_open

import sdtorch
from sdtorch.generate.loading import BUILTIN


def test_builtin_file_is_fp16_with_config_and_under_60_mb():
    assert BUILTIN.exists(), f"{BUILTIN} missing"
    assert BUILTIN.stat().st_size <= 60e6
    with safe_open(str(BUILTIN), "pt") as f:
        assert "sdtorch_config" in f.metadata()
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}


def test_load_without_path_generates_a_batch_of_four_at_native_size():
    pipe = sdtorch.load()
    assert pipe.config.sample_size == 64
    images = pipe.generate("red apple", batch_size=4, steps=20, seed=0, progress=False)
    assert [im.size for im in images] == [(64, 64)] * 4
    arrays = [np.asarray(im, dtype=np.float32) for im in images]
    assert all(a.std() > 10 for a in arrays)  # not a flat colour
    assert np.abs(arrays[0] - arrays[1]).mean() > 1  # a batch draws different images


def _mean_rgb(pipe, prompt: str) -> np.ndarray:
    images = pipe.generate(prompt, batch_size=4, steps=20, seed=1, progress=False)
    return np.mean([np.asarray(im, dtype=np.float32).reshape(-1, 3).mean(0) for im in images], axis=0)


def test_builtin_model_follows_the_colour_in_the_prompt():
    """A trained model, not noise: 'red heart' is redder than 'green heart' and vice versa."""
    pipe = sdtorch.load()
    red, green = _mean_rgb(pipe, "red heart"), _mean_rgb(pipe, "green heart")
    assert red[0] - red[1] > green[0] - green[1] + 20


def test_cli_generate_needs_no_checkpoint(tmp_path):
    r = subprocess.run([sys.executable, "-m", "sdtorch.cli", "generate", "red apple", "--seed", "3",
                        "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "built-in emoji model" in r.stderr
    image = Image.open(tmp_path / "00000-3.png")
    assert image.size == (64, 64)
    assert image.text["parameters"].startswith("red apple\n")
