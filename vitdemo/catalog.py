"""The models the app lists, known from their names and checkpoint headers alone: which there are, which
need a download, their layers, heads and prefix tokens, and the cache that loads them when asked. Our own
checkpoints are described from their headers, without torch, so the page is built and served before the seconds
that import takes (a pretrained model's shape and classes come from timm, imported when first asked for);
`vitdemo.backends` loads and runs the models.
"""
import functools
import os
import socket
import threading
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

import huggingface_hub

from .lazy import late_import
from .metadata import read_metadata
from .store import ModelStore

if TYPE_CHECKING:
    from .backends import Model

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
# what every model's first prediction imports, for a server to import ahead: torch with our model and explanation
# code (~2 s on two cores; the rest of the package's model code then takes a fraction of a second), then timm's
# preprocessing with torchvision and torch._dynamo (~4 s)
FIRST_PREDICTION = ('vitdemo.explain', 'timm.data')


class ModelUnavailable(RuntimeError):
    """A model that cannot be loaded here, with a message that says how to make it available."""


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


@functools.lru_cache(maxsize=16)
def _timm_shape(arch: str) -> tuple[int, int, int]:
    timm, torch = late_import('timm'), late_import('torch')
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
    if meta['arch'] != 'vit':  # a CNN
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
        self._models: OrderedDict[str, 'Model'] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}  # a lock per model being loaded

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

    def _cached(self, key: str) -> 'Model | None':
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
            return self._models.get(key)

    def get(self, name: str, owner: str | None = None) -> 'Model':
        key = self._key(name, owner)
        if (model := self._cached(key)) is not None:
            return model
        with self._lock:
            loading = self._loading.setdefault(key, threading.Lock())
        # two requests for one model at once (two visitors, two tabs, a pick and an option moved): the second
        # waits for the first's load (one download, one copy in memory); a slow load blocks no other model's
        with loading:
            if (model := self._cached(key)) is not None:
                return model
            load_model = late_import('vitdemo.backends').load_model
            model = load_model(key if key.endswith('.safetensors') else name, self.weights_dir)
            model.name = name
            with self._lock:
                self._models[key] = model
                self._loading.pop(key, None)
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
