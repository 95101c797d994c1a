"""Perturbation tests: deletion and insertion of patches in a map's order, against a random one."""
import pytest
import torch
from PIL import Image

from vitdemo.backends import load_model
from vitdemo.catalog import DEFAULT_SCRATCH
import vitdemo.faithfulness as faithfulness_module
from vitdemo.faithfulness import Score, auc, faithfulness, perturbation_curves, verdict
from vitdemo.methods import Stopped


def test_curves_start_and_end_where_they_must(weights_dir):
    model = load_model(DEFAULT_SCRATCH, weights_dir)
    pred = model.predict(Image.effect_noise((64, 64), 60).convert('RGB'))
    n = pred.grid[0] * pred.grid[1]
    target = int(pred.probs.argmax())
    fractions, deletion, insertion = perturbation_curves(model, pred, torch.arange(n), target, steps=4)
    _, deletion_reversed, insertion_reversed = perturbation_curves(model, pred, torch.arange(n).flip(0), target, 4)
    assert fractions == [0, 0.25, 0.5, 0.75, 1.0]
    assert deletion[0] == pytest.approx(float(pred.probs.max()), abs=1e-4)  # nothing blanked: the prediction
    assert insertion[-1] == pytest.approx(deletion[0], abs=1e-5)  # everything shown: the same image
    assert deletion[-1] == pytest.approx(insertion[0], abs=1e-5)  # all blanked = nothing shown
    with torch.no_grad():
        blank = model.module(torch.zeros(1, *model.transform(pred.image).shape)).softmax(-1)[0, target]
    assert insertion[0] == pytest.approx(float(blank), abs=1e-5)
    assert deletion[-1] == pytest.approx(deletion_reversed[-1], abs=1e-6)  # then the order no longer matters
    assert deletion[2] != pytest.approx(deletion_reversed[2], abs=1e-6)  # half way it does
    assert insertion[2] != pytest.approx(insertion_reversed[2], abs=1e-6)


def test_every_map_of_the_model_is_scored_against_random(weights_dir):
    model = load_model(DEFAULT_SCRATCH, weights_dir)
    scores = faithfulness(model, Image.new('RGB', (48, 48), (30, 90, 200)), steps=5)
    fast = ['random order', 'last-layer attention', 'rollout', 'relevance', 'Grad-CAM', 'Grad-CAM++', 'EigenCAM']
    assert [s.name for s in scores] == fast[:-1] + ['Score-CAM', 'EigenCAM', 'Integrated Gradients',
                                                    'Shapley values', 'occlusion']
    shares = []
    quick = faithfulness(model, Image.new('RGB', (48, 48), (30, 90, 200)), steps=5, slow=False,
                         progress=shares.append)
    assert [s.name for s in quick] == fast and shares == sorted(shares) and shares[-1] < 1
    assert all(len(s.deletion) == len(s.insertion) == 6 and 0 <= s.deletion_auc <= 1 for s in scores)
    assert isinstance(verdict(scores), str)


def test_area_and_verdict():
    assert auc([0, 0.5, 1], [1, 1, 0]) == pytest.approx(0.75)
    flat = [0.5] * 3
    random = Score('random order', [0, 0.5, 1], flat, flat, 0.0)
    good = Score('relevance', [0, 0.5, 1], [1, 0.1, 0], [0, 0.9, 1], 0.01)
    poor = Score('rollout', [0, 0.5, 1], [1, 0.9, 0.8], [0, 0.1, 0.2], 0.01)
    assert verdict([random, poor, good]).startswith('relevance earns the most trust on this image')
    assert verdict([random, poor]).startswith('no map beats a random order')


@pytest.mark.slow  # two fresh Python processes
def test_the_faithfulness_bench_runs_on_a_handful_of_images(tmp_path):
    """The bench end to end, as the README runs it, on a small folder and a model trained on it here."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    from test_data import make_folder
    make_folder(tmp_path / 'data', classes=[f'c{i}' for i in range(10)], per_class=10, size=32)
    env = {**os.environ, 'VITDEMO_CACHE': str(tmp_path / 'cache')}
    train = [sys.executable, '-m', 'vitdemo.train', '--data', str(tmp_path / 'data'), '--epochs', '1',
                '--embed-dim', '32', '--depth', '2', '--heads', '2', '--batch-size', '16',
                '--out', str(tmp_path / 'tiny.safetensors')]
    subprocess.run(train, cwd=ROOT, check=True, capture_output=True, timeout=300, env=env)
    out = subprocess.run([sys.executable, 'bench/faithfulness.py', '--weights', str(tmp_path / 'tiny.safetensors'),
                          '--data', str(tmp_path / 'data'), '--images', '3', '--steps', '4'],
                         cwd=ROOT, check=True, capture_output=True, text=True, timeout=300, env=env)
    rows = [line for line in out.stdout.splitlines() if line.startswith('| ') and not line.startswith('| map')
            and not line.startswith('| ---')]
    assert '3 held-out images' in out.stdout
    assert [r.split(' | ')[0][2:] for r in rows][:5] == ['random order', 'last-layer attention', 'rollout',
                                                         'relevance', 'Grad-CAM']
    assert len(rows) == 11  # every method the ViT offers that ranks patches, and random


def test_the_test_reports_before_each_pair_of_curves_and_stops_between_them(weights_dir, monkeypatch):
    # a ViT-B's pair of curves takes seconds on a CPU: Stop and the server's time limit must reach between them
    model = load_model(DEFAULT_SCRATCH, weights_dir)
    image = Image.new('RGB', (48, 48), (30, 90, 200))
    passes = []
    real = faithfulness_module.perturbation_curves

    def counted(*args):
        passes.append(args[2])
        return real(*args)
    monkeypatch.setattr(faithfulness_module, 'perturbation_curves', counted)
    shares = []
    faithfulness(model, image, steps=3, slow=False, progress=shares.append)
    units = 5 + 7  # attention, relevance, Grad-CAM, Grad-CAM++, EigenCAM; random and six maps
    assert set(k / units for k in range(units)) <= set(shares) and shares == sorted(shares) and len(passes) == 7

    def stop_at_the_third_pair(share):
        if share >= (5 + 2) / units:
            raise Stopped('stopped, as asked')
    passes.clear()
    with pytest.raises(Stopped):
        faithfulness(model, image, steps=3, slow=False, progress=stop_at_the_third_pair)
    assert len(passes) == 2


def test_the_curves_of_a_224_pixel_model_run_at_most_16_images_at_once(weights_dir):
    # the bound every method keeps at 224 px (ViT-B's activations and attention maps): the curves keep it too
    model = load_model('timm/vit_tiny_patch16_224', weights_dir)
    pred = model.predict(Image.effect_noise((64, 64), 60).convert('RGB'))
    batches = []
    hook = model.module.register_forward_hook(lambda module, inputs, out: batches.append(inputs[0].shape[0]))
    try:
        fractions, deletion, insertion = perturbation_curves(model, pred, torch.arange(196), 3, steps=10)
    finally:
        hook.remove()
    assert max(batches) == 16 and sum(batches) == 2 + 2 * 9  # the two ends, then nine steps of each curve
    assert len(deletion) == len(insertion) == len(fractions) == 11
