"""What the Predict tab shows, as plain functions of a prediction: no UI code, tested without a browser.

The page is built from this module before torch is imported: the explanation and drawing code (with torch) is
imported by the first view asked for (`vitdemo.lazy`)."""
from __future__ import annotations

import functools
import hashlib
import html
import math
import threading
import time
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, NamedTuple

import matplotlib
import numpy as np
import pandas as pd
from PIL import Image

from .lazy import late_import
from .metadata import epochs_seen, epochs_text
from .methods import METHODS, Progress, Stopped
from .policy import checked_number

if TYPE_CHECKING:
    from .attention import Fusion
    from .backends import Model, Prediction
    from .explain import Explanation

FUSIONS = ['mean', 'max', 'min', 'one head']
DISPLAY_SIDE = 448  # overlays are drawn at this size: sharp in the gallery, quick to render


def fusion_mode(fusion: str) -> Fusion:
    """A fusion by mode name only (mean, max or min), as Compare and click-a-patch take it."""
    if fusion not in FUSIONS[:3]:
        raise ValueError(f'head fusion must be one of {", ".join(FUSIONS[:3])}, not {fusion!r}')
    return fusion


def parse_fusion(fusion: str, head: int | float | None, num_heads: int) -> Fusion:
    """The UI's fusion choice as `attention.Fusion`: a mode name, or a head checked against the model.
    Heads are numbered from 1, as people count, in every tab; `attention` indexes them from 0."""
    if fusion == 'one head':
        head = checked_number(head if head is not None else 1, 'head', -10 ** 6, 10 ** 6, integer=True)
        if not 1 <= head <= num_heads:
            raise ValueError(f'this model has {num_heads} heads: choose a head from 1 to {num_heads}')
        return head - 1
    if fusion not in FUSIONS:
        raise ValueError(f'head fusion must be one of {", ".join(FUSIONS)}, not {fusion!r}')
    return fusion


SCALES = ['own', 'shared']  # each map stretched to its own range, or one scale for all layers


def attention_gallery(pred: Prediction, fusion: Fusion = 'mean', opacity: float = 0.6,
                      discard_ratio: float = 0.9, scale: str = 'own') -> list[tuple[Image.Image, str]]:
    """The gallery of what a prediction holds: a ViT's attention per layer and rollout, a CNN's Grad-CAM."""
    from_prediction = late_import('vitdemo.explain').from_prediction
    return explanation_gallery(pred, from_prediction(pred, fusion, discard_ratio), fusion, opacity, scale)


def explanation_gallery(pred: Prediction, explanation: Explanation, fusion: Fusion = 'mean', opacity: float = 0.6,
                        scale: str = 'own') -> list[tuple[Image.Image, str]]:
    """The input with the region the model saw, one overlay per depth, then the overall map. With
    `scale='shared'` every depth's map is coloured on one scale, from the lowest to the highest value of
    any of them: the way to see attention go from scattered to focused through the depth (the overall
    map keeps its own range)."""
    if scale not in SCALES:
        raise ValueError(f'colour scale must be one of {", ".join(SCALES)}, not {scale!r}')
    attention = late_import('vitdemo.attention')
    image, box = attention.fit_for_display(pred.image, pred.box, DISPLAY_SIDE)
    maps = [m for _, m in explanation.maps]
    shared = (min(float(m.min()) for m in maps), max(float(m.max()) for m in maps)) if scale == 'shared' else None
    # opacity 0 draws no heat, only dims what lies outside the model's view; captions short enough to be
    # read whole under a thumbnail, the description says the rest
    # the input first, except where the maps come in pairs to be read side by side
    items = [] if explanation.paired else [(attention.overlay(image, maps[0], box, opacity=0.0),
                                            'input (bright: what it sees)')]
    if explanation.method in ('attention', 'tokens'):
        heads = pred.attentions.shape[1]
        how = f' · head {fusion + 1} of {heads}' if isinstance(fusion, int) else f' · {fusion} of {heads} heads'
    else:
        how = f' · {explanation.target}' if explanation.target else ''
    items += [(attention.overlay(image, m, box, opacity, scale=shared), caption + how)
              for caption, m in explanation.maps]
    if not any(m is explanation.overall[1] for m in maps):  # a last stage or a single map is already shown
        items.append((attention.overlay(image, explanation.overall[1], box, opacity), explanation.overall[0]))
    return items


