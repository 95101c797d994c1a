"""Why this class: explanations of one prediction behind one interface, `explain(model, image, method,
target)`, whatever the kind of model behind it.

- `attention`: each layer's CLS attention and the rollout through all layers (Abnar & Zuidema, 2020).
  It does not depend on the class: it says where the model looks, not what speaks for a class.
- `relevance`: gradient-weighted attention relevance for a chosen class (Chefer, Gur & Wolf, ICCV 2021,
  "Generic Attention-model Explainability"): starting from the identity, each layer adds the positive part
  of gradient x attention, averaged over heads, times the relevance so far. The map after each layer, and
  the CLS row of the last one as the overall map. Our ViT code (`scratch/`, `ours/`, `trained/`).
- `gradcam`: the CNN's Grad-CAM after each of its four stages, for the chosen class.

A new method is one function here and its test. `sanity_check` redraws the weights and asks whether a
map changes (Adebayo et al. 2018).
"""
import copy
from dataclasses import dataclass

import torch

from .attention import Fusion
from .backends import Model, Prediction
from .model import VisionTransformer

METHODS = {
    'attention': 'where the CLS token looks, layer by layer, and the rollout; the same for every class',
    'relevance': 'what speaks for the chosen class: gradient-weighted attention relevance (Chefer et al. 2021)',
    'gradcam': 'where the evidence for the chosen class lies after each stage (Grad-CAM)',
}


@dataclass
class Explanation:
    method: str
    target: str | None  # the class explained; None for a method that does not depend on the class
    maps: list[tuple[str, torch.Tensor]]  # per depth: (caption, (rows, cols) map)
    overall: tuple[str, torch.Tensor]  # one map for the whole network
    description: str


def methods_for(model: Model) -> list[str]:
    """The methods this model offers: a CNN has no attention; relevance needs our ViT code's gradients."""
    if model.is_cnn:
        return ['gradcam']
    return ['attention', 'relevance'] if isinstance(model.module, VisionTransformer) else ['attention']


def from_prediction(pred: Prediction, fusion: Fusion = 'mean', discard_ratio: float = 0.9) -> Explanation:
    """What a prediction already holds, with no further pass: a ViT's attention and rollout, or the
    CNN's Grad-CAM of its top class."""
    if pred.is_cnn:
        maps = [(f'stage {i + 1}', m) for i, m in enumerate(pred.saliency)]
        return Explanation('gradcam', None, maps, ('last-stage Grad-CAM', maps[-1][1]), METHODS['gradcam'])
    maps = pred.layer_maps(fusion)
    return Explanation('attention', None, [(f'layer {i + 1}', m) for i, m in enumerate(maps)],
                       (f'rollout · all {len(maps)} layers', pred.overall_map(fusion, discard_ratio)),
                       METHODS['attention'])


def class_index(model: Model, target: int | str | None, pred: Prediction) -> int:
    """A class by index or by name; None is the predicted class."""
    if target is None or target == '':
        return int(pred.probs.argmax())
    if isinstance(target, str):
        if target not in model.classes:
            raise ValueError(f'{target!r} is not one of this model\'s {len(model.classes)} classes')
        return model.classes.index(target)
    if not 0 <= int(target) < len(model.classes):
        raise ValueError(f'class index {target} out of range 0..{len(model.classes) - 1}')
    return int(target)


def explain(model: Model, image, method: str = 'attention', target: int | str | None = None,
            fusion: Fusion = 'mean', discard_ratio: float = 0.9) -> Explanation:
    """Explain one image's prediction (`image` as `Model.predict` takes it, or that prediction itself)."""
    if method not in methods_for(model):
        raise ValueError(f'{model.name} offers {", ".join(methods_for(model))}, not {method!r}'
                         + (' (relevance needs our ViT code: pick the ours/ twin)' if method == 'relevance' else ''))
    pred = image if isinstance(image, Prediction) else model.predict(image)
    if method == 'attention':
        return from_prediction(pred, fusion, discard_ratio)
    index = class_index(model, target, pred)
    x = model.transform(pred.image).unsqueeze(0).to(model.device)
    with model._lock:  # the module's read-outs keep per-call state
        if method == 'gradcam':
            _, stages = model.module.forward_with_saliency(x, torch.tensor([index]))
            maps = [(f'stage {i + 1}', m[0].cpu()) for i, m in enumerate(stages)]
            return Explanation(method, model.classes[index], maps, ('last-stage Grad-CAM', maps[-1][1]),
                               METHODS[method])
        steps = relevance(model.module, x, index)
    rows, cols = pred.grid
    maps = [(f'after layer {i + 1}', r[pred.num_prefix_tokens:].reshape(rows, cols)) for i, r in enumerate(steps)]
    return Explanation(method, model.classes[index], maps, (f'relevance · all {len(maps)} layers', maps[-1][1]),
                       METHODS[method])


def relevance(module: VisionTransformer, x: torch.Tensor, index: int) -> list[torch.Tensor]:
    """The CLS token's relevance over all tokens after each layer, for class `index` of one image."""
    with torch.inference_mode(False), torch.enable_grad():
        logits, attentions = module.forward_with_attention(x.clone())
        grads = torch.autograd.grad(logits[0, index], attentions)
    tokens = attentions[0].shape[-1]
    r = torch.eye(tokens)
    steps = []
    for a, g in zip(attentions, grads):
        cam = (g[0] * a[0]).detach().float().clamp(min=0).mean(0).cpu()  # (tokens, tokens), heads averaged
        r = r + cam @ r
        steps.append(r[0].clone())
    return steps


def with_random_weights(model: Model, seed: int = 0) -> Model:
    """The same model with every weight redrawn (Adebayo et al., NeurIPS 2018, "Sanity Checks for Saliency
    Maps", cascading to all layers): a map that does not change then says nothing about what was learned."""
    module = copy.deepcopy(model.module)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator).to(p) * 0.02 * (1 if p.ndim > 1 else 0.5))
    attend = module.forward_with_saliency if model.is_cnn else module.forward_with_attention
    return Model(f'{model.name} (random weights)', module, model.classes, model.data_config, attend,
                 model.num_prefix_tokens, f'{model.description}, with its weights redrawn at random')


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two maps of one shape."""
    ra, rb = (m.flatten().argsort().argsort().float() for m in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / ((ra.norm() * rb.norm()).clamp_min(1e-12)))


def sanity_check(model: Model, image, method: str, target: int | str | None = None,
                 seed: int = 0) -> tuple[Explanation, Explanation, float]:
    """The map with the trained weights, the map with random weights, and their rank correlation: a map
    that depends on what the model learned changes (a correlation well below 1)."""
    pred = image if isinstance(image, Prediction) else model.predict(image)
    trained = explain(model, pred, method, target)
    index = class_index(model, trained.target if trained.target is not None else target, pred)
    randomized = with_random_weights(model, seed)
    shuffled = explain(randomized, randomized.predict(pred.image), method, index)
    return trained, shuffled, rank_correlation(trained.overall[1], shuffled.overall[1])
