"""What test-time augmentation is worth to our checkpoints: each one's accuracy on the images its own run held
out, alone, averaged with its answer for the mirror image (what a teacher gives its student, vitdemo/distill.py),
and averaged over the mirror and four diagonal shifts of one pixel; then all the checkpoints averaged together.

    python bench/test_time_augmentation.py weights/convnet_cifar10.safetensors weights/vit_cifar10.safetensors \
        --data ../shared/data/cifar10-train.tar.gz

Answers are averaged as probabilities, in bf16 autocast as training evaluates. The checkpoints must share
their held-out split (the same seed and size), or the ensemble line is skipped.
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from vitdemo.data import load_dataset  # noqa: E402
from vitdemo.evaluate import held_out  # noqa: E402
from vitdemo.train import autocast, to_model_input  # noqa: E402
from vitdemo.weights import load_checkpoint  # noqa: E402


def views(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The image, its mirror, and four diagonal shifts of one pixel (reflect padding), all of the same size."""
    padded, side = F.pad(x, (1, 1, 1, 1), mode='reflect'), x.shape[-1]
    shifts = {f'shift {dx - 1:+d},{dy - 1:+d}': padded[..., dy:dy + side, dx:dx + side]
              for dx, dy in [(0, 0), (2, 2), (0, 2), (2, 0)]}
    return {'plain': x, 'mirror': x.flip(-1), **shifts}


@torch.inference_mode()
def probabilities(path: str, data) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Per view, the checkpoint's class probabilities on its held-out images; and their labels."""
    model, meta = load_checkpoint(path)
    model.eval()
    images = held_out(data, meta)
    out: dict[str, list[torch.Tensor]] = {}
    for i in range(0, len(images), 500):
        x = to_model_input(images.images[i:i + 500], meta['mean'], meta['std'], model.config.img_size)
        for name, view in views(x).items():
            with autocast(torch.device('cpu'), True):
                logits = model(view)
            out.setdefault(name, []).append(logits.float().softmax(-1))
    return {name: torch.cat(p) for name, p in out.items()}, images.labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('weights', nargs='+', help='vitdemo .safetensors checkpoints')
    parser.add_argument('--data', required=True, help='the training archive or folder the checkpoints held out from')
    args = parser.parse_args()
    data = load_dataset(args.data)
    accuracy = lambda p, y: 100 * (p.argmax(1) == y).float().mean().item()  # noqa: E731
    print(f'{"checkpoint":40s} {"alone":>7s} {"+mirror":>8s} {"+shifts":>8s}')
    answers, labels = [], []
    for path in args.weights:
        p, y = probabilities(path, data)
        answers.append(p)
        labels.append(y)
        print(f'{Path(path).name:40s} {accuracy(p["plain"], y):6.2f}% {accuracy(p["plain"] + p["mirror"], y):7.2f}% '
              f'{accuracy(sum(p.values()), y):7.2f}%')
    if len(answers) > 1 and all(torch.equal(y, labels[0]) for y in labels):
        y = labels[0]
        print(f'{"all averaged":40s} {accuracy(sum(p["plain"] for p in answers), y):6.2f}% '
              f'{accuracy(sum(p["plain"] + p["mirror"] for p in answers), y):7.2f}% '
              f'{accuracy(sum(sum(p.values()) for p in answers), y):7.2f}%')


if __name__ == '__main__':
    main()
