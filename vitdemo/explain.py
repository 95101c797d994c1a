"""Why this class: explanations of one prediction behind one interface, `explain(model, image, method,
target)`, whatever the kind of model behind it (a ViT pooled by its CLS token or by the mean of its patch
tokens, DeiT with its distillation token, the CNN).

Attention, read from the forward pass (the same for every class):
- `attention`: each layer's CLS attention and the rollout through all layers (Abnar & Zuidema, 2020). A
  mean-pooled ViT classifies the mean of its patch tokens, so there each map is the attention a patch
  receives from all patch tokens, and the description says so.
- `tokens`: DeiT's CLS and distillation tokens side by side, layer by layer and rolled out.
- `heads`: every head of one layer, optionally cut to the patches holding a share of the attention mass
  (DINO's `visualize_attention.py` threshold).

For a chosen class:
- `relevance`: gradient-weighted attention relevance (Chefer, Gur & Wolf, ICCV 2021): starting from the
  identity, each layer adds the positive part of gradient x attention, averaged over heads, times the
  relevance so far. No library has it; pinned in the tests to the rule written out by hand.
- `gradcam`: the CNN's Grad-CAM after each of its stages (hand-written, as no library gives every stage from
  one pass; tested against pytorch-grad-cam), and on a ViT's last block tokens (pytorch-grad-cam).
- `gradcam++`, `scorecam`, `eigencam` (the last one class-blind): pytorch-grad-cam, on the CNN's last stage
  or the ViT's last block tokens.
- `ig` (Integrated Gradients), `shapley` (Shapley Value Sampling over patches) and `occlusion`: Captum, in
  units of the class's probability. Patches are blanked to 0 after normalisation (the dataset's mean colour),
  as the faithfulness test blanks them: the perturbation methods are measured by the kind of change they
  are made of.

Slow methods (many forward passes) take a `progress` callback that may stop them by raising `Stopped`. They
run on a twin of the module (`twin`), so the hooks the libraries add never see another request's pass.
A new method is one function here, one line in `vitdemo.methods.METHODS` (the page's list), and its test.
"""
import copy
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Fusion, cls_attention, fuse_heads, received, rollout, rollout_matrix
from .backends import Model, Prediction, TimmAttention
from .lazy import late_import
from .methods import METHODS, Progress, kinds, offered


@dataclass
class Explanation:
    method: str
    target: str | None  # the class explained; None for a method that does not depend on the class
    maps: list[tuple[str, torch.Tensor]]  # per depth, head or token: (caption, 2-D map)
    overall: tuple[str, torch.Tensor]  # one map for the whole network
    description: str
    paired: bool = False  # maps come in pairs to be seen side by side (DeiT's two tokens)


def methods_for(model: Model) -> list[str]:
    """The methods this model offers, its default first: a CNN has no attention."""
    return offered(kinds(model.is_cnn, model.num_prefix_tokens))


def from_prediction(pred: Prediction, fusion: Fusion = 'mean', discard_ratio: float = 0.9) -> Explanation:
    """What a prediction already holds, with no further pass: a ViT's attention and rollout, or the
    CNN's Grad-CAM of its top class."""
    if pred.is_cnn:
        maps = [(f'stage {i + 1} · {m.shape[0]}x{m.shape[1]}', m) for i, m in enumerate(pred.saliency)]
        return Explanation('gradcam', None, maps, ('last-stage Grad-CAM', maps[-1][1]), METHODS['gradcam'].description)
    if pred.pooling == 'avg':
        fused = fuse_heads(pred.attentions, fusion).float()
        maps = list(received(fused, pred.grid, pred.num_prefix_tokens))
        flow = received(rollout_matrix(fused, discard_ratio), pred.grid, pred.num_prefix_tokens)
        description = ('this ViT classifies the mean of its patch tokens, not its CLS token: each map is the '
                       'attention each patch receives, averaged over all patch tokens; the same for every class')
    else:
        maps = list(cls_attention(pred.attentions, pred.grid, pred.num_prefix_tokens, fusion))
        flow = rollout(pred.attentions, pred.grid, pred.num_prefix_tokens, fusion, discard_ratio)
        description = METHODS['attention'].description
    return Explanation('attention', None, [(f'layer {i + 1}', m) for i, m in enumerate(maps)],
                       (f'rollout · all {len(maps)} layers', flow), description)


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


