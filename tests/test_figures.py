import math

import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from vitdemo.backends import DEFAULT_SCRATCH, load_model
from vitdemo.figures import (attention_entropy, inspect_view, mean_attention_distance, mosaic, patch_filters,
                             position_similarity, token_costs)


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
    grid, costs, *figures = inspect_view(model, Image.new('RGB', (64, 48), (90, 140, 200)))
    assert isinstance(grid, Image.Image) and grid.size == (448, 336)
    assert [c['tokens'] for c in costs] == [65, 17, 5, 2]
    assert len(figures) == 4 and all(isinstance(f, Figure) for f in figures)
    for fig in figures:
        assert fig.axes[0].get_title() or fig._suptitle is not None
    assert figures[2].axes[0].get_xlabel() == 'layer'
    dots = figures[2].axes[0].collections
    assert len(dots) == 4 and all(len(d.get_offsets()) == 2 for d in dots)  # one dot per head and layer
