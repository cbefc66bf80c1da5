"""Looking into (and later steering) the UNet's attention: hooks on `CrossAttention.hook`.

`AttentionStore` records the cross-attention probabilities between image positions and prompt
tokens, averaged over heads, layers and steps, at one resolution (the 16x16-ish layers where
Hertz et al. 2022 found the maps most meaningful). For every image position the maps over all
77 token positions sum to 1 (they are softmax rows); `token_maps` returns them per token.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.nn.functional as F
from PIL import Image  # noqa: F401  (return type of edit)
from torch import nn

from sdtorch.generate.pipeline import GenerationParams, to_pil, validate
from sdtorch.models.unet import CrossAttention
from sdtorch.sampling import samplers


def attention_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) in float32: (B, heads, N, L)."""
    scale = q.shape[-1] ** -0.5
    return torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)


@contextmanager
def hooked(unet: nn.Module, hook, *, cross: bool = True, self_attn: bool = False):
    """Install `hook` on the UNet's cross- (and/or self-) attention layers for a `with` block."""
    layers = [m for m in unet.modules() if isinstance(m, CrossAttention) and (cross if m.is_cross else self_attn)]
    for m in layers:
        m.hook = hook
    try:
        yield layers
    finally:
        for m in layers:
            m.hook = None


class AttentionStore:
    """Accumulates cross-attention maps of the conditional half of each guided UNet batch, per
    resolution (number of image positions N). Call it as a `CrossAttention.hook`."""

    def __init__(self, batch: int = 1):
        self.batch = batch
        self.sums: dict[int, torch.Tensor] = {}  # N -> (B, N, L) summed over heads/layers/steps
        self.counts: dict[int, int] = {}

    def __call__(self, module: CrossAttention, q, k, v) -> torch.Tensor:
        probs = attention_probs(q, k)  # (B', heads, N, L)
        cond = probs[-self.batch :].mean(dim=1)  # guidance batches are [uncond, cond]
        n = probs.shape[2]
        self.sums[n] = self.sums.get(n, 0) + cond.detach().cpu()
        self.counts[n] = self.counts.get(n, 0) + 1
        return probs.to(v.dtype) @ v

    def maps(self, latent_hw: tuple[int, int], side: int = 16) -> torch.Tensor:
        """(B, L, h, w): mean attention of each image position to each token position, at the
        recorded resolution whose shorter side is closest to `side`; sums to 1 over L."""
        if not self.sums:
            raise RuntimeError("no attention was recorded")
        h, w = latent_hw

        def shape(n: int) -> tuple[int, int]:
            f = math.sqrt(h * w / n)  # every level halves both sides
            return round(h / f), round(w / f)

        n = min(self.sums, key=lambda n: (abs(min(shape(n)) - side), -n))
        mean = self.sums[n] / self.counts[n]  # (B, N, L)
        return mean.transpose(1, 2).reshape(mean.shape[0], -1, *shape(n))


# --- prompt-to-prompt (Hertz et al. 2022) ------------------------------------------------------

MODES = ("replace", "refine", "reweight")
ONE_CALL_SAMPLERS = ("ddim", "euler", "lms", "dpmpp_2m", "unipc", "euler_karras", "lms_karras",
                     "dpmpp_2m_karras", "unipc_karras")  # one UNet call per step, no noise draws


