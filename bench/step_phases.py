"""Where a training step's time goes: each phase of `vitdemo.train`'s loop alone, timed with the device
synchronised, at two batch sizes; then the trainer itself, eager, on random images at each size.

    python bench/step_phases.py --device cuda      # bench/gpu_check.sh runs this
    python bench/step_phases.py --device cpu --batches 128 --rounds 3

The model is the larger student of docs/benchmarks.md (dim 256, depth 7, 4 heads, MLP ratio 2, the conv
stem, drop-path 0.1), the teacher the shipped CNN answering for each image and its mirror. A phase whose
time hardly grows with the batch is bound by the CPU launching its kernels, not by the device computing.
"""
import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from vitdemo.data import ImageData, augment, mix, rand_augment, to_model_input  # noqa: E402
from vitdemo.distill import Distillation  # noqa: E402
from vitdemo.model import ViTConfig, VisionTransformer  # noqa: E402
from vitdemo.train import TrainConfig, autocast, precision, train  # noqa: E402
from vitdemo.weights import read_metadata  # noqa: E402

TEACHER = ROOT / 'weights' / 'convnet_cifar10.safetensors'
MEAN, STD = [0.49, 0.48, 0.45], [0.25, 0.24, 0.26]


def student(distilled: bool = False) -> ViTConfig:
    return ViTConfig(img_size=32, patch_size=4, num_classes=10, embed_dim=256, depth=7, num_heads=4, mlp_ratio=2.0,
                     stem='conv', drop_path_rate=0.1, distilled=distilled)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--batches', type=int, nargs='+', default=[256, 1024], help='batch sizes')
    parser.add_argument('--rounds', type=int, default=20, help='timed calls of each phase')
    parser.add_argument('--images', type=int, default=8192, help="random images for the trainer's runs")
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)

    def time_ms(phase) -> float:
        phase()  # warm up: first-call allocations and kernel choices
        sync()
        start = time.perf_counter()
        for _ in range(args.rounds):
            phase()
        sync()
        return 1000 * (time.perf_counter() - start) / args.rounds

    images = torch.randint(0, 256, (args.images, 3, 32, 32), dtype=torch.uint8)
    labels = torch.randint(0, 10, (args.images,))
    crops = torch.Generator().manual_seed(0)
    teacher = Distillation.from_checkpoint(TEACHER, read_metadata(TEACHER)['classes'], device=device)
    name = torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'
    print(f'torch {torch.__version__}, {name}, autocast {precision(device)}, '
          f'ms per batch (mean of {args.rounds} calls)')
    for batch in args.batches:
        pixels, y = images[:batch].to(device), labels[:batch].to(device)
        x = to_model_input(pixels, MEAN, STD, 32)
        phases = {
            'pick the images, copy them to the device': lambda: images[torch.randperm(len(images))[:batch]].to(device),
            'crops and flips': lambda: augment(pixels, 4, crops),
            'RandAugment, 16 draws a batch': lambda: rand_augment(pixels, 9),
            'RandAugment, 4 draws a batch': lambda: rand_augment(pixels, 9, draws=4),
            'normalise': lambda: to_model_input(pixels, MEAN, STD, 32),
            'CutMix or MixUp': lambda: mix(x, y, 10),
        }

        def teach() -> None:
            with autocast(device):
                teacher.teach(x, MEAN, STD)
        phases['teacher, image and mirror'] = teach
        for distilled in (False, True):
            model = VisionTransformer(student(distilled)).to(device).train()
            model.set_fused_attn(device.type == 'cuda')
            model.set_distilled_training(distilled)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)

            def step(model=model, optimizer=optimizer) -> None:  # forward, loss, backward, clip, update
                with autocast(device):
                    out = model(x)
                loss = F.cross_entropy((out[0] if isinstance(out, tuple) else out).float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                loss.item()  # the trainer reads the loss every step
            phases[f'model step{", distillation token" if distilled else ""}'] = step
        print(f'\nbatch {batch}')
        for phase, call in phases.items():
            print(f'  {phase:44s} {time_ms(call):8.2f}', flush=True)

    print(f'\nthe trainer itself (eager, {args.images:,} random images, RandAugment 9 or none, 30% of batches '
          'mixed, no teacher): images/s in its second epoch')
    data = ImageData(images, labels, [str(i) for i in range(10)])
    for batch in args.batches:
        for strength in (9, 0):
            cfg = TrainConfig(epochs=2, minutes=None, batch_size=batch, val_size=512, rand_augment=strength,
                              mix_prob=0.3, crop_padding=4, filmstrip=0)
            result = train(student(), cfg, data, device=str(device))
            print(f'  batch {batch:5d}, RandAugment {strength}: {result.history[-1]["images_per_sec"]:9,.0f}',
                  flush=True)


if __name__ == '__main__':
    main()
