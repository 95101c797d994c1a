"""Two models on one image: layers paired by relative depth, attention agreement, and ImageNet predictions
read as CIFAR-10 classes so an ImageNet model and a CIFAR-10 model can be scored on the same picture."""
import numpy as np
import torch
from PIL import Image

from .attention import Fusion, fit_for_display, overlay
from .backends import Model, Prediction
from .explain import from_prediction

# ImageNet-1k class indices for each CIFAR-10 class. CIFAR-10's own definitions: "automobile" is sedans,
# SUVs and the like, "truck" only big trucks, and neither includes pickup trucks (717), so it is left out.
# ImageNet has no deer: its antelopes are the nearest and are marked as approximate.
IMAGENET_TO_CIFAR10: dict[str, list[int]] = {
    'airplane': [404, 895, 908],  # airliner, warplane, wing
    'automobile': [436, 468, 511, 609, 627, 656, 661, 751, 817],  # beach wagon, cab, convertible, jeep, ...
    'bird': list(range(7, 25)) + list(range(80, 101)) + list(range(127, 147)),
    'cat': list(range(281, 286)),  # tabby, tiger, Persian, Siamese, Egyptian
    'deer': [351, 352, 353],  # hartebeest, impala, gazelle (approximate)
    'dog': list(range(151, 269)),  # Chihuahua ... Mexican hairless
    'frog': [30, 31, 32],  # bullfrog, tree frog, tailed frog
    'horse': [339],  # sorrel
    'ship': [403, 472, 484, 510, 554, 576, 625, 628, 724, 780, 814, 833, 871, 914],
    'truck': [555, 569, 675, 864, 867],  # fire engine, garbage truck, moving van, tow truck, trailer truck
}
OTHER = 'other (no CIFAR-10 class)'


def imagenet_to_cifar10(probs: torch.Tensor) -> dict[str, float]:
    """1000 ImageNet probabilities -> the 10 CIFAR-10 classes (sums over their ImageNet classes) and the rest."""
    assert probs.shape == (1000,), f'expected 1000 ImageNet probabilities, got {tuple(probs.shape)}'
    mapped = {name: float(probs[idx].sum()) for name, idx in IMAGENET_TO_CIFAR10.items()}
    mapped[OTHER] = max(0.0, 1.0 - sum(mapped.values()))
    return mapped


def align_layers(depth_a: int, depth_b: int) -> list[tuple[int, int]]:
    """Pairs (layer of a, layer of b), 0-based, one per layer of the shallower model, matched by relative
    depth: layer i of 6 goes with layer 2i+1 of 12, and the last layers always meet."""
    if depth_a > depth_b:
        return [(a, b) for b, a in align_layers(depth_b, depth_a)]
    return [(i, round((i + 1) * depth_b / depth_a) - 1) for i in range(depth_a)]


def image_space(heat: torch.Tensor, box: tuple[float, float, float, float], image_size: tuple[int, int],
                side: int = 64) -> np.ndarray:
    """A (rows, cols) patch map placed on its box in image coordinates, at `side` cells on the longer side;
    zero where the model did not look. Two models' maps become comparable whatever their grids and crops."""
    w, h = image_size
    scale = side / max(w, h)
    out = np.zeros((max(1, round(h * scale)), max(1, round(w * scale))), dtype=np.float32)
    left, top, right, bottom = (round(v * scale) for v in box)
    size = (max(right - left, 1), max(bottom - top, 1))
    values = np.asarray(heat, dtype=np.float32)
    cells = np.asarray(Image.fromarray(values).resize(size, Image.Resampling.NEAREST))
    cells = cells * (values.size / (size[0] * size[1]))  # keep each patch's share of the total
    out[top:top + size[1], left:left + size[0]] = cells[:out.shape[0] - top, :out.shape[1] - left]
    return out


def top_mass(map_: np.ndarray, mass: float = 0.2) -> np.ndarray:
    """The fewest cells that together hold `mass` of the total: where the map looks most."""
    flat = map_.flatten()
    order = np.argsort(flat)[::-1]
    keep = np.cumsum(flat[order]) <= mass * flat.sum()
    keep[0] = True  # at least the strongest cell
    mask = np.zeros(flat.shape, dtype=bool)
    mask[order[keep]] = True
    return mask.reshape(map_.shape)


