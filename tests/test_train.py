import re
import threading
import time

import pytest
import torch

from conftest import CIFAR_ARCHIVE, TINY_CIFAR
from vitdemo import evaluate as evaluate_cli
from vitdemo import train as train_cli
from vitdemo.cnn import ConvNetConfig
from vitdemo.data import ImageData, load_dataset
from vitdemo.model import ViTConfig
from vitdemo.train import TrainConfig, get_lr, train
from vitdemo.weights import build_model, load_checkpoint

COLOURS = torch.tensor([[220, 30, 30], [30, 220, 30], [30, 30, 220], [220, 220, 30]], dtype=torch.float32)
CONFIG = ViTConfig(**{**TINY_CIFAR.to_dict(), 'num_classes': 4})


def colour_data(n=640, seed=0) -> ImageData:
    """Four classes told apart by colour under heavy noise: learnable in a few seconds."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = COLOURS[labels][:, :, None, None] + torch.randn(n, 3, 32, 32, generator=g) * 60
    return ImageData(images.clamp(0, 255).to(torch.uint8), labels, ['red', 'green', 'blue', 'yellow'])


def test_schedule_warms_up_then_decays_to_zero():
    cfg = TrainConfig(epochs=1, minutes=None, lr=1e-3, warmup_frac=0.1)
    assert get_lr(0.0, cfg) == 0 and get_lr(0.05, cfg) == pytest.approx(5e-4)
    assert get_lr(0.1, cfg) == pytest.approx(1e-3)
    assert get_lr(0.55, cfg) == pytest.approx(5e-4)
    assert get_lr(1.0, cfg) == pytest.approx(0.0, abs=1e-12)
    lrs = [get_lr(p / 100, cfg) for p in range(10, 101)]
    assert lrs == sorted(lrs, reverse=True)


@pytest.mark.parametrize('kwargs,message', [
    (dict(epochs=0, minutes=None), 'epochs must be at least 1'), (dict(minutes=-1), 'minutes must be positive'),
    (dict(lr=-0.1), 'learning rate'), (dict(batch_size=100000), 'batch size'),
    (dict(epochs=2, minutes=3), 'not both'), (dict(weight_decay=-1), 'weight decay'),
    (dict(crop_padding=-2), 'crop padding'), (dict(rand_augment=31), 'RandAugment strength'),
    (dict(mix_prob=1.5), 'mix probability')])
def test_bad_hyper_parameters_are_refused_before_any_work(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_training_learns_reports_events_and_writes_a_loadable_checkpoint(tmp_path):
    events = []
    out = tmp_path / 'run.safetensors'
    cfg = TrainConfig(epochs=4, minutes=None, batch_size=64, lr=3e-3, val_size=128, seed=1)
    result = train(CONFIG, cfg, colour_data(), out=out, on_event=events.append)
    kinds = [e.kind for e in events]
    assert kinds.count('epoch') == 4 and kinds[-1] == 'done' and kinds.count('step') == 4 * (512 // 64)
    steps = [e for e in events if e.kind == 'step']
    assert steps[-1].progress == 1.0 and all(e.images_per_sec > 0 and e.eta_seconds >= 0 for e in steps)
    assert {e.budget_epochs for e in events if e.kind in ('step', 'epoch')} == {4}  # the epochs asked for
    assert [h['epoch'] for h in result.history] == [1, 2, 3, 4]
    assert [h['epochs'] for h in result.history] == [1.0, 2.0, 3.0, 4.0]
    assert result.history[-1]['train_loss'] < result.history[0]['train_loss']
    assert result.metrics['val_accuracy'] > 0.9 and not result.stopped
    model, meta = load_checkpoint(out)
    assert meta['history'] == result.history and meta['classes'] == ['red', 'green', 'blue', 'yellow']
    assert meta['train_config']['seed'] == 1 and meta['metrics']['val_accuracy'] == result.metrics['val_accuracy']
    for a, b in zip(model.state_dict().values(), result.model.state_dict().values()):
        assert torch.equal(a, b)


def test_randaugment_and_mixing_every_batch_still_learn():
    cfg = TrainConfig(epochs=4, minutes=None, batch_size=64, lr=3e-3, val_size=128, seed=1,
                      rand_augment=5, mix_prob=1.0)
    result = train(CONFIG, cfg, colour_data())
    assert result.history[-1]['train_loss'] < result.history[0]['train_loss']
    assert result.metrics['val_accuracy'] > 0.8  # validation images are neither augmented nor mixed


def test_same_seed_same_run():
    cfg = TrainConfig(epochs=1, minutes=None, batch_size=64, val_size=64, seed=5)
    a = train(CONFIG, cfg, colour_data()).model.head.weight
    b = train(CONFIG, cfg, colour_data()).model.head.weight
    assert torch.equal(a, b)


def test_stop_request_ends_at_the_next_step_and_saves(tmp_path):
    stop = threading.Event()
    out = tmp_path / 'stopped.safetensors'

    def stop_after_three_steps(event):
        if event.kind == 'step' and event.step == 3:
            stop.set()

    result = train(CONFIG, TrainConfig(epochs=50, minutes=None, batch_size=32, val_size=64), colour_data(),
                   out=out, on_event=stop_after_three_steps, stop=stop)
    assert result.stopped and result.history[-1]['step'] == 3
    assert load_checkpoint(out)[1]['history'][-1]['step'] == 3


def test_a_minutes_budget_is_kept_and_its_epochs_foretold():
    start, events = time.perf_counter(), []
    result = train(CONFIG, TrainConfig(minutes=0.05, batch_size=32, val_size=64), colour_data(), on_event=events.append)
    assert time.perf_counter() - start < 3 + 5  # 3 s of budget plus one last evaluation
    assert result.history and result.history[-1]['step'] > 0
    # each step foretells how many epochs the minutes hold at the pace so far; the last, what the run did
    steps = [e for e in events if e.kind == 'step']
    assert all(e.budget_epochs is None for e in steps if e.progress < 0.03)  # not from the warm-up's pace
    assert all(e.budget_epochs > 0 for e in steps if e.progress >= 0.04)
    steps_per_epoch = (640 - 64) // 32
    assert steps[-1].budget_epochs == pytest.approx(steps[-1].step / steps_per_epoch, rel=0.1)
    ends = [e for e in events if e.kind == 'epoch']  # an epoch's end says it too
    assert ends and all(e.budget_epochs > 0 for e in ends if e.progress >= 0.04)


@pytest.mark.slow  # decodes the 50,000 real images
@pytest.mark.skipif(not CIFAR_ARCHIVE.exists(), reason='needs ../shared/data/cifar10-train.tar.gz')
def test_cli_trains_on_real_cifar_images_and_evaluate_scores_them(tmp_path, capsys):
    out = tmp_path / 'cifar.safetensors'
    train_cli.main(['--data', str(CIFAR_ARCHIVE), '--epochs', '3', '--train-limit', '3000', '--val-limit', '1000',
                    '--embed-dim', '64', '--depth', '2', '--heads', '2', '--batch-size', '100', '--lr', '3e-3',
                    '--rand-augment', '5', '--mix-prob', '0.25', '--patch-drop', '0.25', '--out', str(out)])
    assert 'done: 3 epochs' in capsys.readouterr().out
    _, meta = load_checkpoint(out)
    assert meta['metrics']['val_accuracy'] > 0.2  # chance is 0.1
    assert meta['config']['patch_drop_rate'] == 0.25
    assert meta['train_config']['rand_augment'] == 5 and meta['train_config']['mix_prob'] == 0.25
    data = load_dataset(CIFAR_ARCHIVE)
    assert meta['mean'] == pytest.approx([0.49, 0.48, 0.45], abs=0.02)  # measured on the images, not assumed
    evaluate_cli.main(['--weights', str(out), '--data', str(CIFAR_ARCHIVE), '--split', 'train', '--limit', '500'])
    printed = capsys.readouterr().out
    assert printed.startswith('accuracy ') and 'on 500 images' in printed and 'airplane' in printed
    evaluate_cli.main(['--weights', str(out), '--data', str(CIFAR_ARCHIVE), '--split', 'holdout'])
    printed = capsys.readouterr().out  # the run's own 1,000 validation images, scored again
    assert 'on 1000 images' in printed
    # the same accuracy, up to bf16 rounding (the reloaded model attends through SDPA, training did not)
    assert float(printed.split()[1]) == pytest.approx(meta['metrics']['val_accuracy'], abs=0.01)
    assert len(data.classes) == 10


def test_cli_refuses_impossible_models(capsys):
    with pytest.raises(SystemExit):
        train_cli.main(['--data', 'x', '--embed-dim', '100', '--heads', '3'])
    assert 'divisible by num_heads' in capsys.readouterr().err


def test_evaluate_draws_the_training_curves_of_a_checkpoint(tmp_path, capsys):
    out = tmp_path / 'run.safetensors'
    train(CONFIG, TrainConfig(epochs=2, minutes=None, batch_size=64, val_size=128), colour_data(), out=out)
    evaluate_cli.main(['--weights', str(out), '--curves', str(tmp_path / 'curves.png')])
    assert 'curves written' in capsys.readouterr().out
    assert (tmp_path / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_finetune_a_locally_saved_timm_vit_as_linear_probe_partially_and_in_full(weights_dir, tmp_path):
    from vitdemo.backends import timm_pretrained
    from vitdemo.train import prepare_finetune
    from vitdemo.weights import from_timm
    pretrained = from_timm(timm_pretrained('vit_tiny_patch16_224', weights_dir))
    cfg = TrainConfig(epochs=2, minutes=None, batch_size=16, lr=1e-3, train_limit=32, val_size=128, val_limit=16)
    data = colour_data(n=256)
    events = []

    probe = prepare_finetune('vit_tiny_patch16_224', list('abcd'), mode='probe', weights_dir=weights_dir)
    assert probe.mean == [0.5, 0.5, 0.5] and probe.model.config.img_size == 224  # the pretrained recipe
    out = tmp_path / 'probe.safetensors'
    result = train(None, cfg, data, out=out, finetune=probe, on_event=events.append)
    assert result.model.head.weight.shape == (4, 192) and result.model.head.weight.abs().sum() > 0
    for name, p in result.model.named_parameters():  # the head learned, nothing else moved
        assert name.startswith('head.') or torch.equal(p, pretrained.get_parameter(name)), name
    # features once (32 training + 16 validation images, batches of 16), then the head's two epochs
    assert [e.kind for e in events] == ['features'] * 3 + ['epoch'] * 2 + ['done']
    assert [round(e.progress, 3) for e in events] == [0.3, 0.6, 0.9, 0.95, 1.0, 1.0]
    assert len(result.history) == 2 and result.history[-1]['val_accuracy'] is not None
    model, meta = load_checkpoint(out)
    assert meta['config']['img_size'] == 224 and meta['mean'] == [0.5, 0.5, 0.5] and len(meta['classes']) == 4
    assert torch.equal(model.head.weight, result.model.head.weight)

    partial = prepare_finetune('vit_tiny_patch16_224', list('abcd'), mode='partial', frozen_blocks=10,
                               weights_dir=weights_dir)
    tuned = train(None, cfg, data, finetune=partial).model
    for name, p in tuned.named_parameters():  # the embedding and blocks 0-9 stay; blocks 10-11 and the head learn
        moved = not torch.equal(p, pretrained.get_parameter(name))
        layer = int(name.split('.')[1]) if name.startswith('blocks.') else None
        learns = name.startswith(('head.', 'norm.')) or (layer is not None and layer >= 10)
        assert moved == learns, name

    full = prepare_finetune('vit_tiny_patch16_224', list('abcd'), mode='full', layer_decay=0.5, weights_dir=weights_dir)
    assert full.lr_scale('head.weight') == 1 and full.lr_scale('norm.weight') == 1
    assert full.lr_scale('blocks.11.mlp.fc1.weight') == 0.5 and full.lr_scale('blocks.0.attn.qkv.weight') == 0.5 ** 12
    assert full.lr_scale('patch_embed.proj.weight') == full.lr_scale('cls_token') == 0.5 ** 13
    tuned = train(None, cfg, data, finetune=full).model
    assert not torch.equal(tuned.blocks[0].attn.qkv.weight, pretrained.blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError, match='frozen blocks must be between 0 and 12'):
        prepare_finetune('vit_tiny_patch16_224', list('abcd'), mode='partial', frozen_blocks=13,
                         weights_dir=weights_dir)


def test_a_second_run_goes_on_from_one_of_our_checkpoints_with_its_head_or_a_new_one(tmp_path):
    # the shipped model was trained on in a second, longer run: `--finetune CHECKPOINT --layer-decay 1`
    from vitdemo.cnn import CifarResNet, ResNetConfig
    from vitdemo.train import prepare_finetune
    from vitdemo.weights import CheckpointError, save_checkpoint
    first = build_model(CONFIG)
    with torch.no_grad():  # a trained head (a new one starts at zero): each row its own class
        first.head.weight.normal_(), first.head.bias.normal_()
    path = save_checkpoint(tmp_path / 'first.safetensors', first, ['a', 'b', 'c', 'd'], [0.4, 0.5, 0.6], [0.2] * 3)
    again = prepare_finetune(str(path), ['a', 'b', 'c', 'd'], mode='full', layer_decay=1.0)
    assert (again.mean, again.std) == ([0.4, 0.5, 0.6], [0.2] * 3)  # the first run's normalisation
    for name, p in again.model.named_parameters():  # every weight, the head too, as the first run left it
        assert torch.equal(p, first.get_parameter(name)) and again.lr_scale(name) == 1, name
    cfg = TrainConfig(epochs=1, minutes=None, batch_size=32, lr=1e-3, train_limit=64, val_size=128, val_limit=32)
    second = train(None, cfg, colour_data(n=256), finetune=again).model
    assert second.config == first.config and not torch.equal(second.head.weight, first.head.weight)

    # the same classes in another order: each class keeps its own row of the head
    shuffled = prepare_finetune(str(path), ['c', 'a', 'd', 'b'], mode='full').model
    assert torch.equal(shuffled.head.weight, first.head.weight[[2, 0, 3, 1]])
    assert torch.equal(shuffled.head.bias, first.head.bias[[2, 0, 3, 1]])
    image = torch.randn(1, 3, CONFIG.img_size, CONFIG.img_size)
    with torch.no_grad():
        assert torch.allclose(shuffled.eval()(image), first.eval()(image)[:, [2, 0, 3, 1]], atol=1e-6)
    for names in (['a', 'b', 'c'], ['a', 'b', 'c', 'e']):  # other classes, even as many: a new head, the body kept
        other = prepare_finetune(str(path), names, mode='full')
        assert other.model.head.weight.shape == (len(names), CONFIG.embed_dim), names
        assert other.model.head.weight.abs().sum() == 0 and other.model.num_classes == len(names), names
        assert torch.equal(other.model.blocks[0].attn.qkv.weight, first.blocks[0].attn.qkv.weight)
    # a distilled student's second head answers for the same classes: put in order, or new, alike
    student = build_model(ViTConfig(**{**CONFIG.to_dict(), 'distilled': True}))
    with torch.no_grad():
        student.head_dist.weight.normal_(), student.head_dist.bias.normal_()
    taught = save_checkpoint(tmp_path / 'taught.safetensors', student, ['a', 'b', 'c', 'd'], [0.5] * 3, [0.2] * 3)
    shuffled = prepare_finetune(str(taught), ['c', 'a', 'd', 'b']).model
    assert torch.equal(shuffled.head_dist.weight, student.head_dist.weight[[2, 0, 3, 1]])
    other = prepare_finetune(str(taught), ['a', 'b', 'c']).model
    assert other.head_dist.weight.shape == (3, CONFIG.embed_dim) and other.head_dist.weight.abs().sum() == 0
    assert other.train()(image).shape == (1, 3)
    cnn = save_checkpoint(tmp_path / 'cnn.safetensors', CifarResNet(ResNetConfig()), list('abcdefghij'),
                          [0.5] * 3, [0.2] * 3)
    with pytest.raises(CheckpointError, match='not a ViT'):
        prepare_finetune(str(cnn), list('abcdefghij'))


def test_a_run_stopped_within_an_epoch_records_the_part_it_saw_and_goes_on_from_there(tmp_path):
    # 512 training images in batches of 64: 8 steps an epoch. Stopped after 11 steps, the second epoch's record
    # is 3/8 of an epoch long: it ends at 1.375 epochs, not at 2, and the resumed run counts on from there
    cfg = TrainConfig(epochs=3, minutes=None, batch_size=64, val_size=128, keep_state=True)
    stop = threading.Event()
    out = tmp_path / 'part.safetensors'
    first = train(CONFIG, cfg, colour_data(), out=out, stop=stop,
                  on_event=lambda e: e.kind == 'step' and e.step == 11 and stop.set())
    assert first.stopped and [(h['epoch'], h['epochs']) for h in first.history] == [(1, 1.0), (2, 1.375)]
    assert first.history[-1]['val_accuracy'] is not None  # the model as it was stopped, measured
    resumed = train(CONFIG, cfg, colour_data(), out=out, resume=out)
    assert [(h['epoch'], h['epochs']) for h in resumed.history] == [(1, 1.0), (2, 1.375), (3, 2.375), (4, 3.0)]


NARROW_CNN = ConvNetConfig(img_size=32, num_classes=4, widths=(8, 16, 32, 32))  # channels-last and batch norm, quickly


@pytest.mark.parametrize('model_config,half,optimizer', [(CONFIG, False, 'adamw'), (CONFIG, True, 'adamw'),
                                                          (NARROW_CNN, True, 'adamw'), (CONFIG, False, 'muon')],
                         ids=['vit', 'vit-float16', 'cnn-float16', 'vit-muon'])
def test_a_run_stopped_after_an_epoch_and_resumed_ends_as_one_that_never_stopped(tmp_path, model_config, half,
                                                                                   optimizer):
    # crops, CutMix/MixUp and the batch order all draw from random generators: the resumed run must draw alike;
    # a float16 checkpoint's rounded weights must not be where it resumes from, a CNN's channels-last
    # weights must get moments of their own layout back, and Muon's momentum must come back beside AdamW's
    cfg = TrainConfig(epochs=4, minutes=None, batch_size=64, val_size=128, crop_padding=2, mix_prob=0.5,
                      keep_state=True, half_checkpoint=half, optimizer=optimizer)
    data = colour_data()
    whole = train(model_config, cfg, data, out=tmp_path / 'whole.safetensors')
    stop = threading.Event()
    part = tmp_path / 'part.safetensors'
    first = train(model_config, cfg, data, out=part, stop=stop,
                  on_event=lambda e: e.kind == 'epoch' and e.epoch == 2 and stop.set())
    assert first.stopped and len(first.history) == 2 and part.with_suffix('.state').is_file()
    resumed = train(model_config, cfg, data, out=part, resume=part)
    assert [h['epoch'] for h in resumed.history] == [1, 2, 3, 4]
    assert [h['lr'] for h in resumed.history] == [h['lr'] for h in whole.history]  # the same schedule
    assert [h['val_loss'] for h in resumed.history] == [h['val_loss'] for h in whole.history]
    for (name, a), b in zip(whole.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    model, meta = load_checkpoint(part)
    whole_model, whole_meta = load_checkpoint(tmp_path / 'whole.safetensors')
    assert len(meta['history']) == 4 and torch.equal(model.head.weight, whole_model.head.weight)
    if model_config is CONFIG:  # a ViT's run keeps its attention after every epoch
        assert meta['filmstrip']['epochs'] == [1, 2, 3, 4] and meta['filmstrip'] == whole_meta['filmstrip']


def test_cli_resumes_a_run_from_its_checkpoint_and_refuses_one_without_state(tmp_path, capsys):
    from test_data import make_folder
    make_folder(tmp_path / 'ds', classes=['a', 'b', 'c', 'd'], per_class=40, size=32)
    out = tmp_path / 'run.safetensors'
    stop = threading.Event()
    cfg = TrainConfig(epochs=3, minutes=None, batch_size=32, val_size=32, keep_state=True)
    data = load_dataset(tmp_path / 'ds', cache_dir=tmp_path / 'cache')
    train(CONFIG, cfg, data, out=out, stop=stop, on_event=lambda e: e.kind == 'epoch' and stop.set())
    train_cli.main(['--data', str(tmp_path / 'ds'), '--resume', str(out), '--lr', '0.5'])  # its own recipe wins
    captured = capsys.readouterr()
    printed = captured.out
    assert 'epoch 2:' in printed and 'epoch 3:' in printed and 'epoch 1:' not in printed
    assert re.search(r'ETA \d+:\d\d', captured.err)  # the trainer's estimate, counting the first epoch's time
    _, meta = load_checkpoint(out)
    assert [h['epoch'] for h in meta['history']] == [1, 2, 3] and meta['train_config']['lr'] == cfg.lr
    make_folder(tmp_path / 'other', classes=['a', 'b', 'c', 'e'], per_class=10, size=32)
    with pytest.raises(SystemExit):
        train_cli.main(['--data', str(tmp_path / 'other'), '--resume', str(out)])
    assert 'was trained on other classes than those of' in capsys.readouterr().err
    out.with_suffix('.state').unlink()
    with pytest.raises(SystemExit):
        train_cli.main(['--data', str(tmp_path / 'ds'), '--resume', str(out)])
    assert 'no training state beside run.safetensors' in capsys.readouterr().err


def test_cli_preset_gives_the_forms_model_and_recipe_and_flags_still_win(tmp_path, capsys):
    from test_data import make_folder
    from vitdemo.train_form import TRAIN_PRESETS
    make_folder(tmp_path / 'ds', classes=['a', 'b'], per_class=40, size=32)
    out = tmp_path / 'quick.safetensors'
    train_cli.main(['--preset', '2-minute quick look', '--data', str(tmp_path / 'ds'), '--epochs', '1',
                    '--lr', '1e-3', '--out', str(out)])
    _, meta = load_checkpoint(out)
    form = TRAIN_PRESETS['2-minute quick look']
    assert (meta['config']['embed_dim'], meta['config']['depth'], meta['config']['stem'],
            meta['config']['patch_drop_rate'], meta['config']['global_pool']) == \
        (form.embed_dim, form.depth, form.stem, form.patch_drop, form.global_pool)
    recipe = meta['train_config']
    assert (recipe['lr'], recipe['epochs'], recipe['minutes'], recipe['crop_padding']) == (1e-3, 1, None, 0)
    assert (recipe['finetune_from'], recipe['teacher']) == ('', '')  # the form's fine-tune fields stay off
    # a teacher's student classifies its CLS token whatever the preset pools, unless told otherwise
    taught = tmp_path / 'taught.safetensors'
    args = ['--preset', '2-minute quick look', '--data', str(tmp_path / 'ds'), '--epochs', '1', '--teacher', str(out),
            '--out', str(taught)]
    train_cli.main(args)
    assert load_checkpoint(taught)[1]['config']['global_pool'] == 'token' and form.global_pool == 'avg'
    with pytest.raises(SystemExit):
        train_cli.main(args + ['--global-pool', 'avg'])
    assert 'global_pool must be token' in capsys.readouterr().err
    # the preset's optimiser, unless told otherwise
    assert recipe['optimizer'] == form.optimizer
    train_cli.main(['--preset', '2-minute quick look', '--data', str(tmp_path / 'ds'), '--epochs', '1',
                    '--optimizer', 'adamw', '--out', str(out)])
    assert load_checkpoint(out)[1]['train_config']['optimizer'] == 'adamw'
    cnn = tmp_path / 'cnn.safetensors'  # a CNN names no hidden matrices: it records AdamW, whatever the preset's
    train_cli.main(['--preset', '10-minute fast CNN (a teacher)', '--data', str(tmp_path / 'ds'), '--epochs', '1',
                    '--optimizer', 'muon', '--out', str(cnn)])
    assert load_checkpoint(cnn)[1]['train_config']['optimizer'] == 'adamw'


@pytest.mark.parametrize('optimizer', ['adamw', 'muon'])
def test_float16_training_scales_the_loss_and_bfloat16_does_not(scalers, optimizer):
    # float16 on a CPU without float16 arithmetic is slow: two steps (that it learns is bench/gpu_check.sh's)
    torch.manual_seed(0)
    before = build_model(CONFIG).state_dict()
    cfg = TrainConfig(epochs=1, minutes=None, batch_size=32, val_size=32, amp_dtype='float16', optimizer=optimizer)
    result = train(CONFIG, cfg, colour_data(n=96))
    assert len(scalers) == 1 and scalers[0].is_enabled() and scalers[0]._scale is not None  # it scaled the loss
    after = result.model.state_dict()
    assert all(torch.isfinite(v).all() for v in after.values())
    for name in ('head.weight', 'blocks.0.attn.qkv.weight'):  # AdamW's and (with Muon) Muon's, both unscaled
        assert not torch.equal(after[name], before[name]), name  # the unscaled gradients made a step
    train(CONFIG, TrainConfig(epochs=1, minutes=None, batch_size=32, val_size=32, amp_dtype='bfloat16'),
          colour_data(n=96))
    assert len(scalers) == 2 and not scalers[1].is_enabled()  # bfloat16 has float32's range: nothing to scale
    with pytest.raises(ValueError, match='amp dtype'):
        TrainConfig(amp_dtype='float8')
