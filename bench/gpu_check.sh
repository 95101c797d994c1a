#!/usr/bin/env bash
# The GPU check, under 8 minutes on one GPU (3 on an H100): the tests that need CUDA, the training throughput of
# our trainer against the tutorial's ViT (both on the GPU, with the matrix-product limit), where a training
# step's time goes, and ViT-B/16's predict latency with every layer's attention against a plain forward.
# Run from anywhere; without a GPU it says so and exits 0.
#     bash bench/gpu_check.sh            # prints everything; put the figures in docs/benchmarks.md with the card
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo 'no CUDA GPU here: the GPU check has nothing to run'
    exit 0
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
                              "bf16", torch.cuda.is_bf16_supported())'
echo '== tests that need CUDA'
python -m pytest -q -m cuda tests/test_cuda.py
echo '== training throughput on the GPU (ours vs the tutorial as written)'
timeout 300 python bench/train_throughput.py --device cuda --no-ddp --images 25600 --rounds 2
echo '== where the time of a training step goes, at two batch sizes'
timeout 120 python bench/step_phases.py --device cuda
echo '== predict latency on the GPU: every attention vs a plain forward'
timeout 120 python bench/predict_latency.py --device cuda --rounds 30 \
    --models timm/vit_base_patch16_224 ours/vit_base_patch16_224
