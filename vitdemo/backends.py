"""The models the app offers, behind one `Model` type with `predict(image) -> Prediction`.

Three kinds of name:
- `scratch/NAME`: our ViT, or the ResNet-18 baseline, with our weights, `weights/NAME.safetensors`
  (shipped, or trained by `python -m vitdemo.train`); `trained/NAME`: trained in the app's Train tab
  (`vitdemo.store` says where those live and whose they are);
- `timm/ARCH`: timm's ViT with its ImageNet-1k weights, attention read with `timm.utils.AttentionExtract`;
- `ours/ARCH`: our ViT code running the same ImageNet weights (proof the two implementations agree).

Pretrained weights come from the Hugging Face Hub through timm (cached after the first download), or,
offline, from `weights/ARCH.safetensors` when that file exists.
"""
import functools
import math
import os
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

import huggingface_hub
import torch
from PIL import Image

from .cnn import ConvClassifier
from .images import load_image
from .lazy import late_import
from .store import ModelStore
from .model import VisionTransformer
from .weights import from_timm, load_checkpoint, read_metadata

WEIGHTS_DIR = Path(os.environ.get('VITDEMO_WEIGHTS', Path(__file__).resolve().parent.parent / 'weights'))
# timm architectures offered with pretrained ImageNet-1k weights (timm's default tag for each); DeiT's
# distilled model adds a second prefix token, the distillation token
TIMM_ARCHS = ['vit_tiny_patch16_224', 'vit_small_patch16_224', 'vit_base_patch16_224', 'deit_small_patch16_224',
              'deit_small_distilled_patch16_224']
OURS_ARCHS = TIMM_ARCHS
# where the hub keeps each one's default weights (timm's pretrained config says the same: a test holds them
# equal), written out so that the start-up needs no timm import to know which are on disk
HUB_IDS = {'vit_tiny_patch16_224': 'timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k',
           'vit_small_patch16_224': 'timm/vit_small_patch16_224.augreg_in21k_ft_in1k',
           'vit_base_patch16_224': 'timm/vit_base_patch16_224.augreg2_in21k_ft_in1k',
           'deit_small_patch16_224': 'timm/deit_small_patch16_224.fb_in1k',
           'deit_small_distilled_patch16_224': 'timm/deit_small_distilled_patch16_224.fb_in1k'}
DEFAULT_SCRATCH = 'scratch/vit_cifar10'
# what every model's first prediction imports: timm's preprocessing, with torchvision and torch._dynamo (~4 s
# on two cores), for a server to import ahead
FIRST_PREDICTION = ('timm.data',)


class ModelUnavailable(RuntimeError):
    """A model that cannot be loaded here, with a message that says how to make it available."""


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


def imagenet_classes() -> list[str]:
    ImageNetInfo = late_import('timm.data').ImageNetInfo
    info = ImageNetInfo()
    return [info.index_to_description(i).split(',')[0] for i in range(info.num_classes())]


def list_models(weights_dir: Path | None = None, owner: str | None = None,
                store: ModelStore | None = None) -> list[str]:
    """Names for the model dropdown: checkpoints (the default first, then `scratch/`, then the owner's
    `trained/`), then the pretrained models."""
    store = store or ModelStore(Path(weights_dir or WEIGHTS_DIR))
    checkpoints = sorted(store.checkpoint_names(owner), key=lambda n: n != DEFAULT_SCRATCH)
    return checkpoints + [f'timm/{a}' for a in TIMM_ARCHS] + [f'ours/{a}' for a in OURS_ARCHS]


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


@functools.lru_cache(maxsize=16)
def _timm_shape(arch: str) -> tuple[int, int, int]:
    timm = late_import('timm')
    with torch.device('meta'):  # shapes only: no memory, no download
        module = timm.create_model(arch, pretrained=False)
    return len(module.blocks), module.blocks[0].attn.num_heads, module.num_prefix_tokens


def model_shape(name: str, store: ModelStore, owner: str | None = None) -> tuple[int, int]:
    """(layers, heads) of a listed model, from its config alone, without loading weights; a CNN has four
    stages and no heads: (4, 0). For the UI's layer and head controls."""
    return _shape(name, store, owner)[:2]


def prefix_tokens(name: str, store: ModelStore, owner: str | None = None) -> int:
    """Tokens before the patches of a listed model, from its config alone: CLS, and DeiT's distillation
    token; 0 for a CNN."""
    return _shape(name, store, owner)[2]


def _shape(name: str, store: ModelStore, owner: str | None) -> tuple[int, int, int]:
    kind, _, arch = name.partition('/')
    if kind in ('timm', 'ours') and arch in TIMM_ARCHS:
        return _timm_shape(arch)
    path = store.path(name, owner)
    if path is None:
        raise ModelUnavailable(f'unknown model {name!r}: choose one from the list')
    meta = read_metadata(path)
    if meta['arch'] != VisionTransformer.arch:
        return 4, 0, 0
    c = meta['config']
    return c['depth'], c['num_heads'], 2 if c.get('distilled') else 1


def local_weights(arch: str, weights_dir: Path) -> Path | None:
    """Pretrained weights of `arch` already on this machine: in the weights folder, or in the hub's cache."""
    local = weights_dir / f'{arch}.safetensors'
    if local.is_file():
        return local
    cached = huggingface_hub.try_to_load_from_cache(HUB_IDS[arch], 'model.safetensors')
    return Path(cached) if isinstance(cached, str) else None


def needs_download(weights_dir: Path | None = None) -> list[str]:
    """The pretrained architectures whose weights would have to be downloaded first."""
    return [arch for arch in TIMM_ARCHS if local_weights(arch, Path(weights_dir or WEIGHTS_DIR)) is None]


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


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers at all: offline, fail in a moment rather than after retries."""
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return False
    host = urlparse(huggingface_hub.constants.ENDPOINT).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


class ModelCache:
    """The few most recently used models, loaded once each; safe to share between request threads.
    It serves the app, so it loads by list name only (the names `store` lists for the asking owner),
    never from a path someone typed."""

    def __init__(self, max_models: int = 3, weights_dir: Path | None = None, store: ModelStore | None = None):
        self.max_models = max_models
        self.store = store or ModelStore(Path(weights_dir or WEIGHTS_DIR))
        self.weights_dir = self.store.weights_dir
        self._models: OrderedDict[str, Model] = OrderedDict()
        self._lock = threading.Lock()

    def names(self, owner: str | None = None) -> list[str]:
        return list_models(owner=owner, store=self.store)

    def _key(self, name: str, owner: str | None) -> str:
        """The cache key: the checkpoint's file (two owners' `trained/my_vit` are two models), else the name."""
        if name.split('/')[0] in ('scratch', 'trained'):
            path = self.store.path(name, owner)
            if path is not None:
                return str(path)
        elif name in self.names(owner):
            return name
        raise ModelUnavailable(f'unknown model {name!r}: choose one from the list')

    def get(self, name: str, owner: str | None = None) -> Model:
        key = self._key(name, owner)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        # outside the lock: a slow download blocks no one else
        model = load_model(key if key.endswith('.safetensors') else name, self.weights_dir)
        model.name = name
        with self._lock:
            self._models[key] = model
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
        return model

    def forget(self, path: Path) -> None:
        """Drop a cached checkpoint, e.g. after its file was rewritten."""
        with self._lock:
            self._models.pop(str(path), None)

    def has(self, name: str, owner: str | None = None) -> bool:
        try:
            return self._key(name, owner) in self._models
        except ModelUnavailable:
            return False