@dataclass
class _Job:
    """One explanation's inputs, as every method function takes them."""
    model: Model
    pred: Prediction
    index: int
    fusion: Fusion
    discard_ratio: float
    layer: int | None
    keep: float
    progress: Progress | None

    @property
    def x(self) -> torch.Tensor:
        return self.model.transform(self.pred.image).unsqueeze(0).to(self.model.device)


def explain(model: Model, image, method: str = 'attention', target: int | str | None = None,
            fusion: Fusion = 'mean', discard_ratio: float = 0.9, *, layer: int | None = None, keep: float = 0.0,
            progress: Progress | None = None) -> Explanation:
    """Explain one image's prediction (`image` as `Model.predict` takes it, or that prediction itself).

    Args:
        method: one of `methods_for(model)`.
        target: the class to explain, by name or index; None is the predicted class.
        fusion, discard_ratio: how attention heads are fused, and the rollout's discard ratio.
        layer: for `heads`, the layer (from 1; None is the last).
        keep: for `heads`, DINO's threshold: keep the patches holding this share of each head's attention
            mass (0 keeps every patch).
        progress: for slow methods, told the share done; may raise `Stopped`.
    """
    if method not in methods_for(model):
        raise ValueError(f'{model.name} offers {", ".join(methods_for(model))}, not {method!r}')
    pred = image if isinstance(image, Prediction) else model.predict(image)
    spec = METHODS[method]
    index = class_index(model, target, pred)
    job = _Job(model, pred, index, fusion, discard_ratio, layer, keep, progress)
    with torch.inference_mode(False), torch.enable_grad():  # gradient methods, even inside a no-grad caller
        maps, overall, description = _RUN[method](job)
    return Explanation(method, model.classes[index] if spec.per_class else None, maps, overall,
                       description or spec.description, spec.paired)


def _attention(job: _Job):
    e = from_prediction(job.pred, job.fusion, job.discard_ratio)
    return e.maps, e.overall, e.description


def _tokens(job: _Job):
    fused = fuse_heads(job.pred.attentions, job.fusion).float()
    grid, p = job.pred.grid, job.pred.num_prefix_tokens
    flow = rollout_matrix(fused, job.discard_ratio)
    maps = []
    for i, a in enumerate(fused):
        maps += [(f'layer {i + 1} · CLS', a[0, p:].reshape(grid)),
                 (f'layer {i + 1} · distillation', a[1, p:].reshape(grid))]
    maps += [('rollout · CLS', flow[0, p:].reshape(grid)), ('rollout · distillation', flow[1, p:].reshape(grid))]
    return maps, maps[-2], None


def _heads(job: _Job):
    layers, heads = job.pred.attentions.shape[:2]
    layer = layers if job.layer is None else int(job.layer)
    if not 1 <= layer <= layers:
        raise ValueError(f'this model has {layers} layers: choose a layer from 1 to {layers}')
    if not 0.0 <= job.keep < 1.0:
        raise ValueError(f'the share of attention to keep must be from 0 (all) to below 1, got {job.keep}')
    a = job.pred.attentions[layer - 1].float()
    if job.pred.pooling == 'avg':
        maps = list(received(a, job.pred.grid, job.pred.num_prefix_tokens))
    else:
        maps = [h[0, job.pred.num_prefix_tokens:].reshape(job.pred.grid) for h in a]
    if job.keep:
        maps = [m * mass_mask(m, job.keep) for m in maps]
    cut = f', cut to the patches holding {job.keep:.0%} of each head\'s attention (DINO)' if job.keep else ''
    return ([(f'layer {layer} · head {h + 1}', m) for h, m in enumerate(maps)],
            (f'layer {layer} · mean of {heads} heads', torch.stack(maps).mean(0)),
            f'every head of layer {layer} on its own{cut}: heads specialise; the same for every class')


