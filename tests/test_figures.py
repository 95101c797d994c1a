import math

import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from vitdemo.backends import load_model
from vitdemo.catalog import DEFAULT_SCRATCH
from vitdemo.figures import (attention_entropy, inspect_steps, inspect_view, mean_attention_distance, model_sizes,
                             mosaic, patch_filters, position_similarity, token_costs)
from vitdemo.methods import Stopped


def test_token_costs_grow_with_tokens_squared():
    rows = token_costs(224)
    assert [r['patch_size'] for r in rows] == [4, 8, 16, 32]
    p16 = rows[2]
    assert p16['grid'] == '14x14' and p16['tokens'] == 197 and p16['attention_pairs'] == 197 ** 2
    assert [r['tokens'] for r in token_costs(32, (4, 5, 8))] == [65, 17]  # 5 does not divide 32


def test_position_similarity_is_a_cosine_matrix_over_the_grid():
    pos = torch.randn(1, 1 + 6, 8)
    sim = position_similarity(pos, grid=(2, 3))
    assert sim.shape == (2, 3, 2, 3)
    flat = sim.reshape(6, 6)
    torch.testing.assert_close(flat.diagonal(), torch.ones(6))
    torch.testing.assert_close(flat, flat.T)
    pos[0, 2] = pos[0, 1] * 3  # same direction: similarity 1 whatever the length
    assert position_similarity(pos, grid=(2, 3))[0, 0, 0, 1] == pytest.approx(1.0)


def test_patch_filters_are_orthonormal_principal_components_most_variance_first():
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(3 * 4 * 4, generator=g)
    direction /= direction.norm()
    weights = torch.randn(64, 1, generator=g) * 10 * direction + torch.randn(64, 48, generator=g) * 0.1
    pcs = patch_filters(weights.reshape(64, 3, 4, 4), k=5)
    assert pcs.shape == (5, 3, 4, 4)
    flat = pcs.reshape(5, -1)
    torch.testing.assert_close(flat @ flat.T, torch.eye(5), atol=1e-4, rtol=0)
    assert abs(float(flat[0] @ direction)) > 0.99


def test_mean_attention_distance_in_pixels():
    # a 2x2 grid of 16-pixel patches after one CLS token
    self_only = torch.zeros(1, 1, 5, 5)
    self_only[0, 0, torch.arange(5), torch.arange(5)] = 1.0
    assert mean_attention_distance(self_only, (2, 2), 16).item() == 0.0
    uniform = torch.full((1, 2, 5, 5), 0.2)  # CLS gets a share too: it is left out and the rest renormalised
    expected = (0 + 16 + 16 + 16 * math.sqrt(2)) / 4
    torch.testing.assert_close(mean_attention_distance(uniform, (2, 2), 16), torch.full((1, 2), expected))


def test_attention_entropy_from_focused_to_spread():
    focused = torch.zeros(2, 1, 5, 5)
    focused[:, :, :, 1] = 1.0
    assert attention_entropy(focused).abs().max() < 1e-6
    uniform = torch.full((1, 3, 5, 5), 0.2)
    torch.testing.assert_close(attention_entropy(uniform), torch.full((1, 3), math.log(4)))


def test_mosaic_separates_tiles():
    out = mosaic(torch.ones(2, 3, 4, 4))
    assert out.shape == (10, 15)
    assert math.isnan(out[4, 0]) and out[0, 0] == 1.0


