import json
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
from vitdemo.weights import CheckpointError, load_checkpoint, read_metadata, rewrite_checkpoint, save_checkpoint

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


def handed_over(tmp_path, model=None, metadata: dict | None = None, tensors: dict | None = None) -> Path:
    """A checkpoint as a visitor might hand one over: vitdemo's own, its metadata or tensors then changed."""
    path = tmp_path / 'handed.safetensors'
    model = model or randomize_(VisionTransformer(TINY_CIFAR))
    save_checkpoint(path, model, CLASSES, [0.5] * 3, [0.25] * 3, metrics={'val_accuracy': 0.7},
                    history=[{'epoch': 1, 'epochs': 1.0, 'seconds': 9.5, 'val_accuracy': 0.7},
                             {'epoch': 2, 'seconds': 19.0, 'val_loss': None, 'val_accuracy': None}],
                    seed=3, train_config={'lr': 1})
    from safetensors import safe_open
    with safe_open(str(path), 'pt') as f:
        meta = f.metadata()
    meta.update({k: json.dumps(v) for k, v in (metadata or {}).items()})
    save_file({**model.state_dict(), **(tensors or {})}, str(path), metadata=meta)
    return path


def test_a_checkpoint_handed_over_is_written_again_with_its_weights_classes_and_curves_only(tmp_path):
    from vitdemo.filmstrip import Filmstrip
    model = randomize_(VisionTransformer(TINY_CIFAR))
    strip = Filmstrip(torch.randint(0, 255, (4, 32, 32, 3), dtype=torch.uint8).numpy(), [0, 1, 2, 3])
    strip.record(model, [0.5] * 3, [0.25] * 3, epoch=1)
    source = handed_over(tmp_path, model, {'filmstrip': strip.to_metadata(), 'notes': 'anything at all'})
    assert rewrite_checkpoint(source, tmp_path / 'kept.safetensors', max_params=10 ** 6) == []
    loaded, meta = load_checkpoint(tmp_path / 'kept.safetensors')
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert meta['classes'] == CLASSES and meta['metrics'] == {'val_accuracy': 0.7}
    assert meta['history'] == [{'epoch': 1, 'epochs': 1.0, 'seconds': 9.5, 'val_accuracy': 0.7},
                               {'epoch': 2, 'seconds': 19.0, 'val_loss': None, 'val_accuracy': None}]
    assert Filmstrip.from_metadata(meta['filmstrip']).maps[0].shape == (4, 2, 4, 4)
    assert not {'seed', 'train_config', 'notes'} & set(meta)  # nothing else of the file is kept

    shipped_cnn = ROOT / 'weights' / 'convnet_cifar10.safetensors'  # a CNN, stored in float16: it stays so
    assert rewrite_checkpoint(shipped_cnn, tmp_path / 'cnn.safetensors') == []
    assert (tmp_path / 'cnn.safetensors').stat().st_size <= shipped_cnn.stat().st_size
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path / 'cnn.safetensors')[0](x), load_checkpoint(shipped_cnn)[0](x))

    odd = handed_over(tmp_path, model, {'history': [{'epoch': 1, 'seconds': 1.0, 'command': 'rm -rf /'}],
                                        'filmstrip': {'images': {'shape': [10 ** 6], 'data': ''}}})
    left_out = rewrite_checkpoint(odd, tmp_path / 'odd.safetensors')
    assert left_out == ['its training curves (they did not read back)',
                        'its attention through training (it did not read back)']
    assert not {'history', 'filmstrip'} & set(read_metadata(tmp_path / 'odd.safetensors'))


@pytest.mark.parametrize('change,refusal', [
    (dict(metadata={'config': {**TINY_CIFAR.to_dict(), 'embed_dim': 65536, 'num_heads': 1}}), 'M parameters'),
    (dict(metadata={'config': {**TINY_CIFAR.to_dict(), 'img_size': 4096, 'patch_size': 8}}), 'px images'),
    (dict(metadata={'config': {**TINY_CIFAR.to_dict(), 'img_size': 224, 'patch_size': 4}}), '3,136 patches'),
    (dict(metadata={'config': {**TINY_CIFAR.to_dict(), 'depth': 'many'}}), 'invalid model config'),
    (dict(metadata={'config': {**TINY_CIFAR.to_dict(), 'depth': 10 ** 7}}), '10,000,000 blocks'),
    (dict(metadata={'config': {**TINY_CIFAR.to_dict(), 'img_size': 32.0}}), 'values of the wrong type'),
    (dict(metadata={'config': {**TINY_CIFAR.to_dict(), 'num_heads': 4.0}}), 'values of the wrong type'),
    (dict(metadata={'config': {**TINY_CIFAR.to_dict(), 'qkv_bias': 1}}), 'values of the wrong type'),
    (dict(metadata={'classes': CLASSES[:9]}), 'does not name its classes'),
    (dict(metadata={'classes': CLASSES[:9] + ['x' * 49]}), 'does not name its classes'),
    (dict(metadata={'classes': CLASSES[:9] + ['a\nb']}), 'does not name its classes'),
    (dict(metadata={'classes': CLASSES[:9] + [{'a': 1}]}), 'does not name its classes'),
    (dict(metadata={'std': [0.25, 0.25, 0.0]}), 'no usable normalisation'),
    (dict(metadata={'mean': [0.5, 'NaN', 0.5]}), 'no usable normalisation'),
    (dict(tensors={'head.bias': torch.full((10,), float('nan'))}), 'not finite'),
    (dict(tensors={'head.weight': torch.zeros(7, 64)}), 'does not fit its own config: head.weight'),
    # a config far larger than the file: never built for real (there is no cap on parameters here)
    (dict(metadata={'config': {**TINY_CIFAR.to_dict(), 'embed_dim': 65536, 'num_heads': 1}}, max_params=None),
     'does not fit its own config'),
], ids=['too-many-parameters', 'huge-input', 'too-many-tokens', 'bad-config', 'too-deep', 'float-size',
        'float-heads', 'number-for-a-flag', 'class-count', 'long-class-name', 'control-character',
        'class-not-text', 'zero-std', 'nan-mean', 'nan-weights', 'wrong-shape', 'config-past-the-file'])
def test_a_hostile_checkpoint_is_refused_before_any_model_is_built_and_nothing_is_written(tmp_path, monkeypatch,
                                                                                         change, refusal):
    max_params = change.pop('max_params', 10 ** 6)
    source = handed_over(tmp_path, **change)
    built = []  # the device each model was built on
    real = VisionTransformer.__init__
    monkeypatch.setattr(VisionTransformer, '__init__',
                        lambda self, *a, **k: built.append(torch.empty(0).device.type) or real(self, *a, **k))
    with pytest.raises(CheckpointError, match=refusal):
        rewrite_checkpoint(source, tmp_path / 'kept.safetensors', max_params=max_params)
    assert not (tmp_path / 'kept.safetensors').exists()
    if any(w in refusal for w in ('parameters', 'px images', 'patches', 'blocks', 'fit')):  # on the meta device at most
        assert set(built) <= {'meta'}


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
