"""Text-to-image: load a checkpoint, encode prompts, sample latents, decode images.

Seeds and noise follow the reference (diffusers `StableDiffusionPipeline`): one CPU generator
seeded with `seed` draws the initial noise for the whole batch in one call, then every
per-step noise draw of the ancestral samplers, in that order.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from sdtorch.adapters import lora, tiling
from sdtorch.adapters.deepcache import DeepCache
from sdtorch.adapters.fast import CompiledModule
from sdtorch.adapters.lora_prompt import PromptLoRAs
from sdtorch.conditioning.embeddings import load_embeddings
from sdtorch.conditioning.prompts import (
    Chunk,
    embedding_lookup,
    encode_chunks_pooled,
    extract_loras,
    tokenize_prompt,
)
from sdtorch.conditioning.tokenizer import ClipTokenizer
from sdtorch.config import ModelConfig
from sdtorch.formats.files import sha256
from sdtorch.generate.concat import inpaint_latents
from sdtorch.generate.control import controlled_unet
from sdtorch.generate.guidance import conditions
from sdtorch.generate.vae import decode as vae_decode, encode as vae_encode
from sdtorch.generate.offload import Offload, text_encoded, text_needed, unet_needed
from sdtorch.generate.images import ImageLike, extend_canvas, img2img_start, open_image
from sdtorch.generate.output import save_png, to_pil  # noqa: F401  (re-exported)
from sdtorch.generate.params import GenerationParams, validate  # noqa: F401  (re-exported)
from sdtorch.models.clip import ClipTextModel
from sdtorch.models.unet import CrossAttention, UNetModel
from sdtorch.models.vae import AutoencoderKL
from sdtorch.sampling import samplers
from sdtorch.sampling.denoisers import CFGDenoiser, DiscreteDenoiser, ScheduledCFG
from sdtorch.sampling.noise import initial_noise

log = logging.getLogger(__name__)


class Pipeline:
    """A loaded text-to-image model. Build it with `sdtorch.load(path)`."""

    def __init__(self, config: ModelConfig, unet: UNetModel, vae: AutoencoderKL, clip: ClipTextModel, *,
                 path: Path | None = None, prediction_source: str = "given", clip2: ClipTextModel | None = None):
        self.config = config
        self.unet, self.vae, self.clip = unet.eval(), vae.eval(), clip.eval()
        self.clip2 = None if clip2 is None else clip2.eval()  # SDXL's second text encoder (OpenCLIP bigG)
        self.tokenizer = ClipTokenizer()
        # A `sdtorch.conditioning.encoders.ConditionEncoder` the UNet was trained with (None: text only);
        # requests give its input as `condition`.
        self.condition_encoder: torch.nn.Module | None = None
        self.path = path
        self.prediction_source = prediction_source
        self._hash: str | None = None
        self.prompt_syntax = "a1111"  # or "plain": the reference's tokens, truncated to 77
        self.embeddings: dict[str, torch.Tensor] = {}  # textual inversion: trigger word -> (n, width)
        self.embeddings2: dict[str, torch.Tensor] = {}  # the same for the second text encoder (SDXL clip_g)
        self.embedding_files: dict[str, Path] = {}  # trigger word -> its file (for "TI hashes")
        # lora_loader([(name, multiplier)]) makes exactly those LoRAs active; None: no LoRA directory
        self.lora_loader: Callable[[list[tuple[str, float]]], None] | None = None
        self.loras = lora.LoRAStack(unet, clip, clip2)  # LoRAs applied now, in order (`load_lora`)
        self.lora_cache: dict = {}  # (path, size, mtime) -> LoRANetwork of requests' LoRAs (`run`)
        # The VAE in overlapping tiles (sdtorch.adapters.tiling): True, False, or None = for images of more
        # than tiling.AUTO_CELLS latent cells; tile size and overlap in latent cells.
        self.tile_vae: bool | None = None
        self.vae_tile = (tiling.TILE, tiling.OVERLAP)
        self.tiny_decoder: torch.nn.Module | None = None  # TAESD-style (`generate.loading.load_tiny_decoder`)
        self.decoder = "vae"  # or "tiny": decode() with the tiny decoder
        self._compiled: CompiledModule | None = None  # `compile()`
        self._vae_decode = None  # the VAE decode through OpenVINO (`compile("openvino")`)
        # DeepCache (sdtorch.adapters.deepcache): (interval, branch) reuses deep UNet features between
        # full calls; an approximation, None = off.
        self.deep_cache: tuple[int, int] | None = None
        self.low_memory = False  # free the text encoders once a run's prompts are encoded (`generate.offload`)
        self.offload: Offload | None = None  # the file a low-memory pipeline reads its weights from when needed
        # Per-request settings (`run`) are applied to the fields above for the length of one run
        # and restored after it; this lock makes those scoped patches safe across threads.
        self.lock = threading.RLock()

    def run(self, request, on_step=None, cancel=None, *, progress: bool = False, callback=None):
        """A `GenerationRequest` (txt2img, img2img, inpainting) -> `RunResult`; see `sdtorch.generate.run`."""
        from sdtorch.generate.run import run

        return run(self, request, on_step=on_step, cancel=cancel, progress=progress, callback=callback)

    def compile(self, backend: str = "inductor", cache_dir: str | Path | None = None) -> None:
        """Run the UNet through torch.compile (backend "inductor") or OpenVINO's CPU runtime
        ("openvino": the UNet and the VAE decode, `sdtorch.adapters.openvino`; converted graphs
        kept in `cache_dir`). The first call at a new shape compiles (minutes for SD on a small
        CPU); where inductor cannot compile (no C++ compiler, an unsupported op) it warns once and
        runs eagerly."""
        unet_needed(self)
        if backend == "openvino":
            from sdtorch.adapters.openvino import compile_pipeline

            self._compiled, self._vae_decode = compile_pipeline(self, cache_dir)
        elif backend == "inductor":
            self._compiled = CompiledModule(self.unet)
        else:
            raise ValueError(f"unknown compile backend {backend!r}: inductor or openvino")

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.time_embed[0].weight.dtype

    @property
    def device(self) -> torch.device:
        weight = self.unet.time_embed[0].weight
        return self.vae.post_quant_conv.weight.device if weight.is_meta else weight.device  # meta: not read yet

    @property
    def attention_chunk(self) -> int:
        """Query positions per UNet attention call, 0 = all at once (`unet.chunked_attention`)."""
        return next((m.chunk for m in self.unet.modules() if isinstance(m, CrossAttention)), 0)

    @attention_chunk.setter
    def attention_chunk(self, n: int) -> None:
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"attention chunk must be a non-negative integer (0 = off), got {n!r}")
        for m in self.unet.modules():
            if isinstance(m, CrossAttention):
                m.chunk = n

    @property
    def text_encoders(self) -> list[ClipTextModel]:
        """The text encoders whose states are concatenated (SDXL: CLIP ViT-L, then OpenCLIP bigG)."""
        return [self.clip] if self.clip2 is None else [self.clip, self.clip2]

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], clip_skip: int | None = None, *,
                      syntax: str | None = None, tags_removed: bool = False) -> torch.Tensor:
        """prompts -> text states (B, 77·k, width) that condition the UNet (`encode_text` without
        the pooled output)."""
        return self.encode_text(prompts, clip_skip, syntax=syntax, tags_removed=tags_removed)[0]

    @torch.no_grad()
    def encode_text(self, prompts: list[str], clip_skip: int | None = None, *, syntax: str | None = None,
                    tags_removed: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """prompts -> (text states (B, 77·k, width), the pooled text (B, P) of models that use it).

        syntax (default `self.prompt_syntax`): "a1111" reads AUTOMATIC1111's emphasis, BREAK,
        textual-inversion names and prompts of any length in chunks of 75 tokens (`<lora:...>` tags
        dropped; `sdtorch.conditioning.prompts`); "plain" is the reference's encoding, truncated to 77
        tokens. tags_removed: the prompts' LoRA tags are already out (`parse_prompt`). With two text encoders (SDXL) each reads the prompt with its own padding and emphasis and
        their states are concatenated; the pooled text is the projecting encoder's (its first chunk).
        """
        syntax = syntax or self.prompt_syntax
        text_needed(self)
        if syntax not in ("a1111", "plain"):
            raise ValueError(f"prompt syntax must be 'a1111' or 'plain', got {syntax!r}")
        prompts = [prompts] if isinstance(prompts, str) else prompts
        if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a str or a list of str, got {prompts!r}")
        states, pooled = [], None
        for clip, embeddings in zip(self.text_encoders, (self.embeddings, self.embeddings2)):
            pad = clip.cfg.pad_token_id
            if syntax == "plain":
                z, p = clip.encode(self.tokenizer(prompts, pad_id=pad).to(self.device), clip_skip)
            else:
                empty = tokenize_prompt("", self.tokenizer, pad_id=pad)[0]
                chunks = [self.prompt_chunks(text, tags_removed, pad, embeddings) for text in prompts]
                z, p = encode_chunks_pooled(clip, chunks, empty, clip_skip)
            states.append(z.float())
            pooled = p.float() if p is not None else pooled
        return torch.cat(states, dim=-1), pooled

    def prompt_chunks(self, prompt: str, tags_removed: bool = False, pad: int | None = None,
                      embeddings: dict | None = None) -> list[Chunk]:
        """A prompt in a1111 syntax as the chunks of 77 tokens `encode_prompt` encodes (LoRA tags
        removed; textual-inversion slots carry their vectors, `embeddings` or the first encoder's)."""
        pad = self.config.clip.pad_token_id if pad is None else pad
        lookup = embedding_lookup(self.embeddings if embeddings is None else embeddings, self.tokenizer, pad)
        text = prompt if tags_removed else extract_loras(prompt)[0]
        return tokenize_prompt(text, self.tokenizer, pad_id=pad, lookup=lookup)

    def load_embeddings(self, path: str | Path) -> list[str]:
        """Add textual-inversion embeddings from a file or a folder (file stem = trigger word);
        returns the trigger words added. Folder files of another model family are skipped."""
        width2 = None if self.clip2 is None else self.clip2.cfg.width
        found, path = load_embeddings(path, width=self.config.clip.width, width2=width2), Path(path)
        self.embeddings.update({w: v[0] if width2 else v for w, v in found.items()})  # SDXL: (clip_l, clip_g)
        self.embeddings2.update({w: v[1] for w, v in found.items()} if width2 else {})
        for word in found:
            self.embedding_files[word] = path if path.is_file() else min(f for f in path.rglob(f"{word}.*") if f.is_file())
        return list(found)

    def denoiser(self, cfg_scale: float, quantize: bool = False, scheduled=None, control: Callable | None = None):
        """The UNet as a guided denoiser D(x, sigma, cond, uncond) -> x0 in float32 (`CFGDenoiser`), cond and
        uncond `Condition`s (or bare text states); with `scheduled` (parts, negative schedule) A1111's prompt
        schedules and AND (`ScheduledCFG`); `control(quantize)`: the UNet with ControlNets (`generate.control`)."""
        net = DeepCache(self.unet, *self.deep_cache) if self.deep_cache is not None else self._compiled or self.unet
        net = control(quantize) if control is not None else net

        def unet(x, t, context, y=None):
            return (net(x, t, context) if y is None else net(x, t, context, y)).float()

        inner = DiscreteDenoiser(unet, self.config.schedule, self.config.prediction, quantize=quantize)
        return ScheduledCFG(inner, cfg_scale, *scheduled) if scheduled else CFGDenoiser(inner, cfg_scale)

    def _sample(self, params: GenerationParams, generator: torch.Generator, noise: torch.Tensor,
                callback: Callable | None, progress: bool, *, init: torch.Tensor | None = None,
                start: int = 0, concat: torch.Tensor | None = None, wrap: Callable | None = None,
                stop: int | None = None, noised: bool = False) -> torch.Tensor:
        """concat: (B, C', h, w) image channels the UNet takes beside the latents (`generate.concat`);
        wrap(denoiser): a wrapper of the guided denoiser; stop / noised: a hand-off between two models."""
        text = conditions(self, params, concat)  # the prompt read once (LoRAs applied), or the encoder's tokens
        text_encoded(self)

        control = controlled_unet(self, params, start, stop) if params.controls else None
        def make_model(quantize: bool):
            model = self.denoiser(params.cfg_scale, quantize, text.scheduled, control)
            return wrap(model) if wrap else model

        return samplers.sample(
            params.sampler, make_model, noise.to(self.device), params.steps, params.schedule(self.config.schedule),
            extra_args={"cond": text.cond, "uncond": text.uncond}, callback=callback, generator=generator,
            eta=params.eta, disable=not progress, prediction=self.config.prediction, init=init, start=start,
            scheduler=params.scheduler, stop=stop, noised=noised,
        )

    def latent_shape(self, params: GenerationParams) -> tuple[int, int, int, int]:
        f = self.vae.downscale
        return (params.batch_size, self.config.unet.out_channels, params.height // f, params.width // f)

    @torch.no_grad()
    def generate_latents(self, params: GenerationParams, callback: Callable | None = None,
                         progress: bool = True, *, stop: int | None = None) -> torch.Tensor:
        """Run the sampler; returns the final latents (B, 4, H/f, W/f), unscaled for decoding
        (with `stop`, the noisy latents at that grid index, for another model to finish)."""
        validate(params, self.vae.downscale)
        generator, noise = self._noise(params, self.latent_shape(params))
        return self._sample(params, generator, noise, callback, progress, stop=stop)

    def _noise(self, params: GenerationParams, shape, generator: torch.Generator | None = None):
        """(the sampler's noise source, initial noise) in the request's seed mode (`sampling.noise`)."""
        return initial_noise(shape, params.seed, mode=params.seed_mode, generator=generator, subseed=params.subseed,
                             subseed_strength=params.subseed_strength, resize_from=params.seed_resize_from,
                             downscale=self.vae.downscale)

    @torch.no_grad()
    def encode_image(self, image: torch.Tensor, generator: torch.Generator, batch_size: int) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1] -> scaled latents (batch_size, 4, h, w): one posterior sample,
        repeated for the batch (as the reference does)."""
        posterior = vae_encode(self, image.to(self.device))
        z = posterior.sample(generator) * self.config.vae.scaling_factor
        return z.repeat(batch_size, 1, 1, 1)

    @torch.no_grad()
    def img2img_latents(self, image: torch.Tensor, params: GenerationParams, strength: float,
                        callback: Callable | None = None, progress: bool = True) -> torch.Tensor:
        """img2img (SDEdit, Meng et al. 2022): the image's latents noised to the grid point that
        `strength` selects, then denoised by the same sampler. image: (1, 3, H, W) in [-1, 1]."""
        validate(params, self.vae.downscale)
        start = img2img_start(params.steps, strength)
        generator = torch.Generator("cpu").manual_seed(params.seed)
        init = self.encode_image(image, generator, params.batch_size)  # draws from the generator first
        source, noise = self._noise(params, init.shape, generator)
        return self._sample(params, source, noise, callback, progress, init=init, start=start)

    def inpaint_latents(self, image: torch.Tensor, mask: torch.Tensor, params: GenerationParams,
                        strength: float = 1.0, callback: Callable | None = None,
                        progress: bool = True) -> torch.Tensor:
        """Repaint where mask == 1. image: (1, 3, H, W) in [-1, 1]; mask: (1, 1, H, W) in {0, 1}.
        9-channel inpainting UNets get the mask and the masked image as extra input channels (in
        the reference's order of random draws); ordinary UNets keep the known region by blending."""
        return inpaint_latents(self, image, mask, params, strength, callback, progress)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiled: bool | None = None) -> torch.Tensor:
        """Latents -> images (B, 3, H, W) in [0, 1], one image at a time (the memory of one, and
        pixels that do not depend on what else is in the batch). tiled: decode in overlapping
        tiles of `vae_tile` (sdtorch.adapters.tiling); None: as `tile_vae` says (`generate.vae`)."""
        return vae_decode(self, latents, tiled)

    def generate(self, prompt: str, negative_prompt: str = "", *, steps: int = 20,
                 sampler: str = "dpmpp_2m_karras", cfg_scale: float = 7.5, seed: int | None = None,
                 width: int | None = None, height: int | None = None, batch_size: int = 1,
                 eta: float = 0.0, clip_skip: int | None = None, callback: Callable | None = None,
                 progress: bool = True) -> list[Image.Image]:
        """Keyword shortcut for `run`: generate `batch_size` images, each with its parameters in
        `image.info["parameters"]`, with the pipeline's current settings (prompt syntax, DeepCache,
        VAE options). callback(dict) gets the sampler's step dict (`x`, `denoised`, `i`, `sigma`)."""
        request = self._request(prompt, negative_prompt, dict(steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                                seed=seed, width=width, height=height, batch_size=batch_size, eta=eta, clip_skip=clip_skip))
        return self.run(request, callback=callback, progress=progress).images

    def img2img(self, image: ImageLike, prompt: str, negative_prompt: str = "", *, strength: float = 0.75,
                callback: Callable | None = None, progress: bool = True, **options) -> list[Image.Image]:
        """Transform `image` (PIL, path, or (1, 3, H, W) in [-1, 1]) guided by the prompt. strength
        in [0, 1]: 0 returns the image (through the VAE), 1 ignores it. `options` as `generate`."""
        request = self._request(prompt, negative_prompt, options, init_image=_image(image), strength=strength)
        return self.run(request, callback=callback, progress=progress).images

    def inpaint(self, image: ImageLike, mask: ImageLike, prompt: str, negative_prompt: str = "", *,
                strength: float = 1.0, callback: Callable | None = None, progress: bool = True,
                **options) -> list[Image.Image]:
        """Repaint the white part of `mask` (same size as the image). `options` as `generate`."""
        request = self._request(prompt, negative_prompt, options, init_image=_image(image), mask=_image(mask, "L"),
                                strength=strength)
        return self.run(request, callback=callback, progress=progress).images

    def outpaint(self, image: ImageLike, prompt: str, negative_prompt: str = "", *, left: int = 0,
                 right: int = 0, top: int = 0, bottom: int = 0, **options) -> list[Image.Image]:
        """Extend the canvas by the given margins (pixels) and paint the new area."""
        canvas, mask = extend_canvas(image, left=left, right=right, top=top, bottom=bottom)
        return self.inpaint(canvas, mask, prompt, negative_prompt, **options)

    def _request(self, prompt: str, negative: str, options: dict, **fields):
        """A `GenerationRequest` from keyword options and the pipeline's current settings."""
        from sdtorch.generate.request import GenerationRequest

        unknown = set(options) - {"steps", "sampler", "cfg_scale", "seed", "batch_size", "eta", "clip_skip",
                                  "width", "height"}
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        options = dict(options)
        options["seed"] = -1 if options.get("seed") is None else options["seed"]
        cache = self.deep_cache or (0, 0)
        return GenerationRequest(prompt, negative, scheduler="automatic", prompt_syntax=self.prompt_syntax,
                                 deep_cache=cache[0], deep_cache_branch=cache[1], tile_vae=self.tile_vae,
                                 attention_chunk=self.attention_chunk, **options, **fields)

    def load_lora(self, path: str | Path, strength: float = 1.0, *, merge: bool = False) -> lora.Applied:
        """Apply a LoRA file (kohya / A1111 / ComfyUI / Civitai, or diffusers / PEFT format) to the
        UNet and text encoder with `strength`; several stack. Dynamic (forward hooks) by default;
        merge=True folds it into the weights (`self.loras.merge/unmerge` switch later)."""
        network = lora.load(path, self.unet, self.clip, dtype=self.dtype, device=self.device, clip2=self.clip2)
        return self.loras.add(network, strength, merge=merge)

    def set_lora_dir(self, directory: str | Path) -> None:
        """Resolve the prompt's `<lora:NAME:STRENGTH>` tags in `directory` (AUTOMATIC1111's Lora
        folder): each generation makes exactly the LoRAs its prompt names active."""
        if not Path(directory).is_dir():
            raise FileNotFoundError(f"LoRA directory not found: {directory}")
        self.lora_loader = PromptLoRAs(self, directory)

    def unload_loras(self) -> None:
        """Remove every LoRA; merged ones are unmerged and the weights restored bit for bit."""
        self.loras.clear()

    def _images(self, params: GenerationParams, latents: torch.Tensor) -> list[Image.Image]:
        images = to_pil(self.decode(latents))
        for i, image in enumerate(images):
            image.info["parameters"] = self.infotext(params, i)
        return images

    def model_hash(self) -> str:
        """AUTOMATIC1111's short model hash: the first 10 hex digits of the file's sha256."""
        if self._hash is None:
            self._hash = sha256(self.path)[:10] if self.path is not None and self.path.is_file() else ""
        return self._hash

    def infotext(self, p: GenerationParams, index: int = 0) -> str:
        """The `parameters` text AUTOMATIC1111 writes into PNGs (`sdtorch.generate.infotext`)."""
        from sdtorch.generate.infotext import infotext

        return infotext(self, p, index)


def _image(image: ImageLike, mode: str = "RGB"):
    """A path opened; a PIL image or a (1, C, H, W) tensor as it is."""
    return image if isinstance(image, torch.Tensor) else open_image(image, mode)
