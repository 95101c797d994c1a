"""What needs a CUDA GPU: training there (bfloat16 or float16 with a loss scaler, fused attention) and
predictions that agree with the CPU's. Skipped without a GPU; `bench/gpu_check.sh` runs them on one."""
import math

import pytest
import torch

import vitdemo.train as train_module
from test_train import CONFIG, colour_data
from vitdemo.backends import checkpoint_model
from vitdemo.train import TrainConfig, precision, train
from vitdemo.weights import build_model

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]


@pytest.mark.parametrize('dtype,optimizer', [('', 'adamw'), ('float16', 'adamw'), ('', 'muon')])
def test_training_on_the_gpu_learns_with_its_precision_and_fused_attention(dtype, optimizer, scalers):
    cfg = TrainConfig(epochs=4, minutes=None, batch_size=64, val_size=128, amp_dtype=dtype, optimizer=optimizer)
    result = train(CONFIG, cfg, colour_data(), device='cuda')
    expected = precision(torch.device('cuda'), True, dtype)
    assert scalers[0].is_enabled() == (expected == torch.float16)  # float16 always with the scaler
    assert result.model.blocks[0].attn.fused_attn  # SDPA trained it
    assert result.history[-1]['val_accuracy'] > 0.9
    assert next(result.model.parameters()).device.type == 'cuda'


def test_the_batch_is_augmented_on_the_gpu(monkeypatch):
    devices = []
    rand_augment = train_module.rand_augment
    monkeypatch.setattr(train_module, 'rand_augment',
                        lambda images, strength: devices.append(images.device.type) or rand_augment(images, strength))
    cfg = TrainConfig(epochs=1, minutes=None, batch_size=64, val_size=128, rand_augment=9, mix_prob=1.0)
    result = train(CONFIG, cfg, colour_data(), device='cuda')
    assert devices and set(devices) == {'cuda'}  # the cropped batch reached RandAugment on the GPU
    assert math.isfinite(result.history[-1]['train_loss'])


def test_a_prediction_on_the_gpu_agrees_with_the_cpu():
    torch.manual_seed(0)
    module = build_model(CONFIG).eval()
    classes = ['red', 'green', 'blue', 'yellow']
    image = colour_data(n=1).images[0].permute(1, 2, 0).numpy()
    cpu = checkpoint_model('cpu', module, classes, [0.5] * 3, [0.25] * 3).predict(image)
    gpu = checkpoint_model('gpu', module.to('cuda'), classes, [0.5] * 3, [0.25] * 3).predict(image)
    torch.testing.assert_close(gpu.probs.cpu(), cpu.probs.cpu(), atol=2e-3, rtol=0)
    for a, b in zip(gpu.attentions, cpu.attentions):
        torch.testing.assert_close(a.float().cpu(), b.float().cpu(), atol=2e-3, rtol=0)
