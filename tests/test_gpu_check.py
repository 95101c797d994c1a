import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason='with a GPU the check runs for minutes: run it yourself')
def test_the_gpu_check_says_there_is_no_gpu_and_succeeds():
    done = subprocess.run(['bash', str(ROOT / 'bench' / 'gpu_check.sh')], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and 'no CUDA GPU here' in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason='with a GPU the run trains for minutes: run it yourself')
def test_the_gpu_run_says_there_is_no_gpu_and_succeeds_without_writing(tmp_path):
    script = str(ROOT / 'bench' / 'gpu_train.sh')
    done = subprocess.run(['bash', script, str(tmp_path / 'out')], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and 'no CUDA GPU here' in done.stdout
    assert not (tmp_path / 'out').exists()
    # where the checkpoint goes is the one thing it must be told
    done = subprocess.run(['bash', script], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0 and 'usage: bash bench/gpu_train.sh OUT_DIR' in done.stderr