def input_only(pred: Prediction) -> tuple[Image.Image, str]:
    """The gallery's first picture alone, for an explanation that was stopped: the maps of the method asked
    before must not stay beside predictions they were not drawn for."""
    attention = late_import('vitdemo.attention')
    image, box = attention.fit_for_display(pred.image, pred.box, DISPLAY_SIDE)
    return attention.overlay(image, np.zeros(pred.grid), box, opacity=0.0), 'input: no maps, see above'


def describe(model: Model, pred: Prediction, seconds: float) -> str:
    return _describe(model, pred, seconds) + _classes_note(model)


def _classes_note(model: Model) -> str:
    """A small model's classes, and what that means for an image of anything else."""
    if len(model.classes) > 20:
        return ''
    return (f'\n\nIt knows {len(model.classes)} classes only: {", ".join(model.classes)}. An image of anything '
            'else (a rocket, a face) is still given one of them, often with confidence.')


def _describe(model: Model, pred: Prediction, seconds: float) -> str:
    size = model.data_config['input_size'][1]
    if pred.is_cnn:
        return (f'**{model.name}**: {model.description}. Input {size}x{size}; a CNN has no attention, so each map '
                'is the Grad-CAM of the class explained after a stage: where the evidence for it lies. '
                f'Answered in {seconds:.2f} s.')
    layers, heads, tokens, _ = pred.attentions.shape
    rows, cols = pred.grid
    # the grid and the patch's side both: "8x8 patches" alone reads as the side of a 4-pixel patch
    return (f'**{model.name}**: {model.description}. Input {size}x{size}, a grid of {rows}x{cols} patches of '
            f'{size // rows}x{size // cols} pixels, {tokens} tokens ({pred.num_prefix_tokens} before the patches), '
            f'{layers} layers x {heads} heads. '
            f'Answered in {seconds:.2f} s.')


class PredictView(NamedTuple):
    labels: dict[str, float]  # {class: probability} of the top k
    gallery: list[tuple[Image.Image, str]]
    text: str  # what the model is, and what the maps show
    focus: pd.DataFrame  # each layer's attention entropy, as `explain.focus` (empty for a CNN)
    columns: int  # how many maps a gallery row shows: 2 where they come in pairs


class Explanations:
    """The last few explanations, so that redrawing (opacity, colour scale) never reruns a slow method; and which
    ones an asker (a browser session) is making now."""

    def __init__(self, size: int = 16):
        self.size = size
        self._kept: OrderedDict[tuple, Explanation] = OrderedDict()
        self._making: Counter[tuple] = Counter()
        self._lock = threading.Lock()

    def get(self, key: tuple, compute, asker: str | None = None) -> Explanation:
        with self._lock:
            if key in self._kept:
                self._kept.move_to_end(key)
                return self._kept[key]
            self._making[asker, key] += 1
        try:
            explanation = compute()
        finally:
            with self._lock:
                self._making[asker, key] -= 1
                if not self._making[asker, key]:
                    del self._making[asker, key]
        with self._lock:
            self._kept[key] = explanation
            while len(self._kept) > self.size:
                self._kept.popitem(last=False)
        return explanation

    def making(self, key: tuple, asker: str | None = None) -> bool:
        with self._lock:
            return (asker, key) in self._making


class StillMaking(Exception):
    """The maps asked for are being made by another request of the same asker, whose answer draws them."""


