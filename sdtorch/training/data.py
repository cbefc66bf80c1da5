"""Image-caption datasets: a folder of captioned images, and the emoji set rendered from a font.

A folder is read in either of the two layouts people already have:

    root/metadata.jsonl   {"file_name": "a/0001.png", "text": "a red apple"} per line
                          (what Hugging Face `imagefolder` and the diffusers training scripts read)
    root/**/0001.png + root/**/0001.txt   a caption file beside each image (kohya-style)

Augmentation is deterministic: the crop offset and flip of item `i` in epoch `e` come from a
torch.Generator seeded with (seed, e, i) and nothing else, so they do not depend on the number
of workers, the batch size, the order of access or where a run was resumed. The training loop
calls `set_epoch(e)` before each epoch (as with DistributedSampler), or, with persistent workers
that never see that call, asks for `dataset[(e, i)]`.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps, features
from torch.utils.data import Dataset
from tqdm import tqdm

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
RESAMPLE = Image.Resampling.BICUBIC  # Pillow's bicubic is antialiased when it downsamples


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, upright (EXIF orientation applied), transparency composited onto white."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def square_crop_resize(image: Image.Image, size: int, offset: float = 0.5) -> Image.Image:
    """The largest square of `image`, placed at `offset` (0: left/top, 0.5: centre, 1: right/bottom)
    along the longer side, resized to size x size in one resampling step. Same result as resizing
    the shorter side to `size` and then cropping at a whole pixel, without rounding an
    intermediate size (so an image whose shorter side is already `size` is cropped, not resampled)."""
    w, h = image.size
    side = min(w, h)
    scale = side / size  # source pixels per output pixel
    shift = round((max(w, h) - side) / scale * offset) * scale  # a whole number of output pixels
    x, y = (shift, 0) if w > h else (0, shift)
    return image.resize((size, size), RESAMPLE, box=(x, y, x + side, y + side))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8))  # (H, W, 3)
    return x.permute(2, 0, 1).float() / 127.5 - 1.0


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator that drives item `index`'s augmentation in `epoch`: a function of the three
    numbers only (SeedSequence mixes them, so nearby triples give unrelated streams)."""
    if min(seed, epoch, index) < 0:
        raise ValueError(f"seed, epoch and index must be >= 0, got {seed}, {epoch}, {index}")
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) >> 1)


def _read_metadata(root: Path) -> list[tuple[Path, str]]:
    items = []
    metadata = root / "metadata.jsonl"
    for n, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            file_name, text = row["file_name"], row["text"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{metadata}, line {n}: expected a JSON object with 'file_name' and 'text' "
                             f"({type(e).__name__}: {e})") from e
        path = root / file_name
        if not path.is_file():
            raise FileNotFoundError(f"{metadata}, line {n}: image not found: {path}")
        items.append((path, str(text)))
    return items


def _read_images(root: Path) -> list[tuple[Path, str]]:
    """Every image under root (hidden folders left out), sorted, with an empty caption."""
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                    and not any(part.startswith(".") for part in p.relative_to(root).parts))
    return [(p, "") for p in images]


