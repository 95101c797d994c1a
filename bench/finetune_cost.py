"""What fine-tuning a pretrained ViT costs on this machine, in images per second, side by side in one run:
a linear probe's feature pass, and a training step with the first 8 blocks frozen and with none frozen
(layer-wise decay changes the rates, not the cost). The Train tab's estimate quotes these figures.

    python bench/finetune_cost.py                       # ViT-Ti/16 and ViT-S/16, 224 px
    python bench/finetune_cost.py --archs vit_tiny_patch16_224 --seconds 4

Random weights: speed does not depend on their values (no download). Inputs are 224 px, as a fine-tune
upscales every image to its model's size.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vitdemo.model import preset  # noqa: E402
from vitdemo.train import FineTune, autocast, param_groups  # noqa: E402
from vitdemo.weights import build_model  # noqa: E402


def rate(step, batch: int, seconds: float) -> float:
    """Images per second of `step` (a batch each call), timed for about `seconds` after one warm-up call."""
    step()  # warm up
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        n += batch
    if torch.cuda.is_available():  # a GPU's queued work counts too
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--archs', nargs='*', default=['vit_tiny_patch16_224', 'vit_small_patch16_224'])
    parser.add_argument('--seconds', type=float, default=8.0, help='timed per contender')
    args = parser.parse_args()
    device = torch.device('cpu')
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads; images/s at 224 px\n')
    print(f'{"model":24s} {"probe features":>15s} {"partial (8 frozen)":>19s} {"full":>8s}')
    for arch in args.archs:
        model = build_model(preset(arch, num_classes=10))
        x = torch.randn(64, 3, 224, 224)
        y = torch.randint(0, 10, (32,))

        @torch.no_grad()
        def features():
            with autocast(device):
                model.forward_head(model.forward_features(x), pre_logits=True)

        model.eval()
        rates = [rate(features, len(x), args.seconds)]
        model.train().set_fused_attn(False)  # as the trainer runs it on a CPU
        for mode in ('partial', 'full'):
            for p in model.parameters():
                p.requires_grad_(True)
            finetune = FineTune(model, [0.5] * 3, [0.5] * 3, mode, frozen_blocks=8)
            optimizer = torch.optim.AdamW(param_groups(model, 0.05, finetune.lr_scale), fused=True)

            def step():
                with autocast(device):
                    loss = F.cross_entropy(model(x[:32]).float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            rates.append(rate(step, 32, args.seconds))
        print(f'{arch:24s} {rates[0]:15.0f} {rates[1]:19.0f} {rates[2]:8.0f}', flush=True)


if __name__ == '__main__':
    main()
