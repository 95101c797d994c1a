import re
from dataclasses import replace

import pytest

from test_train import CONFIG, colour_data
from vitdemo.cnn import ResNetConfig
from vitdemo.train import TrainConfig
from vitdemo.train_form import TRAIN_PRESETS, TrainForm
from vitdemo.training_job import TrainingBusy, TrainingCurve, TrainingJob, checkpoint_name, of_budget
from vitdemo.views import progress_html, training_curves
from vitdemo.store import ModelStore
from vitdemo.weights import load_checkpoint


KEYS = ('embed_dim', 'depth', 'num_heads', 'patch_size', 'minutes', 'batch_size', 'lr')


def form(*values, **extra) -> TrainForm:
    return TrainForm(**dict(zip(KEYS, values)), **extra)


def test_every_preset_is_a_valid_configuration_and_the_defaults_are_the_first():
    assert next(iter(TRAIN_PRESETS.values())) == TrainForm()
    for name, p in TRAIN_PRESETS.items():
        model_config, train_config = p.configs()
        assert model_config.img_size == 32 and train_config.minutes == p.minutes, name
        assert train_config.crop_padding == p.crop_padding, name
        if p.arch == 'vit':
            assert (model_config.pos_embed, model_config.stem) == (p.pos_embed, p.stem), name
            assert model_config.patch_drop_rate == p.patch_drop, name
            assert model_config.global_pool == p.global_pool, name
        assert train_config.optimizer == (p.optimizer if p.arch == 'vit' else 'adamw'), name  # CNNs: AdamW alone


def test_the_forms_torch_free_facts_are_the_training_codes():
    # the page knows them without torch; the training code holds the same from its own classes and torch's answers
    import torch
    from vitdemo.metadata import ARCH_NAMES
    from vitdemo.model import PRESETS
    from vitdemo.train import precision, training_device
    from vitdemo.train_form import ARCHS, FINETUNE_ARCHS, cpu_has_bf16, has_gpu, trains_in_float32
    from vitdemo.weights import ARCHITECTURES
    assert list(ARCHITECTURES) == list(ARCH_NAMES) == ARCHS
    assert FINETUNE_ARCHS and all(a in PRESETS for a in FINETUNE_ARCHS)
    assert cpu_has_bf16() == torch.cpu._is_avx512_bf16_supported()
    assert has_gpu() == torch.cuda.is_available()
    assert trains_in_float32() == (precision(training_device()) is None)


@pytest.mark.parametrize('extra,message', [
    (dict(crop_padding=-1), 'crop padding must be between'), (dict(crop_padding=1.5), 'must be a whole number'),
    (dict(pos_embed='rope'), 'pos_embed must be learn or sincos'), (dict(arch='vgg'), 'model must be one of'),
    (dict(stem='pixels'), 'stem must be one of patch, conv, strided, hybrid'),
    (dict(patch_drop=0.95), 'patch tokens left out must be between 0 and 0.9'),
    (dict(patch_drop='half'), "patch tokens left out must be a number, got 'half'"),
    (dict(global_pool='max'), "global_pool must be token or avg, not 'max'"),
    (dict(global_pool='avg', teacher='scratch/convnet_cifar10'), r'must be token \(the CLS token\), not avg'),
    (dict(optimizer='sgd'), "optimizer must be 'adamw' or 'muon', got 'sgd'"),
])
def test_bad_augmentation_and_model_choices_are_refused(extra, message):
    with pytest.raises(ValueError, match=message):
        form(96, 4, 3, 4, 10, 256, 1e-3, **extra).configs()


@pytest.mark.parametrize('values,message', [
    ((100, 4, 3, 4, 10, 256, 1e-3), 'divisible by num_heads'),
    ((96, 4, 3, 5, 10, 256, 1e-3), 'divisible by patch_size'),
    ((96, 0, 3, 4, 10, 256, 1e-3), 'depth must be between 1 and 24'),
    ((96, 4, 3, 4, float('nan'), 256, 1e-3), 'minutes must be between'),
    ((96, 4, 3, 4, None, 256, 1e-3), 'minutes must be a number, got None'),
    ((96, 4, 3, 4, 'ten', 256, 1e-3), "minutes must be a number, got 'ten'"),
    ((96, 4, 3, 4, 0, 256, 1e-3), 'minutes must be positive'),
    ((96, 4, 3, 4, 10, 256, -1.0), 'learning rate'),
    ((96, 4, 3, 4, 10, 10 ** 6, 1e-3), 'batch size'),
    ((96, 4, 3, 4, 10, 2.5, 1e-3), 'batch size must be a whole number'),
    ((4096, 4, 4, 4, 10, 256, 1e-3), 'embed dim must be between 1 and 1024'),
])
def test_bad_training_forms_are_refused_before_any_work(values, message):
    with pytest.raises(ValueError, match=message):
        form(*values).configs()


