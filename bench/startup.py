"""Start-up: seconds from `python app.py` to the page's first answer, for this checkout and, side by side
in alternating rounds, another one (e.g. an older commit in a git worktree).

    python bench/startup.py
    git worktree add /tmp/old 545c8d3 && python bench/startup.py --other /tmp/old

Offline (HF_HUB_OFFLINE=1) and with a warm file cache after the first round: the first round shows a
colder start.
"""
import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def seconds_to_answer(root: Path) -> float:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = dict(os.environ, GRADIO_SERVER_PORT=str(port), GRADIO_SERVER_NAME='127.0.0.1', HF_HUB_OFFLINE='1')
    start = time.perf_counter()
    app = subprocess.Popen([sys.executable, 'app.py'], cwd=root, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    try:
        while True:
            if app.poll() is not None:
                raise RuntimeError(f'the app in {root} exited with {app.returncode}')
            try:
                urllib.request.urlopen(f'http://127.0.0.1:{port}/', timeout=1)
                return time.perf_counter() - start
            except OSError:
                time.sleep(0.05)
    finally:
        app.terminate()
        app.wait()


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
