import pytest
import timm
import torch

from conftest import ROOT, TINY_CIFAR, randomize_
from vitdemo.backends import TimmAttention
from vitdemo.model import PRESETS, ViTConfig, VisionTransformer, preset, sincos_pos_embed
from vitdemo.weights import from_timm

# (timm model name, timm kwargs, our config): a paper size, and a CIFAR-sized one with mean pooling
EQUIVALENT = [
    ('vit_tiny_patch16_224', {}, preset('vit_tiny_patch16_224')),
    ('vit_small_patch16_224', dict(img_size=32, patch_size=4, num_classes=10, depth=3, global_pool='avg',
                                   qkv_bias=False, mlp_ratio=2.0),
     ViTConfig(img_size=32, patch_size=4, num_classes=10, embed_dim=384, depth=3, num_heads=6, mlp_ratio=2.0,
               qkv_bias=False, global_pool='avg')),
    ('deit_small_distilled_patch16_224', dict(depth=4), preset('vit_small_patch16_224', depth=4, distilled=True)),
]


@pytest.mark.parametrize('timm_name,timm_kwargs,config', EQUIVALENT, ids=['tiny16-224', 'small4-32-avg',
                                                                          'deit-distilled'])
def test_same_weights_same_logits_and_attention_as_timm(timm_name, timm_kwargs, config):
    theirs = randomize_(timm.create_model(timm_name, pretrained=False, **timm_kwargs)).eval()
    ours = VisionTransformer(config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)  # same names and shapes, nothing renamed
    x = torch.randn(2, 3, config.img_size, config.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected_logits, expected_attn = TimmAttention(theirs)(x)
        logits, attn = ours.forward_with_attention(x)
        fused = ours(x)
    assert expected_logits.abs().max() > 0.1  # the comparison below means something
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(fused, expected_logits, atol=1e-4, rtol=0)
    assert len(attn) == len(expected_attn) == config.depth
    for ours_layer, theirs_layer in zip(attn, expected_attn):
        torch.testing.assert_close(ours_layer, theirs_layer, atol=1e-5, rtol=0)


def test_the_distilled_vit_gives_both_heads_while_taught_and_their_mean_otherwise():
    theirs = randomize_(timm.create_model('deit_small_distilled_patch16_224', pretrained=False, depth=2))
    ours = from_timm(theirs)
    assert ours.config.distilled and ours.num_prefix_tokens == 2
    x = torch.randn(2, 3, 224, 224)
    for model in (theirs, ours):
        model.set_distilled_training(True)
        model.train()
    torch.manual_seed(0)
    cls_logits, dist_logits = ours(x)
    expected_cls, expected_dist = theirs(x)
    torch.testing.assert_close(cls_logits, expected_cls, atol=1e-4, rtol=0)
    torch.testing.assert_close(dist_logits, expected_dist, atol=1e-4, rtol=0)
    ours.eval()
    torch.testing.assert_close(ours(x), (cls_logits + dist_logits) / 2, atol=1e-4, rtol=0)
    assert ours.no_weight_decay() >= {'cls_token', 'dist_token', 'pos_embed'}
    with pytest.raises(ValueError, match='global_pool must be token'):
        ViTConfig(distilled=True, global_pool='avg')


def test_from_timm_converts_a_timm_vit():
    theirs = randomize_(timm.create_model('deit_small_patch16_224', pretrained=False, depth=2)).eval()
    ours = from_timm(theirs)
    assert ours.config.embed_dim == 384 and ours.config.num_heads == 6 and ours.config.depth == 2
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize('name,millions', [('vit_tiny_patch16_224', 5.7), ('vit_small_patch16_224', 22.0),
                                           ('vit_base_patch16_224', 86.0), ('vit_large_patch16_224', 307.0),
                                           ('vit_huge_patch14_224', 632.0)])
def test_paper_sizes_have_the_paper_parameter_counts(name, millions):
    with torch.device('meta'):  # no memory for the weights of ViT-H
        model = VisionTransformer(preset(name))
    count = sum(p.numel() for p in model.parameters()) / 1e6
    assert count == pytest.approx(millions, rel=0.015)
    with torch.device('meta'):
        assert count == sum(p.numel() for p in timm.create_model(name, num_classes=1000).parameters()) / 1e6


def test_cifar_preset_is_small_and_sees_32px():
    config = preset('vit_cifar10')
    assert (config.img_size, config.num_classes, config.grid_size) == (32, 10, 8)
    assert set(PRESETS) >= {'vit_tiny_patch16_224', 'vit_huge_patch14_224', 'vit_cifar10'}


@pytest.mark.parametrize('overrides', [{}, dict(global_pool='avg'), dict(pos_embed='sincos'),
                                       dict(drop_path_rate=0.2, proj_drop_rate=0.1, attn_drop_rate=0.1),
                                       dict(stem='conv'), dict(stem='strided')])
def test_forward_shapes_finite_and_every_parameter_learns(overrides):
    model = VisionTransformer(ViTConfig(**{**TINY_CIFAR.to_dict(), **overrides})).train()
    torch.nn.init.normal_(model.head.weight, std=0.02)  # it starts at zero, which passes no gradient back
    x = torch.randn(4, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 2, 3])).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not no_grad


