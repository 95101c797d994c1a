"""Resident memory stays flat over many requests: nothing a prediction makes outlives it."""
import gc
from pathlib import Path

import pytest

from conftest import ROOT
from vitdemo.catalog import ModelCache
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
        labels, gallery, _, *_ = predict_view(model, image)
    growth = resident_mb() - before
    print(f'resident memory: {before:.0f} MB, then {growth:+.1f} MB after 200 predictions')
    assert len(gallery) == 4 and growth < BUDGET_MB


DECODE_IN_THREADS = '''
import gc, io, sys, threading
sys.path.insert(0, {root!r})
import numpy as np
from PIL import Image
from vitdemo.images import load_image

def resident_mb():
    gc.collect()
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS:')).split()[1]) / 1024
uploads = []
for array, fmt in [(np.tile((np.arange(8000) % 256).astype(np.uint8)[None, :, None], (5000, 1, 3)), 'PNG'),
                   (np.random.default_rng(0).random((4000, 4000), np.float32), 'TIFF'),
                   ((np.arange(16_000_000) % 65536).astype(np.uint16).reshape(4000, 4000), 'TIFF')]:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, fmt)
    uploads.append(buffer.getvalue())
del array, buffer
before = resident_mb()
def visitor(i):
    for r in range(4):
        load_image(uploads[(i + r) % 3])
threads = [threading.Thread(target=visitor, args=(i,)) for i in range(4)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(resident_mb() - before)
'''


@pytest.mark.skipif(not STATUS.exists(), reason='reads the resident set size from Linux /proc')
def test_big_uploads_decoded_at_once_leave_no_memory_held():
    """Four request threads decode 40-megapixel PNGs and 16-megapixel float and 16-bit TIFFs, four each; in
    a fresh process, so that no other test's heap counts. Without trimming the heap afterwards, glibc
    kept ~400 MB of it."""
    import subprocess
    import sys
    out = subprocess.run([sys.executable, '-c', DECODE_IN_THREADS.format(root=str(ROOT))], capture_output=True,
                         text=True, timeout=300, check=True)
    growth = float(out.stdout.strip().splitlines()[-1])
    print(f'resident memory after 16 big decodes in 4 threads: {growth:+.0f} MB')
    assert growth < 100
