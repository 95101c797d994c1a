"""Load test: many predict requests from concurrent gradio_client clients, at the app on loopback.

    python bench/load_test.py                           # 64 requests from 8 clients
    python bench/load_test.py --train-minutes 2         # ... while a training run goes on
    python bench/load_test.py --requests 200 --clients 4 --model timm/vit_tiny_patch16_224

It starts `python app.py` itself, as a user would (on a free GRADIO_SERVER_PORT), and reports how long the
app took to answer its first request, then the latency of every prediction (p50, p95, max), throughput,
failures, the server's resident memory before and after, and, with --train-minutes, whether the training
run started through the Train endpoint at the same time completed.
"""
import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from gradio_client import Client, handle_file

ROOT = Path(__file__).resolve().parent.parent
IMAGES = sorted(p for p in (ROOT / 'examples').glob('*.*') if p.suffix != '.md')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def resident_mb(pid: int) -> float:
    line = next(line for line in Path(f'/proc/{pid}/status').read_text().splitlines() if line.startswith('VmRSS:'))
    return int(line.split()[1]) / 1024


def start_app(port: int, temp: Path) -> tuple[subprocess.Popen, float]:
    env = dict(os.environ, GRADIO_SERVER_NAME='127.0.0.1', GRADIO_SERVER_PORT=str(port), GRADIO_TEMP_DIR=str(temp))
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, 'app.py'], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    while True:
        if server.poll() is not None:
            sys.exit('the app exited during start-up; run `python app.py` to see why')
        try:
            urllib.request.urlopen(f'http://127.0.0.1:{port}/', timeout=1)
            return server, time.perf_counter() - start
        except OSError:
            time.sleep(0.1)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--requests', type=int, default=64, help='predict requests in all (at least 50)')
    parser.add_argument('--clients', type=int, default=8, help='concurrent gradio_client clients')
    parser.add_argument('--model', default='scratch/vit_cifar10', help='model every request asks for')
    parser.add_argument('--train-minutes', type=float, default=0, help='also run a training of this many minutes')
    args = parser.parse_args()

    port = free_port()
    with tempfile.TemporaryDirectory(prefix='vitdemo-load-') as temp:
        server, startup = start_app(port, Path(temp))
        try:
            url = f'http://127.0.0.1:{port}/'
            print(f'app answered {startup:.1f} s after `python app.py` (GRADIO_SERVER_PORT={port})')
            clients = [Client(url, verbose=False, download_files=False) for _ in range(args.clients)]
            clients[0].predict(handle_file(str(IMAGES[0])), args.model, api_name='/predict')  # loads the model
            rss_before = resident_mb(server.pid)

            training = None
            if args.train_minutes:
                training = Client(url, verbose=False, download_files=False).submit(
                    'load_test_run', embed_dim=96, depth=3, num_heads=3, minutes=args.train_minutes, batch_size=256,
                    api_name='/train')

            latencies: list[float] = []
            failures: list[str] = []
            lock = threading.Lock()

            def worker(index: int) -> None:
                for r in range(index, args.requests, args.clients):
                    image = handle_file(str(IMAGES[r % len(IMAGES)]))
                    t = time.perf_counter()
                    try:
                        clients[index].predict(image, args.model, api_name='/predict')
                        with lock:
                            latencies.append(time.perf_counter() - t)
                    except Exception as e:  # counted and shown, not fatal: this is what we measure
                        with lock:
                            failures.append(f'{type(e).__name__}: {e}')

            start = time.perf_counter()
            threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - start
            rss_after = resident_mb(server.pid)

            print(f'{len(latencies)}/{args.requests} predictions of {args.model} answered, {len(failures)} failed, '
                  f'{args.clients} concurrent clients' + (', training at the same time' if training else ''))
            if latencies:
                print(f'latency p50 {statistics.median(latencies) * 1000:.0f} ms, '
                      f'p95 {percentile(latencies, 0.95) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms; '
                      f'throughput {len(latencies) / wall:.1f} predictions/s')
            print(f'server resident memory {rss_before:.0f} MB before, {rss_after:.0f} MB after')
            for failure in failures[:5]:
                print('  failure:', failure)
            if training:
                status = re.sub(r'<[^>]+>', '', training.result()[0])  # the page's HTML bar, as text
                print(f'training run: {status}')
                for path in (ROOT / 'weights' / 'trained').glob('load_test_run*.safetensors'):
                    path.unlink()
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == '__main__':
    main()
