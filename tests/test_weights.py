import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import CIFAR_ARCHIVE, ROOT, TINY_CIFAR, randomize_
from vitdemo.data import load_dataset
from vitdemo.evaluate import held_out
from vitdemo.model import VisionTransformer
from vitdemo.train import evaluate
from vitdemo.weights import CheckpointError, load_checkpoint, read_metadata, save_checkpoint

CLASSES = [f'class{i}' for i in range(10)]


@pytest.mark.parametrize('config', [TINY_CIFAR, replace(TINY_CIFAR, stem='conv'), replace(TINY_CIFAR, stem='strided')],
                         ids=['patch', 'conv-stem', 'strided-stem'])
def test_round_trip_keeps_weights_and_metadata(tmp_path, config):
    model = randomize_(VisionTransformer(config))
    model.train()(torch.randn(8, 3, 32, 32))  # batch-norm statistics (conv stem) move off their defaults
    path = save_checkpoint(tmp_path / 'm.safetensors', model, CLASSES, [0.5] * 3, [0.25] * 3,
                           metrics={'val_accuracy': 0.7}, seed=3)
    loaded, meta = load_checkpoint(path)
    assert loaded.config == model.config and not loaded.training
    assert meta['classes'] == CLASSES and meta['metrics'] == {'val_accuracy': 0.7} and meta['seed'] == 3
    assert model.state_dict().keys() == loaded.state_dict().keys()
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert read_metadata(path)['config'] == config.to_dict()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), atol=0, rtol=0)


def test_a_pickle_renamed_safetensors_is_refused_and_never_run(tmp_path):
    marker = tmp_path / 'pwned'

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), 'w'))

    path = tmp_path / 'evil.safetensors'
    path.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(CheckpointError, match='not a readable safetensors file'):
        load_checkpoint(path)
    assert not marker.exists()


def test_foreign_or_ill_fitting_checkpoints_are_refused(tmp_path):
    model = VisionTransformer(TINY_CIFAR)
    plain = tmp_path / 'plain.safetensors'
    save_file(model.state_dict(), str(plain))
    with pytest.raises(CheckpointError, match='no model config'):
        load_checkpoint(plain)

    wrong = tmp_path / 'wrong.safetensors'
    save_checkpoint(wrong, model, CLASSES, [0.5] * 3, [0.25] * 3)
    tensors = model.state_dict()
    tensors['head.weight'] = torch.zeros(7, 64)
    del tensors['norm.bias']
    from safetensors import safe_open
    with safe_open(str(wrong), 'pt') as f:
        metadata = f.metadata()
    save_file(tensors, str(wrong), metadata=metadata)
    with pytest.raises(CheckpointError, match=r'missing norm.bias.*head.weight: file \(7, 64\), config \(10, 64\)'):
        load_checkpoint(wrong)

    with pytest.raises(CheckpointError, match='no checkpoint file'):
        load_checkpoint(tmp_path / 'absent.safetensors')


def test_a_failed_save_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / 'm.safetensors'
    first = randomize_(VisionTransformer(TINY_CIFAR), seed=1)
    save_checkpoint(path, first, CLASSES, [0.5] * 3, [0.25] * 3)
    import vitdemo.weights as weights

    def crash(tensors, filename, metadata=None):
        open(filename, 'wb').write(b'half a file')
        raise KeyboardInterrupt  # the process killed mid-write

    monkeypatch.setattr(weights, 'save_file', crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, VisionTransformer(TINY_CIFAR), CLASSES, [0.5] * 3, [0.25] * 3)
    loaded, _ = load_checkpoint(path)
    assert torch.equal(loaded.head.weight, first.head.weight)
    assert [p.name for p in tmp_path.iterdir()] == ['m.safetensors']  # no temporary file left behind


KILLED_MID_SAVE = '''
import os, sys, time
sys.path.insert(0, sys.argv[1])
import vitdemo.weights as weights
from conftest import TINY_CIFAR, randomize_
from vitdemo.model import VisionTransformer
real_save_file = weights.save_file


def save_then_hang(tensors, filename, metadata=None):
    real_save_file(tensors, filename, metadata=metadata)
    print('written', flush=True)  # the new file is complete but not yet renamed: the parent kills us now
    time.sleep(600)


weights.save_file = save_then_hang
weights.save_checkpoint(sys.argv[2], randomize_(VisionTransformer(TINY_CIFAR), seed=2), ['a'] * 10, [0.5] * 3,
                        [0.25] * 3, run='second')
'''


def test_a_process_killed_mid_save_leaves_the_previous_checkpoint_intact(tmp_path):
    """A real SIGKILL between writing the new file and renaming it: no exception handler runs."""
    path = tmp_path / 'm.safetensors'
    first = randomize_(VisionTransformer(TINY_CIFAR), seed=1)
    save_checkpoint(path, first, CLASSES, [0.5] * 3, [0.25] * 3, run='first')
    tests = Path(__file__).parent
    child = subprocess.Popen([sys.executable, '-c', KILLED_MID_SAVE, str(tests.parent), str(path)],
                             cwd=tests, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == 'written'
        stray = [p for p in tmp_path.iterdir() if p != path]
        assert len(stray) == 1 and stray[0].stat().st_size > 0  # the half-done save exists ...
    finally:
        child.kill()
        child.wait()
    assert read_metadata(path)['run'] == 'first'  # ... and the checkpoint is the old one, whole
    assert torch.equal(load_checkpoint(path)[0].head.weight, first.head.weight)
    assert not stray[0].name.endswith('.safetensors')  # the model list never offers the stray file


@pytest.mark.slow  # scores 5,000 real images per model
@pytest.mark.skipif(not CIFAR_ARCHIVE.exists(), reason='needs ../shared/data/cifar10-train.tar.gz')
@pytest.mark.parametrize('name', ['vit_cifar10', 'convnet_cifar10'])
def test_the_shipped_checkpoint_scores_what_its_model_card_says(name):
    # the app's default model and the CNN that taught it: the images their runs held out, rebuilt from the
    # seed, scored again
    model, meta = load_checkpoint(ROOT / 'weights' / f'{name}.safetensors')
    holdout = held_out(load_dataset(CIFAR_ARCHIVE), meta)
    assert len(holdout) == 5000 and meta['classes'] == holdout.classes
    _, accuracy = evaluate(model, holdout, meta['mean'], meta['std'])
    assert accuracy == pytest.approx(meta['metrics']['val_accuracy'], abs=0.005)
    assert accuracy >= 0.85
