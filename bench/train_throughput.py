"""Training throughput of our trainer vs the tutorial's ViT as written, side by side in one run.

    python bench/train_throughput.py                 # 3 rounds of 2,560 images each
    python bench/train_throughput.py --images 5120 --rounds 2

Both train the same CIFAR configuration (32x32, patch 4, dim 192, depth 6, heads 3, MLP 384, batch 128)
with AdamW. The reference (../shared/reference/tutorial_vit.py, imported, not copied) runs as the tutorial
does: fp32, manual attention, einops, float batches made in advance. Ours is `vitdemo.train.train` itself,
augmentation included, in eager mode and with torch.compile, and compiled under DistributedDataParallel
as two CPU processes of one thread each, 64 images per process and step (the same batch of 128 in all):
is one thread per core in its own process better than one process with two threads? "CLI epochs" counts
what a whole epoch of the command line adds to its steps: validating a held-out ninth of the images (the
CLI's 5,000 of 45,000), the attention filmstrip and writing the checkpoint. Rounds alternate the
contenders, so a busy machine slows them alike; the median of the rounds is reported.

The limit: in the same run, the matrix products of one training step alone (every linear layer's and the
attention's, forward and the backward's two per forward product) are timed at this model's shapes, in
bfloat16 where the hardware has it and in float32. A trainer can go no faster than those products; its
share of the limit in its own precision says how much of a step is everything else (casts, copies,
norms, softmax, GELU, the optimiser).

    python bench/train_throughput.py --device cuda --no-ddp   # on a GPU (bench/gpu_check.sh)
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
from vitdemo.train import TrainConfig, precision, train  # noqa: E402

BATCH = 128
CONFIG = ViTConfig(img_size=32, patch_size=4, num_classes=10, embed_dim=192, depth=6, num_heads=3, mlp_ratio=2.0)


def sync(device: str) -> None:
    if device == 'cuda':
        torch.cuda.synchronize()


def reference_images_per_sec(model, optimizer, images: int, device: str = 'cpu') -> float:
    x = torch.randn(BATCH, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (BATCH,), device=device)
    steps = images // BATCH
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    sync(device)
    return steps * BATCH / (time.perf_counter() - start)


def ours_images_per_sec(data: ImageData, compile: bool, world: int = 1, device: str = 'cpu') -> float:
    """Images per second over all processes (each of the `world` processes trains BATCH / world a step)."""
    cfg = TrainConfig(epochs=1, minutes=None, batch_size=BATCH // world, val_size=0, compile=compile)
    step_times = []  # when each step ended: the rate skips the first three (start-up) and the evaluation

    def ended(e) -> None:
        if e.kind == 'step':
            sync(device)
            step_times.append(time.perf_counter())

    train(CONFIG, cfg, data, on_event=ended, device=device)
    return (len(step_times) - 3) * BATCH / (step_times[-1] - step_times[2])


def cli_epoch_images_per_sec(data: ImageData, device: str = 'cpu') -> float:
    """Training images per second of a whole compiled epoch as the command line runs it: the steps, then
    the validation of a held-out ninth (the CLI's 5,000 of 45,000), the filmstrip and the checkpoint."""
    cfg = TrainConfig(epochs=1, minutes=None, batch_size=BATCH, val_size=len(data) // 10, compile=True)
    times = []  # when the third step ended (start-up excluded) and when the epoch's work was all done

    def ended(e) -> None:
        if (e.kind == 'step' and e.step == 3) or e.kind == 'epoch':
            sync(device)
            times.append((time.perf_counter(), e.step))

    with tempfile.TemporaryDirectory() as folder:
        train(CONFIG, cfg, data, out=Path(folder, 'run.safetensors'), on_event=ended, device=device)
    (start, first), (end, last) = times
    return (last - first) * BATCH / (end - start)


def step_products(batch: int = BATCH) -> list[tuple[int, int, int, int]]:
    """(count, m, k, n) of the forward's matrix products of one step of CONFIG: batch x tokens rows."""
    tokens, d, h = (CONFIG.img_size // CONFIG.patch_size) ** 2 + 1, CONFIG.embed_dim, CONFIG.num_heads
    rows, hidden, head = batch * tokens, int(d * CONFIG.mlp_ratio), d // h
    per_block = [(1, rows, d, 3 * d), (1, rows, d, d), (1, rows, d, hidden), (1, rows, hidden, d),  # linear
                 (batch * h, tokens, head, tokens), (batch * h, tokens, tokens, head)]  # q k^T, attention v
    patch = (1, batch * (tokens - 1), 3 * CONFIG.patch_size ** 2, d)
    return [patch] + [(c, m, k, n) for _ in range(CONFIG.depth) for c, m, k, n in per_block]


def matmul_limit(dtype: torch.dtype, device: str, repeats: int = 20) -> tuple[float, float]:
    """(images/s, TFLOP/s): a training step made of its matrix products alone, forward and backward (the
    backward does two products the size of each forward one), timed at the step's own shapes."""
    operands = [(torch.randn(c, m, k, dtype=dtype, device=device), torch.randn(c, k, n, dtype=dtype, device=device))
                for c, m, k, n in step_products()]
    flops = 3 * sum(2 * c * m * k * n for c, m, k, n in step_products())
    for a, b in operands:  # warm up
        torch.bmm(a, b)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        for a, b in operands:
            for _ in range(3):
                torch.bmm(a, b)
    sync(device)
    seconds = (time.perf_counter() - start) / repeats
    return BATCH / seconds, flops / seconds / 1e12


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
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    parser.add_argument('--no-ddp', action='store_true', help='leave out the two-process contender (on a GPU)')
    args = parser.parse_args()
    device = args.device

    g = torch.Generator().manual_seed(0)
    data = ImageData(torch.randint(0, 256, (args.images + 3 * BATCH, 3, 32, 32), generator=g, dtype=torch.uint8),
                     torch.randint(0, 10, (args.images + 3 * BATCH,), generator=g), [str(i) for i in range(10)])
    reference = TutorialViT(image_size=32, patch_size=4, num_classes=10, dim=192, depth=6, heads=3, mlp_dim=384,
                            dim_head=64).train().to(device)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    reference_images_per_sec(reference, optimizer, 3 * BATCH, device)  # warm-up
    ours_images_per_sec(data, compile=True, device=device)  # compile once, outside the timed rounds
    if not args.no_ddp:
        ddp_images_per_sec(data)  # and once in the two processes, which then find it in inductor's cache

    ours_dtype = precision(torch.device(device)) or torch.float32
    limits = {dtype: [] for dtype in {ours_dtype, torch.float32}}
    results: dict[str, list[float]] = {'tutorial (fp32, as written)': [], 'ours, eager': [], 'ours, compiled': [],
                                       'ours, compiled, CLI epochs': []}
    if not args.no_ddp:
        results['ours, compiled, 2 processes'] = []
    for r in range(args.rounds):
        for dtype in limits:
            limits[dtype].append(matmul_limit(dtype, device))
        results['tutorial (fp32, as written)'].append(
            reference_images_per_sec(reference, optimizer, args.images, device))
        results['ours, eager'].append(ours_images_per_sec(data, compile=False, device=device))
        results['ours, compiled'].append(ours_images_per_sec(data, compile=True, device=device))
        results['ours, compiled, CLI epochs'].append(cli_epoch_images_per_sec(data, device))
        if not args.no_ddp:
            results['ours, compiled, 2 processes'].append(ddp_images_per_sec(data))
        print(f'round {r + 1}: ' + ', '.join(f'{k} {v[-1]:.0f}' for k, v in results.items()), flush=True)

    where = torch.cuda.get_device_name() if device == 'cuda' else f'{torch.get_num_threads()} CPU threads'
    print(f'\ntorch {torch.__version__}, {where}, batch {BATCH}, median of {args.rounds}')
    limit = {dtype: statistics.median(r[0] for r in rounds) for dtype, rounds in limits.items()}
    for dtype, rounds in limits.items():
        print(f'limit in {str(dtype)[6:]:8s}: matrix products alone {limit[dtype]:6.0f} images/s '
              f'({statistics.median(r[1] for r in rounds):.2f} TFLOP/s at the step\'s shapes)')
    base = statistics.median(results['tutorial (fp32, as written)'])
    print(f'{"trainer":32s} {"images/s":>9s} {"vs tutorial":>12s} {"share of its limit":>19s}')
    for name, rates in results.items():
        own = limit[torch.float32] if name.startswith('tutorial') else limit[ours_dtype]
        rate = statistics.median(rates)
        print(f'{name:32s} {rate:9.0f} {rate / base:11.2f}x {rate / own:18.0%}')


if __name__ == '__main__':
    main()