def mass_mask(heat: torch.Tensor, keep: float) -> torch.Tensor:
    """1 on the fewest strongest positions that together hold `keep` of the map's mass (DINO's threshold:
    sorted ascending, the positions whose cumulative share exceeds 1 - keep)."""
    values, order = heat.flatten().sort()
    share = values.cumsum(0) / values.sum().clamp_min(1e-12)
    mask = torch.zeros(heat.numel())
    mask[order] = (share > 1 - keep).float()
    return mask.view_as(heat)


def _relevance(job: _Job):
    with job.model._lock:  # the attention read-out keeps per-call state
        steps = relevance(job.model.attend, job.x, job.index)
    if job.pred.pooling == 'avg':
        p = job.pred.num_prefix_tokens
        rows = [r[p:, p:].mean(0).reshape(job.pred.grid) for r in steps]
    else:
        rows = [r[0, job.pred.num_prefix_tokens:].reshape(job.pred.grid) for r in steps]
    maps = [(f'after layer {i + 1}', r) for i, r in enumerate(rows)]
    return maps, (f'relevance · all {len(maps)} layers', maps[-1][1]), None


def relevance(attend: Callable, x: torch.Tensor, index: int) -> list[torch.Tensor]:
    """Every token's relevance to every token after each layer, (tokens, tokens) each, for class `index` of
    one image; `attend` is a model's read-out, image -> (logits, attention per layer)."""
    with torch.inference_mode(False), torch.enable_grad():
        logits, attentions = attend(x.clone().requires_grad_(True))
        grads = torch.autograd.grad(logits[0, index], attentions)
    r = torch.eye(attentions[0].shape[-1])
    steps = []
    for a, g in zip(attentions, grads):
        cam = (g[0] * a[0]).detach().float().clamp(min=0).mean(0).cpu()  # (tokens, tokens), heads averaged
        r = r + cam @ r
        steps.append(r.clone())
    return steps


def _gradcam(job: _Job):
    if not job.model.is_cnn:
        return _library_cam(job, 'gradcam')
    with job.model._lock:
        _, stages = job.model.module.forward_with_saliency(job.x, torch.tensor([job.index]))
    maps = [(f'stage {i + 1} · {m.shape[1]}x{m.shape[2]}', m[0].cpu()) for i, m in enumerate(stages)]
    return maps, ('last-stage Grad-CAM', maps[-1][1]), None


def small_input(model: Model) -> bool:
    """Whether the model's input is small (CIFAR's 32 px, at most 64): many images fit in one pass, and a
    method of many passes, or the faithfulness test with every method, takes seconds on a CPU."""
    return model.data_config['input_size'][1] <= 64


def images_per_pass(model: Model) -> int:
    """How many images a method (or the faithfulness test) runs through the model at once, without gradients:
    at 224 px, 16 bound the memory of a ViT-B's pass (its activations and attention maps)."""
    return 64 if small_input(model) else 16


def twin(module: nn.Module) -> nn.Module:
    """The same network sharing the same weights, with hooks of its own and no gradients for the weights:
    the libraries' hooks on it never see another request's forward pass, and their backward passes grow no
    `.grad` on the shared weights."""
    copy_ = copy.copy(module)
    for name, value in vars(module).items():
        if name.endswith('hooks') or name.endswith('hooks_with_kwargs') or name.endswith('hooks_always_called'):
            setattr(copy_, name, OrderedDict())
    copy_._parameters = {k: None if p is None else nn.Parameter(p.detach(), requires_grad=False)
                         for k, p in module._parameters.items()}
    copy_._buffers = dict(module._buffers)
    copy_._modules = {k: None if m is None else twin(m) for k, m in module._modules.items()}
    return copy_


class _Counted(nn.Module):
    """A module that tells `progress` how many of `total` forward passes are done."""

    def __init__(self, module: nn.Module, total: int, progress: Progress | None):
        super().__init__()
        self.module, self.total, self.progress, self.calls = module, max(total, 1), progress, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.progress is not None:
            self.progress(min(self.calls / self.total, 1.0))
        self.calls += 1
        return self.module(x)


