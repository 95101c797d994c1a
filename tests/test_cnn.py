"""The CNN baselines (ResNet-18 and the fast 8-layer CNN) for 32x32 images, trained by the same trainer,
shown through Grad-CAM."""
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from test_train import colour_data
from vitdemo.backends import load_model
from vitdemo.catalog import ModelCache, list_models
from vitdemo.cnn import CifarConvNet, CifarResNet, ConvNetConfig, ResNetConfig
from vitdemo.compare import compare_view
from vitdemo.figures import inspect_view
from vitdemo.train import TrainConfig, train
from vitdemo.train_form import TRAIN_PRESETS, TrainForm
from vitdemo.training_job import attention_snapshot
from vitdemo.views import predict_view
from vitdemo.weights import CheckpointError, load_checkpoint, read_metadata


CNNS = [pytest.param((CifarResNet, ResNetConfig), id='resnet18'),
        pytest.param((CifarConvNet, ConvNetConfig), id='convnet')]


@pytest.fixture(scope='module')
def trained(tmp_path_factory, weights_dir):
    """A ResNet-18 trained for a moment on four colours, saved beside the test ViT checkpoint. Batch 16: its
    batch-norm statistics need a dozen steps to settle; at batch 32 (8 steps) validation swung 0.7-1.0."""
    out = weights_dir / 'resnet18_colours.safetensors'
    cfg = TrainConfig(epochs=2, minutes=None, batch_size=16, lr=2e-3, val_size=64, seed=0)
    result = train(ResNetConfig(num_classes=4), cfg, colour_data(n=320), out=out)
    yield result, out
    out.unlink()


