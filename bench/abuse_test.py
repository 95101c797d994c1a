"""Replay the public-safety issue's abuse against `python app.py` in public mode, on loopback.

    python bench/abuse_test.py                 # all five phases, about five minutes on 2 cores
    python bench/abuse_test.py --skip-failed-run

It starts the app itself (VITDEMO_PUBLIC=1, a small store cap, a training folder of generated images,
everything in a temporary folder) and reports, phase by phase:

1. a failed run: the server's resident memory before a training run that runs out of memory, and after
   it failed (the run is made to fail for real: the estimate that would refuse it is switched off and the
   server's address space is capped with prlimit); then a small run must still finish;
2. 8 clients x 40 predictions while a training run goes on: answered, failed, latency;
3. one client flooding the queue with Inspect calls while another's predictions still answer;
4. 20 training runs from 20 sessions: the number of stored checkpoints after each, against the cap;
5. 30 sessions each bringing back a checkpoint into that full store: what is added, and what remains of
   the models stored before.
"""
import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from gradio_client import Client, handle_file
from PIL import Image

from load_test import IMAGES, ROOT, free_port, resident_mb  # its companion, beside it in bench/

STORE_CAP = 5
TINY_RUN = dict(embed_dim=64, depth=2, num_heads=2, patch_size=8, minutes=0.05, batch_size=64)  # 3 seconds


def make_data(folder: Path, per_class: int = 100) -> None:
    for c in range(10):
        (folder / 'train' / f'class{c}').mkdir(parents=True)
        for i in range(per_class):
            Image.new('RGB', (32, 32), (c * 25, i * 2, 90)).save(folder / 'train' / f'class{c}' / f'{i}.png')


def start_app(port: int, temp: Path, memory_mb: str) -> subprocess.Popen:
    env = dict(os.environ, GRADIO_SERVER_NAME='127.0.0.1', GRADIO_SERVER_PORT=str(port), HF_HUB_OFFLINE='1',
               GRADIO_TEMP_DIR=str(temp / 'gradio'), VITDEMO_PUBLIC='1', VITDEMO_DATA=str(temp / 'data'),
               VITDEMO_CACHE=str(temp / 'cache'), VITDEMO_RUNS=str(temp / 'runs'),
               VITDEMO_STORE_MAX_FILES=str(STORE_CAP), VITDEMO_TRAIN_MEMORY_MB=memory_mb)
    server = subprocess.Popen([sys.executable, 'app.py'], cwd=ROOT, env=env, stdout=open(temp / 'app.log', 'w'),
                              stderr=subprocess.STDOUT)
    while True:
        if server.poll() is not None:
            sys.exit(f'the app exited during start-up; see {temp / "app.log"}')
        try:
            urllib.request.urlopen(f'http://127.0.0.1:{port}/', timeout=1)
            return server
        except OSError:
            time.sleep(0.2)


def failed_run(url: str, pid: int) -> None:
    client = Client(url, verbose=False, download_files=False)
    client.predict('warm_up', **TINY_RUN, api_name='/train')  # the training code's own allocations settle
    time.sleep(2)
    before = resident_mb(pid)
    soft, hard = resource.prlimit(pid, resource.RLIMIT_AS)
    vm = int(next(line for line in Path(f'/proc/{pid}/status').read_text().splitlines()
                  if line.startswith('VmSize:')).split()[1]) * 1024
    resource.prlimit(pid, resource.RLIMIT_AS, (vm + 3 * 2 ** 30, hard))  # 3 GB more address space, no more
    try:
        client.predict('too_big', embed_dim=256, depth=8, num_heads=8, patch_size=2, minutes=5, batch_size=4096,
                       stem='patch', api_name='/train')  # 6.4 M parameters
        outcome = 'it did not fail'
    except Exception as e:
        outcome = str(e).splitlines()[0][:150]
    finally:
        resource.prlimit(pid, resource.RLIMIT_AS, (soft, hard))
    time.sleep(2)
    after = resident_mb(pid)
    status = re.sub(r'<[^>]+>', '', client.predict('after_failure', **TINY_RUN, api_name='/train')[0])  # the bar's HTML
    print(f'1. failed run: "{outcome}"\n   resident memory {before:.0f} MB before, {after:.0f} MB after '
          f'({after - before:+.0f} MB); the next small run: {status}')


