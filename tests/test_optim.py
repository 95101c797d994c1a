import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vitdemo.model import ViTConfig, VisionTransformer
from vitdemo.optim import Muon, Optimizers, make_optimizer, orthogonalise
from vitdemo.train import param_groups

SMALL = ViTConfig(img_size=32, patch_size=8, num_classes=10, embed_dim=48, depth=2, num_heads=3, stem='conv')


def steps(optimizer_of, seed=0, n=3):
    """A few steps of a small linear model from the same start and gradients; its weight after them."""
    torch.manual_seed(seed)
    layer = torch.nn.Linear(24, 40)
    optimizer = optimizer_of([layer.weight])
    x = torch.randn(16, 24)
    for _ in range(n):
        optimizer.zero_grad()
        layer(x).pow(2).mean().backward()
        optimizer.step()
    return layer.weight.detach()


@pytest.mark.parametrize('adjust', [None, 'match_rms_adamw'])
def test_muon_in_bfloat16_steps_as_torchs_own_and_in_float32_close_to_it(adjust):
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust)
    theirs = steps(lambda p: torch.optim.Muon(p, **kw))
    assert torch.equal(steps(lambda p: Muon(p, ns_dtype=torch.bfloat16, **kw)), theirs)
    ours = steps(lambda p: Muon(p, ns_dtype=torch.float32, **kw))
    start = steps(lambda p: torch.optim.SGD(p, lr=0.0), n=1)
    moved = (theirs - start).norm()
    assert moved > 0 and (ours - theirs).norm() < 0.15 * moved  # the same steps but for bfloat16 rounding (~9%)


def test_orthogonalise_leaves_no_direction_dominant():
    torch.manual_seed(0)
    skewed = torch.randn(64, 16) @ torch.diag(torch.logspace(-2, 0, 16))  # singular values over two decades
    for update in (skewed, skewed.T):
        singular = torch.linalg.svdvals(orthogonalise(update, (3.4445, -4.775, 2.0315), 5, 1e-7, torch.float32))
        assert singular.max() < 1.3 and singular.min() > 0.3, singular  # Muon's ~(0.5, 1.5): roughly orthogonal
        assert torch.linalg.svdvals(update).max() / torch.linalg.svdvals(update).min() > 50


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = VisionTransformer(SMALL)
    groups = param_groups(model, 0.05, muon=True)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in groups if g['muon'] for p in g['params']}
    assert muon == {f'blocks.{i}.{m}.weight' for i in range(2) for m in ('attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2')}
    assert all(g['weight_decay'] == 0.05 for g in groups if g['muon'])
    adamw = {names[id(p)] for g in groups if not g['muon'] for p in g['params']}
    assert {'head.weight', 'pos_embed', 'cls_token'} <= adamw and not adamw & muon
    assert not any(g['muon'] for g in param_groups(model, 0.05))  # AdamW alone unless asked
    assert isinstance(make_optimizer(param_groups(model, 0.05), 1e-3, torch.float32), torch.optim.AdamW)


def test_two_optimisers_save_and_load_as_one():
    model = VisionTransformer(SMALL)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])

    def trained(optimizer, n):
        for _ in range(n):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()

    both = make_optimizer(param_groups(model, 0.05, muon=True), 1e-3, torch.float32)
    assert isinstance(both, Optimizers) and len(both.param_groups) == sum(len(o.param_groups) for o in both.optimizers)
    trained(both, 2)
    saved = copy.deepcopy(both.state_dict())  # its tensors are the moments themselves, which go on moving
    numbers = [i for g in saved['param_groups'] for i in g['params']]
    assert numbers == list(range(len(list(model.parameters()))))  # numbered on, as within one optimiser
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    trained(both, 1)
    after = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(weights)
    again = make_optimizer(param_groups(model, 0.05, muon=True), 1e-3, torch.float32)
    again.load_state_dict(saved)
    assert len(again.state) == len(both.state) and all('momentum_buffer' in again.state[p]
                                                         for p in again.optimizers[1].state)
    trained(again, 1)
    for name, value in model.state_dict().items():
        assert torch.equal(value, after[name]), name


@pytest.mark.parametrize('amp_dtype,expected', [('', torch.float32), ('bfloat16', torch.bfloat16)])
def test_the_trainer_orthogonalises_in_bfloat16_only_where_the_model_computes_in_it(monkeypatch, amp_dtype, expected):
    import vitdemo.train as trainer
    from test_train import colour_data
    seen, real = [], trainer.make_optimizer
    monkeypatch.setattr(trainer, 'make_optimizer',
                        lambda groups, lr, ns_dtype: seen.append(ns_dtype) or real(groups, lr, ns_dtype))
    config = ViTConfig(**{**SMALL.to_dict(), 'num_classes': 4})
    cfg = trainer.TrainConfig(epochs=1, minutes=None, batch_size=32, val_size=32, optimizer='muon',
                              amp=bool(amp_dtype), amp_dtype=amp_dtype)
    result = trainer.train(config, cfg, colour_data(n=96))
    assert seen == [expected] and result.history[0]['train_loss'] > 0


def test_a_finetune_learns_with_adamw():
    from dataclasses import replace
    from vitdemo.train import TrainConfig
    from vitdemo.train_form import TRAIN_PRESETS
    with pytest.raises(ValueError, match='a fine-tune learns with AdamW'):
        TrainConfig(finetune_from='vit_tiny_patch16_224', finetune='full', optimizer='muon')
    form = replace(next(p for p in TRAIN_PRESETS.values() if p.optimizer == 'muon'),
                   start_from='vit_tiny_patch16_224')
    assert form.configs()[1].optimizer == 'adamw'


def test_a_cnn_asked_to_learn_with_muon_learns_and_is_recorded_with_adamw(tmp_path):
    from test_train import colour_data
    from vitdemo.cnn import ConvNetConfig
    from vitdemo.train import TrainConfig, train
    from vitdemo.weights import read_metadata
    cfg = TrainConfig(epochs=1, minutes=None, batch_size=32, val_size=32, optimizer='muon', amp=False)
    result = train(ConvNetConfig(img_size=32, num_classes=4, widths=(8, 8, 16, 16)), cfg, colour_data(n=96),
                   out=tmp_path / 'cnn.safetensors')
    assert read_metadata(result.path)['train_config']['optimizer'] == 'adamw'


def test_a_torch_without_muon_is_named_with_the_upgrade_that_mends_it():
    # torch before 2.9, as pip keeps one installed when vitdemo is installed without its requirements
    script = ('import sys, torch; del torch.optim.Muon; sys.modules["torch.optim._muon"] = None\n'
              'import vitdemo.optim')
    run = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert 'vitdemo needs torch 2.9 or later' in run.stderr and 'pip install -U -r requirements.txt' in run.stderr


def test_a_torch_that_moves_muons_private_rate_still_starts_the_app():
    # vitdemo.optim reads torch's private rate scaling; a release that moves it may stop Muon's runs, not the app
    script = ('import torch.optim._muon as muon; del muon._adjust_lr\n'
              'import app; app.create_demo(); print("started")')
    run = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert run.stdout.strip().splitlines()[-1:] == ['started'], run.stderr[-2000:]
