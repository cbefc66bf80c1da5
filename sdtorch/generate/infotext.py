"""AUTOMATIC1111's infotext: the `parameters` text written into PNGs (and read back by A1111's
"PNG info", Civitai, sd-parsers), and its parser.

Written as A1111 1.10 writes it: the prompt, "Negative prompt: ...", then one line of
"Key: value" fields: Steps, Sampler, Schedule type (unless automatic), CFG scale, Seed, Size,
Model hash (10 hex digits of the file's SHA-256), Model, then the run's extras (Denoising
strength, Clip skip, Lora hashes with 12 hex digits each, ...), and Version.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

import torch

from sdtorch.formats.files import sha256
from sdtorch.sampling import samplers


def sdtorch_version() -> str:
    try:
        return f"sdtorch-{version('sdtorch')}"
    except PackageNotFoundError:
        return "sdtorch"


def _quote(value: str) -> str:
    return '"' + value.replace('"', '\\"') + '"' if any(c in value for c in ',:"\n') else value


def infotext(pipe, p, index: int = 0) -> str:
    """The infotext of image `index` of a run with GenerationParams `p` on pipeline `pipe` (its
    LoRAs applied now)."""
    base, scheduler = samplers.resolve(p.sampler, p.scheduler)
    fields = {"Steps": p.steps, "Sampler": samplers.SAMPLERS[base].label}
    if scheduler != "automatic":
        fields["Schedule type"] = samplers.LABELS[scheduler]
    seed, subseed = (p.seeds()[index], p.subseeds()[index]) if index < p.batch_size else (p.seed, p.subseed)
    fields.update({"CFG scale": p.cfg_scale, "Seed": seed, "Size": f"{p.width}x{p.height}",
                   "Model hash": pipe.model_hash(), "Model": pipe.path.stem if pipe.path else pipe.config.name})
    if p.clip_skip:
        fields["Clip skip"] = p.clip_skip
    if p.subseed_strength:
        fields["Variation seed"] = subseed
        fields["Variation seed strength"] = p.subseed_strength
    if p.seed_resize_from[0] > 0 and p.seed_resize_from[1] > 0:
        fields["Seed resize from"] = f"{p.seed_resize_from[0]}x{p.seed_resize_from[1]}"
    if p.eta:
        fields["Eta"] = p.eta
    loras = [a.network for a in pipe.loras.applied]
    if loras:
        fields["Lora hashes"] = _quote(", ".join(f"{n.name}: {n.shorthash}" for n in loras))
    used = [w for w in pipe.embedding_files if re.search(rf"(?<![\w]){re.escape(w)}(?![\w])",
                                                        f"{p.prompt}\n{p.negative_prompt}")]
    if used:
        fields["TI hashes"] = _quote(", ".join(f"{w}: {sha256(pipe.embedding_files[w])[:12]}" for w in used))
    if pipe.deep_cache is not None:  # it changes the image: say so
        fields["DeepCache"] = f"interval {pipe.deep_cache[0]} branch {pipe.deep_cache[1]}"
    if pipe.decoder != "vae":
        fields["Decoder"] = pipe.decoder
    if getattr(pipe._compiled, "backend", None):
        fields["Backend"] = pipe._compiled.backend
    if pipe.dtype != torch.float32:
        fields["Precision"] = str(pipe.dtype).removeprefix("torch.")
    for i, unit in enumerate(p.controls):  # as sd-webui-controlnet writes them
        fields[f"ControlNet {i}"] = _quote(unit.infotext())
    fields.update(p.extra)
    fields["Version"] = sdtorch_version()
    line = ", ".join(f"{k}: {v}" for k, v in fields.items() if v != "")
    neg = f"\nNegative prompt: {p.negative_prompt}" if p.negative_prompt else ""
    return f"{p.prompt}{neg}\n{line}"


def parse_infotext(text: str) -> dict:
    """AUTOMATIC1111's `parameters` text -> a dict ("Prompt", "Negative prompt", then the
    "Key: value" fields of the last line; "Size" also as "Size-1" / "Size-2", as A1111 reports)."""
    lines = text.strip().split("\n")
    last = lines[-1] if lines and _FIELD.match(lines[-1]) and ":" in lines[-1] else ""
    body = lines[:-1] if last else lines
    prompt, negative, into_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            into_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if into_negative else prompt).append(line)
    out: dict = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _FIELDS.findall(last):
        value = value.strip()
        if value.startswith('"') and value.endswith('"') and len(value) > 1:
            value = value[1:-1].replace('\\"', '"')
        out[key.strip()] = value
    if "Size" in out and "x" in out["Size"]:
        out["Size-1"], out["Size-2"] = out["Size"].split("x", 1)
    return out


_FIELD = re.compile(r"^(\s*[\w \-/+]+:\s*(\"(?:\\.|[^\\\"])+\"|[^,]*)(?:,|$))+$")
_FIELDS = re.compile(r"\s*([\w \-/+]+):\s*(\"(?:\\.|[^\\\"])+\"|[^,]*)(?:,|$)")