def test_the_cnn_ignores_the_hidden_vit_fields_but_not_its_own():
    # heads that do not divide the dim would stop a ViT; the form hides them for the CNN
    model_config, train_config = form(100, 4, 3, 5, 10, 64, 1e-3, arch='resnet18', crop_padding=2).configs()
    assert isinstance(model_config, ResNetConfig) and train_config.batch_size == 64
    with pytest.raises(ValueError, match='divisible by num_heads'):
        form(100, 4, 3, 4, 10, 64, 1e-3, arch='vit').configs()
    with pytest.raises(ValueError, match='batch size must be between 1 and 4096'):
        form(100, 4, 3, 5, 10, 0, 1e-3, arch='resnet18').configs()


def test_the_status_says_how_many_epochs_the_budget_holds():
    assert (of_budget(None), of_budget(25)) == ('', ' of 25')  # a fine-tune's features; the epochs asked for
    assert (of_budget(2.44), of_budget(4.3)) == (' of about 2.4', ' of about 4')  # estimates from the minutes
    # ResNet-18 on a float32 CPU: a third of an epoch in ten minutes, and no curve until it ends
    assert of_budget(0.31) == ' of about 0.3 (the time runs out within it: the curves come at its end)'


def test_checkpoint_names_are_safe():
    assert checkpoint_name(' my-run_2 ') == 'my-run_2'
    for bad in ['../../etc/passwd', '', 'a b', '/abs', 'x' * 60]:
        with pytest.raises(ValueError, match='letters, digits'):
            checkpoint_name(bad)
    for shipped in ['vit_cifar10', 'VIT_CIFAR10', 'Vit_Tiny_Patch16_224']:  # compared without case
        with pytest.raises(ValueError, match='a model the app ships'):
            checkpoint_name(shipped, reserved={'vit_cifar10', 'vit_tiny_patch16_224'})


def test_a_run_reports_progress_curves_and_attention_then_saves(tmp_path):
    job = TrainingJob(data_path='unused', store=ModelStore(tmp_path), update_seconds=0.0)
    snaps = list(job.run(CONFIG, TrainConfig(epochs=2, minutes=None, batch_size=64, val_size=128), 'colours',
                         data=colour_data()))
    assert snaps[0].progress == 0 and 'loading' in snaps[0].status
    assert any('ETA' in s.status for s in snaps) and any(s.status.startswith('epoch 2 of 2,') for s in snaps)
    last = snaps[-1]
    assert last.done and last.checkpoint == tmp_path / 'trained' / 'colours.safetensors'
    assert 'finished after 2 epochs' in last.status
    assert [h['epoch'] for h in last.history] == [1, 2] and [p.size for p, _ in last.strip] == [(192, 192)] * 2
    assert last.subject in ['red', 'green', 'blue', 'yellow']
    for i, (_, caption) in enumerate(last.strip):  # the class given after each epoch, ticked when right
        given = caption.removeprefix(f'epoch {i + 1}: ').removesuffix(' ✓')
        assert given in ['red', 'green', 'blue', 'yellow'] and caption.endswith(' ✓') == (given == last.subject)
    # the curves move within an epoch: points at fractions of epochs, ~20 an epoch (an epoch here has 7 steps)
    assert len(last.steps) >= 7 and 0 < last.steps[0]['epoch'] < 1
    assert [s['epoch'] for s in last.steps] == sorted(s['epoch'] for s in last.steps)
    assert load_checkpoint(last.checkpoint)[1]['classes'] == ['red', 'green', 'blue', 'yellow']
    loss, accuracy = training_curves(last.history)
    assert len(loss) == 4 and set(loss['split']) == {'train', 'validation'}
    moving, _ = training_curves(last.history, last.steps)  # within epochs: the epochs' lagging means left out
    assert (moving['split'] == 'train').sum() == len(last.steps) and (moving['split'] == 'validation').sum() == 2
    assert accuracy['value'].between(0, 1).all()
    assert not job.busy


