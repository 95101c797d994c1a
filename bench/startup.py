"""Start-up: seconds from `python app.py` to the page's first answer, for this checkout and, side by side
in alternating rounds, another one (e.g. an older commit in a git worktree).

    python bench/startup.py
    git worktree add /tmp/old 545c8d3 && python bench/startup.py --other /tmp/old

Offline (HF_HUB_OFFLINE=1) and with a warm file cache after the first round: the first round shows a
colder start.
"""
import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from vitdemo.app_process import running_app  # noqa: E402


def seconds_to_answer(root: Path) -> float:
    with running_app(root) as (_, seconds):
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--other', type=Path, help='another checkout to time alongside')
    parser.add_argument('--rounds', type=int, default=3)
    args = parser.parse_args()
    roots = {'this checkout': ROOT} | ({f'{args.other}': args.other} if args.other else {})
    times = {name: [] for name in roots}
    for _ in range(args.rounds):
        for name, root in roots.items():
            times[name].append(seconds_to_answer(root))
    for name, t in times.items():
        print(f'{name:24s} ' + ' '.join(f'{x:5.2f}' for x in t) + f'   median {statistics.median(t):.2f} s')


if __name__ == '__main__':
    main()
