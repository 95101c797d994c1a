import pytest
from PIL import Image

from vitdemo.backends import DEFAULT_SCRATCH, load_model
from vitdemo.views import attention_gallery, parse_fusion, predict_view


def test_parse_fusion_checks_the_head_against_the_model():
    assert parse_fusion('max', 5, num_heads=3) == 'max'
    assert parse_fusion('one head', 3.0, num_heads=3) == 2  # people count heads from 1
    for outside in (0, 4):
        with pytest.raises(ValueError, match='choose a head from 1 to 3'):
            parse_fusion('one head', outside, num_heads=3)
    with pytest.raises(ValueError, match='head fusion must be one of'):
        parse_fusion('median', 0, num_heads=3)


def test_predict_view_gives_labels_a_gallery_per_layer_and_a_description(weights_dir):
    model = load_model(DEFAULT_SCRATCH, weights_dir)
    labels, gallery, text = predict_view(model, Image.new('RGB', (900, 300), (120, 30, 60)), top_k=3,
                                         fusion='one head', head=1, opacity=0.5, discard_ratio=0.5)
    assert len(labels) == 3 and set(labels) <= set(model.classes)
    depth = model.module.config.depth
    assert len(gallery) == depth + 2  # input, one per layer, rollout
    captions = [c for _, c in gallery]
    assert captions[0].startswith('input') and captions[1] == 'layer 1 · head 1 of 4'
    assert captions[-1] == f'rollout · all {depth} layers'
    assert all(img.size == (448, 149) for img, _ in gallery)  # the input's own aspect ratio, display size
    assert '4x4 patches' in text and '17 tokens' in text


def test_gallery_dims_what_the_model_did_not_see(weights_dir):
    pred = load_model(DEFAULT_SCRATCH, weights_dir).predict(Image.new('RGB', (400, 100), (200, 200, 200)))
    first = attention_gallery(pred, 'mean')[0][0]
    assert first.getpixel((10, 50))[0] < 100  # left of the centre square: dimmed
    assert first.getpixel((224, 56)) == (200, 200, 200)  # inside: untouched