def _read_sidecar_captions(root: Path) -> list[tuple[Path, str]]:
    images = [p for p, _ in _read_images(root)]
    missing = [p.with_suffix(".txt") for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: no metadata.jsonl, and {len(missing)} of {len(images)} images have "
                                f"no caption file beside them, e.g. {missing[0]}")
    return [(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in images]


def find_items(root: str | Path, *, captions: bool = True) -> list[tuple[Path, str]]:
    """(image path, caption) pairs of a dataset folder, in a fixed order (the metadata's, or sorted paths).
    captions=False: a folder without metadata.jsonl may be bare images (their captions are "")."""
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise NotADirectoryError(f"dataset path is not a folder: {root}")
    if (root / "metadata.jsonl").is_file():
        items = _read_metadata(root)
    else:
        items = _read_sidecar_captions(root) if captions else _read_images(root)
    if not items:
        raise ValueError(f"{root}: no images (looked for metadata.jsonl, or {'/'.join(IMAGE_EXTENSIONS)} "
                         f"files with .txt captions)")
    return items


class ImageCaptionDataset(Dataset):
    """Captioned images as {"image": (3, size, size) float in [-1, 1], "text": str, "index": int}.

    center_crop=False takes a random square along the longer side, flip=True mirrors half the
    items; both are drawn from `item_generator(seed, epoch, index)` (see the module docstring).
    cache=True keeps each decoded RGB image in memory after its first load (meant for small sets
    such as the emoji one; with DataLoader workers each worker fills its own copy).
    caption: give every item this text (DreamBooth's "a sks dog"); the folder then needs no captions.
    """

    def __init__(self, root: str | Path, size: int, *, flip: bool = False, center_crop: bool = True,
                 cache: bool = False, seed: int = 0, caption: str | None = None):
        if size <= 0:
            raise ValueError(f"size must be a positive integer, got {size}")
        self.root = Path(root)
        self.items = find_items(self.root, captions=caption is None)
        if caption is not None:
            self.items = [(path, caption) for path, _ in self.items]
        self.size, self.flip, self.center_crop, self.seed = size, flip, center_crop, seed
        self.epoch = 0
        self._cache: dict[int, Image.Image] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        return self.get(index, epoch)

    def get(self, index: int, epoch: int = 0) -> dict:
        if not 0 <= index < len(self.items):
            raise IndexError(f"index {index} out of range for {len(self.items)} items")
        g = item_generator(self.seed, epoch, index)
        u_crop, u_flip = torch.rand(2, generator=g).tolist()  # both drawn always: options stay independent
        image = square_crop_resize(self.load(index), self.size, 0.5 if self.center_crop else u_crop)
        x = to_tensor(image)
        if self.flip and u_flip < 0.5:
            x = x.flip(-1)
        return {"image": x, "text": self.items[index][1], "index": index}

    def load(self, index: int) -> Image.Image:
        """Item `index` as a full-size RGB image, before cropping."""
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        path = self.items[index][0]
        with Image.open(path) as f:
            image = to_rgb(f)
        if self._cache is not None:
            self._cache[index] = image
        return image


# --- The emoji set: Noto Color Emoji rendered with Pillow, captioned with CLDR names ---------

EMOJI_FONT_PATHS = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",  # Debian, Ubuntu (fonts-noto-color-emoji)
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",  # Arch
    "/usr/share/fonts/google-noto-emoji/NotoColorEmoji.ttf",  # Fedora
    "/usr/share/fonts/google-noto-color-emoji-fonts/NotoColorEmoji.ttf",  # Fedora 39+
)
NOTO_BITMAP_SIZE = 109  # the font's only bitmap strike (136 x 128 px cells)
EMOJI_MARGIN = 4  # px of white around the content, at the 109 strike
UNKNOWN_FLAG = "\U0001F1FF\U0001F1FF"  # regional indicators Z Z: no such country


def find_emoji_font(font: str | Path | None = None) -> Path:
    candidates = [Path(font)] if font is not None else [Path(p) for p in EMOJI_FONT_PATHS]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"Noto Color Emoji font not found (looked for {', '.join(map(str, candidates))}); "
                            f"install it with `apt-get install fonts-noto-color-emoji` (Debian/Ubuntu)")


def _is_flag(sequence: str) -> bool:
    regional = all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in sequence)  # 🇯🇵: two regional indicators
    tags = len(sequence) > 1 and 0xE0020 <= ord(sequence[1]) <= 0xE007F  # 🏴 + tag letters: England, ...
    return regional or tags


def emoji_caption(sequence: str, name: str) -> str:
    """':red_apple:' -> 'red apple'; country flags (named ':Japan:') -> 'flag of Japan'."""
    text = name.strip(":").replace("_", " ").replace("\u2019", "'")
    return f"flag of {text}" if _is_flag(sequence) else text


def emoji_items() -> list[tuple[str, str]]:
    """(sequence, caption) of every fully-qualified emoji the `emoji` package knows (skin-tone
    variants, flags, keycaps and ZWJ sequences included; components such as a lone skin-tone
    swatch and unqualified spellings left out), sorted by code points, first of each caption only."""
    try:
        import emoji
    except ImportError as e:
        raise ImportError("the emoji dataset needs the `emoji` package: pip install emoji") from e
    items, seen = [], set()
    for sequence in sorted(emoji.EMOJI_DATA):
        data = emoji.EMOJI_DATA[sequence]
        caption = emoji_caption(sequence, data["en"])
        if data["status"] == emoji.STATUS["fully_qualified"] and caption not in seen:
            seen.add(caption)
            items.append((sequence, caption))
    return items