def predict_view(model: Model, image, top_k: int = 5, fusion: str = 'mean', head: int = 1,
                 opacity: float = 0.6, discard_ratio: float = 0.9, scale: str = 'own', method: str = '',
                 target: str | None = None, layer: int | None = None, keep: float = 0.0,
                 progress: Progress | None = None, remembered: Explanations | None = None, *,
                 start_slow: bool = True, asker: str | None = None) -> PredictView:
    """Everything the Predict tab shows: the top classes, the maps of the chosen explanation method (the
    model's first when it offers no such method), how focused each layer is, and a description.
    `start_slow=False` (an option moved, not a new question): a slow method's maps are drawn only from
    `remembered`, never computed; where there are none (it was stopped), the text says so, and where `asker`'s
    own request is making them, `StillMaking` is raised: that request's answer will draw them."""
    start = time.perf_counter()
    top_k = checked_number(top_k, 'top-k', 1, 1000, integer=True)
    opacity = checked_number(opacity, 'overlay opacity', 0, 1)
    discard_ratio = checked_number(discard_ratio, 'rollout discard ratio', 0, 0.99)
    keep = checked_number(keep, 'share of attention to keep', 0, 0.99)
    layer = None if layer is None else checked_number(layer, 'layer', -10 ** 6, 10 ** 6, integer=True)
    pred = model.predict(image, top_k=top_k)
    chosen = 'mean' if pred.is_cnn else parse_fusion(fusion, head, pred.attentions.shape[1])
    explaining = late_import('vitdemo.explain')
    offered = explaining.methods_for(model)
    method = method if method in offered else offered[0]  # e.g. a CNN asked for attention gets its Grad-CAM
    spec = METHODS[method]
    settings = dict(fusion=chosen, discard_ratio=discard_ratio, layer=layer, keep=keep)
    key = (model.name, id(model.module), hashlib.sha1(np.asarray(pred.image).tobytes()).hexdigest(), method,
           target or None if spec.per_class else None, *(settings[name] for name in spec.reads))

    def compute() -> Explanation:
        if spec.slow and not start_slow:
            raise Stopped('a slow method runs when you press Predict or change the image, model, method or '
                          'class; moving an option redraws maps already made')
        return explaining.explain(model, pred, method, target or None, chosen, discard_ratio, layer=layer, keep=keep,
                                  progress=progress)
    if spec.slow and not start_slow and remembered is not None and remembered.making(key, asker):
        raise StillMaking(f'{spec.short} is being made for this asker')
    try:
        explanation = remembered.get(key, compute, asker) if remembered is not None else compute()
    except Stopped as stopped:  # Stop, the time limit or a busy server: the predictions stand, the maps are missing
        return PredictView(dict(pred.top_k), [input_only(pred)],
                           f'{describe(model, pred, time.perf_counter() - start)}\n\n**No maps this time:** {stopped}.',
                           focus_frame(pred), 3)
    gallery = explanation_gallery(pred, explanation, chosen, opacity, scale)
    said = f' for the class **{explanation.target}**' if explanation.target else ''
    text = describe(model, pred, time.perf_counter() - start)
    first = 'The maps' if explanation.paired else 'The first map is your image, dimmed outside what the model sees; ' \
        'the others'
    return PredictView(dict(pred.top_k), gallery, f'{text}\n\n{first}{said}: {explanation.description}.',
                       focus_frame(pred), 2 if explanation.paired else 3)


def focus_frame(pred: Prediction) -> pd.DataFrame:
    """Each layer's attention entropy (`explain.focus`), and that of attention spread evenly, for a line plot."""
    if pred.is_cnn:
        return pd.DataFrame(columns=['layer', 'entropy', 'line'])
    values = late_import('vitdemo.explain').focus(pred)
    even = math.log(pred.grid[0] * pred.grid[1])
    frame = pd.DataFrame([dict(layer=i + 1, entropy=v, line='this image') for i, v in enumerate(values)]
                         + [dict(layer=i + 1, entropy=even, line='spread evenly') for i in range(len(values))])
    # layers as categories: the plot labels each layer once (a numeric axis of 2 layers ticks 1, 1.5, 2 as "1 2 2")
    frame['layer'] = pd.Categorical(frame['layer'], categories=range(1, len(values) + 1))
    return frame