def test_inspect_view_gives_the_grid_costs_and_four_figures(weights_dir):
    model = load_model(DEFAULT_SCRATCH, weights_dir)  # 32x32 input, 8x8 patches, 2 layers x 4 heads
    view = inspect_view(model, Image.new('RGB', (64, 48), (90, 140, 200)))
    assert isinstance(view.grid, Image.Image) and view.grid.size == (448, 336)
    assert view.costs == [[4, '8x8', 65, 4225], [8, '4x4', 17, 289], [16, '2x2', 5, 25], [32, '1x1', 2, 4]]
    figures = [view.positions, view.filters, view.distance, view.entropy, view.faithfulness]
    assert all(isinstance(f, Figure) for f in figures) and view.note == ''
    assert view.sizes[-1][0] == 'this model'
    for fig in figures:
        assert fig.axes[0].get_title() or fig._suptitle is not None
    assert figures[2].axes[0].get_xlabel() == 'layer'
    dots = figures[2].axes[0].collections
    assert len(dots) == 4 and all(len(d.get_offsets()) == 2 for d in dots)  # one dot per head and layer
    # this barely trained model's heads are all alike: the axes start at 0, with no offset notation that
    # would spread alike heads over the whole height, and entropy reaches its even-spread bound, log(16)
    distance, entropy = figures[2].axes[0], figures[3].axes[0]
    for fig in figures[2:4]:
        FigureCanvasAgg(fig).draw()
    for ax in (distance, entropy):
        assert ax.get_ylim()[0] == 0 and ax.yaxis.get_offset_text().get_text() == ''
    assert [line.get_ydata()[0] for line in entropy.lines] == [pytest.approx(math.log(16))]
    assert entropy.get_ylim()[1] > math.log(16)


def test_the_paper_sizes_at_this_input_and_this_models_own_counts(weights_dir):
    tiny = load_model('timm/vit_tiny_patch16_224', weights_dir)
    rows = model_sizes(tiny)
    assert [r[0] for r in rows] == ['ViT-Ti/16', 'ViT-S/16', 'ViT-B/16', 'ViT-L/16', 'ViT-H/16',
                                    'this model']
    base = rows[2]  # model, params (M), GMACs, layers, width, heads, MLP
    assert base[3:] == [12, 768, 12, 3072] and base[1] == pytest.approx(86.6, abs=0.1)
    assert base[2] == pytest.approx(17.56, abs=0.05)  # the ViT-B/16 multiply-adds timm reports (17.6 G)
    assert rows[-1][1:] == rows[0][1:]  # timm's ViT-Ti is the paper's Ti, counted from the module itself
    small = model_sizes(load_model(DEFAULT_SCRATCH, weights_dir))  # 32 px, patch 8: 16 tokens
    assert small[0][0] == 'ViT-Ti/8' and small[-1][3:] == [2, 64, 4, 128]
    assert small[2][2] < base[2] / 10  # the same network sees 17 tokens instead of 197


def test_patch_at_maps_a_click_to_the_patch_under_it():
    from vitdemo.figures import patch_at
    box = (100, 0, 300, 200)  # a 2x4 grid of 50x100-pixel... cells: rows 2, cols 4
    assert patch_at((100, 0), box, (2, 4)) == 0
    assert patch_at((299, 199), box, (2, 4)) == 7
    assert patch_at((160, 120), box, (2, 4)) == 4 + 1
    assert patch_at((50, 50), box, (2, 4)) is None and patch_at((300, 50), box, (2, 4)) is None


def test_token_attention_is_that_patch_row_over_the_patches():
    from vitdemo.figures import token_attention
    a = torch.zeros(2, 2, 5, 5)
    a[1, 0, 3, 4] = 1.0  # layer 2, head 1: patch 2 (token 3) looks at patch 3 (token 4)
    a[1, 1, 3, 1] = 1.0  # head 2: at patch 0
    assert token_attention(a, 2, 1, (2, 2), fusion=0).tolist() == [[0, 0], [0, 1]]
    assert token_attention(a, 2, 1, (2, 2), fusion='mean').tolist() == [[0.5, 0], [0, 0.5]]
    with pytest.raises(AssertionError, match='layer 3 out of range'):
        token_attention(a, 0, 2, (2, 2))


