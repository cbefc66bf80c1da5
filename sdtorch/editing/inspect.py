"""Looking into a run: per-token cross-attention maps and the denoising process, frame by frame."""

from __future__ import annotations

from sdtorch.editing.p2p import AttentionStore, hooked
from sdtorch.generate.pipeline import to_pil


def attention(pipe, prompt: str, negative_prompt: str = "", **options):
    """Generate (options as `generate`) while recording cross-attention. Returns (images,
    maps (B, T, h, w) for the prompt's T tokens without start/end, token labels). Over all
    77 token positions a pixel's attention sums to 1; these T maps hold part of that mass."""
    store = AttentionStore(batch=options.get("batch_size", 1))
    with pipe.lock, hooked(pipe.unet, store):  # the hook is on shared modules: one run at a time
        images = pipe.generate(prompt, negative_prompt, **options)
    f = pipe.vae.downscale
    maps = store.maps((images[0].height // f, images[0].width // f))
    ids = pipe.tokenizer.encode(prompt)[: pipe.config.clip.max_length - 2]
    if pipe.prompt_syntax == "a1111":  # the first chunk's tokens, as encoded
        first = pipe.prompt_chunks(prompt)[0].tokens
        ids = first[1 : first.index(pipe.tokenizer.eos_id)]
    labels = [pipe.tokenizer.decode([i]).strip() or "?" for i in ids]
    return images, maps[:, 1 : 1 + len(ids)], labels


def process(pipe, prompt: str, negative_prompt: str = "", **options):
    """Generate (options as `generate`) and decode the predicted clean image of every step.
    Returns (images, frames of the first image, their noise levels sigma)."""
    latents, sigmas = [], []

    def record(d: dict) -> None:
        latents.append(d["denoised"][:1].clone())
        sigmas.append(float(d["sigma"]))
        if callback:
            callback(d)

    callback = options.pop("callback", None)
    images = pipe.generate(prompt, negative_prompt, callback=record, **options)
    frames = [to_pil(pipe.decode(z))[0] for z in latents]
    return images, frames, sigmas
