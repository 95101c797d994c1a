"""Training throughput of our trainer vs the tutorial's ViT as written, side by side in one run.

    python bench/train_throughput.py                 # 3 rounds of 2,560 images each
    python bench/train_throughput.py --images 5120 --rounds 2

Both train the same CIFAR configuration (32x32, patch 4, dim 192, depth 6, heads 3, MLP 384, batch 128)
with AdamW. The reference (../shared/reference/tutorial_vit.py, imported, not copied) runs as the tutorial
does: fp32, manual attention, einops, float batches made in advance. Ours is `vitdemo.train.train` itself,
augmentation included, in eager mode and with torch.compile, and compiled under DistributedDataParallel
as two CPU processes of one thread each, 64 images per process and step (the same batch of 128 in all):
is one thread per core in its own process better than one process with two threads? Rounds alternate the
contenders, so a busy machine slows them alike; the median of the rounds is reported.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / 'shared' / 'reference'))
from tutorial_vit import TutorialViT  # noqa: E402

from vitdemo.data import ImageData  # noqa: E402
from vitdemo.model import ViTConfig  # noqa: E402
from vitdemo.train import TrainConfig, train  # noqa: E402

BATCH = 128
CONFIG = ViTConfig(img_size=32, patch_size=4, num_classes=10, embed_dim=192, depth=6, num_heads=3, mlp_ratio=2.0)


def reference_images_per_sec(model, optimizer, images: int) -> float:
    x = torch.randn(BATCH, 3, 32, 32)
    y = torch.randint(0, 10, (BATCH,))
    steps = images // BATCH
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * BATCH / (time.perf_counter() - start)


def ours_images_per_sec(data: ImageData, compile: bool, world: int = 1) -> float:
    """Images per second over all processes (each of the `world` processes trains BATCH / world a step)."""
    cfg = TrainConfig(epochs=1, minutes=None, batch_size=BATCH // world, val_size=0, compile=compile)
    step_times = []  # when each step ended: the rate skips the first three (start-up) and the evaluation
    train(CONFIG, cfg, data, on_event=lambda e: e.kind == 'step' and step_times.append(time.perf_counter()))
    return (len(step_times) - 3) * BATCH / (step_times[-1] - step_times[2])


def _ddp_rank(rank: int, world: int, folder: str, data: ImageData) -> None:
    dist.init_process_group('gloo', init_method=f'file://{folder}/rendezvous', rank=rank, world_size=world)
    torch.set_num_threads(1)
    rate = ours_images_per_sec(data, compile=True, world=world)  # the ranks step together: rank 0's clock
    if rank == 0:
        Path(folder, 'rate').write_text(str(rate))
    dist.destroy_process_group()


def ddp_images_per_sec(data: ImageData, world: int = 2) -> float:
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_ddp_rank, args=(world, folder, data), nprocs=world)
        return float(Path(folder, 'rate').read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--images', type=int, default=2560, help='training images per contender per round')
    parser.add_argument('--rounds', type=int, default=3, help='alternating rounds')
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    data = ImageData(torch.randint(0, 256, (args.images + 3 * BATCH, 3, 32, 32), generator=g, dtype=torch.uint8),
                     torch.randint(0, 10, (args.images + 3 * BATCH,), generator=g), [str(i) for i in range(10)])
    reference = TutorialViT(image_size=32, patch_size=4, num_classes=10, dim=192, depth=6, heads=3, mlp_dim=384,
                            dim_head=64).train()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    reference_images_per_sec(reference, optimizer, 3 * BATCH)  # warm-up
    ours_images_per_sec(data, compile=True)  # compile once, outside the timed rounds

    ddp_images_per_sec(data)  # and once in the two processes, which then find it in inductor's cache

    results: dict[str, list[float]] = {'tutorial (fp32, as written)': [], 'ours, eager': [], 'ours, compiled': [],
                                       'ours, compiled, 2 processes': []}
    for r in range(args.rounds):
        results['tutorial (fp32, as written)'].append(reference_images_per_sec(reference, optimizer, args.images))
        results['ours, eager'].append(ours_images_per_sec(data, compile=False))
        results['ours, compiled'].append(ours_images_per_sec(data, compile=True))
        results['ours, compiled, 2 processes'].append(ddp_images_per_sec(data))
        print(f'round {r + 1}: ' + ', '.join(f'{k} {v[-1]:.0f}' for k, v in results.items()), flush=True)

    base = statistics.median(results['tutorial (fp32, as written)'])
    print(f'\ntorch {torch.__version__}, {torch.get_num_threads()} threads, batch {BATCH}, median of {args.rounds}')
    print(f'{"trainer":32s} {"images/s":>9s} {"vs tutorial":>12s}')
    for name, rates in results.items():
        print(f'{name:32s} {statistics.median(rates):9.0f} {statistics.median(rates) / base:11.2f}x')


if __name__ == '__main__':
    main()
