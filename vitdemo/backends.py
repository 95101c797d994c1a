"""The models the app offers, behind one `Model` type with `predict(image) -> Prediction`.

Three kinds of name:
- `scratch/NAME`: our ViT, or the ResNet-18 baseline, with our weights, `weights/NAME.safetensors`
  (shipped, or trained by `python -m vitdemo.train`); `trained/NAME`: trained in the app's Train tab
  (`vitdemo.store` says where those live and whose they are);
- `timm/ARCH`: timm's ViT with its ImageNet-1k weights, attention read with `timm.utils.AttentionExtract`;
- `ours/ARCH`: our ViT code running the same ImageNet weights (proof the two implementations agree).

Which names there are, and what the page needs to know of each, is `vitdemo.catalog`'s (without torch).
Pretrained weights come from the Hugging Face Hub through timm (cached after the first download), or,
offline, from `weights/ARCH.safetensors` when that file exists.
"""
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from .catalog import (HUB_IDS, OURS_ARCHS, TIMM_ARCHS, WEIGHTS_DIR, ModelUnavailable, hub_reachable, imagenet_classes,
                      list_models, local_weights)
from .cnn import ConvClassifier
from .images import load_image
from .lazy import late_import
from .store import ModelStore
from .weights import from_timm, load_checkpoint


@dataclass
class Prediction:
    top_k: list[tuple[str, float]]  # (label, probability), most probable first
    attentions: torch.Tensor | None  # ViT: (layers, heads, tokens, tokens), softmax probabilities; CNN: None
    grid: tuple[int, int]  # (rows, cols) of patches; a CNN's last feature map
    num_prefix_tokens: int  # tokens before the patches: CLS, and DeiT's distillation token
    image: Image.Image  # the RGB image as loaded (downscaled if it was huge)
    box: tuple[float, float, float, float]  # (left, top, right, bottom) of `image` that the model saw
    probs: torch.Tensor  # (classes,) every class's probability, in `Model.classes` order
    saliency: list[torch.Tensor] | None = None  # CNN: Grad-CAM of the top class after each stage, (rows, cols)
    pooling: str = 'token'  # what a ViT classifies: its CLS token ('token'), or the mean of its patch tokens ('avg')

    @property
    def is_cnn(self) -> bool:
        return self.saliency is not None


class Model:
    """A classifier with a preprocessing recipe and a way to read its attention.

    Args:
        name: the name it was loaded by.
        module: the torch module.
        classes: class names, in logit order.
        data_config: timm data config (input_size, interpolation, mean, std, crop_pct, crop_mode).
        attend: image batch -> (logits, per-layer attention list), the module's attention read-out; for
            a CNN, (logits, per-stage Grad-CAM list).
        num_prefix_tokens: tokens before the patch tokens (0 for a CNN).
        description: one line for people.
    """

    def __init__(self, name: str, module: torch.nn.Module, classes: list[str], data_config: dict,
                 attend: Callable[[torch.Tensor], tuple[torch.Tensor, list[torch.Tensor]]],
                 num_prefix_tokens: int, description: str):
        self.name = name
        self.module = module
        self.classes = classes
        self.data_config = data_config
        create_transform = late_import('timm.data').create_transform  # timm (with torch._dynamo): when first used
        self.transform = create_transform(**data_config)
        self.num_prefix_tokens = num_prefix_tokens
        self.description = description
        self.attend = attend
        self._lock = threading.Lock()  # attention read-outs keep per-call state; one image at a time
        self.device = next(module.parameters()).device
        self.is_cnn = isinstance(module, ConvClassifier)
        if not self.is_cnn:
            side = math.isqrt(module.patch_embed.num_patches)  # square grids, in timm's ViTs and ours
            self.grid = (side, side)
        config = getattr(module, 'config', None)  # ours keep the pooling in their config, timm's ViTs as an attribute
        self.pooling = getattr(config, 'global_pool', None) or getattr(module, 'global_pool', 'token')

    def predict(self, image, top_k: int = 5) -> Prediction:
        """Top-k classes and every layer's attention for one image (PIL image, numpy array or file path)."""
        if not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f'top_k must be a positive integer, got {top_k!r}')
        image = load_image(image)
        x = self.transform(image).unsqueeze(0).to(self.device)
        with self._lock, torch.inference_mode():
            logits, maps = self.attend(x)
        maps = [m[0].float().cpu() for m in maps]
        probs = logits[0].float().softmax(-1).cpu()
        values, indices = probs.topk(min(top_k, len(self.classes)))
        return Prediction(top_k=[(self.classes[i], v) for v, i in zip(values.tolist(), indices.tolist())],
                          attentions=None if self.is_cnn else torch.stack(maps),
                          grid=tuple(maps[-1].shape) if self.is_cnn else self.grid,
                          num_prefix_tokens=self.num_prefix_tokens, image=image,
                          box=crop_box(image.size, self.data_config), probs=probs,
                          saliency=maps if self.is_cnn else None, pooling=self.pooling)


def crop_box(size: tuple[int, int], data_config: dict) -> tuple[float, float, float, float]:
    """The part of an image of `size` that timm's eval transform keeps: the shorter side is resized to
    input / crop_pct, then the centre input x input is cut out."""
    w, h = size
    side = data_config['input_size'][1]
    scale_size = math.floor(side / data_config['crop_pct'])
    seen = min(w, h) * side / scale_size
    return ((w - seen) / 2, (h - seen) / 2, (w + seen) / 2, (h + seen) / 2)