def predictions_during_training(url: str, clients: int = 8, each: int = 40) -> None:
    trainer = Client(url, verbose=False, download_files=False).submit(
        'busy_run', embed_dim=96, depth=3, num_heads=3, minutes=3.0, api_name='/train')
    time.sleep(3)
    latencies, failures = [], []
    lock = threading.Lock()

    def worker(index: int) -> None:
        client = Client(url, verbose=False, download_files=True)
        for r in range(each):
            t = time.perf_counter()
            try:
                client.predict(handle_file(str(IMAGES[(index + r) % len(IMAGES)])), 'scratch/vit_cifar10',
                               api_name='/predict')
                with lock:
                    latencies.append(time.perf_counter() - t)
            except Exception as e:  # counted and shown: this is what we measure
                with lock:
                    failures.append(f'{type(e).__name__}: {str(e)[:120]}')
    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    print(f'2. {len(latencies)}/{clients * each} predictions answered, {len(failures)} failed, '
          f'{clients} clients with their outputs downloaded, during a training run; p50 '
          f'{statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms, '
          f'{len(latencies) / wall:.1f}/s; training still going: {not trainer.done()}')
    for failure in failures[:5]:
        print('   failure:', failure)
    trainer.cancel()  # the watcher leaves: the run stops at its next step and keeps what it learned


def flood(url: str, calls: int = 30, answers: int = 10) -> None:
    flooder = Client(url, verbose=False, download_files=False)
    jobs = [flooder.submit(handle_file(str(IMAGES[0])), 'scratch/vit_cifar10', api_name='/inspect')
            for _ in range(calls)]
    visitor = Client(url, verbose=False, download_files=False)
    answered, latencies = 0, []
    for r in range(answers):
        t = time.perf_counter()
        try:
            visitor.predict(handle_file(str(IMAGES[r % len(IMAGES)])), 'scratch/vit_cifar10', api_name='/predict')
            answered += 1
            latencies.append(time.perf_counter() - t)
        except Exception as e:
            print('   visitor failure:', str(e)[:120])
    refused = 0
    for job in jobs:
        try:
            job.result(timeout=120)
        except Exception:
            refused += 1
    print(f'3. one client sent {calls} Inspect calls at once: {calls - refused} run, {refused} refused to it; '
          f'meanwhile another visitor got {answered}/{answers} predictions, max {max(latencies or [0]):.1f} s')


def many_runs(url: str, runs_dir: Path, count: int = 20) -> None:
    stored = []
    for i in range(count):
        Client(url, verbose=False, download_files=False).predict(f'run{i}', **TINY_RUN, api_name='/train')
        stored.append(len(list(runs_dir.rglob('*.safetensors'))))
    print(f'4. {count} runs from {count} sessions: checkpoints stored after each {stored} (cap {STORE_CAP})')


def bring_back_flood(url: str, runs_dir: Path, temp: Path, count: int = 30) -> None:
    stored = sorted(runs_dir.rglob('*.safetensors'))
    mine = temp / 'mine.safetensors'  # one of the stored models, downloaded, as a flood's ammunition
    shutil.copy(stored[-1], mine)
    added, refused = 0, []
    for _ in range(count):
        try:
            Client(url, verbose=False, download_files=False).predict(handle_file(str(mine)), api_name='/add_model')
            added += 1
        except Exception as e:
            refused.append(str(e))
    why = {r[:90] for r in refused}
    print(f'5. {count} checkpoints brought back from {count} sessions into the full store: {added} added, '
          f'{len(refused)} refused ({"; ".join(why)}); of the {len(stored)} models stored before, '
          f'{sum(p.exists() for p in stored)} remain')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--skip-failed-run', action='store_true', help='phase 1 needs Linux prlimit')
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix='vitdemo-abuse-') as temp:
        temp = Path(temp)
        make_data(temp / 'data')
        port = free_port()
        # phase 1 switches the memory estimate off (a budget no run exceeds) so that a run fails for real
        server = start_app(port, temp, memory_mb='1000000' if not args.skip_failed_run else '')
        url = f'http://127.0.0.1:{port}/'
        try:
            Client(url, verbose=False, download_files=False).predict(handle_file(str(IMAGES[0])),
                                                                     'scratch/vit_cifar10', api_name='/predict')
            if not args.skip_failed_run:
                failed_run(url, server.pid)
            predictions_during_training(url)
            time.sleep(2)
            flood(url)
            many_runs(url, temp / 'runs')
            bring_back_flood(url, temp / 'runs', temp)
            print(f'server resident memory at the end: {resident_mb(server.pid):.0f} MB; '
                  f'{sum("Traceback" in line for line in open(temp / "app.log"))} tracebacks in its log')
        finally:
            server.terminate()
            server.wait(timeout=30)


if __name__ == '__main__':
    main()
