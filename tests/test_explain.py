"""The explanation interface: every method through `explain`, pinned to a reference computation."""
import math
import threading
from dataclasses import replace

import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY_CIFAR, randomize_
from vitdemo.backends import load_model
from vitdemo.catalog import DEFAULT_SCRATCH
from vitdemo.cnn import CifarConvNet, CifarResNet, ConvNetConfig, ResNetConfig
from vitdemo.explain import explain, focus, mass_mask, methods_for, rank_correlation, sanity_check, twin
from vitdemo.methods import METHODS, Stopped
from vitdemo.model import VisionTransformer
from vitdemo.views import Explanations, StillMaking, predict_view, sanity_view
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
    assert methods_for(model)[0] == 'gradcam'
    pred = model.predict(str(CAT))
    top = explain(model, pred, 'gradcam')  # the predicted class: what predict itself drew
    assert top.target == CLASSES[int(pred.probs.argmax())]
    for (_, m), saliency in zip(top.maps, pred.saliency):
        torch.testing.assert_close(m, saliency)
    other = next(c for c in CLASSES if c != top.target)
    chosen = explain(model, pred, 'gradcam', other)
    assert chosen.target == other and any(not torch.allclose(a, b) for (_, a), (_, b) in zip(top.maps, chosen.maps))


@pytest.mark.parametrize('cnn', [CifarResNet(ResNetConfig()), CifarConvNet(ConvNetConfig())],
                         ids=['resnet18', 'convnet'])
def test_every_method_a_cnn_offers_answers(cnn, tmp_path):
    """Each CNN through every method it is offered: a map per stage or one map, on its own grid, for the class."""
    save_checkpoint(tmp_path / 'cnn.safetensors', randomize_(cnn, seed=3), CLASSES, mean=[0.5] * 3, std=[0.25] * 3)
    model = load_model(tmp_path / 'cnn.safetensors')
    pred = model.predict(str(CAT))
    for method in methods_for(model):
        got = explain(model, pred, method, 'ship')
        class_free = 'the same for every class' in got.description  # EigenCAM
        assert got.target == (None if class_free else 'ship') and got.maps, method
        assert all(m.ndim == 2 and torch.isfinite(m).all() for _, m in got.maps), method


def test_models_offer_what_they_can_and_refuse_the_rest(weights_dir, tmp_path):
    timm_model = load_model('timm/vit_tiny_patch16_224', weights_dir)
    assert methods_for(timm_model) == ['attention', 'heads', 'relevance', 'gradcam', 'gradcam++', 'scorecam',
                                       'eigencam', 'ig', 'shapley', 'occlusion']
    assert 'tokens' in methods_for(load_model('timm/deit_small_distilled_patch16_224', weights_dir))
    cnn = randomize_(CifarResNet(ResNetConfig()), seed=5)
    save_checkpoint(tmp_path / 'cnn.safetensors', cnn, CLASSES, mean=[0.5] * 3, std=[0.25] * 3)
    cnn_methods = methods_for(load_model(tmp_path / 'cnn.safetensors'))
    assert cnn_methods[0] == 'gradcam' and not {'attention', 'heads', 'relevance', 'tokens'} & set(cnn_methods)
    with pytest.raises(ValueError, match="offers attention, heads.*not 'tokens'"):
        explain(timm_model, Image.new('RGB', (64, 64)), 'tokens')
    model = load_model(DEFAULT_SCRATCH, weights_dir)
    with pytest.raises(ValueError, match="'zebra' is not one of this model's 10 classes"):
        explain(model, str(CAT), 'relevance', 'zebra')


def test_relevance_of_timm_code_equals_relevance_of_ours_on_the_same_weights(weights_dir):
    image = Image.open(ROOT / 'examples' / 'coffee.jpg')
    theirs, ours = (explain(load_model(f'{kind}/vit_tiny_patch16_224', weights_dir), image, 'relevance', 'espresso')
                    for kind in ('timm', 'ours'))
    for (_, a), (_, b) in zip(theirs.maps, ours.maps):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-3)
    assert theirs.target == 'espresso' and len(theirs.maps) == 12


