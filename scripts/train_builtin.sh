#!/usr/bin/env bash
# Train the built-in emoji model from scratch: dataset -> VAE -> CLIP text encoder -> UNet.
# Usage: scripts/train_builtin.sh RUN_DIR   (re-running resumes every stage where it stopped)
# Hardware and timings of a run go into the README with its results.
set -euo pipefail
run=${1:-runs/builtin}
mkdir -p "$run"
data="$run/emoji64"
[ -f "$data/metadata.jsonl" ] || sdtorch dataset emoji --out "$data" --size 64

sdtorch train vae --data "$data" --out "$run/vae" --preset emoji --bf16 \
    --steps "${VAE_STEPS:-600}" --batch-size 32 --lr 5e-4 --warmup 100 --ema-decay 0.999 \
    --save-every 100 --sample-every 200 --log-every 20

sdtorch train clip --data "$data" --out "$run/clip" --preset emoji --bf16 \
    --steps "${CLIP_STEPS:-600}" --batch-size 64 --lr 5e-4 --warmup 100 --ema-decay 0.999 \
    --patch-size 8 --tower-width 256 --tower-layers 6 --embed-dim 256 \
    --save-every 100 --sample-every 200 --log-every 20

sdtorch train unet --data "$data" --out "$run/unet" --preset emoji --bf16 \
    --vae "$run/vae/vae.safetensors" --clip "$run/clip/clip.safetensors" --prediction eps \
    --steps "${UNET_STEPS:-7400}" --batch-size 32 --lr 3e-4 --warmup 200 --ema-decay 0.999 \
    --caption-dropout 0.1 --save-every 100 --sample-every 500 --log-every 20 \
    --prompts "red apple" "grinning face" "flag of Japan" "dog face" "tent" "red heart" "sun" "pizza"

# The shipped file: the EMA weights in fp16 (51.9 MB), config in the metadata.
python - "$run/unet/model.safetensors" "${BUILTIN_OUT:-sdtorch/data/emoji.safetensors}" <<'PY'
import sys, torch, sdtorch
from sdtorch import checkpoint
pipe = sdtorch.load(sys.argv[1])
print(checkpoint.save(sys.argv[2], pipe.unet, pipe.vae, pipe.clip, pipe.config, dtype=torch.float16))
PY