def _target_layer(job: _Job, net: nn.Module):
    """Where the CAM methods read: the CNN's last stage; a ViT's last block's first norm, its patch tokens
    laid out as an image (`reshape`)."""
    if job.model.is_cnn:
        return net.stages()[-1], None
    rows, cols = job.pred.grid
    p = job.pred.num_prefix_tokens

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, p:].reshape(tokens.shape[0], rows, cols, -1).permute(0, 3, 1, 2)
    return net.blocks[-1].norm1, reshape


def _library_cam(job: _Job, method: str):
    cams = late_import('pytorch_grad_cam')  # with OpenCV: imported when first used
    EigenCAM, GradCAM, GradCAMPlusPlus, ScoreCAM = cams.EigenCAM, cams.GradCAM, cams.GradCAMPlusPlus, cams.ScoreCAM
    ClassifierOutputTarget = late_import('pytorch_grad_cam.utils.model_targets').ClassifierOutputTarget
    kind = {'gradcam': GradCAM, 'gradcam++': GradCAMPlusPlus, 'scorecam': ScoreCAM, 'eigencam': EigenCAM}[method]
    net = twin(job.model.module)
    layer, reshape = _target_layer(job, net)
    batch = images_per_pass(job.model)
    channels = layer.normalized_shape[0] if reshape else net.num_features
    total = 1 + (math.ceil(channels / batch) if method == 'scorecam' else 0)
    cam = kind(model=_Counted(net, total, job.progress), target_layers=[layer], reshape_transform=reshape)
    cam.batch_size = batch  # Score-CAM's masked images per pass: bounds its memory
    # drawn at the size of the layer's own grid, not upsampled to the input's: the patches are what gets ranked
    cam.get_target_width_height = lambda _: job.pred.grid[::-1]
    try:
        heat = cam(input_tensor=job.x.requires_grad_(True), targets=[ClassifierOutputTarget(job.index)])[0]
    finally:
        cam.activations_and_grads.release()
    grid = torch.from_numpy(heat).float()
    where = 'last stage' if job.model.is_cnn else 'last block'
    return [(f'{METHODS[method].short}, {where}', grid)], (f'{METHODS[method].short} · {where}', grid), None


