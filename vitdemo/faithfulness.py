"""Can I trust this map? Perturbation tests of every explanation on the image at hand.

Deletion blanks the patches a map ranks highest first and watches the explained class's probability:
a faithful map makes it fall fast (a small area under the curve). Insertion starts from a blank image and
reveals those patches first: a faithful map makes it rise fast (a large area). Both are set beside a
random order, which any map worth reading must beat.
"""
import time
from dataclasses import dataclass

import torch

from .backends import Model, Prediction
from .explain import class_index, explain, images_per_pass, methods_for
from .methods import METHODS, Progress


@dataclass
class Score:
    name: str  # which map ranked the patches
    fractions: list[float]
    deletion: list[float]  # the class's probability as patches are blanked, most relevant first
    insertion: list[float]  # ... as they are revealed on a blank image
    seconds: float  # what the map itself cost

    @property
    def deletion_auc(self) -> float:
        return auc(self.fractions, self.deletion)

    @property
    def insertion_auc(self) -> float:
        return auc(self.fractions, self.insertion)


def auc(x: list[float], y: list[float]) -> float:
    return float(sum((x[i + 1] - x[i]) * (y[i] + y[i + 1]) / 2 for i in range(len(x) - 1)))


def perturbation_curves(model: Model, pred: Prediction, order: torch.Tensor, target: int, steps: int = 10,
                        ends: tuple[float, float] | None = None) -> tuple[list[float], list[float], list[float]]:
    """(fractions, deletion, insertion): the probability of class `target` with the first fraction of
    patches in `order` blanked (to the normalised mean, 0), and with only those patches shown. `ends`: the
    probabilities of the whole image and of a blank one (`end_points`), which every order shares."""
    x = model.transform(pred.image).unsqueeze(0)
    whole, blank = ends or end_points(model, pred, target)
    rows, cols = pred.grid
    ph, pw = x.shape[-2] // rows, x.shape[-1] // cols
    fractions = [i / steps for i in range(steps + 1)]
    inner = fractions[1:-1]
    mask = torch.zeros(len(inner), 1, rows, cols)  # 1 where a patch is among the first `fraction`
    for i, f in enumerate(inner):
        mask[i, 0].view(-1)[order[:round(f * rows * cols)]] = 1.0
    pixels = mask.repeat_interleave(ph, -2).repeat_interleave(pw, -1)
    batch = torch.cat([x * (1 - pixels), x * pixels])  # deletion, then insertion
    probs = _probabilities(model, batch, target) if inner else []
    return fractions, [whole, *probs[:len(inner)], blank], [blank, *probs[len(inner):], whole]


def end_points(model: Model, pred: Prediction, target: int) -> tuple[float, float]:
    """The probability of class `target` for the whole image and for a blank one (every patch blanked)."""
    x = model.transform(pred.image).unsqueeze(0)
    whole, blank = _probabilities(model, torch.cat([x, torch.zeros_like(x)]), target)
    return whole, blank


def _probabilities(model: Model, images: torch.Tensor, target: int) -> list[float]:
    with torch.inference_mode():
        return [p for batch in images.split(images_per_pass(model))
                for p in model.module(batch.to(model.device)).float().softmax(-1)[:, target].cpu().tolist()]


def faithfulness(model: Model, image, target: int | str | None = None, steps: int = 10, seed: int = 0,
                 slow: bool = True, progress: Progress | None = None) -> list[Score]:
    """Deletion and insertion for the overall map of every method the model offers (and, for attention, its
    last layer alone), beside a random order; `slow=False` leaves out the methods of many passes. `progress`
    is told the share done before each map and each pair of curves (a ViT-B's take seconds each on a CPU),
    and may stop the work there by raising `Stopped`."""
    pred = image if isinstance(image, Prediction) else model.predict(image)
    index = class_index(model, target, pred)
    methods = [m for m in methods_for(model) if METHODS[m].ranked and (slow or not METHODS[m].slow)]
    curves = 1 + sum(2 if m == 'attention' else 1 for m in methods)  # random, and each map (attention's two)
    units = len(methods) + curves
    tell = progress or (lambda share: None)
    maps: list[tuple[str, torch.Tensor, float]] = []
    for i, method in enumerate(methods):
        tell(i / units)
        start = time.perf_counter()
        share = None if progress is None else (lambda f, i=i: progress((i + f) / units))
        explanation = explain(model, pred, method, index, progress=share)
        spent = time.perf_counter() - start
        if method == 'attention':
            maps.append(('last-layer attention', explanation.maps[-1][1], spent))
            maps.append(('rollout', explanation.overall[1], spent))
        else:
            maps.append((METHODS[method].short, explanation.overall[1], spent))
    rows, cols = pred.grid
    random_order = torch.randperm(rows * cols, generator=torch.Generator().manual_seed(seed))
    ends = end_points(model, pred, index)
    orders = [('random order', random_order, 0.0)] + [
        (name, torch.as_tensor(heat).flatten().argsort(descending=True), spent) for name, heat, spent in maps]
    scores = []
    for j, (name, order, spent) in enumerate(orders):
        tell((len(methods) + j) / units)
        scores.append(Score(name, *perturbation_curves(model, pred, order, index, steps, ends), spent))
    return scores


def verdict(scores: list[Score]) -> str:
    """Which map earned trust on this image, in words: beating random at both deletion and insertion."""
    random = scores[0]
    trusted = [s for s in scores[1:] if s.deletion_auc < 0.9 * random.deletion_auc
               and s.insertion_auc > 1.1 * random.insertion_auc]
    if not trusted:
        return 'no map beats a random order at both deletion and insertion on this image: read none as evidence'
    best = min(trusted, key=lambda s: s.deletion_auc - s.insertion_auc)
    others = [s.name for s in trusted if s is not best]
    return (f'{best.name} earns the most trust on this image (it beats random at deletion and insertion)'
            + (f'; {", ".join(others)} beat random too' if others else ''))
