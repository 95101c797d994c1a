"""Which map can be trusted? Deletion and insertion areas of every explanation over held-out images.

    python bench/faithfulness.py                       # the shipped model, 200 of its held-out images
    python bench/faithfulness.py --images 20 --steps 10
    python bench/faithfulness.py --weights weights/my_run.safetensors --data ~/data/cifar10

For each image it ranks the patches by the overall map of every method the model offers (see
`vitdemo.explain`: the last layer's raw CLS attention and the rollout; relevance, Chefer et al. 2021; the
CAMs; Integrated Gradients, Shapley values and occlusion) for the predicted class, and by a random order;
blanks them most relevant first (deletion: lower is better) and reveals them on a blank image (insertion:
higher is better), and prints the mean areas and each map's own cost per image. The images are the ones
the checkpoint's run held out for validation: never trained on.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vitdemo.backends import load_model  # noqa: E402
from vitdemo.data import load_dataset  # noqa: E402
from vitdemo.evaluate import held_out  # noqa: E402
from vitdemo.faithfulness import faithfulness  # noqa: E402
from vitdemo.weights import read_metadata  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--weights', default=str(ROOT / 'weights' / 'vit_cifar10.safetensors'))
    parser.add_argument('--data', default=str(ROOT.parent / 'shared' / 'data' / 'cifar10-train.tar.gz'),
                        help='the images the checkpoint was trained from (its held-out split is rebuilt)')
    parser.add_argument('--images', type=int, default=200, help='how many held-out images')
    parser.add_argument('--steps', type=int, default=10, help='points of each curve, past the first')
    args = parser.parse_args()

    model = load_model(args.weights)
    images = held_out(load_dataset(args.data), read_metadata(args.weights))
    totals: dict[str, list[tuple[float, float, float]]] = {}
    start = time.perf_counter()
    for i in range(min(args.images, len(images))):
        picture = Image.fromarray(images.images[i].permute(1, 2, 0).numpy())
        for score in faithfulness(model, picture, steps=args.steps, seed=i):
            totals.setdefault(score.name, []).append((score.deletion_auc, score.insertion_auc, score.seconds))
        if (i + 1) % 20 == 0:
            print(f'{i + 1} images, {time.perf_counter() - start:.0f} s', file=sys.stderr, flush=True)
    n = len(next(iter(totals.values())))
    print(f'{Path(args.weights).name}: {n} held-out images, {args.steps + 1}-point curves, '
          f'{time.perf_counter() - start:.0f} s in all')
    print('| map | deletion area (lower is better) | insertion area (higher is better) | ms per image |')
    print('| --- | ---: | ---: | ---: |')
    for name, rows in totals.items():
        deletion, insertion, seconds = zip(*rows)
        print(f'| {name} | {statistics.mean(deletion):.3f} | {statistics.mean(insertion):.3f} | '
              f'{statistics.mean(seconds) * 1000:.1f} |')


if __name__ == '__main__':
    main()
