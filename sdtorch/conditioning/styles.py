"""AUTOMATIC1111's prompt styles: a styles.csv (columns name, prompt, negative_prompt), applied by
name. A style's text with `{prompt}` gets the prompt put there; otherwise it is appended after a
comma (the same for the negative prompt)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str = ""
    negative_prompt: str = ""


def read_styles(path: str | Path) -> dict[str, Style]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"styles file not found: {path}")
    with open(path, newline="", encoding="utf-8-sig") as fh:
        rows = list(csv.DictReader(fh))
    if rows and "name" not in rows[0]:
        raise ValueError(f"{path}: expected A1111's columns name,prompt,negative_prompt, got {list(rows[0])}")
    return {r["name"]: Style(r["name"], r.get("prompt") or "", r.get("negative_prompt") or "") for r in rows if r["name"]}


def merge(style: str, prompt: str) -> str:
    if "{prompt}" in style:
        return style.replace("{prompt}", prompt)
    return ", ".join(p for p in (prompt.strip(), style.strip()) if p)


def apply_styles(prompt: str, negative: str, names: list[str] | tuple[str, ...],
                 styles: dict[str, Style]) -> tuple[str, str]:
    """The prompt and negative prompt with the named styles applied in order."""
    for name in names:
        if name not in styles:
            have = ", ".join(styles) or "none"
            raise ValueError(f"unknown style {name!r} (styles: {have})")
        prompt, negative = merge(styles[name].prompt, prompt), merge(styles[name].negative_prompt, negative)
    return prompt, negative