def normalised(m):
    m = torch.as_tensor(m, dtype=torch.float32)
    return (m - m.min()) / (m.max() - m.min()).clamp_min(1e-7)


def test_hand_written_cnn_gradcam_matches_pytorch_grad_cam_at_every_stage(tmp_path):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    cnn = randomize_(CifarResNet(ResNetConfig()), seed=7)
    save_checkpoint(tmp_path / 'cnn.safetensors', cnn, CLASSES, mean=[0.5] * 3, std=[0.25] * 3)
    model = load_model(tmp_path / 'cnn.safetensors')
    pred = model.predict(str(CAT))
    ours = explain(model, pred, 'gradcam', 'ship')
    x = model.transform(pred.image).unsqueeze(0)
    stages = [model.module.layer1, model.module.layer2, model.module.layer3, model.module.layer4]
    for (caption, m), stage in zip(ours.maps, stages):
        cam = GradCAM(model=model.module, target_layers=[stage])
        cam.get_target_width_height = lambda _, m=m: m.shape[::-1]  # the stage's own size: no resizing
        theirs = cam(input_tensor=x, targets=[ClassifierOutputTarget(CLASSES.index('ship'))])[0]
        cam.activations_and_grads.release()
        torch.testing.assert_close(normalised(m), normalised(theirs), atol=1e-4, rtol=1e-3, msg=caption)


def last_block_gradcam(module, x, index, prefix):
    """Grad-CAM on a ViT's last block written out: the gradient of the class score at the last block's first
    norm, averaged over the patch tokens, weights that norm's channels; negatives dropped."""
    kept = {}
    handle = module.blocks[-1].norm1.register_forward_hook(lambda m, i, o: kept.update(tokens=o))
    with torch.enable_grad():
        logits = module(x)
        grad, = torch.autograd.grad(logits[0, index], kept['tokens'])
    handle.remove()
    tokens, grad = kept['tokens'][0, prefix:].detach(), grad[0, prefix:]
    return torch.relu((tokens * grad.mean(0)).sum(-1))


def test_vit_gradcam_through_the_library_is_grad_cam_on_the_last_block_tokens(weights_dir):
    model = load_model(DEFAULT_SCRATCH, weights_dir)
    pred = model.predict(str(CAT))
    got = explain(model, pred, 'gradcam', 'dog')
    expected = last_block_gradcam(model.module, model.transform(pred.image)[None], CLASSES.index('dog'), 1)
    torch.testing.assert_close(normalised(got.overall[1]), normalised(expected.reshape(pred.grid)), atol=1e-4,
                               rtol=1e-3)
    assert got.target == 'dog' and got.overall[1].shape == pred.grid


def test_the_other_cams_run_on_a_vit_and_a_cnn_and_eigencam_ignores_the_class(weights_dir, tmp_path):
    vit = load_model(DEFAULT_SCRATCH, weights_dir)
    pred = vit.predict(str(CAT))
    for method in ('gradcam++', 'scorecam', 'eigencam'):
        heat = explain(vit, pred, method, 'dog').overall[1]
        assert heat.shape == pred.grid and torch.isfinite(heat).all()
    shipped = load_model(ROOT / 'weights' / 'vit_cifar10.safetensors')  # a trained model: its classes differ
    a, b = (explain(shipped, str(CAT), 'scorecam', c).overall[1] for c in ('cat', 'truck'))
    assert a.max() > 0 and not torch.allclose(a, b)
    save_checkpoint(tmp_path / 'cnn.safetensors', randomize_(CifarResNet(ResNetConfig()), seed=5), CLASSES,
                    mean=[0.5] * 3, std=[0.25] * 3)
    cnn = load_model(tmp_path / 'cnn.safetensors')
    pred = cnn.predict(str(CAT))
    a, b = (explain(cnn, pred, 'gradcam++', c).overall[1] for c in ('dog', 'truck'))
    assert a.shape == pred.grid and a.max() > 0 and not torch.allclose(a, b)
    a, b = (explain(cnn, pred, 'eigencam', c) for c in ('dog', 'truck'))
    assert a.target is None and a.overall[1].max() > 0 and torch.equal(a.overall[1], b.overall[1])


def probability(model, x, index):
    with torch.no_grad():
        return float(model.module(x).softmax(-1)[0, index])


