"""Attention maths as pure functions over a stacked attention tensor, and heat-map overlays.

`attentions` is always a float tensor (layers, heads, tokens, tokens) of softmax probabilities for one
image; the first `num_prefix_tokens` tokens are CLS (and DeiT's distillation token), the rest are the
patches in row-major order over a `grid` of (rows, cols).
"""
from typing import Literal

import matplotlib
import numpy as np
import torch
from PIL import Image

Fusion = Literal['mean', 'max', 'min'] | int  # an int picks one head


def fuse_heads(attentions: torch.Tensor, fusion: Fusion = 'mean') -> torch.Tensor:
    """(layers, heads, T, T) -> (layers, T, T), by mean, max or min over heads, or one head by index."""
    assert attentions.ndim == 4, f'expected (layers, heads, tokens, tokens), got {tuple(attentions.shape)}'
    if isinstance(fusion, int):
        assert 0 <= fusion < attentions.shape[1], f'head {fusion} out of range 0..{attentions.shape[1] - 1}'
        return attentions[:, fusion]
    if fusion == 'mean':
        return attentions.mean(dim=1)
    if fusion == 'max':
        return attentions.amax(dim=1)
    if fusion == 'min':
        return attentions.amin(dim=1)
    raise ValueError(f"fusion must be 'mean', 'max', 'min' or a head index, not {fusion!r}")


def cls_attention(attentions: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1,
                  fusion: Fusion = 'mean') -> torch.Tensor:
    """Where the CLS token looks in each layer: (layers, rows, cols), the CLS row's weights on the patches."""
    fused = fuse_heads(attentions, fusion)
    patches = fused[:, 0, num_prefix_tokens:]
    assert patches.shape[1] == grid[0] * grid[1], f'{patches.shape[1]} patch tokens do not fill a {grid} grid'
    return patches.reshape(-1, *grid)


def received(attention: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """(..., tokens, tokens) -> (..., rows, cols): what each patch gets from the patch tokens, averaged over
    them: what a mean-pooled ViT's pooled token takes from each patch."""
    p = num_prefix_tokens
    return attention[..., p:, p:].mean(-2).reshape(*attention.shape[:-2], *grid)


def rollout(attentions: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1,
            fusion: Fusion = 'mean', discard_ratio: float = 0.0) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): how much each patch flows into CLS through all layers,
    (rows, cols). See `rollout_matrix`."""
    flow = rollout_matrix(fuse_heads(attentions, fusion).float(), discard_ratio)
    return flow[0, num_prefix_tokens:].reshape(*grid)


def rollout_matrix(fused: torch.Tensor, discard_ratio: float = 0.0) -> torch.Tensor:
    """Attention rollout over every token: (layers, T, T) fused attention -> (T, T), row i how much each
    token flows into token i through all layers.

    Each layer's attention gets the residual connection added (0.5 A + 0.5 I, rows re-normalised), and the
    layers are multiplied in order. `discard_ratio` first zeroes that fraction of the weakest weights per
    layer (never those from or to the first token, CLS), which sharpens the map (Gildenblat's variant).
    """
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f'the rollout discard ratio must be in [0, 1), got {discard_ratio}')
    eye = torch.eye(fused.shape[-1])
    result = eye.clone()
    for a in fused:
        k = int(a.numel() * discard_ratio)
        if k:
            keep = torch.ones(a.numel(), dtype=torch.bool)
            keep[a.flatten().topk(k, largest=False).indices] = False
            keep = keep.view_as(a)
            keep[0, :] = True  # CLS row and column carry the signal we are tracing
            keep[:, 0] = True
            a = a * keep
        a = 0.5 * a + 0.5 * eye
        result = (a / a.sum(dim=-1, keepdim=True)) @ result
    return result


def fit_for_display(image: Image.Image, box: tuple[float, float, float, float], side: int = 448
                    ) -> tuple[Image.Image, tuple[float, float, float, float]]:
    """The image scaled so its longer side is `side` (small ones enlarged with sharp pixels), and the box
    scaled with it."""
    scale = side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    resample = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST
    return image.resize(size, resample), tuple(v * size[0] / image.width for v in box)


def overlay(image: Image.Image, heat: torch.Tensor | np.ndarray, box: tuple[float, float, float, float] | None = None,
            opacity: float = 0.6, cmap: str = 'inferno', scale: tuple[float, float] | None = None) -> Image.Image:
    """Colour the region `box` (left, top, right, bottom; default the whole image) by `heat` (rows, cols).

    The map is stretched to `scale` (low, high), by default its own min..max, resized smoothly to the box
    and alpha-blended over the image; outside the box (pixels the model never saw) the image is dimmed.
    """
    assert 0.0 <= opacity <= 1.0, f'opacity must be in [0, 1], got {opacity}'
    heat = np.asarray(heat, dtype=np.float32)
    low, high = scale if scale is not None else (float(heat.min()), float(heat.max()))
    heat = np.clip((heat - low) / max(high - low, 1e-12), 0.0, 1.0)
    left, top, right, bottom = (round(v) for v in (box or (0, 0, *image.size)))
    size = (max(right - left, 1), max(bottom - top, 1))
    heat_img = Image.fromarray((heat * 255).astype(np.uint8)).resize(size, Image.Resampling.BILINEAR)
    colours = matplotlib.colormaps[cmap](np.asarray(heat_img) / 255.0)[..., :3]  # (h, w, 3) in [0, 1]
    base = np.asarray(image.convert('RGB'), dtype=np.float32) / 255.0
    out = base * 0.35 if box is not None else base.copy()
    region = base[top:bottom, left:right]
    out[top:bottom, left:right] = (1 - opacity) * region + opacity * colours[:region.shape[0], :region.shape[1]]
    return Image.fromarray((out * 255 + 0.5).clip(0, 255).astype(np.uint8))