def agreement(pred_a: Prediction, heat_a: torch.Tensor, pred_b: Prediction, heat_b: torch.Tensor,
              mass: float = 0.2) -> float:
    """IoU, in image space, of the regions holding the top `mass` of each model's attention."""
    a = top_mass(image_space(heat_a, pred_a.box, pred_a.image.size), mass)
    b = top_mass(image_space(heat_b, pred_b.box, pred_b.image.size), mass)
    return float((a & b).sum() / max((a | b).sum(), 1))


def agreement_words(iou: float) -> str:
    """An IoU of the two most-attended regions, said in words."""
    if iou >= 0.6:
        return 'look at the same place'
    if iou >= 0.35:
        return 'overlap a lot'
    if iou >= 0.15:
        return 'overlap a little'
    return 'look elsewhere'


def left_out(depth: int, paired: list[int]) -> list[int]:
    """1-based layers of a model that no pair shows (the deeper model has more than the pairs)."""
    return [i + 1 for i in range(depth) if i not in set(paired)]


def scores_for(model: Model, pred: Prediction, as_cifar10: bool) -> tuple[dict[str, float], bool]:
    """{label: probability} for display, and whether ImageNet classes were mapped onto CIFAR-10."""
    if as_cifar10 and len(model.classes) == 1000:
        return imagenet_to_cifar10(pred.probs), True
    return dict(pred.top_k), False


def compare_view(model_a: Model, model_b: Model, image, fusion: Fusion = 'mean', as_cifar10: bool = True,
                 top_k: int = 5, opacity: float = 0.6, discard_ratio: float = 0.9, display: int = 320):
    """Everything the Compare tab shows: each model's scores, the aligned layer overlays with their
    agreement, both rollouts, and a description."""
    pred_a, pred_b = model_a.predict(image, top_k), model_b.predict(image, top_k)
    (scores_a, mapped_a), (scores_b, mapped_b) = scores_for(model_a, pred_a, as_cifar10), \
        scores_for(model_b, pred_b, as_cifar10)
    # what each prediction holds (a ViT's attention and rollout, a CNN's Grad-CAM), through the one interface
    explained_a, explained_b = (from_prediction(p, fusion, discard_ratio) for p in (pred_a, pred_b))
    maps_a, maps_b = explained_a.maps, explained_b.maps
    image_a, box_a = fit_for_display(pred_a.image, pred_a.box, display)
    image_b, box_b = fit_for_display(pred_b.image, pred_b.box, display)

    def pair(heat_a, heat_b, caption_a, caption_b) -> float:
        # one row per pair in a two-column gallery: A | B, their agreement in words under B
        iou = agreement(pred_a, heat_a, pred_b, heat_b)
        gallery.append((overlay(image_a, heat_a, box_a, opacity), caption_a))
        gallery.append((overlay(image_b, heat_b, box_b, opacity), f'{caption_b} · {agreement_words(iou)}'))
        return iou

    gallery: list[tuple[Image.Image, str]] = []
    depth_a, depth_b = (maps[0][0].split()[0] for maps in (maps_a, maps_b))  # 'layer' or 'stage'
    pairs = align_layers(len(maps_a), len(maps_b))
    ious = [pair(maps_a[la][1], maps_b[lb][1], f'A {maps_a[la][0]}', f'B {maps_b[lb][0]}') for la, lb in pairs]
    pair(explained_a.overall[1], explained_b.overall[1], f'A {explained_a.overall[0]}', f'B {explained_b.overall[0]}')
    note = (' ImageNet predictions are summed into CIFAR-10 classes (dog breeds into "dog", and so on; deer '
            "into ImageNet's antelopes, the nearest it has).") if mapped_a or mapped_b else ''
    cnn = (' A CNN has no attention: its maps are the Grad-CAM of its top class after each stage, and its last '
           'stage stands in for the rollout.') if 'gradcam' in (explained_a.method, explained_b.method) else ''
    skipped = ''
    for who, depth, count, paired in (('A', depth_a, len(maps_a), [a for a, _ in pairs]),
                                      ('B', depth_b, len(maps_b), [b for _, b in pairs])):
        if missing := left_out(count, paired):
            skipped += f' Not shown: {who}\'s {depth}s {", ".join(map(str, missing))} (no partner at their depth).'
    text = (f'**A** {model_a.name} ({len(maps_a)} {depth_a}s) vs **B** {model_b.name} ({len(maps_b)} {depth_b}s), '
            'paired by relative depth, one pair a row. Under each B, how much the two agree: the overlap (IoU) '
            'of the image regions holding the top 20% of each map, per pair: '
            f'{", ".join(f"{v:.2f}" for v in ious)}.{skipped}{cnn}{note}')
    return scores_a, scores_b, gallery, text