def render_emoji(font: ImageFont.FreeTypeFont, sequence: str, size: int) -> Image.Image | None:
    """`sequence` on white, cropped to its content plus a margin, size x size RGB; None when the
    font has no glyph for it (blank) or draws it as several glyphs (a sequence it lacks)."""
    left, top, right, bottom = font.getbbox(sequence)
    if bottom <= top or right - left > 1.5 * (bottom - top):
        return None
    canvas = Image.new("RGBA", (right, bottom), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((0, 0), sequence, font=font, embedded_color=True)
    box = canvas.getchannel("A").getbbox()
    if box is None:
        return None
    # A square around the content, never smaller than the em: small shapes (▪ vs ⬛) keep their size.
    side = max(box[2] - box[0], box[3] - box[1]) + 2 * EMOJI_MARGIN
    side = max(side, sum(font.getmetrics()))
    cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
    square = canvas.crop((cx - side // 2, cy - side // 2, cx - side // 2 + side, cy - side // 2 + side))
    return to_rgb(square).resize((size, size), RESAMPLE)


def emoji_file_name(sequence: str) -> str:
    """Noto's naming: '🍎' -> 'emoji_u1f34e.png' (U+FE0F variation selectors left out)."""
    return "emoji_u" + "_".join(f"{ord(c):04x}" for c in sequence if c != "\ufe0f") + ".png"


def build_emoji_dataset(out_dir: str | Path, size: int = 64, *, fluent: bool = False, limit: int | None = None,
                        font: str | Path | None = None) -> Path:
    """Render every emoji Noto Color Emoji has into `out_dir` as size x size PNGs on white, with
    a metadata.jsonl of captions ("red apple", "flag of Japan"). Returns `out_dir`.

    limit: stop after this many images (for tests). font: the .ttf (default: the system's).
    """
    if fluent:
        raise NotImplementedError(
            "fluent=True (Fluent Emoji Flat, a second style) is not implemented: its SVGs come from npm "
            "(@iconify-json/fluent-emoji-flat) and need an SVG rasteriser with gradients; no pure-Python "
            "one from PyPI renders them reliably")
    if size <= 0:
        raise ValueError(f"size must be a positive integer, got {size}")
    items = emoji_items()
    face = ImageFont.truetype(str(find_emoji_font(font)), size=NOTO_BITMAP_SIZE)
    if not features.check("raqm"):
        log.warning("Pillow has no raqm text layout (install libfribidi0): flags, skin tones, keycaps and "
                    "other multi-code-point emoji cannot be shaped and will be skipped")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Flags the font does not know come out as a white flag with a question mark, not blank.
    unknown = render_emoji(face, UNKNOWN_FLAG, size)
    unknown_flag = unknown.tobytes() if unknown is not None else None
    rows, skipped = [], 0
    for sequence, caption in tqdm(items, desc="emoji", unit="img", disable=None):
        if limit is not None and len(rows) >= limit:
            break
        image = render_emoji(face, sequence, size)
        if image is None or image.tobytes() == unknown_flag:
            skipped += 1
            continue
        file_name = emoji_file_name(sequence)
        image.save(out / file_name)
        rows.append({"file_name": file_name, "text": caption, "emoji": sequence})
    with open(out / "metadata.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    log.info("wrote %d emoji to %s (%d the font cannot draw skipped)", len(rows), out, skipped)
    return out


# --- Command line: `sdtorch dataset emoji --out DIR [--size 64]` -----------------------------

def held_out_split(data: str | Path, out: str | Path, every: int = 20) -> Path:
    """A dataset folder `out` with the items of `data` except every `every`-th (0, every, 2 every, ...),
    which stay held out for evaluation: a metadata.jsonl with absolute paths (no image copied)."""
    data, out = Path(data), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = (data / "metadata.jsonl").read_text().splitlines()
    kept = [json.loads(line) for i, line in enumerate(lines) if i % every]
    for item in kept:
        item["file_name"] = str((data / item["file_name"]).resolve())
    (out / "metadata.jsonl").write_text("".join(json.dumps(item) + "\n" for item in kept))
    return out


def emoji_training_set(run: str | Path, size: int = 64) -> tuple[Path, "ImageCaptionDataset"]:
    """The emoji dataset in RUN/emoji<size> (built there if missing) and its training part,
    every 20th emoji held out (`held_out_split` into RUN/train): what the built-in model's
    add-on training scripts train on."""
    data = Path(run) / f"emoji{size}"
    if not (data / "metadata.jsonl").exists():
        build_emoji_dataset(data, size)
    return data, ImageCaptionDataset(held_out_split(data, Path(run) / "train"), size)


def held_out_items(data: str | Path, every: int = 20) -> list[tuple[int, Image.Image, str]]:
    """(index, image, caption) of the items `held_out_split` leaves out."""
    data = Path(data)
    items = []
    for i, line in enumerate((data / "metadata.jsonl").read_text().splitlines()):
        if i % every == 0:
            item = json.loads(line)
            items.append((i, Image.open(data / item["file_name"]).convert("RGB"), item["text"]))
    return items


def add_dataset_command(subparsers) -> None:
    """Add `dataset` to the `sdtorch` subcommands; run it with `cmd_dataset`."""
    parser = subparsers.add_parser("dataset", help="build a training dataset")
    kinds = parser.add_subparsers(dest="dataset", required=True)
    em = kinds.add_parser("emoji", help="Noto Color Emoji rendered on white, captioned with their names")
    em.add_argument("--out", required=True, help="output folder (PNGs + metadata.jsonl)")
    em.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    em.add_argument("--limit", type=int, default=None, help="only the first N emoji (default: all)")


def cmd_dataset(args: argparse.Namespace) -> int:
    out = build_emoji_dataset(args.out, args.size, limit=args.limit)
    n = len((out / "metadata.jsonl").read_text(encoding="utf-8").splitlines())
    print(f"wrote {n} images to {out}")
    return 0
