"""One training loop for every training job (autoencoder, CLIP text encoder, UNet, fine-tuning).

A job is a small object (see `Job`): the modules it trains, a loss on a batch, optional sample
pictures, and what it exports. The loop owns everything else: AdamW with linear warm-up,
gradient accumulation and clipping, EMA weights, bf16 autocast, a progress bar, a CSV log,
sample grids every N steps, atomic checkpoints and exact resume, and DistributedDataParallel
under `torchrun`.

Determinism by construction: the data is an endless stream of epochs, each a permutation seeded
by (seed, epoch); sample number p of the stream gets its own seed (seed, p) for everything
random about it (crop, flip, noise, timestep, caption dropout). Nothing depends on global RNG
state, on where a run was resumed, or on how many processes share a global batch, so a resumed
run reproduces an uninterrupted one and N processes reproduce one (up to float summation order)
for every loss that is a mean over samples. A contrastive loss is not: its negatives come from
the local micro-batch, so there N processes or accumulation steps train on smaller batches.
Logged numbers are means over processes and over a step's micro-batches (one row per logged step).
"""

from __future__ import annotations

import csv
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from sdtorch.formats.atomic import save_torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every job."""

    out: str  # run folder: checkpoints, log.csv, samples/
    steps: int = 1000  # optimizer steps
    batch_size: int = 32  # global batch per optimizer step (all processes, all accumulation steps)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 100  # linear warm-up steps
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    ema_decay: float = 0.999  # 0 = no EMA
    bf16: bool = False  # autocast matmuls/convs to bfloat16 (AVX-512 bf16 or AMX units where the CPU has them)
    seed: int = 0
    log_every: int = 10
    sample_every: int = 0  # 0 = never
    save_every: int = 100  # 0 = only at the end
    num_workers: int = 0


class Job(Protocol):
    """What a training job provides to the loop."""

    modules: dict[str, nn.Module]  # trained; EMA copies are kept of these

    def loss(self, batch: dict, seeds: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """Mean loss over the batch; `seeds` (B,) int64 seed every sample's randomness."""

    def samples(self, ema: dict[str, nn.Module], step: int):  # -> PIL.Image | None
        """A picture of progress (sample grid), made with the EMA weights."""

    def export(self, ema: dict[str, nn.Module], path: Path) -> Path:
        """Write the trained model (EMA weights) for use outside training."""


def sample_seed(seed: int, position: int) -> int:
    """The seed of sample number `position` of the data stream (a 63-bit hash)."""
    return int(np.random.SeedSequence([seed, position]).generate_state(1, dtype=np.uint64)[0] >> 1)


def seeded_generators(seeds: torch.Tensor, stream: int = 0) -> list[torch.Generator]:
    """One generator per sample; different `stream`s give independent draws for the same sample."""
    return [torch.Generator().manual_seed(sample_seed(int(s), stream)) for s in seeds]


def randn_per_sample(shape: tuple[int, ...], seeds: torch.Tensor, stream: int = 0) -> torch.Tensor:
    """(B, *shape) float32: row b drawn from the generator of sample b and `stream`."""
    return torch.stack([torch.randn(shape, generator=g) for g in seeded_generators(seeds, stream)])


def rand_per_sample(seeds: torch.Tensor, stream: int = 0) -> torch.Tensor:
    """(B,) float32 uniforms in [0, 1), one per sample and `stream`."""
    return torch.stack([torch.rand((), generator=g) for g in seeded_generators(seeds, stream)])


class Stream:
    """Sample positions -> (epoch, dataset index): permutation of each epoch seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perm = n, seed, {}

    def index(self, position: int) -> tuple[int, int]:
        epoch, k = divmod(position, self.n)
        if epoch not in self._perm:
            self._perm = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return epoch, int(self._perm[epoch][k])


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed() -> tuple[int, int]:
    """Join the process group when started by torchrun (gloo on CPU, nccl on GPU)."""
    if "RANK" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return _world()


def micro_batch(dataset, stream: Stream, step: int, micro: int, cfg: TrainConfig) -> tuple[dict, torch.Tensor]:
    """This process's share of micro-batch `micro` of optimizer step `step`, and its sample seeds."""
    rank, world = _world()
    per_micro = cfg.batch_size // cfg.grad_accum
    start = (step * cfg.grad_accum + micro) * per_micro
    positions = range(start + rank, start + per_micro, world)
    items, seeds = [], []
    for p in positions:
        epoch, i = stream.index(p)
        items.append(dataset.get(i, epoch) if hasattr(dataset, "get") else dataset[i])
        seeds.append(sample_seed(cfg.seed, p))
    return collate(items), torch.tensor(seeds, dtype=torch.int64)


def collate(items: list[dict]) -> dict:
    out = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out


def lr_at(step: int, cfg: TrainConfig) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))


@torch.no_grad()
def update_ema(ema: dict[str, nn.Module], modules: dict[str, nn.Module], decay: float, step: int) -> None:
    d = min(decay, (1 + step) / (10 + step))  # short runs: do not average in the random init for long
    for name, module in modules.items():
        for e, p in zip(ema[name].parameters(), module.parameters()):
            e.lerp_(p.detach().to(e.dtype), 1 - d)


