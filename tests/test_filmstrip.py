"""Attention through training: the maps each epoch, kept in the checkpoint, drawn as a filmstrip."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from test_train import CONFIG, NARROW_CNN, colour_data
from vitdemo.data import normalize
from vitdemo.filmstrip import MAX_COLUMNS, Filmstrip, filmstrip_figure
from vitdemo.model import ViTConfig
from vitdemo.train import TrainConfig, train
from vitdemo.weights import build_model, read_metadata


@pytest.mark.parametrize('pool', ['token', 'avg'])
def test_each_layers_map_is_where_the_cls_token_looks_scaled_to_its_peak(pool):
    torch.manual_seed(0)
    model = build_model(ViTConfig(**{**CONFIG.to_dict(), 'global_pool': pool}))
    data = colour_data(n=8)
    mean, std = data.mean_std()
    strip = Filmstrip.of(data, 3)
    strip.record(model, mean, std, epoch=1)
    assert strip.maps[0].shape == (3, CONFIG.depth, 4, 4) and strip.maps[0].dtype == np.uint8
    assert strip.epochs == [1] and strip.labels == data.labels[:3].tolist()
    with torch.no_grad():
        logits, attentions = model.eval().forward_with_attention(normalize(data.images[:3], mean, std))
    assert strip.predicted == [logits.argmax(1).tolist()]
    for layer, a in enumerate(attentions):  # written out for the second image: mean over heads, then its row
        a = a[1].mean(0)
        expected = a[0, 1:] if pool == 'token' else a[1:, 1:].mean(0)  # mean-pooled: what each patch receives
        expected = (expected / expected.max() * 255).reshape(4, 4)
        assert np.abs(strip.maps[0][1, layer] - expected.numpy()).max() <= 0.5 + 1e-3


def test_a_run_keeps_its_filmstrip_in_the_checkpoint_small_and_the_cnn_none(tmp_path):
    data = colour_data(n=256)
    cfg = TrainConfig(epochs=3, minutes=None, batch_size=64, val_size=64)
    seen = []
    train(CONFIG, cfg, data, out=tmp_path / 'vit.safetensors',
          on_event=lambda e: e.kind == 'epoch' and seen.append(list(e.filmstrip.epochs)))
    assert seen == [[1], [1, 2], [1, 2, 3]]  # each epoch's event carries the strip so far
    kept = read_metadata(tmp_path / 'vit.safetensors')['filmstrip']
    assert len(json.dumps(kept)) < 30_000
    strip = Filmstrip.from_metadata(json.loads(json.dumps(kept)))
    assert strip.epochs == [1, 2, 3] and len(strip.maps) == 3 and strip.images.shape == (4, 32, 32, 3)
    assert not np.array_equal(strip.maps[0], strip.maps[2])  # the attention moved as the model learned
    train(NARROW_CNN, replace(cfg, epochs=1), data, out=tmp_path / 'cnn.safetensors')
    assert 'filmstrip' not in read_metadata(tmp_path / 'cnn.safetensors')


def test_the_figure_draws_a_row_per_layer_and_at_most_ten_epochs_the_last_among_them():
    rng = np.random.default_rng(0)
    strip = Filmstrip(rng.integers(0, 255, (2, 32, 32, 3), dtype=np.uint8), [0, 1])
    for epoch in range(1, 26):
        strip.epochs.append(epoch)
        strip.maps.append(rng.integers(0, 255, (2, 3, 8, 8), dtype=np.uint8))
        strip.predicted.append([0, 0])
    fig = filmstrip_figure(strip, 1, ['cat', 'dog'])
    axes = fig.get_axes()
    assert len(axes) == 3 * MAX_COLUMNS
    titles = [ax.get_title() for ax in axes if ax.get_title()]
    assert titles[0] == 'epoch 1\ncat ✗' and titles[-1] == 'epoch 25\ncat ✗' and len(titles) == MAX_COLUMNS
    assert 'a dog' in fig._suptitle.get_text()
    with pytest.raises(ValueError, match='choose 1 to 2'):
        filmstrip_figure(strip, 2, ['cat', 'dog'])
