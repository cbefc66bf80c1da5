"""`sdtorch info PATH`: what a checkpoint file or diffusers folder holds, read from its keys."""

from __future__ import annotations

import argparse


def cmd_info(args: argparse.Namespace) -> int:
    from sdtorch.families import describe
    from sdtorch.formats import checkpoint

    ckpt = checkpoint.read(args.path, prediction=args.prediction)
    cfg = ckpt.config
    parts = [("UNet", ckpt.unet), ("VAE", ckpt.vae), ("text encoder", ckpt.clip)]
    if ckpt.clip2:
        parts.append(("text encoder 2", ckpt.clip2))
    n = {name: sum(t.numel() for t in sd.values()) for name, sd in parts}
    print(f"{args.path}: {describe(cfg)}")
    print(f"  prediction: {cfg.prediction} ({ckpt.prediction_source})")
    print(f"  weights: {str(ckpt.dtype).removeprefix('torch.')}, " + ", ".join(f"{k} {v / 1e6:.1f}M" for k, v in n.items()))
    u = cfg.unet
    depth = u.transformer_depth if isinstance(u.transformer_depth, int) else list(u.transformer_depth)
    print(f"  UNet: {u.in_channels} in-channels, {u.model_channels}x{list(u.channel_mult)}, "
          f"context {u.context_dim}, transformer depth {depth}, "
          f"{'linear' if u.use_linear_in_transformer else 'conv'} projections"
          + (f", vector {u.adm_in_channels} (pooled text + {', '.join(cfg.micro)})" if u.adm_in_channels else ""))
    for label, c in (("text encoder", cfg.clip), ("text encoder 2", cfg.clip2)):
        if c is not None:
            print(f"  {label}: {cfg.clip_layout} layout, {c.layers} layers x {c.width}, clip skip {c.clip_skip}"
                  + (", no final norm" if not c.final_norm else "")
                  + (f", pooled output projected to {c.projection_dim}" if c.projection_dim else ""))
    print(f"  VAE: latent scale {cfg.vae.scaling_factor}")
    print(f"  native size: {cfg.sample_size}x{cfg.sample_size}")
    if ckpt.encoder_spec is not None:
        e = ckpt.encoder_spec
        count = sum(t.numel() for t in ckpt.encoder.values())
        print(f"  condition encoder: {e.get('kind')} backbone, {e.get('tokens')} tokens x {e.get('dim')}, "
              f"mode {e.get('mode')}, {count / 1e6:.2f}M (generate --condition FILE)")
    return 0
