"""Attention through training: for a few fixed validation images, where every layer's CLS token looks
after each epoch, kept small in the checkpoint's metadata and drawn as a layers x epochs filmstrip.

A mean-pooled ViT has no CLS token to follow: its maps are the attention each patch receives from the
patch tokens (as `explain`'s 'attention' method draws it). Maps are stored as 8-bit, each scaled to its
own maximum: a filmstrip shows where a layer looks, not how sharply compared with another layer.

Reading and drawing one needs no torch (the page's Inspect tab does both); recording one imports it.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .lazy import late_import, new_figure

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .data import ImageData
    from .model import VisionTransformer

IMAGES = 4  # fixed validation images a run follows
MAX_COLUMNS = 10  # epochs drawn; a longer run shows evenly spaced ones, the last always among them


def _pack(array: np.ndarray) -> dict:
    return {'shape': list(array.shape), 'data': base64.b64encode(np.ascontiguousarray(array, np.uint8)).decode()}


def _unpack(packed: dict) -> np.ndarray:
    return np.frombuffer(base64.b64decode(packed['data']), np.uint8).reshape(packed['shape'])


@dataclass
class Filmstrip:
    images: np.ndarray  # (N, H, W, 3) uint8: the fixed validation images
    labels: list[int]  # their true classes
    epochs: list[int] = field(default_factory=list)
    maps: list[np.ndarray] = field(default_factory=list)  # per epoch: (N, layers, rows, cols) uint8
    predicted: list[list[int]] = field(default_factory=list)  # per epoch: the class given to each image

    @classmethod
    def of(cls, data: ImageData, count: int = IMAGES) -> 'Filmstrip':
        """The first `count` images of `data` (a seeded validation split: the same ones every epoch)."""
        return cls(data.images[:count].permute(0, 2, 3, 1).numpy().copy(), data.labels[:count].tolist())

    def record(self, model: VisionTransformer, mean: list[float], std: list[float], epoch: int) -> None:
        """Where every layer looks on the fixed images now, and what the model says they are."""
        torch, attention = late_import('torch'), late_import('vitdemo.attention')
        to_model_input = late_import('vitdemo.data').to_model_input
        was_training = model.training
        model.eval()
        size = model.config.img_size
        x = to_model_input(torch.from_numpy(self.images).permute(0, 3, 1, 2), mean, std, size)
        with torch.no_grad():
            logits, attentions = model.forward_with_attention(x.to(next(model.parameters()).device))
        model.train(was_training)
        grid = (size // model.config.patch_size,) * 2
        stacked = torch.stack(attentions, dim=1).float().cpu()  # (N, layers, heads, T, T)
        p = model.num_prefix_tokens
        if model.config.global_pool == 'avg':
            maps = attention.received(stacked.mean(2), grid, p)
        else:
            maps = torch.stack([attention.cls_attention(a, grid, p) for a in stacked])
        peak = maps.flatten(2).amax(2).clamp(min=1e-12)[:, :, None, None]
        self.epochs.append(epoch)
        self.maps.append((maps / peak * 255).round().to(torch.uint8).numpy())
        self.predicted.append(logits.argmax(1).tolist())

    def to_metadata(self) -> dict:
        return {'images': _pack(self.images), 'labels': self.labels, 'epochs': self.epochs,
                'maps': _pack(np.stack(self.maps)) if self.maps else None, 'predicted': self.predicted}

    @classmethod
    def from_metadata(cls, meta: dict) -> 'Filmstrip':
        maps = list(_unpack(meta['maps'])) if meta.get('maps') else []
        return cls(_unpack(meta['images']).copy(), list(meta['labels']), list(meta['epochs']), maps,
                   [list(p) for p in meta['predicted']])


def filmstrip_figure(strip: Filmstrip, index: int, classes: list[str]) -> 'Figure':
    """Image `index` (0-based) of the strip: a row per layer, a column per epoch, each cell the image
    under that layer's map; each column titled with the class the model then gave it."""
    if not strip.epochs:
        raise ValueError('no epoch has ended yet')
    if not 0 <= index < len(strip.labels):
        raise ValueError(f'the filmstrip follows {len(strip.labels)} images: choose 1 to {len(strip.labels)}')
    columns = sorted({round(i) for i in np.linspace(0, len(strip.epochs) - 1, min(MAX_COLUMNS, len(strip.epochs)))})
    layers = strip.maps[0].shape[1]
    image = strip.images[index]
    cell = 0.9
    # wide enough for the title however few epochs there are
    fig = new_figure(figsize=(max(3.6, 0.9 + cell * len(columns)), 0.9 + cell * layers), layout='constrained')
    axes = fig.subplots(layers, len(columns), squeeze=False)
    h, w = image.shape[:2]
    for col, e in enumerate(columns):
        said = strip.predicted[e][index]
        right = '✓' if said == strip.labels[index] else '✗'
        axes[0, col].set_title(f'epoch {strip.epochs[e]}\n{classes[said]} {right}', fontsize=7)
        for layer in range(layers):
            ax = axes[layer, col]
            ax.imshow(image, extent=(0, w, h, 0))
            ax.imshow(strip.maps[e][index, layer], cmap='inferno', alpha=0.6, extent=(0, w, h, 0),
                      interpolation='nearest')
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                ax.set_ylabel(f'layer {layer + 1}', fontsize=7)
    fig.suptitle(f'Where each layer looks as training goes on:\na {classes[strip.labels[index]]}', fontsize=9)
    return fig