def _probabilities(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: module(x).float().softmax(-1)


def _patch_size(job: _Job) -> tuple[int, int]:
    side = job.model.data_config['input_size'][1]
    return side // job.pred.grid[0], side // job.pred.grid[1]


def _integrated_gradients(job: _Job, steps: int = 32):
    IntegratedGradients = late_import('captum.attr').IntegratedGradients
    batch = 32 if small_input(job.model) else 4  # images with gradients: bounds memory
    net = _Counted(twin(job.model.module), math.ceil(steps / batch), job.progress)
    attributions = IntegratedGradients(_probabilities(net)).attribute(
        job.x, baselines=0.0, target=job.index, n_steps=steps, internal_batch_size=batch)
    pixels = attributions[0].sum(0).detach().cpu()
    ph, pw = _patch_size(job)
    patches = F.avg_pool2d(pixels[None, None], (ph, pw))[0, 0] * ph * pw
    return ([('pixels · Integrated Gradients', pixels), ('summed per patch', patches)],
            ('Integrated Gradients · per patch', patches), None)


def _occlusion(job: _Job):
    Occlusion = late_import('captum.attr').Occlusion
    rows, cols = job.pred.grid
    ph, pw = _patch_size(job)
    batch = images_per_pass(job.model)
    net = _Counted(twin(job.model.module), 1 + math.ceil(rows * cols / batch), job.progress)
    window = (job.x.shape[1], ph, pw)
    with torch.no_grad():
        attributions = Occlusion(_probabilities(net)).attribute(
            job.x, sliding_window_shapes=window, strides=window, baselines=0.0, target=job.index,
            perturbations_per_eval=batch)
    drop = attributions[0, 0, ::ph, ::pw].cpu()
    return [('probability drop per blanked patch', drop)], ('occlusion · per patch', drop), None


def _shapley(job: _Job):
    ShapleyValueSampling = late_import('captum.attr').ShapleyValueSampling
    rows, cols = job.pred.grid
    ph, pw = _patch_size(job)
    batch = images_per_pass(job.model)
    samples = max(2, min(10, 640 // (rows * cols)))  # random orders: 10 for CIFAR's 64 patches, 3 for 196
    net = _Counted(twin(job.model.module), 1 + samples * math.ceil(rows * cols / batch), job.progress)
    patches = torch.arange(rows * cols).reshape(rows, cols).repeat_interleave(ph, 0).repeat_interleave(pw, 1)
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same orders each time: one image, one map
        attributions = ShapleyValueSampling(_probabilities(net)).attribute(
            job.x, baselines=0.0, target=job.index, feature_mask=patches.expand_as(job.x[:1, :]).contiguous(),
            n_samples=samples, perturbations_per_eval=batch)
    values = attributions[0, 0, ::ph, ::pw].cpu()
    return ([(f'Shapley value per patch, {samples} orders', values)], ('Shapley values · per patch', values),
            None)


_RUN = {'attention': _attention, 'tokens': _tokens, 'heads': _heads, 'relevance': _relevance, 'gradcam': _gradcam,
        'gradcam++': lambda job: _library_cam(job, 'gradcam++'), 'scorecam': lambda job: _library_cam(job, 'scorecam'),
        'eigencam': lambda job: _library_cam(job, 'eigencam'), 'ig': _integrated_gradients, 'shapley': _shapley,
        'occlusion': _occlusion}


def focus(pred: Prediction) -> list[float]:
    """How focused each layer's map is: the entropy (nats) of the CLS token's attention over the patches
    (a mean-pooled ViT's: of the attention the patches receive, its 'attention' maps), re-normalised,
    averaged over heads. log(patches) is attention spread evenly; 0, one patch."""
    p = pred.num_prefix_tokens
    a = (received(pred.attentions, pred.grid, p).flatten(-2) if pred.pooling == 'avg'
         else pred.attentions[:, :, 0, p:]).float()
    a = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
    return (-(a * a.clamp_min(1e-12).log()).sum(-1)).mean(-1).tolist()


def with_random_weights(model: Model, seed: int = 0) -> Model:
    """The same model with every weight redrawn (Adebayo et al., NeurIPS 2018, "Sanity Checks for Saliency
    Maps", cascading to all layers): a map that does not change then says nothing about what was learned."""
    module = copy.deepcopy(model.module)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator).to(p) * 0.02 * (1 if p.ndim > 1 else 0.5))
    # the same read-out, bound to the copy
    attend = (TimmAttention(module) if isinstance(model.attend, TimmAttention)
              else getattr(module, model.attend.__name__))
    return Model(f'{model.name} (random weights)', module, model.classes, model.data_config, attend,
                 model.num_prefix_tokens, f'{model.description}, with its weights redrawn at random')


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two maps of one shape."""
    ra, rb = (m.flatten().argsort().argsort().float() for m in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / ((ra.norm() * rb.norm()).clamp_min(1e-12)))


def sanity_check(model: Model, image, method: str, target: int | str | None = None, seed: int = 0,
                 progress: Progress | None = None) -> tuple[Explanation, Explanation, float]:
    """The map with the trained weights, the map with random weights, and their rank correlation: a map
    that depends on what the model learned changes (a correlation well below 1)."""
    pred = image if isinstance(image, Prediction) else model.predict(image)
    halves = [None, None] if progress is None else [lambda f: progress(f / 2), lambda f: progress(0.5 + f / 2)]
    trained = explain(model, pred, method, target, progress=halves[0])
    index = class_index(model, trained.target if trained.target is not None else target, pred)
    randomized = with_random_weights(model, seed)
    shuffled = explain(randomized, randomized.predict(pred.image), method, index, progress=halves[1])
    return trained, shuffled, rank_correlation(trained.overall[1], shuffled.overall[1])