def test_integrated_gradients_add_up_to_the_change_in_probability(weights_dir):
    """Completeness (Sundararajan et al. 2017): the attributions sum to p(image) - p(blank image)."""
    model = load_model(DEFAULT_SCRATCH, weights_dir)
    pred = model.predict(str(CAT))
    e = explain(model, pred, 'ig', 'cat')
    x = model.transform(pred.image)[None]
    change = probability(model, x, 3) - probability(model, torch.zeros_like(x), 3)
    assert float(e.maps[0][1].sum()) == pytest.approx(change, abs=0.02 * abs(change) + 1e-4)
    assert float(e.overall[1].sum()) == pytest.approx(float(e.maps[0][1].sum()), abs=1e-5)  # patches sum pixels
    assert e.maps[0][1].shape == (32, 32) and e.overall[1].shape == pred.grid


def test_occlusion_is_the_drop_in_probability_when_one_patch_is_blanked(weights_dir):
    model = load_model(DEFAULT_SCRATCH, weights_dir)
    pred = model.predict(str(CAT))
    drop = explain(model, pred, 'occlusion', 'cat').overall[1]
    x = model.transform(pred.image)[None]
    for r, c in [(0, 0), (1, 2), (3, 3)]:
        blanked = x.clone()
        blanked[..., r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] = 0
        assert float(drop[r, c]) == pytest.approx(probability(model, x, 3) - probability(model, blanked, 3),
                                                  abs=1e-5)


def test_shapley_values_of_the_patches_add_up_to_the_change_in_probability(weights_dir):
    """Efficiency: every sampled order's contributions telescope, so they sum to p(image) - p(blank)."""
    model = load_model(DEFAULT_SCRATCH, weights_dir)
    pred = model.predict(str(CAT))
    values = explain(model, pred, 'shapley', 'cat').overall[1]
    x = model.transform(pred.image)[None]
    assert float(values.sum()) == pytest.approx(probability(model, x, 3) - probability(model, torch.zeros_like(x), 3),
                                                abs=1e-4)


def test_every_head_of_a_layer_and_dinos_threshold(weights_dir):
    model = load_model(DEFAULT_SCRATCH, weights_dir)
    pred = model.predict(str(CAT))
    e = explain(model, pred, 'heads', layer=1)
    assert [c for c, _ in e.maps] == [f'layer 1 · head {h}' for h in range(1, 5)] and e.target is None
    for h, (_, m) in enumerate(e.maps):
        torch.testing.assert_close(m, pred.attentions[0, h, 0, 1:].reshape(pred.grid))
    cut = explain(model, pred, 'heads', layer=2, keep=0.6)
    for h, (_, m) in enumerate(cut.maps):
        full = pred.attentions[1, h, 0, 1:]
        kept = m.flatten() > 0
        assert full[kept].sum() >= 0.6 * full.sum() - 1e-6  # the kept patches hold the share asked for
        assert full[kept].sum() - full[kept].min() < 0.6 * full.sum() + 1e-6  # and none of them is spare
    assert mass_mask(torch.tensor([0.5, 0.3, 0.1, 0.1]), 0.6).tolist() == [1, 1, 0, 0]
    with pytest.raises(ValueError, match='this model has 2 layers: choose a layer from 1 to 2'):
        explain(model, pred, 'heads', layer=3)


def test_deits_two_tokens_side_by_side(weights_dir):
    model = load_model('timm/deit_small_distilled_patch16_224', weights_dir)
    pred = model.predict(str(CAT))
    e = explain(model, pred, 'tokens')
    assert e.paired and e.target is None and len(e.maps) == 2 * 12 + 2
    assert [c for c, _ in e.maps[:2]] == ['layer 1 · CLS', 'layer 1 · distillation']
    fused = pred.attentions.mean(1)
    torch.testing.assert_close(e.maps[22][1], fused[11, 0, 2:].reshape(14, 14))
    torch.testing.assert_close(e.maps[23][1], fused[11, 1, 2:].reshape(14, 14))
    assert not torch.allclose(e.maps[22][1], e.maps[23][1])