@pytest.mark.parametrize('cnn', CNNS)
def test_the_small_image_stem_keeps_the_resolution(cnn):
    model_cls, config_cls = cnn
    model = model_cls(config_cls()).eval()
    logits, maps = model.forward_with_saliency(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert [tuple(m.shape) for m in maps] == [(2, 32, 32), (2, 16, 16), (2, 8, 8), (2, 4, 4)]
    assert all((m >= 0).all() and torch.allclose(m.flatten(1).sum(1), torch.ones(2)) for m in maps)


def test_a_stage_with_no_evidence_for_the_class_gets_an_even_map():
    torch.manual_seed(0)
    model = CifarResNet(ResNetConfig()).eval()
    with torch.no_grad():  # the last stage's features are ReLU outputs: each one now argues against class 3
        model.fc.weight[3] = -model.fc.weight[3].abs()
    _, maps = model.forward_with_saliency(torch.randn(2, 3, 32, 32), target=torch.tensor([3, 3]))
    torch.testing.assert_close(maps[-1], torch.full((2, 4, 4), 1 / 16))
    assert all(torch.allclose(m.flatten(1).sum(1), torch.ones(2)) for m in maps)


@pytest.mark.parametrize('cnn', CNNS)
def test_grad_cam_matches_a_hook_based_computation(cnn):
    """Grad-CAM recomputed the textbook way (hooks keep the stage outputs and their gradients)."""
    torch.manual_seed(0)
    model_cls, config_cls = cnn
    model = model_cls(config_cls()).eval()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    logits, maps = model.forward_with_saliency(x)
    kept = {}
    hooks = [stage.register_forward_hook(lambda m, i, o, k=k: kept.__setitem__(k, o) or o.retain_grad())
             for k, stage in enumerate([model.layer1, model.layer2, model.layer3, model.layer4])]
    out = model(x)
    out[0, out.argmax()].backward()
    for h in hooks:
        h.remove()
    assert torch.allclose(out, logits, atol=1e-5)
    for k, m in enumerate(maps):
        a, g = kept[k][0], kept[k].grad[0]
        cam = torch.relu((g.mean(dim=(1, 2), keepdim=True) * a).sum(0))
        assert cam.sum() > 0 and torch.allclose(m[0], cam / cam.sum(), atol=1e-6), f'stage {k + 1}'


def test_the_trainer_trains_a_resnet_and_its_checkpoint_says_so(trained):
    result, out = trained
    assert result.metrics['val_accuracy'] > 0.9
    meta = read_metadata(out)
    assert meta['arch'] == 'resnet18' and meta['config'] == ResNetConfig(num_classes=4).to_dict()
    model, _ = load_checkpoint(out)
    assert isinstance(model, CifarResNet)
    for a, b in zip(model.state_dict().values(), result.model.state_dict().values()):
        assert torch.equal(a.float(), b.float())


def test_the_fast_cnn_trains_saves_and_answers_with_grad_cam(weights_dir, tmp_path):
    """The teacher-sized CNN goes the ResNet's whole way: trained, saved under its own arch with its widths,
    listed, loaded, and shown stage by stage."""
    out = weights_dir / 'convnet_colours.safetensors'
    cfg = TrainConfig(epochs=2, minutes=None, batch_size=16, lr=2e-3, val_size=64, seed=0)
    try:
        result = train(ConvNetConfig(num_classes=4, widths=(8, 16, 32, 32)), cfg, colour_data(n=320), out=out)
        assert result.metrics['val_accuracy'] > 0.9
        meta = read_metadata(out)
        assert meta['arch'] == 'convnet' and meta['config']['widths'] == [8, 16, 32, 32]
        model, _ = load_checkpoint(out)
        assert isinstance(model, CifarConvNet) and model.config.widths == (8, 16, 32, 32)
        for a, b in zip(model.state_dict().values(), result.model.state_dict().values()):
            assert torch.equal(a.float(), b.float())
        cnn = load_model('scratch/convnet_colours', weights_dir)
        red = Image.fromarray(colour_data(n=4, seed=9).images[0].permute(1, 2, 0).numpy())
        labels, gallery, text, *_ = predict_view(cnn, red, top_k=2, fusion='mean', head=0)
        assert next(iter(labels)) == 'red' and 'Grad-CAM' in text and '8-layer CNN' in cnn.description
        assert [c for _, c in gallery][1:] == [f'stage {i} · {s}x{s} · red'
                                               for i, s in [(1, 32), (2, 16), (3, 8), (4, 4)]]
    finally:
        out.unlink(missing_ok=True)


@pytest.mark.parametrize('widths', [(8, 16, 32), (8, 16, 32, 0), (8, 16, 32, 2048)])
def test_the_fast_cnn_refuses_odd_widths(widths):
    with pytest.raises(ValueError, match='widths must be four channel counts'):
        ConvNetConfig(widths=widths)


def test_a_checkpoint_of_an_unknown_architecture_is_refused(trained, tmp_path):
    _, out = trained
    tensors = load_file(str(out))
    meta = {k: json.dumps(v) for k, v in read_metadata(out).items() if k != 'arch'}
    save_file(tensors, str(tmp_path / 'odd.safetensors'), metadata={**meta, 'format': 'vitdemo.vit', 'arch': 'vgg'})
    with pytest.raises(CheckpointError, match="'vgg' model"):
        load_checkpoint(tmp_path / 'odd.safetensors')
    # the same ResNet tensors under a ViT's name do not fit
    save_file(tensors, str(tmp_path / 'posing.safetensors'), metadata={**meta, 'format': 'vitdemo.vit'})
    with pytest.raises(CheckpointError, match='invalid model config|does not fit'):
        load_checkpoint(tmp_path / 'posing.safetensors')


def test_predict_and_compare_show_grad_cam_for_the_cnn(trained, weights_dir):
    assert 'scratch/resnet18_colours' in list_models(weights_dir)
    cnn = load_model('scratch/resnet18_colours', weights_dir)
    red = Image.fromarray(colour_data(n=4, seed=9).images[0].permute(1, 2, 0).numpy())  # a noisy red, as trained
    labels, gallery, text, *_ = predict_view(cnn, red, top_k=2, fusion='one head', head=7)  # no heads: ignored
    assert next(iter(labels)) == 'red' and 'Grad-CAM' in text and 'CNN' in cnn.description
    assert [c for _, c in gallery][1:] == [f'stage {i} · {s}x{s} · red'
                                           for i, s in [(1, 32), (2, 16), (3, 8), (4, 4)]]
    vit = ModelCache(weights_dir=weights_dir).get('scratch/vit_cifar10')  # 2 layers
    scores_a, scores_b, pairs, text = compare_view(vit, cnn, red)
    assert len(pairs) == 2 * 2 + 2 and set(scores_b) <= {'red', 'green', 'blue', 'yellow'}
    assert [c.split(' · ')[0] for _, c in pairs[1::2]] == ['B stage 2', 'B stage 4', 'B last-stage Grad-CAM']
    assert 'Grad-CAM' in text and '2 layers' in text and '4 stages' in text


def test_inspect_explains_it_shows_vits_only(trained, weights_dir):
    cnn = load_model('scratch/resnet18_colours', weights_dir)
    with pytest.raises(ValueError, match='is a CNN'):
        inspect_view(cnn, Image.new('RGB', (32, 32)))


def test_the_train_tab_offers_the_cnn_and_draws_its_snapshot(trained):
    model_config, _ = TRAIN_PRESETS['10-minute CNN baseline (ResNet-18)'].configs()
    assert model_config == ResNetConfig(img_size=32)
    model_config, cfg = TRAIN_PRESETS['10-minute fast CNN (a teacher)'].configs()
    assert model_config == ConvNetConfig(img_size=32) and (cfg.batch_size, cfg.lr, cfg.minutes) == (256, 3e-3, 10)
    with pytest.raises(ValueError, match='model must be one of'):
        TrainForm(arch='vgg').configs()
    result, _ = trained
    picture, predicted = attention_snapshot(result.model, colour_data(n=4).images[0], [0.5] * 3, [0.25] * 3)
    assert predicted in range(4)
    assert picture.size == (192, 192) and result.model.training is False
