"""Distillation (DeiT): the losses against a hand computation, and a taught run end to end."""
import math
from dataclasses import replace

import pytest
import torch

from conftest import TINY_CIFAR, randomize_
from test_train import colour_data
from vitdemo.backends import load_model
from vitdemo.cnn import CifarResNet, ResNetConfig
from vitdemo.distill import Distillation
from vitdemo.train import TrainConfig, train
from vitdemo.weights import read_metadata, save_checkpoint


def log_softmax(row):
    top = max(row)
    total = sum(math.exp(v - top) for v in row)
    return [v - top - math.log(total) for v in row]


def test_hard_and_soft_losses_are_deits():
    teacher = torch.nn.Identity()
    teacher.config = TINY_CIFAR
    task = Distillation(teacher, (0.5,) * 3, (0.25,) * 3, 'hard')
    cls_logits = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3]])
    dist_logits = torch.tensor([[0.0, 1.0, 0.0], [1.0, -1.0, 2.0]])
    teacher_logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 0.0]])  # top classes 1 and 0
    labels = torch.tensor([0, 2])
    loss, logits = task.loss((cls_logits, dist_logits), teacher_logits, labels)
    ce = lambda z, y: -sum(log_softmax(z[i].tolist())[y[i]] for i in range(len(y))) / len(y)  # noqa: E731
    assert float(loss) == pytest.approx(0.5 * ce(cls_logits, [0, 2]) + 0.5 * ce(dist_logits, [1, 0]), rel=1e-5)
    torch.testing.assert_close(logits, (cls_logits + dist_logits) / 2)

    soft = Distillation(teacher, (0.5,) * 3, (0.25,) * 3, 'soft', alpha=0.1, temperature=3.0)
    loss, _ = soft.loss((cls_logits, dist_logits), teacher_logits, labels)
    kl = 0.0
    for s_row, t_row in zip(dist_logits.tolist(), teacher_logits.tolist()):
        s, t = log_softmax([v / 3 for v in s_row]), log_softmax([v / 3 for v in t_row])
        kl += sum(math.exp(ti) * (ti - si) for si, ti in zip(s, t))
    assert float(loss) == pytest.approx(0.9 * ce(cls_logits, [0, 2]) + 0.1 * 9 * kl / 2, rel=1e-5)
    # a student of one head answers both terms with it
    one, _ = task.loss(cls_logits, teacher_logits, labels)
    assert float(one) == pytest.approx(0.5 * ce(cls_logits, [0, 2]) + 0.5 * ce(cls_logits, [1, 0]), rel=1e-5)
    with pytest.raises(ValueError, match="'hard' or 'soft'"):
        Distillation(teacher, (0.5,) * 3, (0.25,) * 3, 'warm')


def test_the_teacher_sees_the_batch_in_its_own_normalisation():
    class Echo(torch.nn.Module):  # returns the mean of what it is given, per channel
        config = replace(TINY_CIFAR, img_size=16)

        def forward(self, x):
            assert x.shape[-1] == 16
            return x.mean(dim=(2, 3))
    task = Distillation(Echo(), (0.2, 0.3, 0.4), (0.1, 0.1, 0.1))
    pixels = torch.full((1, 3, 32, 32), 0.5)
    student = (pixels - 0.5) / 0.25  # the student's normalisation
    torch.testing.assert_close(task.teach(student, (0.5,) * 3, (0.25,) * 3),
                               torch.tensor([[3.0, 2.0, 1.0]]), atol=1e-5, rtol=0)


def test_a_student_taught_by_a_teacher_trains_and_keeps_both_tokens(tmp_path):
    data = colour_data(n=200)
    teacher = randomize_(CifarResNet(ResNetConfig(num_classes=len(data.classes))), seed=2)
    save_checkpoint(tmp_path / 'teacher.safetensors', teacher, data.classes, mean=[0.5] * 3, std=[0.25] * 3)
    task = Distillation.from_checkpoint(tmp_path / 'teacher.safetensors', data.classes, 'hard')
    config = replace(TINY_CIFAR, num_classes=len(data.classes), distilled=True)
    cfg = TrainConfig(epochs=2, minutes=None, batch_size=32, val_size=40, teacher='teacher.safetensors',
                      distill='hard')
    calls = []
    teach = task.teach
    task.teach = lambda *a: calls.append(1) or teach(*a)
    result = train(config, cfg, data, out=tmp_path / 'student.safetensors', distillation=task)
    steps = result.history[-1]['step']
    assert len(calls) == steps and result.model.num_prefix_tokens == 2 and not result.model.distilled_training
    assert all(p.grad is None for p in task.teacher.parameters())  # the teacher only answers
    meta = read_metadata(tmp_path / 'student.safetensors')
    assert meta['train_config']['teacher'] == 'teacher.safetensors' and meta['train_config']['distill'] == 'hard'
    student = load_model(tmp_path / 'student.safetensors')
    pred = student.predict(data.images[0].permute(1, 2, 0).numpy())
    assert pred.num_prefix_tokens == 2 and torch.isfinite(pred.probs).all()
    with pytest.raises(ValueError, match=r'teacher.safetensors knows other classes \(red, green, blue, ...: 4\)'):
        Distillation.from_checkpoint(tmp_path / 'teacher.safetensors', ['a', 'b'], 'hard')