def test_a_mean_pooled_vit_is_not_explained_by_its_cls_token(tmp_path):
    vit = randomize_(VisionTransformer(replace(TINY_CIFAR, global_pool='avg')), seed=11)
    save_checkpoint(tmp_path / 'avg.safetensors', vit, CLASSES, mean=[0.5] * 3, std=[0.25] * 3)
    model = load_model(tmp_path / 'avg.safetensors')
    pred = model.predict(str(CAT))
    attention = explain(model, pred, 'attention')
    assert 'mean of its patch tokens' in attention.description
    torch.testing.assert_close(attention.maps[0][1], pred.attentions[0].mean(0)[1:, 1:].mean(0).reshape(pred.grid))
    x = model.transform(pred.image)[None]
    logits, attentions = vit.forward_with_attention(x)
    for a in attentions:
        a.retain_grad()
    logits[0, 5].backward()
    r = torch.eye(17)
    for a in attentions:
        r = r + (a.grad[0] * a[0]).clamp(min=0).mean(0).detach() @ r
    got = explain(model, pred, 'relevance', 'dog').overall[1]
    torch.testing.assert_close(got, r[1:, 1:].mean(0).reshape(pred.grid), atol=1e-5, rtol=1e-4)


def test_a_slow_method_reports_progress_and_stops_when_told(weights_dir):
    model = load_model('timm/vit_tiny_patch16_224', weights_dir)
    pred = model.predict(str(CAT))
    seen = []

    def stop_at_half(share):
        seen.append(share)
        if share >= 0.5:
            raise Stopped('stopped')
    with pytest.raises(Stopped):
        explain(model, pred, 'occlusion', progress=stop_at_half)
    assert seen == sorted(seen) and seen[0] == 0 and 0.5 <= seen[-1] < 1
    shares = []
    explain(model, pred, 'scorecam', progress=shares.append)
    assert len(shares) > 3 and shares == sorted(shares)
    # the libraries worked on a twin: no hooks and no gradients were left on the shared model
    assert not any(m._forward_hooks or m._backward_hooks for m in model.module.modules()
                   if not m.__class__.__name__ == 'Dropout')
    assert all(p.grad is None for p in model.module.parameters())


def test_a_twin_shares_the_weights_and_nothing_else(weights_dir):
    module = load_model(DEFAULT_SCRATCH, weights_dir).module
    copy_ = twin(module)
    handle = copy_.blocks[0].register_forward_hook(lambda *a: None)
    assert not module.blocks[0]._forward_hooks and copy_.blocks[0] is not module.blocks[0]
    handle.remove()
    for (name, p), q in zip(module.named_parameters(), copy_.parameters(recurse=True)):
        assert p.data_ptr() == q.data_ptr() and not q.requires_grad, name
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(copy_(x), module(x))


def test_focus_is_the_entropy_of_the_cls_attention_or_of_what_the_patches_receive(weights_dir):
    pred = load_model(DEFAULT_SCRATCH, weights_dir).predict(str(CAT))
    uniform, peaked = torch.full((17,), 1 / 17), torch.zeros(17)
    peaked[5] = 1.0
    pred.attentions = torch.stack([uniform, peaked])[:, None, None, :].expand(2, 4, 17, 17)
    assert focus(pred) == pytest.approx([math.log(16), 0.0], abs=1e-5)
    # a mean-pooled ViT's maps are what the patches receive: here every patch token looks at patch 4 in the
    # first layer, and the CLS token's even spread no longer counts
    pred.pooling = 'avg'
    received = torch.zeros(17, 17)
    received[:, 5] = 1.0
    received[0] = 1 / 17
    pred.attentions = torch.stack([received, torch.full((17, 17), 1 / 17)])[:, None].expand(2, 4, 17, 17)
    assert focus(pred) == pytest.approx([0.0, math.log(16)], abs=1e-5)