def save_atomic(obj, path: Path) -> None:
    """torch.save to a temporary name, then rename: a reader never sees half a file."""
    save_torch(obj, path)


def train(job: Job, dataset, cfg: TrainConfig, *, progress: bool = True) -> dict[str, nn.Module]:
    """Run (or resume) training; returns the EMA modules (the trained ones if EMA is off)."""
    rank, world = init_distributed()
    if cfg.batch_size % (cfg.grad_accum * world):
        raise ValueError(f"batch size {cfg.batch_size} must divide into {cfg.grad_accum} micro-batches x {world} processes")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    params = [p for m in job.modules.values() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    ema = {k: _frozen_copy(m) for k, m in job.modules.items()} if cfg.ema_decay else job.modules
    step = _resume(out / "last.pt", job, ema, opt, cfg)
    models = {k: _wrap_ddp(m) for k, m in job.modules.items()}
    stream = Stream(len(dataset), cfg.seed)
    logger = CsvLog(out / "log.csv", step) if rank == 0 else None
    bar = tqdm(total=cfg.steps, initial=step, disable=not progress or rank != 0, desc="train")
    t0, seen = time.perf_counter(), 0
    while step < cfg.steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss_sum, logs = _accumulate(job, dataset, stream, step, cfg, models, params[0].device.type)
        norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip else torch.tensor(0.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cfg.ema_decay:
            update_ema(ema, job.modules, cfg.ema_decay, step)
        step += 1
        seen += cfg.batch_size
        rate = seen / (time.perf_counter() - t0)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}", img_s=f"{rate:.1f}")
        if logger and (step % cfg.log_every == 0 or step == cfg.steps):
            logger.write(step=step, loss=loss_sum, lr=lr_at(step - 1, cfg), grad_norm=float(norm), samples_per_s=rate, **logs)
        if rank == 0 and cfg.sample_every and (step % cfg.sample_every == 0 or step == cfg.steps):
            _save_samples(job, ema, step, out)
        if rank == 0 and ((cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps):
            _checkpoint(out / "last.pt", job, ema, opt, step, cfg)
    bar.close()
    return ema


def _accumulate(job, dataset, stream, step, cfg, models, device: str) -> tuple[float, dict]:
    total, logs = 0.0, {}
    for micro in range(cfg.grad_accum):
        batch, seeds = micro_batch(dataset, stream, step, micro, cfg)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss, parts = job.loss(batch | {"models": models}, seeds)
        (loss / cfg.grad_accum).backward()
        total += loss.item() / cfg.grad_accum
        for k, v in parts.items():
            logs[k] = logs.get(k, 0.0) + v / cfg.grad_accum
    return _global_mean(total), {k: _global_mean(v) for k, v in logs.items()}


def _global_mean(value: float) -> float:
    """The mean of a logged number over processes (each saw an equal share of the batch)."""
    rank, world = _world()
    if world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / world


def _frozen_copy(module: nn.Module) -> nn.Module:
    import copy

    ema = copy.deepcopy(module).eval()
    ema.requires_grad_(False)
    return ema


def _wrap_ddp(module: nn.Module) -> nn.Module:
    if _world()[1] > 1 and any(p.requires_grad for p in module.parameters()):
        return nn.parallel.DistributedDataParallel(module)
    return module


def _checkpoint(path: Path, job, ema, opt, step: int, cfg: TrainConfig) -> None:
    save_atomic(
        {
            "step": step,
            "modules": {k: m.state_dict() for k, m in job.modules.items()},
            "ema": {k: m.state_dict() for k, m in ema.items()} if cfg.ema_decay else {},
            "optimizer": opt.state_dict(),
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("out",)},
        },
        path,
    )


def _resume(path: Path, job, ema, opt, cfg: TrainConfig) -> int:
    if not path.exists():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=True)
    for k, m in job.modules.items():
        m.load_state_dict(state["modules"][k])
    if cfg.ema_decay:
        for k, m in ema.items():
            m.load_state_dict(state["ema"][k])
    opt.load_state_dict(state["optimizer"])
    log.info("resumed %s at step %d", path, state["step"])
    return int(state["step"])


def _save_samples(job, ema, step: int, out: Path) -> None:
    image = job.samples(ema, step)
    if image is not None:
        (out / "samples").mkdir(exist_ok=True)
        image.save(out / "samples" / f"step_{step:07d}.png")


class CsvLog:
    """Append-only CSV; on resume, rows after the resumed step are dropped first."""

    def __init__(self, path: Path, step: int):
        self.path, self.fields = path, None
        if path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
            self.fields = list(rows[0]) if rows else None
            with open(path, "w", newline="") as f:
                if self.fields:
                    w = csv.DictWriter(f, self.fields)
                    w.writeheader()
                    w.writerows(rows)

    def write(self, **row) -> None:
        new = self.fields is None
        if new:
            self.fields = list(row)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def grid(images: list, cols: int):  # PIL images -> one PIL image
    from PIL import Image

    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * w, (i // cols) * h))
    return sheet
