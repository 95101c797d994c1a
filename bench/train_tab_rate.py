"""The Train tab's training speed against the command line's, side by side in one run.

    python bench/train_tab_rate.py                                   # random images, 3 rounds of 40 s each
    python bench/train_tab_rate.py --data ../shared/data/cifar10-train.tar.gz --seconds 60 --rounds 2

The command line trains in its main thread. The Train tab trains in a thread of its own, while one of the
server's threads waits for its reports (`TrainingJob.run`): here a thread that has answered a prediction
first, as the server's threads have. Three contenders, on the Train tab's default preset for this CPU:

- the command line's path: `vitdemo.train.train` called from the main thread;
- the Train tab's path: `TrainingJob.run`, iterated from that thread;
- the same with the waiting thread keeping its OpenMP workers (`release_openmp_workers` made a no-op): two
  teams of OpenMP threads alive at once, where GNU OpenMP lets no worker wait actively between operations.

Each runs for the same seconds on at most 4,096 training images (short epochs: several per round); its rate
is the median images/s of its epochs after the first. Rounds alternate the contenders.
"""
import argparse
import contextlib
import platform
import statistics
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from vitdemo import training_job  # noqa: E402
from vitdemo.catalog import ModelCache  # noqa: E402
from vitdemo.data import ImageData, load_dataset  # noqa: E402
from vitdemo.policy import release_openmp_workers  # noqa: E402
from vitdemo.store import ModelStore  # noqa: E402
from vitdemo.train import train  # noqa: E402
from vitdemo.train_form import TRAIN_PRESETS, default_preset  # noqa: E402
from vitdemo.views import predict_view  # noqa: E402

EXAMPLE = ROOT / 'examples' / 'cifar_horse.jpg'


def cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as info:
            return next(line.split(':', 1)[1].strip() for line in info if line.startswith('model name'))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def epoch_rate(history: list[dict]) -> float:
    rates = [h['images_per_sec'] for h in history[1:]] or [h['images_per_sec'] for h in history]
    return statistics.median(rates)


def command_line(model_config, cfg, data) -> float:
    rate = epoch_rate(train(model_config, cfg, data).history)
    release_openmp_workers()  # as the command line's process ends: its workers must not slow the next contender
    return rate


def train_tab(model_config, cfg, data, keep_workers: bool = False) -> float:
    """`TrainingJob.run` iterated from a thread that answered a prediction first."""
    answer = {}

    def server_thread():
        predict_view(ModelCache(weights_dir=ROOT / 'weights').get('scratch/vit_cifar10', None), EXAMPLE.read_bytes())
        with tempfile.TemporaryDirectory() as store:
            job = training_job.TrainingJob(data_path=None, store=ModelStore(Path(store)))
            *_, last = job.run(model_config, cfg, 'bench', data=data)
        answer['rate'] = epoch_rate(last.history)

    keep = mock.patch.object(training_job, 'release_openmp_workers', lambda: None) if keep_workers else \
        contextlib.nullcontext()
    with keep:
        thread = threading.Thread(target=server_thread)
        thread.start()
        thread.join()
    return answer['rate']


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--data', help='a CIFAR-10 archive or folder (default: random images)')
    parser.add_argument('--seconds', type=float, default=40.0, help='each contender, each round')
    parser.add_argument('--rounds', type=int, default=3)
    args = parser.parse_args()

    preset = default_preset()
    model_config, cfg = TRAIN_PRESETS[preset].configs()
    cfg = replace(cfg, minutes=args.seconds / 60, epochs=None, train_limit=4096, val_limit=512, keep_state=False)
    if args.data:
        data = load_dataset(args.data)
    else:
        g = torch.Generator().manual_seed(0)
        data = ImageData(torch.randint(0, 256, (5000, 3, 32, 32), dtype=torch.uint8, generator=g),
                         torch.arange(5000) % 10, [f'class {i}' for i in range(10)])
    release_openmp_workers()
    contenders = {'command line (main thread)': lambda: command_line(model_config, cfg, data),
                  'Train tab': lambda: train_tab(model_config, cfg, data),
                  'Train tab, waiting thread keeps its workers': lambda: train_tab(model_config, cfg, data, True)}
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(args.rounds):
        for name, run in contenders.items():
            rates[name].append(run())
            print(f'round {round_ + 1}: {name}: {rates[name][-1]:.0f} images/s', flush=True)

    print(f'\n{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; preset {preset!r}, '
          f'{"random images" if not args.data else args.data}')
    base = statistics.median(rates['command line (main thread)'])
    print(f'{"path":46s} {"images/s":>9s} {"vs the command line":>20s}')
    for name, values in rates.items():
        print(f'{name:46s} {statistics.median(values):9.0f} {statistics.median(values) / base:19.2f}x')


if __name__ == '__main__':
    main()