def sanity_view(model: Model, image, method: str = 'attention', target: str | None = None,
                progress: Progress | None = None):
    """The sanity check in pictures and words: the overall map with the trained weights and with weights
    redrawn at random, and whether the map depends on what the model learned (no pictures, and why, where a
    slow method was stopped)."""
    explaining, attention = late_import('vitdemo.explain'), late_import('vitdemo.attention')
    offered = explaining.methods_for(model)
    method = method if method in offered else offered[0]
    pred = model.predict(image)
    try:
        trained, randomized, correlation = explaining.sanity_check(model, pred, method, target or None,
                                                                   progress=progress)
    except Stopped as stopped:
        return [], f'**Sanity check not finished:** {stopped}.'
    shown, box = attention.fit_for_display(pred.image, pred.box, DISPLAY_SIDE)
    gallery = [(attention.overlay(shown, trained.overall[1], box), f'trained: {trained.overall[0]}'),
               (attention.overlay(shown, randomized.overall[1], box), f'random weights: {randomized.overall[0]}')]
    passed = correlation < 0.5
    verdict = ('the map depends on what the model learned: it passes' if passed else
               'the map hardly changes when the weights are random: it shows the architecture or the image, '
               'not what was learned')
    return gallery, (f'**Sanity check** (Adebayo et al. 2018), {method}: rank correlation of the two maps '
                     f'{correlation:.2f}; {verdict}.')


def training_curves(history: list[dict], steps: list[dict] = ()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Long-form frames for the loss and accuracy plots: columns epoch, value, split (train / validation).
    Validation is measured at each epoch's end. Training points come from within epochs where there are some
    (`steps`, fractional epochs), so that the curves move while an epoch runs; then the epochs' own means, which
    lag behind the model, are left out of the curve."""
    def frame(metric: str) -> pd.DataFrame:
        splits = (('val', 'validation'),) if steps else (('train', 'train'), ('val', 'validation'))
        rows = [dict(epoch=epochs_seen(h), value=h[f'{split}_{metric}'], split=name)
                for h in history for split, name in splits if h.get(f'{split}_{metric}') is not None]
        rows += [dict(epoch=p['epoch'], value=p[f'train_{metric}'], split='train') for p in steps]
        return pd.DataFrame(sorted(rows, key=lambda r: (r['split'], r['epoch'])), columns=['epoch', 'value', 'split'])
    return frame('loss'), frame('accuracy')


def accuracy_title(history: list[dict]) -> str:
    """The accuracy plot's title, with the latest validation accuracy: a line needs two points, so the first
    epoch's validation would otherwise show only as its legend."""
    last = next((h for h in reversed(history) if h.get('val_accuracy') is not None), None)
    if last is None:
        return 'Accuracy'
    return f'Accuracy (validation {last["val_accuracy"]:.1%} after {epochs_text([last])})'


@functools.lru_cache(maxsize=4)
def colour_bar_html(cmap: str = 'inferno', stops: int = 16) -> str:
    """The maps' colour scale as a strip, with what its ends mean: HTML (styled by the app's `.colour-bar`), so
    the words stay readable at any width and drawing it needs no figure at start-up."""
    colours = matplotlib.colormaps[cmap](np.linspace(0, 1, stops))[:, :3]
    gradient = ', '.join('#{:02x}{:02x}{:02x}'.format(*(round(c * 255) for c in rgb)) for rgb in colours)
    return (f'<div class="colour-bar"><div class="strip" style="background: linear-gradient(to right, {gradient})">'
            '</div><div class="ends"><span>dark: less</span>'
            '<span>bright: more attention, or more evidence for the class</span></div></div>')


def progress_html(progress: float, status: str) -> str:
    """A training run's progress as a bar (styled by the app's `.run-progress`), its share and its status line."""
    share = min(max(float(progress), 0.0), 1.0)
    return (f'<div class="run-progress" role="progressbar" aria-valuenow="{share * 100:.0f}" aria-valuemin="0" '
            f'aria-valuemax="100"><div style="width: {share * 100:.1f}%"></div></div>'
            f'<p><strong>{share:.0%}</strong> · {html.escape(status)}</p>')


def runs_frame(histories: dict[str, list[dict]], against: str = 'epoch') -> pd.DataFrame:
    """Several runs' validation accuracy on one chart (ViT vs ResNet-18, with vs without a teacher): columns
    x (the epoch, or the minutes since the run began), accuracy and run, from each checkpoint's history."""
    if against not in ('epoch', 'minutes'):
        raise ValueError(f"runs are set side by side against 'epoch' or 'minutes', not {against!r}")
    rows = [dict(x=epochs_seen(h) if against == 'epoch' else h['seconds'] / 60, accuracy=h['val_accuracy'], run=name)
            for name, history in histories.items() for h in history if h.get('val_accuracy') is not None]
    return pd.DataFrame(rows, columns=['x', 'accuracy', 'run'])