def test_forward_with_attention_returns_probabilities_per_layer():
    model = randomize_(VisionTransformer(TINY_CIFAR)).eval()
    with torch.no_grad():
        logits, attentions = model.forward_with_attention(torch.randn(3, 3, 32, 32))
        plain = model(torch.zeros(1, 3, 32, 32))
    tokens = 1 + TINY_CIFAR.grid_size ** 2
    assert logits.shape == (3, 10) and plain.shape == (1, 10)
    assert [a.shape for a in attentions] == [(3, TINY_CIFAR.num_heads, tokens, tokens)] * TINY_CIFAR.depth
    for a in attentions:
        assert (a >= 0).all()
        torch.testing.assert_close(a.sum(-1), torch.ones(a.shape[:-1]))


def test_fused_and_manual_attention_agree():
    model = randomize_(VisionTransformer(TINY_CIFAR)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.set_fused_attn(True)
        fused = model(x)
        model.set_fused_attn(False)
        manual = model(x)
    torch.testing.assert_close(fused, manual, atol=1e-5, rtol=0)


def test_patch_dropout_leaves_out_patch_tokens_while_training_and_none_in_evaluation():
    config = ViTConfig(**{**TINY_CIFAR.to_dict(), 'patch_size': 4, 'patch_drop_rate': 0.25, 'distilled': True})
    model = randomize_(VisionTransformer(config))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model.eval().embed(x)
        kept = model.train().embed(x)
    patches = config.grid_size ** 2
    assert full.shape[1] == 2 + patches and kept.shape[1] == 2 + patches * 3 // 4
    torch.testing.assert_close(kept[:, :2], full[:, :2])  # the CLS and distillation tokens always stay
    for b in range(2):  # each kept token is one of this image's own patch tokens, none of them twice
        index = torch.cdist(kept[b, 2:], full[b, 2:]).argmin(dim=1)
        torch.testing.assert_close(kept[b, 2:], full[b, 2:][index])
        assert len(set(index.tolist())) == len(index)
    model.train().set_distilled_training()
    logits, distilled = model(x)
    (logits + distilled).sum().backward()  # a taught training step through the fewer tokens
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    model.set_distilled_training(False)
    plain = VisionTransformer(ViTConfig(**{**config.to_dict(), 'patch_drop_rate': 0.0})).eval()
    plain.load_state_dict(model.state_dict())  # no weights of its own: the same checkpoint either way
    torch.testing.assert_close(model.eval()(x), plain(x))


def assert_local_tokens(model: VisionTransformer, config: ViTConfig, corner: int) -> None:
    """One token per patch, and local: changing the image's top-left `corner` pixels moves the first token
    and none in the far quadrant."""
    patch_size = config.patch_size
    with torch.no_grad():
        logits, attentions = model.forward_with_attention(torch.randn(2, 3, 32, 32))
    tokens = 1 + (32 // patch_size) ** 2
    assert logits.shape == (2, 10) and attentions[0].shape == (2, config.num_heads, tokens, tokens)
    x = torch.randn(1, 3, 32, 32)
    y = x.clone()
    y[..., :corner, :corner] += 1.0
    with torch.no_grad():
        change = (model.patch_embed(y) - model.patch_embed(x)).norm(dim=-1)[0].reshape(32 // patch_size, -1)
    half = 16 // patch_size
    assert change[0, 0] > 0 and change[half:, half:].max() == 0


@pytest.mark.parametrize('patch_size', [2, 4, 8])
def test_conv_stem_gives_one_token_per_patch_under_timm_hybrid_names(patch_size):
    config = ViTConfig(**{**TINY_CIFAR.to_dict(), 'patch_size': patch_size, 'stem': 'conv'})
    model = randomize_(VisionTransformer(config)).eval()
    stem = {n.split('.')[1] for n, _ in model.named_parameters() if n.startswith('patch_embed.')}
    assert stem == {'backbone', 'proj'}  # timm's HybridEmbed layout
    strides = [m.stride[0] for m in model.patch_embed.backbone if isinstance(m, torch.nn.Conv2d)]
    assert strides == [1] + [2] * (patch_size.bit_length() - 1)  # one halving per conv after the first
    assert_local_tokens(model, config, corner=patch_size)  # changing the top-left patch moves its token only


@pytest.mark.parametrize('patch_size', [2, 4, 8])
def test_strided_conv_stem_halves_the_image_with_every_conv(patch_size):
    config = ViTConfig(**{**TINY_CIFAR.to_dict(), 'patch_size': patch_size, 'stem': 'strided'})
    model = randomize_(VisionTransformer(config)).eval()
    convs = [m for m in model.patch_embed.backbone if isinstance(m, torch.nn.Conv2d)]
    assert [m.stride[0] for m in convs] == [2] * (patch_size.bit_length() - 1)  # no conv at full size
    full = VisionTransformer(ViTConfig(**{**config.to_dict(), 'stem': 'conv'}))
    widths = [m.out_channels for m in full.patch_embed.backbone if isinstance(m, torch.nn.Conv2d)]
    assert [m.out_channels for m in convs] == widths[1:]  # the conv stem's halvings, as wide
    assert_local_tokens(model, config, corner=patch_size)


def test_conv_stem_keeps_some_channels_for_a_narrow_model_with_large_patches():
    model = VisionTransformer(ViTConfig(img_size=32, patch_size=16, num_classes=10, embed_dim=16, depth=1,
                                        num_heads=2, stem='conv'))
    assert min(m.out_channels for m in model.patch_embed.backbone if isinstance(m, torch.nn.Conv2d)) == 8
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_sincos_position_embedding_is_fixed_and_distinct():
    model = VisionTransformer(ViTConfig(**{**TINY_CIFAR.to_dict(), 'pos_embed': 'sincos'}))
    assert not model.pos_embed.requires_grad
    table = sincos_pos_embed(4, 64)
    assert table.shape == (16, 64)
    assert torch.cdist(table, table).add(torch.eye(16) * 1e3).min() > 0.1  # every position its own code
    torch.testing.assert_close(model.pos_embed[0, 1:], sincos_pos_embed(4, 64))


@pytest.mark.parametrize('kwargs,message', [(dict(embed_dim=100, num_heads=3), 'divisible by num_heads'),
                                            (dict(img_size=30, patch_size=4), 'divisible by patch_size'),
                                            (dict(global_pool='max'), 'global_pool'),
                                            (dict(img_size=36, patch_size=6, stem='conv'), 'power of 2'),
                                            (dict(img_size=32, patch_size=1, stem='strided'), 'patch of 2 or more'),
                                            (dict(embed_dim=90, num_heads=3, pos_embed='sincos'), 'divisible by 4'),
                                            (dict(num_heads=0), 'must be positive'),
                                            (dict(patch_drop_rate=1.0), 'patch_drop_rate')])
def test_config_refuses_impossible_shapes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ViTConfig(**kwargs)


def test_config_checks_hold_under_python_O():
    """User input is checked with exceptions, not asserts, which `python -O` strips."""
    import subprocess
    import sys
    code = ('import sys; sys.path.insert(0, "."); from vitdemo.model import ViTConfig\n'
            'try:\n    ViTConfig(embed_dim=100, num_heads=3)\nexcept ValueError as e:\n    print("refused:", e)')
    out = subprocess.run([sys.executable, '-O', '-c', code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert 'refused: embed_dim (100) must be divisible by num_heads (3)' in out.stdout


def test_wrong_input_size_is_refused():
    with pytest.raises(AssertionError, match='expected 32x32'):
        VisionTransformer(TINY_CIFAR)(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize('patch_size', [1, 4, 8])
def test_hybrid_stem_makes_tokens_from_a_resnet_stage_under_timm_hybrid_names(patch_size):
    from torchvision.models.resnet import BasicBlock
    config = ViTConfig(**{**TINY_CIFAR.to_dict(), 'patch_size': patch_size, 'stem': 'hybrid'})
    model = randomize_(VisionTransformer(config)).eval()
    stem = {n.split('.')[1] for n, _ in model.named_parameters() if n.startswith('patch_embed.')}
    assert stem == {'backbone', 'proj'}
    assert [type(m) for m in model.patch_embed.backbone[3:]] == [BasicBlock, BasicBlock]  # ResNet-18's first stage
    assert model.patch_embed.backbone[0].stride[0] * model.patch_embed.proj.stride[0] == patch_size
    assert_local_tokens(model, config, corner=2)  # the residual blocks see 3x3 neighbourhoods: still local