def test_patch_view_outlines_the_clicked_patch(weights_dir):
    from vitdemo.figures import patch_view
    model = load_model(DEFAULT_SCRATCH, weights_dir)  # 4x4 patches over a centred square
    image = Image.new('RGB', (200, 100), (50, 50, 50))  # shown as 448x224, the square is x 112..336
    picture, caption = patch_view(model, image, (113, 1), layer=2)
    assert picture.size == (448, 224) and caption.startswith('patch (row 1, column 1) in layer 2')
    assert picture.getpixel((112, 30)) == (0, 255, 255)  # the outline
    with pytest.raises(ValueError, match='inside the bright square'):
        patch_view(model, image, (10, 10), layer=1)
    with pytest.raises(ValueError, match='choose a layer from 1 to 2'):
        patch_view(model, image, (200, 100), layer=7)
    # before any click: the patch at the grid's centre, outlined where it lies (x 224..280, y 112..168)
    centre, caption = patch_view(model, image, None, layer=1)
    assert caption.startswith('patch (row 3, column 3) (the centre: click any patch in the grid) in layer 1')
    assert centre.getpixel((224, 140)) == (0, 255, 255) and centre.getpixel((112, 30)) != (0, 255, 255)
    # Inspect draws the same look from its own forward pass; a click outside the square is the centre there,
    # and a layer past this model's (the slider of the model before) its last
    look, caption = inspect_view(model, image, point=(113, 1), layer=2).patch
    assert caption.startswith('patch (row 1, column 1) in layer 2') and look.tobytes() == picture.tobytes()
    _, caption = inspect_view(model, image, point=(10, 10), layer=7).patch
    assert caption.startswith('patch (row 3, column 3) (the centre: click any patch in the grid) in layer 2')


def test_inspect_view_of_a_conv_stem_model_shows_its_first_convolution(tmp_path):
    from dataclasses import replace

    from conftest import TINY_CIFAR, randomize_
    from vitdemo.model import VisionTransformer
    from vitdemo.weights import save_checkpoint
    module = randomize_(VisionTransformer(replace(TINY_CIFAR, patch_size=4, stem='conv')))
    path = save_checkpoint(tmp_path / 'conv.safetensors', module, [str(i) for i in range(10)], [0.5] * 3, [0.25] * 3)
    model = load_model(path)
    assert model.grid == (8, 8)
    view = inspect_view(model, Image.new('RGB', (40, 40), (200, 30, 30)))
    assert "conv stem's first 3x3 filters" in view.filters._suptitle.get_text()
    first_conv = module.patch_embed.backbone[0].out_channels  # as many components as it has filters
    assert sum(ax.has_data() for ax in view.filters.axes) == first_conv
    assert view.costs[0][:3] == [4, '8x8', 65]


def test_inspect_gives_its_figures_before_the_faithfulness_test_starts(weights_dir):
    model = load_model('timm/vit_tiny_patch16_224', weights_dir)  # at 224 px the test is slow work
    told = []
    steps = inspect_steps(model, Image.new('RGB', (32, 32), (90, 140, 200)), progress=told.append)
    figures = next(steps)
    assert not told and figures.faithfulness is None and figures.note == ''
    assert all(isinstance(f, Figure) for f in (figures.positions, figures.filters, figures.distance, figures.entropy))
    tested = next(steps)
    assert told and isinstance(tested.faithfulness, Figure) and tested.note == ''
    assert tested._replace(faithfulness=None) == figures  # the same figures, not drawn again
    assert next(steps, None) is None


def test_a_stopped_faithfulness_test_loses_only_its_own_figure(weights_dir):
    model = load_model('timm/vit_tiny_patch16_224', weights_dir)  # at 224 px the test is slow work
    told = []

    def stop_after_the_first_map(share):
        told.append(share)
        if len(told) > 1:
            raise Stopped('the faithfulness test stopped at 20%, as asked')
    view = inspect_view(model, Image.new('RGB', (32, 32), (90, 140, 200)), progress=stop_after_the_first_map)
    assert view.faithfulness is None and len(told) == 2
    assert view.note.startswith('**No faithfulness test this time:** the faithfulness test stopped at 20%, as asked.')
    assert isinstance(view.grid, Image.Image) and view.sizes[-1][0] == 'this model'
    assert all(isinstance(f, Figure) for f in (view.positions, view.filters, view.distance, view.entropy))


def test_a_small_inputs_faithfulness_test_is_fast_work_that_reports_nothing(weights_dir):
    model = load_model(DEFAULT_SCRATCH, weights_dir)  # 32 px: seconds, slow methods included

    def refuse(share):
        raise Stopped('the slots for slow work are taken')
    view = inspect_view(model, Image.new('RGB', (32, 32), (90, 140, 200)), progress=refuse)
    assert isinstance(view.faithfulness, Figure) and view.note == ''
    assert any('Shapley' in text.get_text() for text in view.faithfulness.legends[0].get_texts())