import numpy as np
import pytest
import torch
from PIL import Image

from vitdemo.attention import cls_attention, fuse_heads, overlay, rollout


def random_attention(layers=3, heads=2, tokens=5, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, heads, tokens, tokens, generator=g).softmax(-1)


def test_fusion_modes_on_hand_made_heads():
    a = torch.zeros(1, 3, 2, 2)
    a[0, 0] = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    a[0, 1] = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    a[0, 2] = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    torch.testing.assert_close(fuse_heads(a, 'mean')[0], torch.full((2, 2), 0.5))
    torch.testing.assert_close(fuse_heads(a, 'max')[0], torch.ones(2, 2))
    torch.testing.assert_close(fuse_heads(a, 'min')[0], torch.zeros(2, 2))
    torch.testing.assert_close(fuse_heads(a, 1)[0], a[0, 1])
    with pytest.raises(AssertionError, match='head 3 out of range'):
        fuse_heads(a, 3)
    with pytest.raises(ValueError, match='fusion must be'):
        fuse_heads(a, 'median')


def test_cls_attention_takes_the_cls_row_over_the_patch_grid():
    # 1 CLS + a 2x3 grid of patches; CLS puts weight 0.5 on patch (1, 2), the last one
    a = torch.zeros(2, 1, 7, 7)
    a[:, :, :, 0] = 1.0
    a[:, :, 0] = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.5])
    maps = cls_attention(a, grid=(2, 3))
    assert maps.shape == (2, 2, 3)
    assert maps[0, 1, 2] == 0.5 and maps[1, 0, 0] == pytest.approx(0.1)


def test_cls_attention_skips_every_prefix_token():
    # DeiT-distilled layout: CLS, DIST, then 4 patches; CLS attends only to the distillation token and patch 3
    a = torch.zeros(1, 1, 6, 6)
    a[0, 0, 0, 1] = 0.7
    a[0, 0, 0, 5] = 0.3
    maps = cls_attention(a, grid=(2, 2), num_prefix_tokens=2)
    torch.testing.assert_close(maps[0], torch.tensor([[0.0, 0.0], [0.0, 0.3]]))
    with pytest.raises(AssertionError, match='do not fill'):
        cls_attention(a, grid=(2, 2), num_prefix_tokens=1)


def test_rollout_of_one_layer_is_half_attention_half_identity():
    a = random_attention(layers=1, heads=1, tokens=5)
    expected = 0.5 * a[0, 0] + 0.5 * torch.eye(5)
    torch.testing.assert_close(rollout(a, grid=(2, 2)), expected[0, 1:].reshape(2, 2))


def test_rollout_multiplies_layers_in_order_and_stays_a_distribution():
    a = random_attention(layers=4, heads=3, tokens=10)
    joint = torch.eye(10)
    for layer in a.mean(1):
        joint = (0.5 * layer + 0.5 * torch.eye(10)) @ joint
    flow = rollout(a, grid=(3, 3))
    assert flow.shape == (3, 3)
    torch.testing.assert_close(flow, joint[0, 1:].reshape(3, 3))
    assert 0 < flow.sum() < 1  # the rest stays on the CLS token itself


def test_rollout_discard_ratio_sharpens_the_map():
    a = random_attention(layers=3, heads=2, tokens=17, seed=1)
    soft = rollout(a, grid=(4, 4), discard_ratio=0.0)
    sharp = rollout(a, grid=(4, 4), discard_ratio=0.9)
    assert sharp.shape == soft.shape
    assert (sharp / sharp.sum()).max() > (soft / soft.sum()).max()
    with pytest.raises(ValueError):
        rollout(a, grid=(4, 4), discard_ratio=1.0)


def test_overlay_colours_the_box_and_dims_the_rest():
    image = Image.new('RGB', (40, 20), (200, 200, 200))
    heat = torch.tensor([[0.0, 1.0], [0.0, 1.0]])
    out = np.asarray(overlay(image, heat, box=(10, 0, 30, 20), opacity=1.0, cmap='gray'))
    assert out.shape == (20, 40, 3)
    assert out[:, :10].max() < 100  # outside the box: dimmed
    assert out[10, 12].mean() < 40 and out[10, 28].mean() > 215  # the map's cold and hot sides
    plain = np.asarray(overlay(image, heat, opacity=0.0))
    assert (plain == 200).all()  # no box and no opacity: the image unchanged


def test_fit_for_display_enlarges_small_images_sharply_and_shrinks_large_ones():
    from vitdemo.attention import fit_for_display
    tiny = Image.new('RGB', (32, 16), (10, 20, 30))
    tiny.putpixel((0, 0), (255, 255, 255))
    big, box = fit_for_display(tiny, (8, 0, 24, 16), side=448)
    assert big.size == (448, 224) and box == (112, 0, 336, 224)
    assert big.getpixel((13, 13)) == (255, 255, 255) and big.getpixel((14, 14)) == (10, 20, 30)  # no blur
    small, box = fit_for_display(Image.new('RGB', (2000, 1000)), (500, 0, 1500, 1000), side=448)
    assert small.size == (448, 224) and box == pytest.approx((112, 0, 336, 224))
