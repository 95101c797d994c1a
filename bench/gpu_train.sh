#!/usr/bin/env bash
# A candidate for the shipped ViT, trained on one GPU in one call: the larger student of docs/benchmarks.md
# (dim 256, depth 7, 4 heads, the conv stem and DeiT's distillation token) at batch 1024, the shipped CNN teaching
# on every batch, for MINUTES (default 8.5: about 270 epochs on an H100). Then its score on the 5,000 held-out
# images, alone and with test-time augmentation, and its curves. Everything goes to OUT_DIR; the checkpoint is
# saved in half precision (~8 MB) and without the optimiser's state, so it comes back from a lent machine.
# Without a GPU it says so and exits 0.
#     bash bench/gpu_train.sh OUT_DIR [MINUTES]     # data: ../shared/data/cifar10-train.tar.gz, or $VITDEMO_ARCHIVE
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash bench/gpu_train.sh OUT_DIR [MINUTES]}
minutes=${2:-8.5}
data=${VITDEMO_ARCHIVE:-../shared/data/cifar10-train.tar.gz}
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo 'no CUDA GPU here: the GPU run has nothing to train on'
    exit 0
fi
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
echo "== training for $minutes minutes (the log: $out/train.log)"
python -m vitdemo.train --data "$data" --embed-dim 256 --depth 7 --heads 4 --mlp-ratio 2 --stem conv \
    --pos-embed learn --drop-path 0.1 --minutes "$minutes" --batch-size 1024 --lr 3e-3 --crop-padding 4 \
    --rand-augment 9 --mix-prob 0.3 --teacher weights/convnet_cifar10.safetensors --distill hard \
    --half-checkpoint --no-state --out "$out/vit_gpu.safetensors" > "$out/train.log" 2>&1 \
    || { tail -c 3000 "$out/train.log"; exit 1; }
# the progress bar rewrites its line with carriage returns: keep one line per epoch
tr '\r' '\n' < "$out/train.log" | grep -o 'epoch [0-9]*: .*\|done.*'
echo '== the 5,000 held-out images'
python -m vitdemo.evaluate --weights "$out/vit_gpu.safetensors" --data "$data" --split holdout \
    --curves "$out/vit_gpu_curves.png"
python bench/test_time_augmentation.py "$out/vit_gpu.safetensors" --data "$data"