def align_tokens(source: list[int], target: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """For each target position: the source position it copies attention from, and 1/0 for
    whether it copies (tokens common to both prompts, in order) or keeps its own (new words)."""
    import difflib

    mapper = torch.arange(len(target))
    keep = torch.zeros(len(target))
    for a, b, n in difflib.SequenceMatcher(None, source, target, autojunk=False).get_matching_blocks():
        mapper[b : b + n] = torch.arange(a, a + n)
        keep[b : b + n] = 1.0
    return mapper, keep


class PromptToPrompt:
    """The attention hook for an edit. The denoiser sets `branch` ("source" / "edit") and `step`
    before each UNet call; layers are matched by call order within a step. For the conditional
    half of the edit branch, during the first `cross_steps` fraction of steps (cross-attention)
    or `self_steps` (self-attention), the edit attends with the source's maps:
      replace:  SDPA(q_src, k_src, v_edit), i.e. source maps, edit values;
      refine:   source maps for tokens both prompts share (aligned), its own for new tokens;
      reweight: as refine, then the attention to chosen tokens scaled by their weights."""

    def __init__(self, mode: str, mapper: torch.Tensor, keep: torch.Tensor, weights: torch.Tensor,
                 steps: int, cross_steps: float, self_steps: float):
        self.mode, self.mapper, self.keep, self.weights = mode, mapper, keep, weights
        self.cross_until, self.self_until = round(cross_steps * steps), round(self_steps * steps)
        self.branch, self.step, self.saved, self.layer = "source", 0, [], 0
        # Every token copying the source map at its own position, unweighted: the injected
        # attention is exactly the source's, which the fused kernel computes as for plain generation.
        identity = torch.equal(mapper, torch.arange(len(mapper))) and bool(keep.all()) and bool((weights == 1).all())
        self.fused = mode == "replace" or identity

    def begin(self, branch: str, step: int) -> None:
        self.branch, self.step, self.layer = branch, step, 0
        if branch == "source":
            self.saved = []

    def __call__(self, module: CrossAttention, q, k, v) -> torch.Tensor:
        if self.branch == "source":
            self.saved.append((q, k))
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        q_src, k_src = self.saved[self.layer]
        self.layer += 1
        until = self.cross_until if module.is_cross else self.self_until
        if self.step >= until:
            return torch.nn.functional.scaled_dot_product_attention(q, k, v)
        half = q.shape[0] // 2  # [uncond, cond]: only the conditional half is edited
        own = torch.nn.functional.scaled_dot_product_attention(q[:half], k[:half], v[:half])
        if not module.is_cross or self.fused:
            injected = torch.nn.functional.scaled_dot_product_attention(q_src[half:], k_src[half:], v[half:])
        else:
            src = attention_probs(q_src[half:], k_src[half:])[..., self.mapper]  # (B, h, N, L)
            mine = attention_probs(q[half:], k[half:])
            probs = src * self.keep + mine * (1 - self.keep)
            if self.mode == "reweight":
                probs = probs * self.weights
            injected = probs.to(v.dtype) @ v[half:]
        return torch.cat([own, injected])


class EditDenoiser(nn.Module):
    """Runs the source and the edited image as two separate guided UNet calls per step (the same
    shapes as plain generation), telling the hook which is which. x: (2, C, h, w) =
    [source, edit]; `blend` (1, 1, h, w) or None: outside it the edit follows the source exactly
    (local blending; the x0 estimates are mixed, so the unmasked latents stay equal)."""

    def __init__(self, denoiser, control: PromptToPrompt, cond_src, cond_edit, uncond, blend=None):
        super().__init__()
        self.denoiser, self.control = denoiser, control
        self.cond_src, self.cond_edit, self.uncond, self.blend = cond_src, cond_edit, uncond, blend
        self.calls = 0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        self.control.begin("source", self.calls)
        d_src = self.denoiser(x[:1], sigma[:1], cond=self.cond_src, uncond=self.uncond)
        self.control.begin("edit", self.calls)
        d_edit = self.denoiser(x[1:], sigma[1:], cond=self.cond_edit, uncond=self.uncond)
        self.calls += 1
        if self.blend is not None:
            d_edit = d_src + self.blend * (d_edit - d_src)
        return torch.cat([d_src, d_edit])


@torch.no_grad()
def edit(pipe, prompt: str, target: str, *, mode: str = "replace", cross_steps: float = 0.8,
         self_steps: float = 0.4, weights: dict[str, float] | None = None, blend: list[str] | torch.Tensor | None = None,
         negative_prompt: str = "", steps: int = 20, sampler: str = "ddim", cfg_scale: float = 7.5,
         seed: int | None = None, width: int | None = None, height: int | None = None,
         callback=None, progress: bool = True) -> list[Image.Image]:
    """Prompt-to-prompt: [source image, edited image] from one seed, the edit reusing the
    source's attention maps for the first `cross_steps` (cross-attention) and `self_steps`
    (self-attention) fractions of the steps. mode: "replace" (word swap, same token count),
    "refine" (words added or changed; shared tokens aligned), "reweight" (scale the attention to
    the words in `weights`). `blend`: words whose attention in the source picks the region the
    edit may change (local blending), or that region as a (1, 1, H, W) pixel mask; elsewhere the
    edit follows the source exactly."""
    size = pipe.config.sample_size
    params = GenerationParams(prompt, negative_prompt, steps, sampler, cfg_scale,
                              random.randrange(2**32) if seed is None else seed, width or size, height or size)
    validate(params, pipe.vae.downscale)
    if not isinstance(target, str):
        raise TypeError(f"the edited prompt must be a string, got {type(target).__name__}")
    if mode not in MODES:
        raise ValueError(f"unknown edit mode {mode!r}; choose from {', '.join(MODES)}")
    if sampler not in ONE_CALL_SAMPLERS:
        raise ValueError(f"editing needs a deterministic one-call-per-step sampler: {', '.join(ONE_CALL_SAMPLERS)}")
    mapper, keep, weight = edit_alignment(pipe, prompt, target, mode, weights or {})
    if isinstance(blend, torch.Tensor):  # an explicit pixel mask (1, 1, H, W), 1 = may change
        mask = F.interpolate(blend.float(), size=pipe.latent_shape(params)[-2:]).to(pipe.device)
    else:
        mask = blend_mask(pipe, params, blend) if blend else None
    control = PromptToPrompt(mode, mapper, keep, weight, steps, cross_steps, self_steps)
    # Plain 77-token encoding: the token alignment above is of the plain tokens.
    cond_src, cond_edit = (pipe.encode_prompt([p], syntax="plain") for p in (prompt, target))
    uncond = pipe.encode_prompt([negative_prompt], syntax="plain")
    generator = torch.Generator("cpu").manual_seed(params.seed)
    noise = torch.randn(pipe.latent_shape(params), generator=generator).repeat(2, 1, 1, 1)

    def make_model(quantize: bool):
        return EditDenoiser(pipe.denoiser(cfg_scale, quantize), control, cond_src, cond_edit, uncond, mask)

    with pipe.lock, hooked(pipe.unet, control, cross=True, self_attn=True):
        latents = samplers.sample(sampler, make_model, noise.to(pipe.device), steps, pipe.config.schedule,
                                  callback=callback, disable=not progress, prediction=pipe.config.prediction)
    source, edited = to_pil(pipe.decode(latents))
    source.info["parameters"] = pipe.infotext(params)
    edited.info["parameters"] = pipe.infotext(replace(params, prompt=target, extra={
        "Edit": f"{mode} from '{prompt}', cross {cross_steps}, self {self_steps}"}))
    return [source, edited]


def edit_alignment(pipe, prompt: str, target: str, mode: str, weights: dict[str, float]):
    ids_src, ids_tgt = pipe.tokenizer.encode(prompt), pipe.tokenizer.encode(target)
    if mode == "replace" and len(ids_src) != len(ids_tgt):
        raise ValueError(f"a word swap needs prompts of the same token count ({len(ids_src)} vs "
                         f"{len(ids_tgt)}); use mode='refine' for added or longer words")
    if mode == "reweight" and not weights:
        raise ValueError("mode 'reweight' needs weights, e.g. {'red': 2.0}")
    pad = pipe.config.clip.pad_token_id
    src, tgt = (pipe.tokenizer([p], pad_id=pad)[0].tolist() for p in (prompt, target))
    mapper, keep = (torch.arange(len(tgt)), torch.ones(len(tgt))) if mode == "replace" else align_tokens(src, tgt)
    weight = torch.ones(len(tgt))
    for word, w in weights.items():
        positions = token_positions(pipe, ids_tgt, word)
        if not positions:
            raise ValueError(f"{word!r} is not a word of the edited prompt {target!r}")
        weight[positions] = w
    return mapper, keep, weight


def token_positions(pipe, ids: list[int], word: str) -> list[int]:
    """Positions (1-based, after <start>) of `word`'s tokens in a token list."""
    w = pipe.tokenizer.encode(word)
    return [i + 1 + j for i in range(len(ids) - len(w) + 1) if ids[i : i + len(w)] == w for j in range(len(w))]


def blend_mask(pipe, params: GenerationParams, words: list[str]) -> torch.Tensor:
    """Where the source image attends to `words` (> 30 % of the strongest), at latent size."""
    store = AttentionStore()
    with pipe.lock, hooked(pipe.unet, store):
        pipe.generate_latents(params, progress=False)
    f = pipe.vae.downscale
    latent_hw = (params.height // f, params.width // f)
    maps = store.maps(latent_hw)[0]  # (77, h', w')
    ids = pipe.tokenizer.encode(params.prompt)
    positions = [p for w in words for p in token_positions(pipe, ids, w)]
    if not positions:
        raise ValueError(f"none of {words} is a word of the prompt {params.prompt!r}")
    m = maps[positions].mean(dim=0)
    m = (m / m.max() > 0.3).float()[None, None]
    m = F.max_pool2d(m, 3, stride=1, padding=1)  # a little room around the object
    return F.interpolate(m, size=latent_hw, mode="nearest").to(pipe.device)