def test_one_run_at_a_time_and_stop_still_saves(tmp_path):
    job = TrainingJob(data_path='unused', store=ModelStore(tmp_path), update_seconds=0.0)
    run = job.run(CONFIG, TrainConfig(epochs=500, minutes=None, batch_size=32, val_size=64), 'long',
                  data=colour_data())
    next(run), next(run)  # loading, then the first step
    assert job.busy
    with pytest.raises(TrainingBusy, match='already in progress'):
        next(job.run(CONFIG, TrainConfig(epochs=1, minutes=None), 'other', data=colour_data()))
    job.stop()
    last = list(run)[-1]
    assert last.done and last.checkpoint.exists()
    # stopped within its first epoch: the status and the curves say how far it got, not "after 1 epochs"
    assert re.match(r'stopped after 0\.\d\d epochs: validation accuracy \d', last.status), last.status
    _, accuracy = training_curves(last.history, last.steps)
    assert accuracy.loc[accuracy['split'] == 'validation', 'epoch'].tolist() == [last.history[-1]['epochs']]
    assert accuracy['epoch'].max() < 1
    assert not job.busy


def test_a_watcher_that_leaves_stops_the_run_cleanly(tmp_path):
    job = TrainingJob(data_path='unused', store=ModelStore(tmp_path), update_seconds=0.0)
    run = job.run(CONFIG, TrainConfig(epochs=500, minutes=None, batch_size=32, val_size=64), 'left',
                  data=colour_data())
    next(run), next(run)
    run.close()  # what Gradio does when the browser tab closes
    assert not job.busy
    files = list((tmp_path / 'trained').iterdir())
    assert files and all(f.suffix == '.safetensors' for f in files)  # no temporary file left behind
    for f in files:
        load_checkpoint(f)


def test_the_training_curve_gives_the_accuracy_of_the_batches_since_its_last_point():
    from vitdemo.train import TrainEvent
    curve = TrainingCurve()

    def step(epoch, fraction, loss, accuracy_so_far):
        curve.add(TrainEvent('step', epoch, 0, 0.0, 1e-3, loss, accuracy_so_far, 100.0, 1.0, epoch_fraction=fraction))
    step(1, 0.25, 2.0, 0.2)
    step(1, 0.5, 1.8, 0.3)  # the epoch's second quarter: 40% right
    step(1, 0.52, 1.6, 0.31)  # too close to the point before: its loss counts toward the next point
    step(1, 1.0, 1.4, 0.5)
    step(2, 0.5, 1.0, 0.8)  # a new epoch counts afresh
    assert [p['epoch'] for p in curve.points] == [0.25, 0.5, 1.0, 1.5]
    assert [p['train_loss'] for p in curve.points] == pytest.approx([2.0, 1.8, 1.5, 1.0])
    # not 0.2, 0.3, 0.5, 0.8: each epoch's running accuracy, which jumps up where an epoch starts
    assert [p['train_accuracy'] for p in curve.points] == pytest.approx([0.2, 0.4, 0.7, 0.8])


def test_progress_is_a_bar_with_its_share_and_an_escaped_status():
    text = progress_html(0.5, 'epoch 3 <of 6>')
    assert 'width: 50.0%' in text and 'aria-valuenow="50"' in text and '<strong>50%</strong>' in text
    assert 'epoch 3 &lt;of 6&gt;' in text
    assert 'width: 100.0%' in progress_html(1.7, 'done')


def test_a_teacher_is_one_of_the_owners_listed_models_and_knows_the_data_classes(tmp_path, monkeypatch):
    from conftest import randomize_
    from vitdemo.cnn import CifarResNet
    from vitdemo.weights import read_metadata, save_checkpoint
    data = colour_data(n=120)
    store = ModelStore(tmp_path / 'weights', tmp_path / 'runs')
    (tmp_path / 'weights').mkdir()
    teacher = randomize_(CifarResNet(ResNetConfig(num_classes=4)), seed=1)
    save_checkpoint(tmp_path / 'weights' / 'colours_cnn.safetensors', teacher, data.classes, [0.5] * 3, [0.25] * 3)
    save_checkpoint(tmp_path / 'weights' / 'two_classes.safetensors', CifarResNet(ResNetConfig(num_classes=2)),
                    ['a', 'b'], [0.5] * 3, [0.25] * 3)
    job = TrainingJob(tmp_path / 'unused', store, update_seconds=0)
    model_config, cfg = form(32, 2, 2, 8, 1, 32, 1e-3, teacher='scratch/colours_cnn', distill='soft').configs()
    assert model_config.distilled and (cfg.teacher, cfg.distill, cfg.teacher_once) == ('scratch/colours_cnn', 'soft',
                                                                                       True)
    cfg = TrainConfig(epochs=1, minutes=None, batch_size=32, val_size=20, teacher=cfg.teacher, distill=cfg.distill,
                      teacher_once=cfg.teacher_once)
    from vitdemo.distill import Distillation
    answered = []  # the form's default: the teacher answers every image once, before the first step
    remember = Distillation.remember
    monkeypatch.setattr(Distillation, 'remember', lambda self, images, *a: answered.append(len(images)) or
                        remember(self, images, *a))
    snapshots = list(job.run(model_config, cfg, 'taught', data=data))
    assert answered == [100]  # 120 images, 20 held out
    meta = read_metadata(snapshots[-1].checkpoint)
    assert meta['config']['distilled'] and meta['train_config']['teacher'] == 'scratch/colours_cnn'
    for name, message in [('/etc/passwd', 'must be one of your models'), ('timm/vit_tiny_patch16_224', 'one of your'),
                          ('scratch/two_classes', 'knows other classes \\(a, b, ...: 2\\)')]:
        with pytest.raises(ValueError, match=message):
            list(job.run(model_config, replace(cfg, teacher=name), 'refused', data=data))
    with pytest.raises(ValueError, match="distillation 'hard' or 'soft'"):
        form(32, 2, 2, 8, 1, 32, 1e-3, teacher='scratch/colours_cnn', distill='lukewarm').configs()


