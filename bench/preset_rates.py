"""How far each Train-tab preset gets on this machine: a training step of the preset's own model, batch and
precision on random 32x32 images, in images per second, and the epochs of CIFAR-10's 45,000 training images
that its minutes hold at that rate (validation and data loading not counted: a whole run gets a little less).
A preset that leaves patch tokens out is timed again with every token, right after, for the speed-up; one
whose conv stem has no conv at full size (`stem='strided'`), again with that conv; one whose ViT learns with
Muon, again with AdamW alone (what the orthogonalisation costs).

    python bench/preset_rates.py
    python bench/preset_rates.py --seconds 4 --presets '10-minute CPU demo'
"""
import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vitdemo.train import autocast, optimizer_of, precision, training_device  # noqa: E402
from vitdemo.train_form import TRAIN_PRESETS, TrainForm, default_preset  # noqa: E402
from vitdemo.weights import build_model  # noqa: E402
from finetune_cost import rate  # noqa: E402  (bench/ is the script's folder)

TRAIN_IMAGES = 45_000  # CIFAR-10's 50,000 less the 5,000 held out for validation


def images_per_second(form: TrainForm, seconds: float, device: torch.device) -> float:
    model_config, cfg = form.configs()
    model = build_model(model_config).to(device).train()
    optimizer = optimizer_of(model, cfg, device)
    x = torch.randn(cfg.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (cfg.batch_size,), device=device)

    def step():
        with autocast(device):
            loss = F.cross_entropy(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return rate(step, cfg.batch_size, seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--presets', nargs='*', default=list(TRAIN_PRESETS), choices=list(TRAIN_PRESETS))
    parser.add_argument('--seconds', type=float, default=8.0, help='timed per preset')
    args = parser.parse_args()
    device = training_device()
    dtype = precision(device)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, {device.type}, '
          f'{dtype or torch.float32}; the Train tab starts from {default_preset()!r}\n')
    print(f'{"preset":42s} {"images/s":>9s} {"minutes":>8s} {"epochs":>7s}')
    for name in args.presets:
        form = TRAIN_PRESETS[name]
        if form.start_from:
            continue  # a fine-tune: bench/finetune_cost.py
        def row(label: str, images_per_sec: float, note: str = '') -> None:
            epochs = images_per_sec * 60 * form.minutes / TRAIN_IMAGES
            print(f'{label:42s} {images_per_sec:9.0f} {form.minutes:8.0f} {epochs:7.1f}{note}', flush=True)
        speed = images_per_second(form, args.seconds, device)
        row(name, speed)
        if form.arch == 'vit' and form.patch_drop:  # the same preset with every token, timed right after it
            full = images_per_second(replace(form, patch_drop=0.0), args.seconds, device)
            row('  the same, every patch token', full, f'   (left out: {speed / full:.2f}x)')
        if form.arch == 'vit' and form.stem == 'strided':  # the same preset with the full-size conv
            full = images_per_second(replace(form, stem='conv'), args.seconds, device)
            row('  the same, the conv stem', full, f'   (strided: {speed / full:.2f}x)')
        if form.arch == 'vit' and form.optimizer == 'muon':  # the same preset with AdamW alone
            adamw = images_per_second(replace(form, optimizer='adamw'), args.seconds, device)
            row('  the same, AdamW alone', adamw, f'   (Muon: {speed / adamw:.2f}x)')


if __name__ == '__main__':
    main()
