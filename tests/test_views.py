import gradio as gr
import pytest
from PIL import Image

from vitdemo.backends import load_model
from vitdemo.catalog import DEFAULT_SCRATCH
from vitdemo.views import attention_gallery, focus_frame, fusion_mode, parse_fusion, predict_view


def test_parse_fusion_checks_the_head_against_the_model():
    assert parse_fusion('max', 5, num_heads=3) == 'max'
    assert parse_fusion('one head', 3.0, num_heads=3) == 2  # people count heads from 1
    for outside in (0, 4):
        with pytest.raises(ValueError, match='choose a head from 1 to 3'):
            parse_fusion('one head', outside, num_heads=3)
    with pytest.raises(ValueError, match='head fusion must be one of'):
        parse_fusion('median', 0, num_heads=3)
    assert fusion_mode('max') == 'max'
    for bad in ('one head', 2):  # Compare and click-a-patch fuse by a mode, never one head
        with pytest.raises(ValueError, match='head fusion must be one of mean, max, min'):
            fusion_mode(bad)


def test_predict_view_gives_labels_a_gallery_per_layer_and_a_description(weights_dir):
    model = load_model(DEFAULT_SCRATCH, weights_dir)
    labels, gallery, text, *_ = predict_view(model, Image.new('RGB', (900, 300), (120, 30, 60)), top_k=3,
                                         fusion='one head', head=1, opacity=0.5, discard_ratio=0.5)
    assert len(labels) == 3 and set(labels) <= set(model.classes)
    depth = model.module.config.depth
    assert len(gallery) == depth + 2  # input, one per layer, rollout
    captions = [c for _, c in gallery]
    assert captions[0].startswith('input') and captions[1] == 'layer 1 · head 1 of 4'
    assert captions[-1] == f'rollout · all {depth} layers'
    assert all(img.size == (448, 149) for img, _ in gallery)  # the input's own aspect ratio, display size
    assert 'a grid of 4x4 patches of 8x8 pixels' in text and '17 tokens' in text


def test_the_focus_plot_has_one_place_per_layer(weights_dir):
    # a numeric axis over two layers ticks 1, 1.5 and 2 and rounds them to "1 2 2"; categories give one per layer
    pred = load_model(DEFAULT_SCRATCH, weights_dir).predict(Image.new('RGB', (64, 64), (90, 140, 30)))
    plotted = gr.LinePlot(x='layer', y='entropy', color='line').postprocess(focus_frame(pred))
    assert plotted.datatypes['layer'] == 'nominal'
    layers = [row[plotted.columns.index('layer')] for row in plotted.data]
    assert layers == [1, 2, 1, 2]  # this image's line, then the even spread's: layer numbers as they are


def test_gallery_dims_what_the_model_did_not_see(weights_dir):
    pred = load_model(DEFAULT_SCRATCH, weights_dir).predict(Image.new('RGB', (400, 100), (200, 200, 200)))
    first = attention_gallery(pred, 'mean')[0][0]
    assert first.getpixel((10, 50))[0] < 100  # left of the centre square: dimmed
    assert first.getpixel((224, 56)) == (200, 200, 200)  # inside: untouched


def test_one_colour_scale_for_all_layers(weights_dir, monkeypatch):
    """'shared' colours every layer's map between the lowest and highest value of any layer (so a flatter
    layer looks darker than a focused one); 'own' stretches each map to its own range."""
    import numpy as np
    import vitdemo.views as views
    from vitdemo.explain import from_prediction
    from vitdemo.attention import overlay
    half = overlay(Image.new('RGB', (8, 8)), np.array([[0.0, 0.5]]), opacity=1.0, scale=(0.0, 1.0))
    full = overlay(Image.new('RGB', (8, 8)), np.array([[0.0, 0.5]]), opacity=1.0)
    assert np.asarray(half).sum(-1).max() < np.asarray(full).sum(-1).max()

    pred = load_model(DEFAULT_SCRATCH, weights_dir).predict(Image.new('RGB', (64, 64), (120, 30, 60)))
    maps = [m for _, m in from_prediction(pred, 'mean').maps]
    scales = []
    import vitdemo.attention as attention
    real = attention.overlay
    monkeypatch.setattr(attention, 'overlay',
                        lambda *a, scale=None, **k: scales.append(scale) or real(*a, scale=scale, **k))
    views.attention_gallery(pred, 'mean', scale='shared')
    expected = (min(float(m.min()) for m in maps), max(float(m.max()) for m in maps))
    assert scales[1:-1] == [expected] * len(maps) and scales[-1] is None  # the rollout keeps its own range
    scales.clear()
    views.attention_gallery(pred, 'mean', scale='own')
    assert scales == [None] * (len(maps) + 2)
    with pytest.raises(ValueError, match='colour scale must be one of own, shared'):
        views.attention_gallery(pred, 'mean', scale='log')
    bar = views.colour_bar_html('inferno', stops=3)  # inferno runs from near black to pale yellow
    assert 'linear-gradient(to right, #000004, #bc3754, #fcffa4)' in bar and 'dark: less' in bar


def test_runs_side_by_side_by_epoch_or_by_minutes():
    from vitdemo.views import runs_frame
    # the ViT's run stopped half-way through its second epoch; the CNN's checkpoint predates `epochs`
    histories = {'trained/vit': [dict(epoch=1, epochs=1.0, seconds=60, val_accuracy=0.4),
                                 dict(epoch=2, epochs=1.5, seconds=90, val_accuracy=0.5)],
                 'trained/cnn': [dict(epoch=1, seconds=300, val_accuracy=0.45), dict(epoch=2, seconds=600,
                                                                                     val_accuracy=None)]}
    by_epoch = runs_frame(histories)
    assert by_epoch.values.tolist() == [[1, 0.4, 'trained/vit'], [1.5, 0.5, 'trained/vit'],
                                        [1, 0.45, 'trained/cnn']]
    assert runs_frame(histories, 'minutes')['x'].tolist() == [1.0, 1.5, 5.0]
    assert runs_frame({}).empty
    with pytest.raises(ValueError, match="against 'epoch' or 'minutes'"):
        runs_frame(histories, 'steps')


def test_how_far_a_run_got_reads_as_words():
    from vitdemo.metadata import epochs_text
    assert epochs_text([dict(epoch=1, epochs=1.0)]) == '1 epoch'
    assert epochs_text([dict(epoch=1, epochs=1.0), dict(epoch=2, epochs=2.0)]) == '2 epochs'
    assert epochs_text([dict(epoch=1, epochs=0.4583)]) == '0.46 epochs'
    assert epochs_text([dict(epoch=14, epochs=13.42)]) == '13.4 epochs'
    assert epochs_text([dict(epoch=3)]) == '3 epochs'  # a history written before `epochs`
    assert epochs_text([]) == '0 epochs'


def test_the_accuracy_plot_names_the_latest_validation_accuracy():
    from vitdemo.views import accuracy_title
    assert accuracy_title([]) == 'Accuracy'
    assert accuracy_title([dict(epoch=1, epochs=1.0, val_accuracy=0.5)]) == 'Accuracy (validation 50.0% after 1 epoch)'
    # stopped within its third epoch; a run without validation names none
    history = [dict(epoch=1, epochs=1.0, val_accuracy=0.5), dict(epoch=2, epochs=2.0, val_accuracy=0.61),
               dict(epoch=3, epochs=2.25, val_accuracy=0.625)]
    assert accuracy_title(history) == 'Accuracy (validation 62.5% after 2.2 epochs)'
    assert accuracy_title([dict(epoch=1, epochs=1.0, val_accuracy=None)]) == 'Accuracy'