def test_the_teacher_answers_for_the_image_and_its_mirror_image_averaged():
    class Linear(torch.nn.Module):  # a classifier of raw pixels: left and right weigh differently
        config = TINY_CIFAR

        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3 * 32 * 32, 4)

        def forward(self, x):
            return self.fc(x.flatten(1))
    teacher = Linear()
    task = Distillation(teacher, (0.5,) * 3, (0.25,) * 3)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        alone, mirrored = teacher(x), teacher(x.flip(-1))
    assert (alone - mirrored).abs().max() > 1e-2  # this teacher is not mirror-symmetric on its own
    torch.testing.assert_close(task.teach(x, (0.5,) * 3, (0.25,) * 3), (alone + mirrored) / 2)
    torch.testing.assert_close(task.teach(x.flip(-1), (0.5,) * 3, (0.25,) * 3), (alone + mirrored) / 2)


def test_a_teacher_that_answers_once_per_image(tmp_path):
    data = colour_data(n=200)
    teacher = randomize_(CifarResNet(ResNetConfig(num_classes=len(data.classes))), seed=2)
    save_checkpoint(tmp_path / 'teacher.safetensors', teacher, data.classes, mean=[0.5] * 3, std=[0.25] * 3)
    task = Distillation.from_checkpoint(tmp_path / 'teacher.safetensors', data.classes, 'soft', once=True)
    calls = []
    teach = task.teach
    task.teach = lambda *a: calls.append(len(a[0])) or teach(*a)
    config = replace(TINY_CIFAR, num_classes=len(data.classes), distilled=True)
    cfg = TrainConfig(epochs=2, minutes=None, batch_size=32, val_size=40)
    train(config, cfg, data, distillation=task)
    assert sum(calls) == 160 and task.answers.shape == (160, 4)  # each training image, once
    mean, std = [0.5] * 3, [0.25] * 3
    image = data.images[:1].float().div(255).sub(0.5).div(0.25)
    with torch.no_grad():
        expected = teach(image, mean, std)
    # its mirror image gets the same answer: the teacher's is the mean over both
    got = task.answer(image.flip(-1), mean, std, torch.tensor([0]))
    # remembered under bf16 autocast, as training runs it; computed here in fp32
    torch.testing.assert_close(got, expected, atol=3e-2 * expected.abs().max().item(), rtol=0)


@pytest.mark.slow  # three fresh Python processes
def test_the_test_time_augmentation_bench_scores_each_checkpoint_as_evaluate_does(tmp_path):
    """bench/test_time_augmentation.py end to end on a small folder and two models trained on it here: a ViT and
    the fast CNN; each one's plain accuracy is what `vitdemo.evaluate` gives on its held-out split."""
    import os
    import subprocess
    import sys

    from conftest import ROOT
    from test_data import make_folder
    from vitdemo.data import load_dataset
    from vitdemo.evaluate import confusion_matrix, held_out
    from vitdemo.weights import load_checkpoint
    make_folder(tmp_path / 'data', classes=[f'c{i}' for i in range(4)], per_class=30, size=32)
    env = {**os.environ, 'VITDEMO_CACHE': str(tmp_path / 'cache')}
    paths = []
    for arch, extra in [('vit', ['--embed-dim', '32', '--depth', '2', '--heads', '2']), ('convnet', [])]:
        paths.append(str(tmp_path / f'{arch}.safetensors'))
        subprocess.run([sys.executable, '-m', 'vitdemo.train', '--data', str(tmp_path / 'data'), '--epochs', '1',
                        '--arch', arch, *extra, '--batch-size', '16', '--out', paths[-1]],
                       cwd=ROOT, check=True, capture_output=True, timeout=300, env=env)
    out = subprocess.run([sys.executable, 'bench/test_time_augmentation.py', *paths, '--data', str(tmp_path / 'data')],
                         cwd=ROOT, check=True, capture_output=True, text=True, timeout=300, env=env).stdout
    rows = {line[:40].strip(): [float(v.rstrip('%')) for v in line[40:].split()] for line in out.splitlines()[1:]}
    assert list(rows) == ['vit.safetensors', 'convnet.safetensors', 'all averaged']
    assert all(len(r) == 3 and all(0 <= v <= 100 for v in r) for r in rows.values())
    data = load_dataset(str(tmp_path / 'data'))
    for path in paths:
        model, meta = load_checkpoint(path)
        counts = confusion_matrix(model, held_out(data, meta), meta['mean'], meta['std'])
        assert rows[os.path.basename(path)][0] == round(100 * counts.diag().sum().item() / counts.sum().item(), 2)


def test_a_teachers_memory_is_counted_for_the_batch_and_its_mirror_images():
    """The teacher answers for the batch and its mirror images in one pass (`teach`), so a run's memory
    estimate, checked before a run starts on a public server, counts the teacher's pass over twice the batch."""
    from vitdemo.cnn import ConvNetConfig
    from vitdemo.policy import estimate_training_memory, run_memory
    student, teacher = replace(TINY_CIFAR, num_classes=10), ConvNetConfig()
    alone, taught = run_memory(student, 64), run_memory(student, 64, teacher=teacher)
    twice_the_batch = estimate_training_memory(teacher, 128, 0)
    assert taught.activation_bytes - alone.activation_bytes == twice_the_batch.activation_bytes
    task = Distillation(torch.nn.Identity(), (0.5,) * 3, (0.25,) * 3)
    task.teacher.config = TINY_CIFAR
    seen = []
    task.teacher.register_forward_hook(lambda module, args, out: seen.append(len(args[0])))
    task.teach(torch.randn(64, 3, 32, 32), (0.5,) * 3, (0.25,) * 3)
    assert seen == [128]  # one pass over the batch and its mirror images
