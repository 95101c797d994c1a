"""bench/airbench.py: airbench94's recipe, run on our data to see what a 94% recipe reaches on these images."""
import importlib.util

import torch

from conftest import ROOT
from test_train import colour_data
from vitdemo.data import train_val_split

spec = importlib.util.spec_from_file_location('airbench', ROOT / 'bench' / 'airbench.py')
airbench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(airbench)


def test_the_whitening_layer_whitens_the_patches_it_was_fitted_on():
    """Its first 12 filters give the images' 2x2 patches unit second moments in 12 uncorrelated directions;
    the other 12 are their negatives (GELU keeps both signs), and neither learns."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.randn(64, 1, 16, 16, generator=g).repeat_interleave(2, 2).repeat_interleave(2, 3)
    x = coarse * torch.tensor([1.0, 0.8, -0.5]).view(1, 3, 1, 1) + 0.3 * torch.randn(64, 3, 32, 32, generator=g)
    model = airbench.AirbenchNet()
    model.fit_whitening(x, eps=1e-6)
    w = model.whiten.weight
    out = torch.nn.functional.conv2d(x, w[:12]).permute(0, 2, 3, 1).reshape(-1, 12)
    assert torch.allclose(out.T @ out / len(out), torch.eye(12), atol=1e-3)
    assert torch.equal(w[12:], -w[:12]) and not w.requires_grad


def test_the_recipe_learns_four_colours_and_reports_each_epoch():
    """Three epochs on four noisy colours: the held-out images are told apart, at each level of test-time
    augmentation, and one line is reported per epoch."""
    torch.manual_seed(0)
    train_data, val_data = train_val_split(colour_data(n=400), 80, seed=0)
    lines = []
    model, scores = airbench.run(train_data, val_data, epochs=3, batch_size=32, report=lines.append)
    assert len(lines) == 3 and lines[-1].startswith('epoch 3.0: held-out')
    assert len(scores) == 3 and all(s > 0.9 for s in scores), scores
    assert model.layers[1][2].weight.eq(1).all()  # batch norm's weights stayed 1