class TimmAttention:
    """Read attention from a timm ViT with timm's AttentionExtract: forward hooks on each block's
    `attn_drop`, which only runs on the manual (non-fused) path, so fused attention is off for this pass."""

    def __init__(self, module: torch.nn.Module):
        AttentionExtract = late_import('timm.utils').AttentionExtract
        self.module = module
        self.extract = AttentionExtract(module, method='hook')
        self.attn_modules = [m for m in module.modules() if hasattr(m, 'fused_attn')]

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        for m in self.attn_modules:
            m.fused_attn = False
        try:
            logits = self.module(x)
            maps = self.extract.hooks.get_output(x.device)
        finally:
            for m in self.attn_modules:
                m.fused_attn = True
        if isinstance(logits, tuple):  # distilled models in train mode; eval returns the averaged logits
            logits = logits[0]
        return logits, list(maps.values())


def load_model(name_or_path: str | Path, weights_dir: Path | None = None, device: str | None = None) -> Model:
    """Load a model by dropdown name (see `list_models`) or from a path to a vitdemo `.safetensors` file."""
    weights_dir = Path(weights_dir or WEIGHTS_DIR)
    device = torch.device(device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    name = str(name_or_path)
    kind, _, arch = name.partition('/')
    if kind in ('timm', 'ours'):
        resolve_data_config = late_import('timm.data').resolve_data_config
    if kind == 'timm' and arch in TIMM_ARCHS:
        module = timm_pretrained(arch, weights_dir).to(device).eval()
        return Model(name, module, imagenet_classes(), resolve_data_config({}, model=module),
                     TimmAttention(module), module.num_prefix_tokens,
                     f"timm's {arch} with ImageNet-1k weights")
    if kind == 'ours' and arch in OURS_ARCHS:
        timm_module = timm_pretrained(arch, weights_dir)
        module = from_timm(timm_module).to(device).eval()
        return Model(name, module, imagenet_classes(), resolve_data_config({}, model=timm_module),
                     module.forward_with_attention, module.num_prefix_tokens,
                     f"our from-scratch ViT code running timm's {arch} ImageNet-1k weights")
    if kind in ('scratch', 'trained') and '/' not in arch:
        path = ModelStore(weights_dir).path(name)
        if path is None:
            raise ModelUnavailable(f'no trained weights for {name}. Train one in the Train tab or with '
                                   '`python -m vitdemo.train`, or pick a pretrained model.')
    elif name.endswith('.safetensors'):
        path = Path(name)
    else:
        raise ModelUnavailable(f'unknown model {name!r}; choose one of {", ".join(list_models(weights_dir))}')
    module, meta = load_checkpoint(path)
    val = (meta.get('metrics') or {}).get('val_accuracy')
    about = f'trained from scratch ({len(meta["classes"])} classes' + \
        (f', {val:.1%} validation accuracy)' if val is not None else ')')
    return checkpoint_model(name, module.to(device), meta['classes'], meta['mean'], meta['std'], about)


def checkpoint_model(name: str, module: torch.nn.Module, classes: list[str], mean, std, about: str = '') -> Model:
    """One of our own networks (the ViT or the CNN baseline, as `vitdemo.weights` saves them) as a `Model`:
    its preprocessing is a resize to its input size and its own normalisation."""
    c = module.config
    data_config = dict(input_size=(c.in_chans, c.img_size, c.img_size), interpolation='bicubic',
                       mean=tuple(mean), std=tuple(std), crop_pct=1.0, crop_mode='center')
    if isinstance(module, ConvClassifier):
        return Model(name, module, classes, data_config, module.forward_with_saliency, 0,
                     f'the CNN baseline, {module.title}, {about}')
    return Model(name, module, classes, data_config, module.forward_with_attention,
                 module.num_prefix_tokens, f'our ViT {about}')


def timm_pretrained(arch: str, weights_dir: Path) -> torch.nn.Module:
    timm = late_import('timm')
    hub_id = HUB_IDS[arch]
    local = local_weights(arch, weights_dir)
    if local is None and not hub_reachable():
        raise ModelUnavailable(
            f'{arch} needs a one-time download of its pretrained weights from the Hugging Face Hub '
            f'({hub_id}), which cannot be reached from here. Download model.safetensors from there and '
            f'save it as weights/{arch}.safetensors, or run with internet access.')
    if local is not None:
        try:
            # custom_load off: the file is a state dict, though the tag's own weights (Google's .npz for the
            # augreg ViTs) need timm's custom loader, which timm before 1.0.31 would also run on this file
            return timm.create_model(arch, pretrained=True,
                                     pretrained_cfg_overlay=dict(file=str(local), custom_load=False))
        except Exception as e:  # safetensors, shape and key errors: the file is not this model's weights
            raise ModelUnavailable(f'{local.name} is not usable as weights for {arch}: {e}') from None
    try:
        return timm.create_model(arch, pretrained=True)  # downloads once, then timm loads from the hub cache
    except Exception as e:  # the hub client raises many types: DNS, HTTP, disk, ...
        raise ModelUnavailable(f'downloading the pretrained weights of {arch} from {hub_id} failed '
                               f'({type(e).__name__}: {e}). Try again, or save model.safetensors from there '
                               f'as weights/{arch}.safetensors.') from None
