"""The ViT paper's inspection figures (Dosovitskiy et al. 2021, Fig. 7), computed from the model in hand.

The maths are pure functions of tensors; the `*_figure` functions draw them with matplotlib, each with a
title, axis labels and a colour bar, for the Inspect tab.
"""
import functools
import math
import textwrap
from typing import TYPE_CHECKING, Iterator, NamedTuple

import matplotlib
import numpy as np
import torch
from PIL import Image, ImageDraw

from .attention import Fusion, fit_for_display, fuse_heads, overlay
from .backends import Model, Prediction
from .explain import small_input, twin
from .methods import Progress, Stopped
from .faithfulness import faithfulness, verdict
from .lazy import new_figure
from .model import VisionTransformer, preset
from .policy import checked_number

if TYPE_CHECKING:
    from matplotlib.figure import Figure


# Two figures share a row of the Inspect tab (~440 px at 1440 px): at this width (in inches, 100 dpi) they are
# shown at about their own size, so that their text reads at 11 px and more
FIG_WIDTH = 4.8
TITLE_SIZE = 10


def token_costs(img_size: int, patch_sizes: tuple[int, ...] = (4, 8, 16, 32), prefix: int = 1) -> list[dict]:
    """For each patch size: the patch grid, the tokens (patches + prefix) and the attention cost, which grows
    with tokens squared (every token attends to every token)."""
    rows = []
    for p in patch_sizes:
        if img_size % p:
            continue
        tokens = (img_size // p) ** 2 + prefix
        rows.append(dict(patch_size=p, grid=f'{img_size // p}x{img_size // p}', tokens=tokens,
                         attention_pairs=tokens ** 2))
    return rows


# the ViT paper's sizes (Table 1) and DeiT's Ti, as timm names them
PAPER_SIZES = {'Ti': 'vit_tiny_patch16_224', 'S': 'vit_small_patch16_224', 'B': 'vit_base_patch16_224',
               'L': 'vit_large_patch16_224', 'H': 'vit_huge_patch14_224'}


def multiply_adds(module: torch.nn.Module, img_size: int) -> int:
    """Multiply-adds of one image's forward pass: those of every linear and convolution layer, and of each
    attention's two token-by-token products (2 N^2 D). Counted by hooks on a twin of the module: PyTorch's
    FlopCounterMode hooks every module of every thread while it counts, which breaks other requests'
    gradient passes."""
    module = twin(module)
    total, ran = 0, set()

    def count(m, inputs, out):
        nonlocal total
        ran.add(m)
        if isinstance(m, torch.nn.Linear):
            total += out.numel() * m.in_features
        elif isinstance(m, torch.nn.Conv2d):
            total += out.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        else:  # an attention module: (B, N, D) in
            batch, tokens, dim = inputs[0].shape
            total += 2 * batch * tokens * tokens * dim
    for m in module.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or (hasattr(m, 'qkv') and hasattr(m, 'num_heads')):
            m.register_forward_hook(count)
    with torch.no_grad():
        module(torch.empty(1, 3, img_size, img_size, device=next(module.parameters()).device))
    # our patch projection runs its conv's weights as one matrix product (see model.PatchEmbed): no hook saw it
    for m in module.modules():
        proj = getattr(m, 'proj', None)
        if hasattr(m, 'num_patches') and isinstance(proj, torch.nn.Conv2d) and proj not in ran:
            total += m.num_patches * proj.out_channels * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
    return total


@functools.lru_cache(maxsize=32)
def paper_size(label: str, img_size: int, patch: int, num_classes: int) -> tuple:
    """One of the paper's sizes at this input and patch size: its row of `model_sizes`. Counting runs the
    model on PyTorch's meta device (shapes only, no memory), each operation through Python: seconds for the
    five on two cores, so each input and patch size is counted once."""
    with torch.device('meta'):
        module = VisionTransformer(preset(PAPER_SIZES[label], img_size=img_size, patch_size=patch,
                                          num_classes=num_classes))
    c = module.config
    return (f'ViT-{label}/{patch}', round(sum(p.numel() for p in module.parameters()) / 1e6, 1),
            round(multiply_adds(module, img_size) / 1e9, 3), c.depth, c.embed_dim, c.num_heads,
            int(c.embed_dim * c.mlp_ratio))


def model_sizes(model: Model) -> list[list]:
    """The paper's Ti/S/B/L/H at this model's input size and patch size (so with as many tokens), then this
    model: parameters (millions), multiply-adds per image (billions), layers, width, heads and MLP width. What
    sets the sizes apart comes first: a phone shows the first columns and scrolls to the rest."""
    size = model.data_config['input_size'][1]
    patch = size // model.grid[0]
    rows = [list(paper_size(label, size, patch, len(model.classes))) for label in PAPER_SIZES]
    m = model.module
    blocks = m.blocks
    # the chosen model's name stays in its list: here it would set the column's width (on a phone, the whole table's)
    rows.append(['this model', round(sum(p.numel() for p in m.parameters()) / 1e6, 1),
                 round(multiply_adds(m, size) / 1e9, 3), len(blocks), blocks[0].norm1.normalized_shape[0],
                 blocks[0].attn.num_heads, blocks[0].mlp.fc1.out_features])
    return rows


def patch_grid(pred: Prediction, display: int = 448) -> Image.Image:
    """The input with the patch grid the model cuts its view into drawn over that view."""
    image, (left, top, right, bottom) = fit_for_display(pred.image, pred.box, display)
    draw = ImageDraw.Draw(image)
    rows, cols = pred.grid
    for i in range(cols + 1):
        x = left + (right - left) * i / cols
        draw.line([(x, top), (x, bottom)], fill=(255, 255, 0), width=1)
    for j in range(rows + 1):
        y = top + (bottom - top) * j / rows
        draw.line([(left, y), (right, y)], fill=(255, 255, 0), width=1)
    return image


def position_similarity(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int = 1) -> torch.Tensor:
    """Cosine similarity of each patch position's embedding with every other: (rows, cols, rows, cols)."""
    patches = pos_embed.reshape(-1, pos_embed.shape[-1])[num_prefix_tokens:].float()
    assert patches.shape[0] == grid[0] * grid[1], f'{patches.shape[0]} position embeddings for a {grid} grid'
    unit = torch.nn.functional.normalize(patches, dim=-1)
    return (unit @ unit.T).reshape(*grid, *grid)


def patch_filters(proj_weight: torch.Tensor, k: int = 28) -> torch.Tensor:
    """The first `k` principal components of the patch projection's filters (D, C, p, p) -> (k, C, p, p)."""
    d, c, ph, pw = proj_weight.shape
    flat = proj_weight.reshape(d, -1).float()
    flat = flat - flat.mean(dim=0, keepdim=True)
    _, _, v = torch.linalg.svd(flat, full_matrices=False)  # rows of v: directions of most variance first
    return v[:min(k, v.shape[0])].reshape(-1, c, ph, pw)


def _patch_centres(grid: tuple[int, int], patch_size: int) -> torch.Tensor:
    rows, cols = grid
    y, x = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing='ij')
    return (torch.stack([y.flatten(), x.flatten()], dim=1).float() + 0.5) * patch_size  # (N, 2) in pixels


