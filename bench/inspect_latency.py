"""Seconds of the Inspect tab's work (`figures.inspect_view`: the patch grid, four figures, the sizes table and
the faithfulness test, most of it) for the shipped model and ViT-B/16, for this checkout and, side by side in
alternating rounds, another one (e.g. an older commit in a git worktree).

    python bench/inspect_latency.py
    git worktree add /tmp/old 0d13e94 && python bench/inspect_latency.py --other /tmp/old --rounds 2

Speed does not depend on the weights' values: the timm model runs on random weights written to a temporary
folder (no download needed). Each round is a fresh process per checkout, warmed on the shipped model first.
"""
import argparse
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# run in the checkout under test, with its own vitdemo
TIMED = """
import sys, tempfile, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import timm, torch
from safetensors.torch import save_file
from vitdemo.backends import load_model
from vitdemo.figures import inspect_view
image = sys.argv[2]
inspect_view(load_model('scratch/vit_cifar10', Path(sys.argv[1]) / 'weights'), image)  # imports, first calls
with tempfile.TemporaryDirectory() as folder:  # ViT-B's weights: 330 MB a round
    folder = Path(folder)
    for name in sys.argv[3:]:
        kind, _, arch = name.partition('/')
        if kind == 'timm':
            save_file(timm.create_model(arch).state_dict(), str(folder / f'{arch}.safetensors'))
    for name in sys.argv[3:]:
        model = load_model(name, folder if name.startswith('timm/') else Path(sys.argv[1]) / 'weights')
        start = time.perf_counter()
        inspect_view(model, image)
        print(name, time.perf_counter() - start)
"""


def timed(root: Path, models: list[str]) -> dict[str, float]:
    out = subprocess.run([sys.executable, '-c', TIMED, str(root), str(ROOT / 'examples' / 'rocket.jpg'), *models],
                         check=True, capture_output=True, text=True).stdout
    return {line.split()[0]: float(line.split()[1]) for line in out.splitlines()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--models', nargs='+', default=['scratch/vit_cifar10', 'timm/vit_base_patch16_224'])
    ap.add_argument('--other', type=Path, help='another checkout to time side by side')
    ap.add_argument('--rounds', type=int, default=2)
    args = ap.parse_args()

    roots = {'this checkout': ROOT} | ({f'other ({args.other})': args.other.resolve()} if args.other else {})
    seconds = {(tree, model): [] for tree in roots for model in args.models}
    for r in range(args.rounds):
        for tree, root in roots.items():
            for model, s in timed(root, args.models).items():
                seconds[tree, model].append(s)
                print(f'round {r + 1}: {tree}: {model} {s:.2f} s', flush=True)
    print(f'\n{args.rounds} rounds, medians:')
    for model in args.models:
        medians = {tree: statistics.median(seconds[tree, model]) for tree in roots}
        line = ', '.join(f'{tree} {s:.2f} s' for tree, s in medians.items())
        if args.other:
            this, other = medians.values()
            line += f': {other / this:.2f}x as fast'
        print(f'  {model}: {line}')


if __name__ == '__main__':
    main()
