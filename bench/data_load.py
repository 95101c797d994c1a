"""Reading a dataset the first time: seconds for `load_dataset` to turn an archive (or image folder) into the
tensors a run trains on, with an empty cache, for this checkout and, side by side in alternating rounds, another
one (e.g. an older commit in a git worktree). Each round is a fresh process with a fresh cache folder, so the
cache never answers; the archive itself stays in the file cache after the first round.

    python bench/data_load.py
    git worktree add /tmp/old 0d13e94 && python bench/data_load.py --other /tmp/old --rounds 3
"""
import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCHIVE = ROOT.parent / 'shared' / 'data' / 'cifar10-train.tar.gz'

# run in the checkout under test: its own vitdemo.data, torch already imported so that only the reading is timed
TIMED = """
import sys, time
sys.path.insert(0, sys.argv[1])
import torch
from pathlib import Path
from vitdemo.data import load_dataset
start = time.perf_counter()
data = load_dataset(sys.argv[2], cache_dir=Path(sys.argv[3]))
print(time.perf_counter() - start, len(data))
"""


def timed_load(root: Path, data: Path) -> tuple[float, int]:
    """Seconds for `root`'s `load_dataset(data)` with an empty cache, and the number of images it read."""
    with tempfile.TemporaryDirectory() as cache:
        out = subprocess.run([sys.executable, '-c', TIMED, str(root), str(data), cache],
                             check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), int(out[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--data', type=Path, default=ARCHIVE, help='archive or image folder to read')
    ap.add_argument('--other', type=Path, help='another checkout to time side by side')
    ap.add_argument('--rounds', type=int, default=3)
    args = ap.parse_args()

    roots = {'this checkout': ROOT} | ({f'other ({args.other})': args.other.resolve()} if args.other else {})
    seconds: dict[str, list[float]] = {name: [] for name in roots}
    for r in range(args.rounds):
        for name, root in roots.items():
            s, n = timed_load(root, args.data)
            seconds[name].append(s)
            print(f'round {r + 1}: {name}: {s:.2f} s for {n:,} images', flush=True)
    print(f'\n{args.data.name}, {args.rounds} rounds, medians:')
    for name, values in seconds.items():
        print(f'  {name}: {statistics.median(values):.2f} s ({" / ".join(f"{v:.2f}" for v in values)})')
    if args.other:
        this, other = (statistics.median(v) for v in seconds.values())
        print(f'  this checkout reads it {other / this:.2f}x as fast')


if __name__ == '__main__':
    main()
