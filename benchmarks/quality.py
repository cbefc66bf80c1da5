"""How well a model draws the emoji it is asked for: prompt adherence and FID.

    python benchmarks/quality.py --clip RUN/clip/clip.safetensors --data RUN/emoji64 \
        [--checkpoint MODEL.safetensors] [--per-prompt 2] [--steps 20] [--out quality-out]

For every name in benchmarks/quality_prompts.txt (200 emoji names spread evenly over the emoji
dataset, one per line) the model (the built-in one unless --checkpoint is given) generates
--per-prompt images. Every image is embedded by the image tower of the CLIP model trained
contrastively on the same image-caption pairs (`sdtorch train clip`), and compared with the
embeddings of all training images:

- adherence top-1 / top-5: the fraction of generated images whose nearest training image (cosine
  similarity of the tower's projected, normalised embeddings) is the prompted emoji, or whose five
  nearest include it. The tower was trained to place each training image next to its own caption
  and away from every other caption, so this is the space in which "which emoji is this?" is what
  the distances measure; the `ceiling` row applies the same test to the prompted training images
  after a VAE round trip (the best a generator limited by this autoencoder could score), and the
  `shuffled` row pairs the generated images with the wrong prompts (chance level).
- FID: Frechet distance between Gaussians fitted to the tower's pooled features (the class
  token before projection) of the generated images and of all training images. For scale the
  script also reports the FID of an equally large random subset of the training images (the
  floor for this sample size) and of their VAE reconstructions.

Prints a table and writes a grid of the first 64 generations to --out.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sdtorch.generate.loading import load  # noqa: E402
from sdtorch.training.clip_train import ClipModel, load_clip_model  # noqa: E402
from sdtorch.training.data import ImageCaptionDataset, to_tensor  # noqa: E402
from sdtorch.training.train import grid  # noqa: E402


@torch.no_grad()
def features(model: ClipModel, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """images (N, 3, H, W) in [-1, 1] -> (pooled tower features, normalised projected embeddings)."""
    pooled, embedded = [], []
    for chunk in images.split(batch):
        p = model.image(chunk)
        pooled.append(p)
        embedded.append(torch.nn.functional.normalize(model.image_projection(p), dim=-1))
    return torch.cat(pooled).double(), torch.cat(embedded)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """FID between Gaussians fitted to feature sets a (N, D) and b (M, D), in float64:
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a^1/2 S_b S_a^1/2)^1/2)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(s_a)
    root_a = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + s_a.trace() + s_b.trace() - 2 * cross)


def adherence(embedded: torch.Tensor, wanted: list[int], train_embedded: torch.Tensor) -> tuple[float, float]:
    """Fraction of rows whose nearest training image is `wanted` (top-1) or among the 5 nearest."""
    sims = embedded @ train_embedded.T
    top5 = sims.topk(5, dim=1).indices
    target = torch.tensor(wanted).unsqueeze(1)
    return float((top5[:, :1] == target).any(1).float().mean()), float((top5 == target).any(1).float().mean())


def to_unit(images) -> torch.Tensor:  # PIL images -> (N, 3, H, W) in [-1, 1]
    return torch.stack([to_tensor(im) for im in images])


@torch.no_grad()
def vae_round_trip(pipe, images: torch.Tensor) -> torch.Tensor:
    out = [pipe.vae.decode(pipe.vae.encode(chunk.to(pipe.dtype)).mean).float().clamp(-1, 1) for chunk in images.split(64)]
    return torch.cat(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clip", required=True, help="CLIP model from `sdtorch train clip` (its clip.safetensors)")
    ap.add_argument("--data", required=True, help="the training image folder (metadata.jsonl)")
    ap.add_argument("--checkpoint", default=None, help="model to score (default: the built-in one)")
    ap.add_argument("--prompts", default=str(ROOT / "benchmarks" / "quality_prompts.txt"))
    ap.add_argument("--per-prompt", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--sampler", default="dpmpp_2m_karras")
    ap.add_argument("--cfg-scale", type=float, default=7.5)
    ap.add_argument("--out", default="quality-out")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    prompts = [line.strip() for line in Path(args.prompts).read_text().splitlines() if line.strip()]
    pipe = load(args.checkpoint)
    data = ImageCaptionDataset(args.data, pipe.config.sample_size)
    captions = [caption for _, caption in data.items]
    index = {caption: i for i, caption in enumerate(captions)}
    missing = [p for p in prompts if p not in index]
    if missing:
        raise SystemExit(f"{len(missing)} prompts are not captions of {args.data}, e.g. {missing[:3]}")

    tower = load_clip_model(args.clip).float()
    train_images = torch.stack([data[i]["image"] for i in range(len(data))])
    train_pooled, train_embedded = features(tower, train_images)

    t0 = time.perf_counter()
    generated, wanted = [], []
    for i, prompt in enumerate(prompts):
        generated += pipe.generate(prompt, steps=args.steps, sampler=args.sampler, cfg_scale=args.cfg_scale,
                                   seed=i, batch_size=args.per_prompt, progress=False)
        wanted += [index[prompt]] * args.per_prompt
        if (i + 1) % 25 == 0:
            print(f"generated {len(generated)} images ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    seconds = time.perf_counter() - t0
    gen_pooled, gen_embedded = features(tower, to_unit(generated))

    reference = train_images[[index[p] for p in prompts]]
    recon = vae_round_trip(pipe, reference)
    _, recon_embedded = features(tower, recon)
    shuffled = wanted[:]
    random.Random(0).shuffle(shuffled)
    subset = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[: len(generated)]
    recon_subset_pooled, _ = features(tower, vae_round_trip(pipe, train_images[subset]))

    rows = [
        ("generated", *adherence(gen_embedded, wanted, train_embedded), frechet_distance(gen_pooled, train_pooled)),
        ("shuffled prompts (chance)", *adherence(gen_embedded, shuffled, train_embedded), float("nan")),
        ("ceiling: VAE round trip of the prompted images",
         *adherence(recon_embedded, [index[p] for p in prompts], train_embedded), float("nan")),
        ("floor: random training subset", float("nan"), float("nan"),
         frechet_distance(train_pooled[subset], train_pooled)),
        ("VAE round trip of that subset", float("nan"), float("nan"),
         frechet_distance(recon_subset_pooled, train_pooled)),
    ]
    print(f"\n{len(prompts)} prompts x {args.per_prompt} images, {args.sampler} {args.steps} steps, "
          f"CFG {args.cfg_scale}: {seconds:.0f} s ({seconds / len(generated):.2f} s per image)")
    print(f"{'':48s} {'top-1':>7s} {'top-5':>7s} {'FID':>8s}")
    for name, top1, top5, fid in rows:
        cells = [f"{v * 100:6.1f}%" if v == v else f"{'-':>7s}" for v in (top1, top5)]
        print(f"{name:48s} {cells[0]} {cells[1]} {fid if fid == fid else float('nan'):8.2f}".replace("nan", "  -"))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    grid(generated[: 64 * args.per_prompt : args.per_prompt], cols=8).save(out / "samples.png")
    sims = gen_embedded @ train_embedded.T
    nearest = sims.topk(5, dim=1).indices
    report = [{"prompt": prompts[i // args.per_prompt], "nearest": [captions[j] for j in nearest[i].tolist()]}
              for i in range(len(generated))]
    (out / "nearest.json").write_text(json.dumps(report, indent=1))
    print(f"grid of the first 64 prompts: {out / 'samples.png'}; nearest training images: {out / 'nearest.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
