"""Image-caption datasets: both folder layouts, the transforms, determinism, errors, the emoji set."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image, features

from sdtorch.training.data import (
    ImageCaptionDataset,
    add_dataset_command,
    build_emoji_dataset,
    cmd_dataset,
    emoji_caption,
    find_emoji_font,
)


def _gradient(w: int, h: int) -> Image.Image:
    """An image whose every pixel differs from its mirror image: red rises left to right."""
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None].repeat(h, 0)
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None].repeat(w, 1)
    return Image.fromarray(np.concatenate([x, y, 255 - x], axis=2).astype(np.uint8))


@pytest.fixture
def jsonl_folder(tmp_path):
    """Layout (a): images plus metadata.jsonl, one of them in a subfolder."""
    (tmp_path / "sub").mkdir()
    _gradient(40, 30).save(tmp_path / "a.png")
    _gradient(20, 50).save(tmp_path / "sub" / "b.jpg")
    Image.new("RGB", (16, 16), (0, 128, 255)).save(tmp_path / "c.webp", lossless=True)
    rows = [("a.png", "a wide gradient"), ("sub/b.jpg", "a tall gradient"), ("c.webp", "a blue square")]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "text": t}) + "\n" for f, t in rows))
    return tmp_path


def test_metadata_jsonl_layout(jsonl_folder):
    ds = ImageCaptionDataset(jsonl_folder, 16)
    assert len(ds) == 3
    for i, text in enumerate(["a wide gradient", "a tall gradient", "a blue square"]):
        item = ds[i]
        assert item["text"] == text and item["index"] == i
        assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
        assert -1 <= item["image"].min() and item["image"].max() <= 1
    blue = ds[2]["image"]
    torch.testing.assert_close(blue[:, 0, 0], torch.tensor([0, 128, 255]) / 127.5 - 1)


def test_caption_files_layout(tmp_path):
    (tmp_path / "10_apples").mkdir()
    (tmp_path / ".hidden").mkdir()
    for name in ("x", "10_apples/y"):
        _gradient(24, 24).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(f"caption of {name}\n")
    _gradient(8, 8).save(tmp_path / ".hidden" / "z.png")  # ignored, as are files without an image suffix
    ds = ImageCaptionDataset(tmp_path, 8)
    assert [ds[i]["text"] for i in range(len(ds))] == ["caption of 10_apples/y", "caption of x"]


def test_one_caption_for_every_image(jsonl_folder, tmp_path):
    """caption=: the given text replaces the captions, and bare images need none (DreamBooth)."""
    ds = ImageCaptionDataset(jsonl_folder, 8, caption="a sks gradient")
    assert len(ds) == 3 and {ds[i]["text"] for i in range(3)} == {"a sks gradient"}
    (tmp_path / "bare").mkdir()
    for name in ("b", "a"):
        _gradient(12, 12).save(tmp_path / "bare" / f"{name}.png")
    bare = ImageCaptionDataset(tmp_path / "bare", 8, caption="a sks gradient")
    assert [p.name for p, _ in bare.items] == ["a.png", "b.png"] and bare[1]["text"] == "a sks gradient"


def test_transparency_is_composited_onto_white(tmp_path):
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 255  # red, fully transparent on the left half, half transparent on the right
    rgba[:, 5:, 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    (tmp_path / "t.txt").write_text("half a pink square")
    x = ImageCaptionDataset(tmp_path, 10)[0]["image"]
    torch.testing.assert_close(x[:, :, :4], torch.ones(3, 10, 4))  # white
    torch.testing.assert_close(x[:, 5, 7], torch.tensor([1.0, -0.004, -0.004]), atol=0.02, rtol=0)


def test_center_crop_takes_the_middle(tmp_path):
    image = np.zeros((10, 40, 3), np.uint8)
    image[:, 10:30] = 255  # white in the middle, wider than the crop by the filter's reach
    Image.fromarray(image).save(tmp_path / "wide.png")
    (tmp_path / "wide.txt").write_text("a white square between black ones")
    x = ImageCaptionDataset(tmp_path, 5)[0]["image"]
    torch.testing.assert_close(x, torch.ones(3, 5, 5))


def test_random_crop_at_native_size_copies_pixels(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (16, 20, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "p.png")
    (tmp_path / "p.txt").write_text("noise")
    ds = ImageCaptionDataset(tmp_path, 16, center_crop=False)
    for epoch in range(3):  # a whole-pixel window of the original, not a resampled one
        x = ((ds.get(0, epoch)["image"] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert any((x == pixels[:, k:k + 16]).all() for k in range(5))


def test_augmentation_is_a_function_of_seed_epoch_index(jsonl_folder):
    plain = ImageCaptionDataset(jsonl_folder, 16)
    ds = ImageCaptionDataset(jsonl_folder, 16, flip=True, center_crop=False, seed=3)
    same = ImageCaptionDataset(jsonl_folder, 16, flip=True, center_crop=False, seed=3, cache=True)
    same.set_epoch(5)
    backwards = [same[i]["image"] for i in reversed(range(3))][::-1]  # order and cache do not matter
    for i in range(3):
        torch.testing.assert_close(ds[(5, i)]["image"], backwards[i])
        torch.testing.assert_close(ds.get(i, 5)["image"], backwards[i])
    # Over 20 epochs the wide image (a = index 0) is flipped sometimes, not always, and exactly mirrored.
    flip_only = ImageCaptionDataset(jsonl_folder, 16, flip=True)
    flips = [not torch.equal(flip_only.get(0, e)["image"], plain[0]["image"]) for e in range(20)]
    assert 0 < sum(flips) < 20
    e = flips.index(True)
    torch.testing.assert_close(flip_only.get(0, e)["image"], plain[0]["image"].flip(-1))
    # Random crops move along the longer side only and differ between epochs.
    crop_only = ImageCaptionDataset(jsonl_folder, 16, center_crop=False)
    crops = {crop_only.get(0, e)["image"][0, 0, 0].item() for e in range(5)}
    assert len(crops) > 1


def test_dataloader_batches(jsonl_folder):
    loader = torch.utils.data.DataLoader(ImageCaptionDataset(jsonl_folder, 8), batch_size=2)
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 8, 8)
    assert batch["text"] == ["a wide gradient", "a tall gradient"] and batch["index"].tolist() == [0, 1]


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        ImageCaptionDataset(tmp_path / "nope", 8)
    with pytest.raises(ValueError, match="no images"):
        ImageCaptionDataset(tmp_path, 8)
    _gradient(8, 8).save(tmp_path / "a.png")
    with pytest.raises(FileNotFoundError, match=r"a\.txt"):
        ImageCaptionDataset(tmp_path, 8)
    lines = ['{"file_name": "a.png", "text": "ok"}', '{"file_name": "gone.png", "text": "x"}']
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines))
    with pytest.raises(FileNotFoundError, match=r"line 2: image not found: .*gone\.png"):
        ImageCaptionDataset(tmp_path, 8)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png"}\n')
    with pytest.raises(ValueError, match="line 1: expected a JSON object with 'file_name' and 'text'"):
        ImageCaptionDataset(tmp_path, 8)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "ok"}\n')
    with pytest.raises(ValueError, match="size must be a positive integer"):
        ImageCaptionDataset(tmp_path, 0)
    with pytest.raises(IndexError):
        ImageCaptionDataset(tmp_path, 8)[1]


# --- the emoji set ---------------------------------------------------------------------------

def test_emoji_captions():
    assert emoji_caption("🍎", ":red_apple:") == "red apple"
    assert emoji_caption("👍🏽", ":thumbs_up_medium_skin_tone:") == "thumbs up medium skin tone"
    assert emoji_caption("🇯🇵", ":Japan:") == "flag of Japan"
    wales = "\U0001F3F4\U000E0067\U000E0062\U000E0077\U000E006C\U000E0073\U000E007F"  # 🏴 + tags g b w l s
    assert emoji_caption(wales, ":Wales:") == "flag of Wales"
    assert emoji_caption("🏴\u200d☠️", ":pirate_flag:") == "pirate flag"
    assert emoji_caption("👞", ":man\u2019s_shoe:") == "man's shoe"


def test_emoji_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="apt-get install fonts-noto-color-emoji"):
        find_emoji_font(tmp_path / "missing.ttf")
    with pytest.raises(NotImplementedError, match="Fluent Emoji Flat"):
        build_emoji_dataset(tmp_path, fluent=True)
    monkeypatch.setitem(sys.modules, "emoji", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install emoji"):
        build_emoji_dataset(tmp_path, font=__file__)


@pytest.fixture
def emoji_font():
    pytest.importorskip("emoji", reason="the emoji package is not installed: pip install emoji")
    if not features.check("raqm"):
        pytest.skip("Pillow has no raqm layout to shape emoji sequences: apt-get install libfribidi0")
    try:
        return find_emoji_font()
    except FileNotFoundError:
        pytest.skip("Noto Color Emoji is not installed: apt-get install fonts-noto-color-emoji")


def test_build_emoji_dataset(emoji_font, tmp_path):
    out = build_emoji_dataset(tmp_path / "emoji", 32, limit=20)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 20 and len({r["text"] for r in rows}) == 20
    assert rows[0] == {"file_name": "emoji_u0023_20e3.png", "text": "keycap #", "emoji": "#\ufe0f\u20e3"}
    for r in rows:
        assert r["text"] and ":" not in r["text"] and "_" not in r["text"]
    ds = ImageCaptionDataset(out, 32)
    for i in range(len(ds)):
        x = ds[i]["image"]
        assert (x[:, 0, 0] == 1).all() and (x[:, -1, -1] == 1).all()  # white corners (the margin)
        assert (x < 0.5).any()  # something drawn


def test_emoji_command(emoji_font, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="sdtorch")
    add_dataset_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["dataset", "emoji", "--out", str(tmp_path), "--size", "16", "--limit", "3"])
    assert cmd_dataset(args) == 0
    assert capsys.readouterr().out.strip() == f"wrote 3 images to {tmp_path}"
    assert {p.name for p in tmp_path.iterdir()} >= {"metadata.jsonl", "emoji_u002a_20e3.png"}