def _patch_attention(attentions: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """Patch-to-patch attention, each query's row renormalised over the patches: (L, H, N, N)."""
    a = attentions[:, :, num_prefix_tokens:, num_prefix_tokens:].float()
    return a / a.sum(dim=-1, keepdim=True).clamp(min=1e-12)


def mean_attention_distance(attentions: torch.Tensor, grid: tuple[int, int], patch_size: int,
                            num_prefix_tokens: int = 1) -> torch.Tensor:
    """(layers, heads): how far, in input pixels, each head looks on average (attention-weighted distance
    between query and key patches, averaged over queries). Small: local, like a convolution; large: global."""
    centres = _patch_centres(grid, patch_size)
    distance = torch.cdist(centres, centres)  # (N, N)
    return (_patch_attention(attentions, num_prefix_tokens) * distance).sum(-1).mean(-1)


def attention_entropy(attentions: torch.Tensor, num_prefix_tokens: int = 1) -> torch.Tensor:
    """(layers, heads): mean entropy (nats) of each patch query's attention over patches. 0: one patch;
    log(patches): spread evenly."""
    a = _patch_attention(attentions, num_prefix_tokens)
    return -(a * a.clamp(min=1e-12).log()).sum(-1).mean(-1)


def mosaic(tiles: torch.Tensor) -> np.ndarray:
    """(R, C, h, w) -> one (R*(h+1), C*(w+1)) image of the tiles with a blank (NaN) line between them."""
    R, C, h, w = tiles.shape
    out = np.full((R * (h + 1), C * (w + 1)), np.nan, dtype=np.float32)
    for r in range(R):
        for c in range(C):
            out[r * (h + 1):r * (h + 1) + h, c * (w + 1):c * (w + 1) + w] = tiles[r, c].numpy()
    return out


def position_similarity_figure(model: Model) -> 'Figure':
    sim = position_similarity(model.module.pos_embed.detach().cpu(), model.grid, model.num_prefix_tokens)
    rows, cols = model.grid
    fig = new_figure(figsize=(FIG_WIDTH, 4.9))
    ax = fig.subplots()
    im = ax.imshow(mosaic(sim), vmin=-1, vmax=1, cmap='viridis')
    step = max(1, rows // 7)  # label a few tiles, not all 14
    ax.set_xticks([c * (cols + 1) + cols / 2 for c in range(0, cols, step)], [str(c + 1) for c in range(0, cols, step)])
    ax.set_yticks([r * (rows + 1) + rows / 2 for r in range(0, rows, step)], [str(r + 1) for r in range(0, rows, step)])
    ax.set(xlabel='input patch column', ylabel='input patch row',
           title="Position embeddings: the tile at (row, col) is the\n"
                 "cosine similarity of that patch's embedding\nwith every other patch's")
    ax.title.set_fontsize(TITLE_SIZE)
    fig.colorbar(im, ax=ax, shrink=0.8, label='cosine similarity')
    fig.tight_layout()
    return fig


def patch_filters_figure(model: Model, k: int = 28) -> 'Figure':
    stem = model.module.patch_embed
    conv_stem = hasattr(stem, 'backbone')  # tokens from convolutions: its first 3x3 filters see the pixels
    filters = patch_filters((stem.backbone[0] if conv_stem else stem.proj).weight.detach().cpu(), k)
    cols = 7
    rows = math.ceil(len(filters) / cols)
    fig = new_figure(figsize=(9.0, 1.3 * rows + 1.0))  # a row of its own: tiles large enough to see
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for i, f in enumerate(filters):
        tile = f - f.min()
        tile = (tile / tile.max().clamp(min=1e-12)).permute(1, 2, 0).numpy()  # each tile stretched to 0..1
        axes.flat[i].imshow(tile if tile.shape[2] == 3 else tile[..., 0], cmap=None if tile.shape[2] == 3 else 'gray')
        axes.flat[i].set_title(f'PC {i + 1}', fontsize=9)
    what = "the conv stem's first 3x3 filters" if conv_stem else 'the patch projection'
    fig.suptitle(f'Patch embedding filters: principal components of {what}, as RGB\n'
                 '(what the pixels are first compared with; left to right, most variance first)',
                 fontsize=TITLE_SIZE)
    return fig


def head_scatter_figure(values: torch.Tensor, ylabel: str, title: str, ceiling: float | None = None,
                        ceiling_label: str = '') -> 'Figure':
    """One dot per head, layers along x: the layout of the paper's Fig. 7 (right). The y axis starts at 0,
    and reaches `ceiling` when given (drawn as a dashed line: the value's upper bound), so that heads of a
    barely trained model, all alike, read as alike rather than spread by a zoomed axis."""
    layers, heads = values.shape
    fig = new_figure(figsize=(FIG_WIDTH, 3.6))
    ax = fig.subplots()
    colours = matplotlib.colormaps['tab20'].resampled(max(heads, 2))
    for h in range(heads):
        ax.scatter(np.arange(1, layers + 1), values[:, h].numpy(), color=colours(h), s=22, label=f'head {h + 1}')
    if ceiling is not None:
        ax.axhline(ceiling, color='0.4', linestyle='--', linewidth=1, label=ceiling_label or None)
    top = max(float(values.max()), ceiling or 0.0)
    ax.set_ylim(0, top * 1.08 if top > 0 else 1)
    ax.ticklabel_format(axis='y', useOffset=False)
    ax.set(xlabel='layer', ylabel=ylabel, title=title, xticks=range(1, layers + 1))
    ax.title.set_fontsize(TITLE_SIZE)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='center left', bbox_to_anchor=(1.01, 0.5), ncol=1 if heads <= 8 else 2)
    fig.tight_layout()
    return fig


def patch_at(point: tuple[float, float], box: tuple[float, float, float, float], grid: tuple[int, int]) -> int | None:
    """Row-major index of the patch under `point` (x, y) in image coordinates, or None outside the box."""
    x, y = point
    left, top, right, bottom = box
    if not (left <= x < right and top <= y < bottom):
        return None
    rows, cols = grid
    return int((y - top) / (bottom - top) * rows) * cols + int((x - left) / (right - left) * cols)


def token_attention(attentions: torch.Tensor, patch: int, layer: int, grid: tuple[int, int],
                    num_prefix_tokens: int = 1, fusion: Fusion = 'mean') -> torch.Tensor:
    """Where one patch token looks in one layer: its attention row over the patches, (rows, cols)."""
    assert 0 <= layer < attentions.shape[0], f'layer {layer + 1} out of range 1..{attentions.shape[0]}'
    row = fuse_heads(attentions[layer:layer + 1], fusion)[0, num_prefix_tokens + patch, num_prefix_tokens:]
    return row.reshape(*grid)


def faithfulness_figure(model: Model, pred: Prediction, seed: int = 0, slow: bool = True,
                        progress: Progress | None = None) -> 'Figure':
    """Deletion and insertion curves of every map the model offers (`slow=False`: of those of few passes),
    beside a random order, with each curve's areas and a verdict in words (see `vitdemo.faithfulness`)."""
    scores = faithfulness(model, pred, seed=seed, slow=slow, progress=progress)
    fig = new_figure(figsize=(FIG_WIDTH, 5.2 + 0.1 * len(scores)), layout='constrained')
    deletion, insertion = fig.subplots(2, 1, sharex=True)
    colours = matplotlib.colormaps['tab20'].colors[::2] + matplotlib.colormaps['tab20'].colors[1::2]
    for i, score in enumerate(scores):
        style = (dict(color='0.45', linestyle='--') if i == 0 else
                 dict(color=colours[i - 1], marker='osv^<>Dph*'[i % 10]))
        deletion.plot(score.fractions, score.deletion, markersize=3, linewidth=1.2, **style,
                      label=f'{score.name}: {score.deletion_auc:.2f} / {score.insertion_auc:.2f}')
        insertion.plot(score.fractions, score.insertion, markersize=3, linewidth=1.2, **style)
    target = model.classes[int(pred.probs.argmax())]
    deletion.set(ylabel=f'p("{target}")', ylim=(0, None),
                 title='Can I trust a map? Its most relevant patches first:\nblanked (deletion: should fall fast, '
                       'small area)')
    insertion.set(xlabel='fraction of patches', ylabel=f'p("{target}")', ylim=(0, None),
                  title='shown alone (insertion: should rise fast, large area)')
    for ax in (deletion, insertion):
        ax.title.set_fontsize(TITLE_SIZE)
        ax.grid(alpha=0.3)
    fig.legend(loc='outside lower center', ncols=2, fontsize=7, title='areas: deletion / insertion',
               title_fontsize=8, frameon=False)
    words = 'Verdict: ' + verdict(scores)
    if not slow:
        words += ' (the slow methods are left out at this input size: run one in Predict)'
    fig.suptitle(textwrap.fill(words, 62), fontsize=TITLE_SIZE - 1)
    return fig


def require_vit(model: Model) -> None:
    if model.is_cnn:
        raise ValueError(f'Inspect shows the inside of a ViT (patches, position embeddings, heads); {model.name} '
                         'is a CNN. Pick a ViT here, or set the CNN beside a ViT in the Compare tab.')


class InspectView(NamedTuple):
    grid: Image.Image  # the input with the patch grid the model cuts it into
    costs: list[list]  # tokens and attention pairs by patch size (`token_costs`)
    positions: 'Figure'  # how alike the position embeddings are
    filters: 'Figure'  # the patch embedding's first principal components
    distance: 'Figure'  # how far each head looks, on this image
    entropy: 'Figure'  # how spread each head's attention is
    faithfulness: 'Figure | None'  # deletion and insertion curves; None where the test was stopped
    sizes: list[list]  # the paper's sizes at this input and patch size, and this model
    patch: tuple[Image.Image, str]  # where one patch looks, and its caption (`patch_view`)
    note: str  # why a figure is missing, or empty


def inspect_steps(model: Model, image, patch_sizes: tuple[int, ...] = (4, 8, 16, 32),
                  progress: Progress | None = None, *, point: tuple[float, float] | None = None, layer: int = 1,
                  fusion: Fusion = 'mean') -> Iterator[InspectView]:
    """Everything the Inspect tab shows for one image, in two steps: first the patch grid, token costs, four
    figures and the model sizes table, with no faithfulness test yet (a second or two, even on ViT-B/16); then
    the same view with the test, which takes most of the time. The test comes last, so that a test stopped
    (Stop, the server's time limit) loses only itself. At a small input (`explain.small_input`) it takes
    seconds with every method, the slow ones included, and is fast work: it tells `progress` nothing, as a
    fast method does not (so in public it takes no slot for slow work). Larger, it leaves the slow methods
    out, and still takes tens of seconds on a large model: it tells `progress` before each map and each pair
    of curves. `point`, `layer` and `fusion` choose the patch whose look is drawn beside the grid
    (`patch_view`), from the same forward pass."""
    require_vit(model)
    pred = model.predict(image, top_k=1)
    # the layer slider follows a model change in its own event, which may land after this one
    layer = min(max(checked_number(layer, 'layer', -10 ** 6, 10 ** 6, integer=True), 1), pred.attentions.shape[0])
    try:
        patch_look = look_from(pred, point, layer, fusion)
    except ValueError:  # a click outside the square the model sees: the centre, as before any click
        patch_look = look_from(pred, None, layer, fusion)
    size = model.data_config['input_size'][1]
    patch = size // pred.grid[0]
    distance = mean_attention_distance(pred.attentions, pred.grid, patch, pred.num_prefix_tokens)
    entropy = attention_entropy(pred.attentions, pred.num_prefix_tokens)
    costs = [list(row.values()) for row in token_costs(size, patch_sizes, pred.num_prefix_tokens)]
    view = InspectView(grid=patch_grid(pred), costs=costs, positions=position_similarity_figure(model),
                       filters=patch_filters_figure(model),
                       distance=head_scatter_figure(distance, 'mean attention distance (input pixels)',
                                                    f'How far each head looks, on this image\n(input {size}x{size})'),
                       entropy=head_scatter_figure(entropy, 'attention entropy (nats)',
                                                   'How spread each head\'s attention is,\non this image',
                                                   ceiling=math.log(pred.grid[0] * pred.grid[1]),
                                                   ceiling_label='spread evenly'),
                       faithfulness=None, sizes=model_sizes(model), patch=patch_look, note='')
    yield view
    try:
        small = small_input(model)
        yield view._replace(faithfulness=faithfulness_figure(model, pred, slow=small,
                                                             progress=None if small else progress))
    except Stopped as stopped:
        yield view._replace(note=f'**No faithfulness test this time:** {stopped}. The other figures are drawn.')


def inspect_view(model: Model, image, patch_sizes: tuple[int, ...] = (4, 8, 16, 32),
                 progress: Progress | None = None, **patch) -> InspectView:
    """The whole of `inspect_steps`, the faithfulness test included (or the note saying why it is missing)."""
    *_, view = inspect_steps(model, image, patch_sizes, progress, **patch)
    return view


def patch_view(model: Model, image, point: tuple[float, float] | None, layer: int, fusion: Fusion = 'mean',
               display: int = 448) -> tuple[Image.Image, str]:
    """Click-a-patch: where the patch under `point` (in the displayed grid image's pixels; None: the patch at
    the grid's centre, before any click) looks in `layer` (1-based), drawn over the image with that patch
    outlined."""
    require_vit(model)
    return look_from(model.predict(image, top_k=1), point, layer, fusion, display)


def look_from(pred: Prediction, point: tuple[float, float] | None, layer: int, fusion: Fusion = 'mean',
              display: int = 448) -> tuple[Image.Image, str]:
    """`patch_view` from a forward pass already made."""
    layer = checked_number(layer, 'layer', -10 ** 6, 10 ** 6, integer=True)
    shown, box = fit_for_display(pred.image, pred.box, display)
    rows, cols = pred.grid
    patch = (rows // 2) * cols + cols // 2 if point is None else patch_at(point, box, pred.grid)
    if patch is None:
        raise ValueError('click inside the bright square: the model does not see the rest')
    layers = pred.attentions.shape[0]
    if not 1 <= int(layer) <= layers:
        raise ValueError(f'this model has {layers} layers: choose a layer from 1 to {layers}')
    heat = token_attention(pred.attentions, patch, int(layer) - 1, pred.grid, pred.num_prefix_tokens, fusion)
    picture = overlay(shown, heat, box, opacity=0.6)
    r, c = divmod(patch, cols)
    left, top, right, bottom = box
    w, h = (right - left) / cols, (bottom - top) / rows
    ImageDraw.Draw(picture).rectangle([left + c * w, top + r * h, left + (c + 1) * w, top + (r + 1) * h],
                                      outline=(0, 255, 255), width=2)
    where = ' (the centre: click any patch in the grid)' if point is None else ''
    return picture, (f'patch (row {r + 1}, column {c + 1}){where} in layer {int(layer)}: where it looks, '
                     'brighter is more')

