import numpy as np
import pytest
import torch
from PIL import Image

from vitdemo.backends import load_model
from vitdemo.catalog import DEFAULT_SCRATCH, imagenet_classes
from vitdemo.compare import (IMAGENET_TO_CIFAR10, OTHER, agreement, agreement_words, align_layers, compare_view,
                             image_space, imagenet_to_cifar10, left_out, top_mass)


def test_the_imagenet_table_names_what_it_claims():
    names = imagenet_classes()
    assert {names[i] for i in IMAGENET_TO_CIFAR10['cat']} == {'tabby', 'tiger cat', 'Persian cat', 'Siamese cat',
                                                              'Egyptian cat'}
    assert names[IMAGENET_TO_CIFAR10['dog'][0]] == 'Chihuahua' and names[IMAGENET_TO_CIFAR10['dog'][-1]] == \
        'Mexican hairless' and len(IMAGENET_TO_CIFAR10['dog']) == 118
    assert names[339] == 'sorrel' and 'airliner' in {names[i] for i in IMAGENET_TO_CIFAR10['airplane']}
    assert 717 not in sum(IMAGENET_TO_CIFAR10.values(), [])  # pickup: neither automobile nor truck in CIFAR-10
    every = sum(IMAGENET_TO_CIFAR10.values(), [])
    assert len(every) == len(set(every))  # no ImageNet class counted twice


def test_imagenet_probabilities_sum_into_cifar_classes():
    probs = torch.zeros(1000)
    probs[[151, 200, 268]] = 0.2  # three dog breeds
    probs[281] = 0.1  # tabby
    probs[717] = 0.3  # pickup: no CIFAR class
    mapped = imagenet_to_cifar10(probs)
    assert mapped['dog'] == pytest.approx(0.6) and mapped['cat'] == pytest.approx(0.1)
    assert mapped[OTHER] == pytest.approx(0.3) and sum(mapped.values()) == pytest.approx(1.0)


def test_layers_are_paired_by_relative_depth():
    assert align_layers(6, 12) == [(0, 1), (1, 3), (2, 5), (3, 7), (4, 9), (5, 11)]
    assert align_layers(12, 6) == [(1, 0), (3, 1), (5, 2), (7, 3), (9, 4), (11, 5)]
    assert align_layers(4, 4) == [(0, 0), (1, 1), (2, 2), (3, 3)]


def test_image_space_places_the_map_on_its_box_and_keeps_mass():
    heat = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    out = image_space(heat, box=(32, 0, 96, 64), image_size=(128, 64), side=64)
    assert out.shape == (32, 64)
    assert out[:, :16].sum() == 0 and out[:, 48:].sum() == 0  # outside the box: nothing
    assert out[0:16, 32:48].min() > 0 and out.sum() == pytest.approx(1.0)


def test_top_mass_keeps_the_fewest_strongest_cells():
    m = np.array([[5.0, 1.0], [3.0, 1.0]])
    assert top_mass(m, 0.5).tolist() == [[True, False], [False, False]]
    assert top_mass(m, 0.8).tolist() == [[True, False], [True, False]]


def test_agreement_of_a_model_with_itself_is_one(weights_dir):
    pred = load_model(DEFAULT_SCRATCH, weights_dir).predict(Image.new('RGB', (40, 30), (9, 99, 199)))
    heat = torch.rand(*pred.grid)
    assert agreement(pred, heat, pred, heat) == 1.0
    flipped = heat.flip(0).flip(1)
    assert agreement(pred, heat, pred, flipped) < 1.0


def test_compare_a_cifar_model_with_an_imagenet_model(weights_dir):
    cifar = load_model(DEFAULT_SCRATCH, weights_dir)  # 2 layers
    imagenet = load_model('timm/vit_tiny_patch16_224', weights_dir)  # 12 layers
    scores_a, scores_b, gallery, text = compare_view(cifar, imagenet, Image.new('RGB', (300, 200), (200, 90, 20)))
    assert len(scores_a) == 5 and set(scores_a) <= set(cifar.classes)
    assert set(scores_b) == set(IMAGENET_TO_CIFAR10) | {OTHER}  # mapped onto CIFAR-10
    first_iou = float(text.split('per pair: ')[1][:4])
    assert [c for _, c in gallery][:2] == ['A layer 1', f'B layer 6 · {agreement_words(first_iou)}']
    assert "Not shown: B's layers 1, 2, 3, 4, 5, 7, 8, 9, 10, 11 (no partner at their depth)." in text
    assert len(gallery) == 2 * 2 + 2 and gallery[-1][1].startswith('B rollout')

    assert 'summed into CIFAR-10 classes' in text
    _, plain_b, _, text = compare_view(cifar, imagenet, np.zeros((20, 20, 3), np.uint8), as_cifar10=False, top_k=3)
    assert len(plain_b) == 3 and 'summed' not in text


def test_agreement_in_words_and_the_layers_left_out():
    assert [agreement_words(v) for v in (0.05, 0.2, 0.4, 0.8)] == \
        ['look elsewhere', 'overlap a little', 'overlap a lot', 'look at the same place']
    assert left_out(12, [a for _, a in align_layers(6, 12)]) == [1, 3, 5, 7, 9, 11]
    assert left_out(6, [a for a, _ in align_layers(6, 12)]) == []
