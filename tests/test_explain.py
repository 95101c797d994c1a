"""The explanation interface: every method through `explain`, pinned to a reference computation."""
import pytest
import torch
from PIL import Image

from conftest import ROOT, randomize_
from vitdemo.backends import DEFAULT_SCRATCH, load_model
from vitdemo.cnn import CifarResNet, ResNetConfig
from vitdemo.explain import explain, methods_for, rank_correlation, sanity_check
from vitdemo.views import predict_view, sanity_view
from vitdemo.weights import save_checkpoint

CAT = ROOT / 'examples' / 'cat.jpg'
CLASSES = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']


def reference_relevance(module, x, index):
    """Chefer et al.'s rule written out: attention kept with retain_grad, heads averaged one by one."""
    logits, attentions = module.forward_with_attention(x)
    for a in attentions:
        a.retain_grad()
    logits[0, index].backward()
    tokens = attentions[0].shape[-1]
    r = torch.eye(tokens)
    for a in attentions:
        heads = a.shape[1]
        cam = sum(torch.clamp(a.grad[0, h] * a[0, h], min=0) for h in range(heads)) / heads
        r = r + torch.einsum('ij,jk->ik', cam.detach(), r)
    return r[0]


def test_relevance_matches_the_rule_written_out(weights_dir):
    model = load_model(DEFAULT_SCRATCH, weights_dir)
    for target in ('dog', 2):
        got = explain(model, str(CAT), 'relevance', target)
        pred = model.predict(str(CAT))
        x = model.transform(pred.image).unsqueeze(0)
        index = CLASSES.index(target) if isinstance(target, str) else target
        expected = reference_relevance(model.module, x, index)[1:].reshape(pred.grid)
        torch.testing.assert_close(got.overall[1], expected, atol=1e-5, rtol=1e-4)
        assert got.target == CLASSES[index] and len(got.maps) == model.module.config.depth


def test_relevance_depends_on_the_class_and_attention_does_not(weights_dir):
    model = load_model(DEFAULT_SCRATCH, weights_dir)
    dog, truck = (explain(model, str(CAT), 'relevance', c).overall[1] for c in ('dog', 'truck'))
    assert not torch.allclose(dog, truck)
    attention = explain(model, str(CAT), 'attention', 'dog')
    assert attention.target is None and 'the same for every class' in attention.description
    torch.testing.assert_close(attention.overall[1], explain(model, str(CAT), 'attention', 'truck').overall[1])


def test_gradcam_for_a_chosen_class(tmp_path):
    cnn = randomize_(CifarResNet(ResNetConfig()), seed=5)
    save_checkpoint(tmp_path / 'cnn.safetensors', cnn, CLASSES, mean=[0.5] * 3, std=[0.25] * 3)
    model = load_model(tmp_path / 'cnn.safetensors')
    assert methods_for(model) == ['gradcam']
    pred = model.predict(str(CAT))
    top = explain(model, pred, 'gradcam')  # the predicted class: what predict itself drew
    assert top.target == CLASSES[int(pred.probs.argmax())]
    for (_, m), saliency in zip(top.maps, pred.saliency):
        torch.testing.assert_close(m, saliency)
    other = next(c for c in CLASSES if c != top.target)
    chosen = explain(model, pred, 'gradcam', other)
    assert chosen.target == other and any(not torch.allclose(a, b) for (_, a), (_, b) in zip(top.maps, chosen.maps))


def test_models_offer_what_they_can_and_refuse_the_rest(weights_dir):
    timm_model = load_model('timm/vit_tiny_patch16_224', weights_dir)
    assert methods_for(timm_model) == ['attention']
    with pytest.raises(ValueError, match='relevance needs our ViT code: pick the ours/ twin'):
        explain(timm_model, Image.new('RGB', (64, 64)), 'relevance')
    model = load_model(DEFAULT_SCRATCH, weights_dir)
    with pytest.raises(ValueError, match="'zebra' is not one of this model's 10 classes"):
        explain(model, str(CAT), 'relevance', 'zebra')


def test_the_predict_view_explains_the_chosen_class(weights_dir):
    model = load_model(DEFAULT_SCRATCH, weights_dir)
    labels, gallery, text = predict_view(model, str(CAT), method='relevance', target='ship')
    depth = model.module.config.depth
    assert [c for _, c in gallery][1:] == [f'after layer {i} · ship' for i in range(1, depth + 1)] + \
        [f'relevance · all {depth} layers']
    assert 'for the class **ship**' in text


def test_the_sanity_check_redraws_the_weights_and_leaves_the_model_alone(weights_dir):
    model = load_model(DEFAULT_SCRATCH, weights_dir)
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    trained, randomized, correlation = sanity_check(model, str(CAT), 'relevance', 'ship')
    assert trained.target == randomized.target == 'ship'
    assert correlation < 0.9 and not torch.allclose(trained.overall[1], randomized.overall[1])
    assert all(torch.equal(v, model.module.state_dict()[k]) for k, v in before.items())  # a copy was redrawn
    assert rank_correlation(trained.overall[1], trained.overall[1]) == pytest.approx(1.0)
    assert rank_correlation(trained.overall[1], -trained.overall[1]) == pytest.approx(-1.0)
    gallery, text = sanity_view(model, str(CAT), 'relevance', 'ship')
    assert [c for _, c in gallery][1].startswith('random weights') and 'rank correlation' in text
