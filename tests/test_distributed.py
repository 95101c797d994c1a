import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from conftest import ROOT
from test_data import make_folder
from test_train import CONFIG, colour_data
from vitdemo.train import TrainConfig, train
from vitdemo.weights import load_checkpoint

pytestmark = pytest.mark.slow  # each rank is a fresh process


def _rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    torch.set_num_threads(1)
    result = train(CONFIG, TrainConfig(epochs=2, minutes=None, batch_size=32, val_size=64, seed=0),
                   colour_data(), out=os.path.join(out_dir, 'ddp.safetensors'))
    # what the global generator draws next: drop-path and RandAugment must not repeat across ranks
    next_draws = torch.rand(8)
    save_file({**result.model.state_dict(), 'next_draws': next_draws}, os.path.join(out_dir, f'rank{rank}.safetensors'))
    dist.destroy_process_group()


def test_two_cpu_ranks_train_in_step_and_end_with_identical_weights(tmp_path):
    mp.spawn(_rank, args=(2, str(tmp_path / 'rendezvous'), str(tmp_path)), nprocs=2)
    rank0, rank1 = load_file(str(tmp_path / 'rank0.safetensors')), load_file(str(tmp_path / 'rank1.safetensors'))
    assert not torch.equal(rank0.pop('next_draws'), rank1.pop('next_draws'))
    for name in rank0:
        torch.testing.assert_close(rank0[name], rank1[name], atol=0, rtol=0, msg=name)
    model, meta = load_checkpoint(tmp_path / 'ddp.safetensors')  # written once, by rank 0
    assert len(meta['history']) == 2
    torch.testing.assert_close(model.head.weight, rank0['head.weight'], atol=0, rtol=0)


def test_the_training_command_runs_under_torchrun(tmp_path):
    make_folder(tmp_path / 'data', classes=[f'c{i}' for i in range(10)], per_class=8, size=32)
    out = tmp_path / 'torchrun.safetensors'
    env = {**os.environ, 'VITDEMO_CACHE': str(tmp_path / 'cache'), 'OMP_NUM_THREADS': '1'}
    done = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                           '-m', 'vitdemo.train', '--data', str(tmp_path / 'data'), '--epochs', '2',
                           '--embed-dim', '32', '--depth', '1', '--heads', '2', '--batch-size', '16',
                           '--out', str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    # the conv stem's gradients come in the layout DDP's buckets expect, so it has nothing to warn about
    assert 'Grad strides do not match' not in done.stderr
    assert done.stdout.count('done: 2 epochs') == 1  # one summary, from rank 0
    assert len(load_checkpoint(out)[1]['history']) == 2