def test_the_predict_view_explains_the_chosen_class(weights_dir):
    model = load_model(DEFAULT_SCRATCH, weights_dir)
    labels, gallery, text, focus_line, columns = predict_view(model, str(CAT), method='relevance', target='ship')
    depth = model.module.config.depth
    # the overall map is the last layer's: shown once
    assert [c for _, c in gallery] == ['input (bright: what it sees)'] + \
        [f'after layer {i} · ship' for i in range(1, depth + 1)]
    assert 'for the class **ship**' in text and columns == 3
    assert list(focus_line.columns) == ['layer', 'entropy', 'line'] and len(focus_line) == 2 * depth
    heads = predict_view(model, str(CAT), method='heads', layer=1, keep=0.6)
    assert [c for _, c in heads.gallery][1:] == [f'layer 1 · head {h}' for h in range(1, 5)] + \
        ['layer 1 · mean of 4 heads']
    assert "cut to the patches holding 60% of each head's attention (DINO)" in heads.text


def test_deit_tokens_are_drawn_in_pairs_and_a_redraw_reuses_the_explanation(weights_dir, monkeypatch):
    model = load_model('timm/deit_small_distilled_patch16_224', weights_dir)
    remembered = Explanations()
    view = predict_view(model, str(CAT), method='tokens', remembered=remembered)
    assert view.columns == 2 and [c for _, c in view.gallery][:2] == ['layer 1 · CLS · mean of 6 heads',
                                                                     'layer 1 · distillation · mean of 6 heads']
    import vitdemo.explain
    monkeypatch.setattr(vitdemo.explain, 'explain', lambda *a, **k: pytest.fail('explained again'))
    again = predict_view(model, str(CAT), method='tokens', opacity=0.2, remembered=remembered)
    assert [c for _, c in again.gallery] == [c for _, c in view.gallery]


@pytest.mark.parametrize('model_name', [DEFAULT_SCRATCH, 'timm/deit_small_distilled_patch16_224'])
def test_each_method_reads_the_settings_it_declares_and_no_other(model_name, weights_dir):
    # what `Method.reads` promises: a remembered explanation is redrawn, not made again, when any other
    # setting moves; so each of the others must leave its maps exactly as they were
    model = load_model(model_name, weights_dir)
    pred = model.predict(str(CAT))
    plain = dict(fusion='mean', discard_ratio=0.9, layer=None, keep=0.0)
    moved = dict(fusion='max', discard_ratio=0.5, layer=1, keep=0.6)

    def maps(method, **settings):
        torch.manual_seed(0)  # Shapley values sample orders of the patches
        e = explain(model, pred, method, 3 if METHODS[method].per_class else None, settings['fusion'],
                    settings['discard_ratio'], layer=settings['layer'], keep=settings['keep'])
        return [m for _, m in e.maps + [e.overall]]

    for method in methods_for(model):
        if METHODS[method].slow and model_name != DEFAULT_SCRATCH:
            continue  # seconds each at 224 px; the small model runs every slow method
        reads = METHODS[method].reads
        before = maps(method, **plain)
        unread = maps(method, **{k: moved[k] if k not in reads else v for k, v in plain.items()})
        assert all(torch.equal(a, b) for a, b in zip(before, unread, strict=True)), method
        for name in reads:
            read = maps(method, **{**plain, name: moved[name]})
            assert len(read) != len(before) or not all(torch.equal(a, b) for a, b in zip(before, read)), \
                (method, name)


def test_an_option_that_a_method_does_not_read_redraws_it_and_never_starts_a_slow_one(weights_dir, monkeypatch):
    import vitdemo.explain
    model = load_model(DEFAULT_SCRATCH, weights_dir)
    remembered, explain = Explanations(), vitdemo.explain.explain
    calls = []
    monkeypatch.setattr(vitdemo.explain, 'explain', lambda *a, **k: calls.append(a[2]) or explain(*a, **k))
    shown = predict_view(model, str(CAT), method='occlusion', target='cat', remembered=remembered)
    # the heads' fusion, the rollout, the layer and the share kept are the attention maps' settings, not occlusion's
    moved = predict_view(model, str(CAT), fusion='max', opacity=0.2, discard_ratio=0.5, scale='shared',
                         method='occlusion', target='cat', layer=1, keep=0.6, remembered=remembered, start_slow=False)
    assert calls == ['occlusion'] and len(moved.gallery) == len(shown.gallery)
    assert [c for _, c in moved.gallery] == [c for _, c in shown.gallery] and 'No maps' not in moved.text
    # the attention maps read the fusion: moved, they are made again (fast), slow or not
    predict_view(model, str(CAT), remembered=remembered, start_slow=False)
    predict_view(model, str(CAT), fusion='max', remembered=remembered, start_slow=False)
    predict_view(model, str(CAT), fusion='max', opacity=0.3, remembered=remembered, start_slow=False)
    assert calls == ['occlusion', 'attention', 'attention']
    # a slow method not made for this image and class (stopped, or never asked) is not started by an option moved
    idle = predict_view(model, str(CAT), method='occlusion', target='dog', remembered=remembered, start_slow=False)
    assert calls == ['occlusion', 'attention', 'attention'] and len(idle.labels) == 5
    assert [c for _, c in idle.gallery] == ['input: no maps, see above']
    assert '**No maps this time:** a slow method runs when you press Predict' in idle.text
    asked = predict_view(model, str(CAT), method='occlusion', target='dog', remembered=remembered)
    assert calls[-1] == 'occlusion' and 'for the class **dog**' in asked.text