def test_a_finetune_form_checks_its_fields_and_records_them_in_the_run(tmp_path):
    model_config, cfg = TrainForm(start_from='vit_tiny_patch16_224', finetune='partial', frozen_blocks=10).configs()
    assert (model_config.img_size, model_config.depth, model_config.embed_dim) == (224, 12, 192)  # what is checked
    assert (cfg.finetune_from, cfg.finetune, cfg.frozen_blocks) == ('vit_tiny_patch16_224', 'partial', 10)
    for extra, message in [(dict(start_from='resnet50'), 'fine-tune one of'), (dict(finetune='half'), 'one of'),
                           (dict(frozen_blocks=13), 'frozen blocks must be between 0 and 12'),
                           (dict(layer_decay=0), 'above 0'), (dict(teacher='scratch/x'), 'from the labels alone')]:
        with pytest.raises(ValueError, match=message):
            TrainForm(**{'start_from': 'vit_tiny_patch16_224', **extra}).configs()


def test_a_linear_probe_on_a_visitors_zip_runs_as_a_job_and_joins_the_store(tmp_path, weights_dir):
    from test_archive import good_entries, make_zip
    from vitdemo.archive import read_image_zip
    data = read_image_zip(make_zip(tmp_path / 'pets.zip', good_entries()), size=64)
    store = ModelStore(weights_dir, runs_dir=tmp_path / 'runs')
    job = TrainingJob('unused', store)
    model_config, cfg = TrainForm(start_from='vit_tiny_patch16_224', finetune='probe', batch_size=4).configs()
    snaps = list(job.run(model_config, cfg, 'pets', data=data))
    assert any('pretrained features' in s.status for s in snaps)
    final = snaps[-1]
    assert final.done and final.checkpoint == store.path('trained/pets')
    model, meta = load_checkpoint(final.checkpoint)
    assert meta['classes'] == ['cat', 'dog'] and meta['config']['img_size'] == 224
    recipe = meta['train_config']
    assert (recipe['finetune'], recipe['finetune_from']) == ('probe', 'vit_tiny_patch16_224')
    assert len(meta['history']) == 30  # the head's epochs over the cached features


def test_the_form_suggests_the_largest_batch_this_server_can_train(tmp_path):
    # a fine-tune's 224 px inputs need ~50x CIFAR's memory at the same batch: the form halves the preset's
    # batch until the run fits, where Start would otherwise refuse it
    from vitdemo.policy import ServerPolicy, check_training, fitting_batch
    policy = ServerPolicy.from_env({'VITDEMO_TRAIN_MEMORY_MB': '3000'})
    job = TrainingJob(tmp_path / 'data', ModelStore(tmp_path / 'weights', runs_dir=tmp_path / 'runs'), policy)
    scratch = TRAIN_PRESETS['10-minute CPU demo']
    probe = replace(scratch, start_from='vit_tiny_patch16_224', finetune='probe')
    assert job.batch_for(scratch) == job.batch_for(probe) == scratch.batch_size == 128  # both fit as they are
    partial = replace(probe, finetune='partial')
    batch = job.batch_for(partial)
    model_config, cfg = partial.configs()
    assert batch < 128
    check_training(policy, model_config, cfg.minutes, batch)
    with pytest.raises(ValueError, match='more than the 3,000 MB'):
        check_training(policy, model_config, cfg.minutes, 2 * batch)
    # the suggestion weighs what Start weighs, a distillation teacher's share too
    taught = fitting_batch(policy, model_config, 128, teacher=model_config)
    assert taught < batch
    check_training(policy, model_config, cfg.minutes, taught, teacher=model_config)
    with pytest.raises(ValueError, match='more than the 3,000 MB'):
        check_training(policy, model_config, cfg.minutes, 2 * taught, teacher=model_config)
