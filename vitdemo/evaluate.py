r"""Accuracy of a checkpoint on a dataset, overall and per class.

    python -m vitdemo.evaluate --weights weights/vit_cifar10.safetensors --data /path/to/cifar10 --split test
    python -m vitdemo.evaluate --weights weights/vit_cifar10.safetensors \
        --data ../shared/data/cifar10-train.tar.gz --split holdout
    python -m vitdemo.evaluate --weights weights/vit_cifar10.safetensors --curves docs/vit_cifar10_curves.png
"""
import argparse

import torch

from .data import ImageData, load_dataset
from .metadata import epochs_seen
from .train import TrainConfig, batch_logits, split
from .weights import CheckpointError, load_checkpoint


def confusion_matrix(model, data: ImageData, mean: list[float], std: list[float], batch_size: int = 500,
                     amp: bool = True) -> torch.Tensor:
    """(classes, classes) counts: row = true class, column = predicted class."""
    n = len(data.classes)
    counts = torch.zeros(n, n, dtype=torch.long)
    for logits, y in batch_logits(model, data, mean, std, batch_size, amp):
        counts += torch.bincount(y * n + logits.argmax(1), minlength=n * n).view(n, n)
    return counts


def report(counts: torch.Tensor, classes: list[str]) -> str:
    per_class = counts.diag() / counts.sum(1).clamp(min=1)
    lines = [f'accuracy {counts.diag().sum().item() / counts.sum().item():.4f} on {counts.sum().item()} images', '',
             f'{"class":12s} {"accuracy":>8s} {"images":>7s}']
    lines += [f'{name:12s} {acc:8.4f} {total:7d}' for name, acc, total in
              zip(classes, per_class.tolist(), counts.sum(1).tolist())]
    return '\n'.join(lines)


def plot_history(history: list[dict], path: str) -> None:
    """Loss and accuracy per epoch, train and validation, from a checkpoint's training history."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    epochs = [epochs_seen(h) for h in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, metric in zip(axes, ('loss', 'accuracy')):
        for part, style in (('train', '-'), ('val', '--')):
            values = [h[f'{part}_{metric}'] for h in history]
            if all(v is not None for v in values):
                ax.plot(epochs, values, style, label='train' if part == 'train' else 'validation')
        ax.set(title=metric.capitalize(), xlabel='epoch', ylabel=metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def held_out(data: ImageData, meta: dict) -> ImageData | None:
    """The training images a checkpoint's own run held out for validation (its split, rebuilt from its
    seed), or None if it held out none."""
    return split(data, TrainConfig(**meta['train_config']))[1]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--weights', required=True, help='a vitdemo .safetensors checkpoint')
    parser.add_argument('--data', help='CIFAR-10 root, image folder or .tar.gz archive to score')
    parser.add_argument('--curves', help="write the checkpoint's training curves to this PNG")
    parser.add_argument('--split', default='test', choices=['train', 'test', 'holdout'],
                        help="which images to score; holdout: the training-set images the checkpoint's own run "
                             'held out for validation (rebuilt from its seed), never trained on')
    parser.add_argument('--limit', type=int, help='score only the first N images')
    parser.add_argument('--no-amp', action='store_true', help='evaluate in fp32')
    args = parser.parse_args(argv)
    try:
        model, meta = load_checkpoint(args.weights)
    except CheckpointError as e:
        parser.error(str(e))
    if args.curves:
        plot_history(meta.get('history') or [], args.curves)
        print(f'curves written to {args.curves}')
    if not args.data:
        return
    data = load_dataset(args.data, split='train' if args.split == 'holdout' else args.split)
    if args.split == 'holdout':
        data = held_out(data, meta)
        if data is None:
            parser.error('the run that made this checkpoint held out no validation images')
    if data.classes != meta['classes']:
        parser.error(f'the data has classes {data.classes}, the checkpoint {meta["classes"]}')
    if args.limit:
        data = data.subset(torch.arange(min(args.limit, len(data))))
    print(report(confusion_matrix(model, data, meta['mean'], meta['std'], amp=not args.no_amp), data.classes))


if __name__ == '__main__':
    main()
