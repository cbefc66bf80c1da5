"""The training options every job shares, as command-line flags and as a `TrainConfig`."""

from __future__ import annotations

COMMON = {
    "steps": int, "batch_size": int, "grad_accum": int, "lr": float, "warmup": int,
    "grad_clip": float, "ema_decay": float, "seed": int, "log_every": int,
    "sample_every": int, "save_every": int,
}


def train_config(args, **defaults):
    """A `TrainConfig` from parsed flags: the job's `defaults`, overridden by the flags given."""
    from sdtorch.training.train import TrainConfig

    given = {k: getattr(args, k) for k in COMMON if getattr(args, k, None) is not None}
    return TrainConfig(out=args.out, bf16=args.bf16, **(defaults | given))
