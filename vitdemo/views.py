"""What the Predict tab shows, as plain functions of a prediction: no UI code, tested without a browser."""
import time

import pandas as pd
from PIL import Image

from .attention import Fusion, fit_for_display, overlay
from .backends import Model, Prediction
from .policy import checked_number

FUSIONS = ['mean', 'max', 'min', 'one head']
DISPLAY_SIDE = 448  # overlays are drawn at this size: sharp in the gallery, quick to render


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


def attention_gallery(pred: Prediction, fusion: Fusion = 'mean', opacity: float = 0.6,
                      discard_ratio: float = 0.9) -> list[tuple[Image.Image, str]]:
    """The input with the region the model saw, one CLS-attention overlay per layer, then the rollout
    (for a CNN: one Grad-CAM per stage, the last being the whole network's)."""
    image, box = fit_for_display(pred.image, pred.box, DISPLAY_SIDE)
    layers = pred.layer_maps(fusion)
    rows, cols = pred.grid
    seen = 'pixels through four stages' if pred.is_cnn else f'{rows}x{cols} patches'
    # opacity 0 draws no heat, only dims what lies outside the model's view
    # captions short enough to be read whole under a thumbnail; the description says the rest
    items = [(overlay(image, layers[0], box, opacity=0.0), 'input (bright: what it sees)')]
    if pred.is_cnn:
        return items + [(overlay(image, m, box, opacity), f'stage {i + 1} · Grad-CAM {m.shape[0]}x{m.shape[1]}')
                        for i, m in enumerate(layers)]
    heads = pred.attentions.shape[1]
    how = f'head {fusion + 1} of {heads}' if isinstance(fusion, int) else f'{fusion} of {heads} heads'
    items += [(overlay(image, layer, box, opacity), f'layer {i + 1} · {how}') for i, layer in enumerate(layers)]
    items.append((overlay(image, pred.overall_map(fusion, discard_ratio), box, opacity),
                  f'rollout · all {len(layers)} layers'))
    return items


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
                'is the Grad-CAM of the top class after a stage: where the evidence for it lies. '
                f'Answered in {seconds:.2f} s.')
    layers, heads, tokens, _ = pred.attentions.shape
    return (f'**{model.name}**: {model.description}. Input {size}x{size}, {pred.grid[0]}x{pred.grid[1]} patches, '
            f'{tokens} tokens ({pred.num_prefix_tokens} before the patches), {layers} layers x {heads} heads. The '
            'maps: your image, dimmed outside what the model sees; each layer\'s CLS attention; the rollout '
            f'through all layers. Answered in {seconds:.2f} s.')


def predict_view(model: Model, image, top_k: int = 5, fusion: str = 'mean', head: int = 1,
                 opacity: float = 0.6, discard_ratio: float = 0.9):
    """Everything the Predict tab shows: {label: probability}, the attention gallery, and a description."""
    start = time.perf_counter()
    top_k = checked_number(top_k, 'top-k', 1, 1000, integer=True)
    opacity = checked_number(opacity, 'overlay opacity', 0, 1)
    discard_ratio = checked_number(discard_ratio, 'rollout discard ratio', 0, 0.99)
    pred = model.predict(image, top_k=top_k)
    chosen = 'mean' if pred.is_cnn else parse_fusion(fusion, head, pred.attentions.shape[1])
    gallery = attention_gallery(pred, chosen, opacity, discard_ratio)
    return dict(pred.top_k), gallery, describe(model, pred, time.perf_counter() - start)


def training_curves(history: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Long-form frames for the loss and accuracy plots: columns epoch, value, split (train / validation)."""
    def frame(metric: str) -> pd.DataFrame:
        rows = [dict(epoch=h['epoch'], value=h[f'{split}_{metric}'], split=name)
                for h in history for split, name in (('train', 'train'), ('val', 'validation'))
                if h.get(f'{split}_{metric}') is not None]
        return pd.DataFrame(rows, columns=['epoch', 'value', 'split'])
    return frame('loss'), frame('accuracy')


def progress_text(progress: float, status: str, width: int = 30) -> str:
    filled = round(progress * width)
    return f'`{"█" * filled}{"░" * (width - filled)}` **{progress:.0%}**  \n{status}'