def test_an_option_moved_while_the_askers_slow_method_runs_leaves_the_maps_to_it(weights_dir):
    model = load_model(DEFAULT_SCRATCH, weights_dir)
    remembered, started, go_on, stop = Explanations(), threading.Event(), threading.Event(), threading.Event()

    def held(share):  # alice's occlusion, held at its first report until the test lets it go on, or stops it
        started.set()
        go_on.wait(10)
        if stop.is_set():
            raise Stopped('occlusion stopped at 0%, as asked')
    ask = dict(method='occlusion', target='cat', remembered=remembered)
    made = []

    def make(target):
        started.clear(), go_on.clear()
        maker = threading.Thread(target=lambda: made.append(
            predict_view(model, str(CAT), **ask | dict(target=target), progress=held, asker='alice')))
        maker.start()
        assert started.wait(30)
        return maker
    maker = make('cat')
    # alice moves an option: her own request is making the maps, and its answer will draw them
    with pytest.raises(StillMaking):
        predict_view(model, str(CAT), **ask, opacity=0.2, start_slow=False, asker='alice')
    # another visitor moving an option finds no maps and is told so, as when none was made
    bobs = predict_view(model, str(CAT), **ask, opacity=0.2, start_slow=False, asker='bob')
    assert '**No maps this time:** a slow method runs when you press Predict' in bobs.text
    go_on.set()
    maker.join(30)
    assert 'No maps' not in made[0].text
    moved = predict_view(model, str(CAT), **ask, opacity=0.2, start_slow=False, asker='alice')  # now drawn
    assert [c for _, c in moved.gallery] == [c for _, c in made[0].gallery]
    # a making that is stopped leaves a later move to say so
    maker = make('dog')
    stop.set(), go_on.set()
    maker.join(30)
    later = predict_view(model, str(CAT), **ask | dict(target='dog'), start_slow=False, asker='alice')
    assert '**No maps this time:**' in made[1].text and '**No maps this time:**' in later.text


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


def test_a_stopped_explanation_keeps_the_predictions_and_drops_the_maps_it_did_not_draw(weights_dir):
    model = load_model(DEFAULT_SCRATCH, weights_dir)
    remembered = Explanations()

    def stop(share):
        raise Stopped(f'occlusion stopped at {share:.0%}, as asked')
    view = predict_view(model, str(CAT), top_k=3, method='occlusion', progress=stop, remembered=remembered)
    assert len(view.labels) == 3 and view.labels == predict_view(model, str(CAT), top_k=3).labels
    assert [c for _, c in view.gallery] == ['input: no maps, see above']
    assert '**No maps this time:** occlusion stopped at 0%, as asked.' in view.text
    assert len(view.focus) == 2 * model.module.config.depth
    # nothing stopped is remembered: asked again, the method runs
    again = predict_view(model, str(CAT), method='occlusion', progress=lambda share: None, remembered=remembered)
    assert 'No maps' not in again.text and len(again.gallery) > 1
    gallery, text = sanity_view(model, str(CAT), 'occlusion', progress=stop)
    assert gallery == [] and text == '**Sanity check not finished:** occlusion stopped at 0%, as asked.'
