"""Training from the app: one run at a time per server, in a background thread, reported as snapshots.

The UI iterates `TrainingJob.run(...)` and shows each `Snapshot` (progress, ETA, curves, the attention of
one fixed validation image after every epoch). A second person who presses Start is told at once that
the server is busy rather than queued behind a run of many minutes. Before any work, the run is checked
against the server's policy (minutes, model size, memory) and given a checkpoint path in the model store
that replaces no one's file. In public mode a run belongs to the session that started it: only that
session can stop it.
"""
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import torch
from PIL import Image

from .attention import cls_attention, overlay
from .backends import TIMM_ARCHS
from .data import ImageData, load_dataset, normalize
from .cnn import CifarResNet, ResNetConfig
from .model import ViTConfig
from .policy import CIFAR10_IMAGES, ServerPolicy, check_training, checked_number, release_memory
from .store import NAME_PATTERN, ModelStore
from .train import TrainConfig, TrainEvent, split, train
from .weights import Classifier

log = logging.getLogger(__name__)

# Presets for the Train tab: (model settings, budget). Sized for a 2-core CPU.
TRAIN_PRESETS: dict[str, dict] = {
    # measured: 10-13 epochs, 75.5-76.2% validation with the conv stem (68.3-69.5% with a patch projection), with
    # flips and 2-pixel crops; with 4-pixel crops and learned position embeddings at batch 256, 67.2%: a
    # run this short underfits, so it wants less augmentation
    '10-minute CPU demo': dict(arch='vit', embed_dim=128, depth=4, num_heads=4, patch_size=4, minutes=10.0,
                               batch_size=128, lr=2e-3, pos_embed='sincos', stem='conv', crop_padding=2),
    '2-minute quick look': dict(arch='vit', embed_dim=96, depth=3, num_heads=3, patch_size=4, minutes=2.0,
                                batch_size=128, lr=2e-3, pos_embed='sincos', stem='conv', crop_padding=0),
    '30-minute, larger model': dict(arch='vit', embed_dim=192, depth=6, num_heads=3, patch_size=4, minutes=30.0,
                                    batch_size=256, lr=2e-3, pos_embed='learn', stem='conv', crop_padding=4),
    # ResNet-18 does ~8x the arithmetic per image of the 10-minute ViT: about one epoch in ten minutes
    '10-minute CNN baseline (ResNet-18)': dict(arch='resnet18', embed_dim=128, depth=4, num_heads=4, patch_size=4,
                                               minutes=10.0, batch_size=128, lr=2e-3, pos_embed='learn', stem='conv',
                                               crop_padding=4),
}
ARCHS = ['vit', 'resnet18']


class TrainingBusy(RuntimeError):
    """Another training run holds this server."""


class TrainingFailed(RuntimeError):
    """A run that broke off; the message says why, and nothing of the run is kept."""


@dataclass
class Snapshot:
    progress: float  # 0..1 of the budget
    status: str  # one line for people
    history: list[dict] = field(default_factory=list)  # one row per finished epoch
    attention: Image.Image | None = None  # CLS attention of the fixed image, after the last epoch
    checkpoint: Path | None = None  # set on the final snapshot when a checkpoint was written
    done: bool = False


def configs_from_form(embed_dim: int, depth: int, num_heads: int, patch_size: int, minutes: float,
                      batch_size: int, lr: float, mlp_ratio: float = 2.0, seed: int = 0, img_size: int = 32,
                      arch: str = 'vit', pos_embed: str = 'learn', stem: str = 'conv',
                      crop_padding: int = 4) -> tuple[ViTConfig | ResNetConfig, TrainConfig]:
    """The Train tab's fields as configs, every value checked before any work starts. The ViT's own
    fields (dim, depth, heads, patch, positions, stem) count only for `arch='vit'`: the form hides them
    for the CNN."""
    if arch not in ARCHS:
        raise ValueError(f'model must be one of {", ".join(ARCHS)}, not {arch!r}')
    batch_size = checked_number(batch_size, 'batch size', 1, 4096, integer=True)
    if arch == 'vit':
        embed_dim = checked_number(embed_dim, 'embed dim', 1, 1024, integer=True)
        depth = checked_number(depth, 'depth', 1, 24, integer=True)
        num_heads = checked_number(num_heads, 'heads', 1, 64, integer=True)
        patch_size = checked_number(patch_size, 'patch size', 1, img_size, integer=True)
    minutes = checked_number(minutes, 'minutes', 0, 10 ** 6)
    lr = checked_number(lr, 'learning rate', 0, 1)
    crop_padding = checked_number(crop_padding, 'crop padding', -10 ** 6, 10 ** 6, integer=True)
    if arch == 'resnet18':
        model_config = ResNetConfig(img_size=img_size)
    else:
        try:
            model_config = ViTConfig(img_size=img_size, patch_size=int(patch_size), num_classes=10,
                                     embed_dim=int(embed_dim), depth=int(depth), num_heads=int(num_heads),
                                     mlp_ratio=float(mlp_ratio), pos_embed=pos_embed, stem=stem)
        except AssertionError as e:
            raise ValueError(str(e)) from None
    return model_config, TrainConfig(minutes=float(minutes), batch_size=int(batch_size), lr=float(lr),
                                     crop_padding=int(crop_padding), seed=int(seed))


def checkpoint_name(name: str, reserved: set[str] = frozenset()) -> str:
    """A run's name, checked: letters, digits, - and _, and none of `reserved` (compared without case)."""
    name = (name or '').strip() if isinstance(name, str) else ''
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError('name the model with letters, digits, - and _ (at most 48 characters)')
    if name.casefold() in {r.casefold() for r in reserved}:
        raise ValueError(f'{name} is the name of a model the app ships; choose another name')
    return name


def attention_snapshot(model: Classifier, image: torch.Tensor, mean: list[float], std: list[float],
                       display: int = 192) -> Image.Image:
    """Where the CLS token looks in the last layer (a CNN: its last stage's Grad-CAM), for one uint8
    (3, H, W) image, drawn large."""
    was_training = model.training
    model.eval()
    x = normalize(image[None], mean, std)
    with torch.no_grad():
        if isinstance(model, CifarResNet):
            heat = model.forward_with_saliency(x)[1][-1][0]
        else:
            attentions = model.forward_with_attention(x)[1]
            grid = (model.patch_embed.grid_size,) * 2
            heat = cls_attention(torch.stack([a[0] for a in attentions]).float(), grid)[-1]
    model.train(was_training)
    picture = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((display, display), Image.Resampling.NEAREST)
    return overlay(picture, heat, opacity=0.55)


def format_eta(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f'{seconds // 60}:{seconds % 60:02d}'


class TrainingJob:
    """Runs `vitdemo.train.train` for the app; at most one run at a time.

    Args:
        data_path: the training images (see `data.load_dataset`).
        store: where checkpoints go (`trained/`), and which names the shipped models hold.
        policy: the server's limits, checked before any work.
        update_seconds: at most one step snapshot per this many seconds.
    """

    def __init__(self, data_path: str | Path, store: ModelStore, policy: ServerPolicy = ServerPolicy(),
                 update_seconds: float = 1.0):
        self.data_path = data_path
        self.store = store
        self.policy = policy
        self.update_seconds = update_seconds
        self._running = threading.Lock()
        self._stop = threading.Event()
        self._owner: str | None = None

    @property
    def busy(self) -> bool:
        return self._running.locked()

    def stop(self, owner: str | None = None) -> bool:
        """Ask the current run to end at its next step; it still saves what it learned. In public mode only
        the run's owner may; returns whether a run was asked to stop."""
        if not self.busy or (self.policy.public and owner != self._owner):
            return False
        self._stop.set()
        return True

    def run(self, model_config: ViTConfig | ResNetConfig, cfg: TrainConfig, name: str, owner: str | None = None,
            data: ImageData | None = None) -> Iterator[Snapshot]:
        reserved = set(TIMM_ARCHS) | {n.split('/')[1] for n in self.store.checkpoint_names()}
        name = checkpoint_name(name, reserved)
        estimate = check_training(self.policy, model_config, cfg.minutes, cfg.batch_size,
                                  len(data) if data is not None else CIFAR10_IMAGES)
        if not self._running.acquire(blocking=False):
            raise TrainingBusy('a training run is already in progress on this server; '
                               'try again when it ends (predictions keep working meanwhile)')
        try:
            self._stop.clear()
            self._owner = owner
            bytes_per_param = 2 if cfg.half_checkpoint else 4
            out = self.store.reserve(name, owner, estimate.params * bytes_per_param + 2 ** 16)  # + the header
            yield Snapshot(0.0, 'loading the training images (the first time decodes and caches them)')
            if data is None:
                data = load_dataset(self.data_path)
                # the first check assumed CIFAR-10's size: check again with the real one
                check_training(self.policy, model_config, cfg.minutes, cfg.batch_size, len(data))
            model_config = replace(model_config, num_classes=len(data.classes))  # the form's 10 is a guess
            train_data, val_data = split(data, cfg)
            fixed = (val_data or train_data).images[0]  # one image: what changes is the model
            yield from self._follow(model_config, cfg, data, fixed, out)
        finally:
            self._stop.clear()
            self._owner = None
            self._running.release()

    def _follow(self, model_config, cfg, data, fixed, out) -> Iterator[Snapshot]:
        events: queue.Queue = queue.Queue()
        outcome: dict = {}

        def on_event(event: TrainEvent) -> None:
            # runs in the training thread, between steps: safe to look at the model here
            picture = None
            if event.kind == 'epoch':
                picture = attention_snapshot(event.model, fixed, *event.normalization)
            events.put((event, picture))

        def work() -> None:
            try:
                outcome['result'] = train(model_config, cfg, data, out=out, on_event=on_event, stop=self._stop)
            except Exception as e:  # reported to the person; the server goes on
                # keep the message only: the exception's traceback holds the run's frames, and with them
                # the model, its optimiser state and the batch's activations
                outcome['error'] = f'{type(e).__name__}: {e}'
                if isinstance(e, MemoryError) or "can't allocate memory" in str(e):
                    outcome['error'] = 'out of memory: lower the batch size or the model size'
                log.warning('training run %s failed: %s: %s', out.stem, type(e).__name__, str(e)[:300])
            events.put(None)

        worker = threading.Thread(target=work, name='vitdemo-train', daemon=True)
        worker.start()
        history: list[dict] = []
        picture, progress, last_yield = None, 0.0, 0.0
        try:
            while (item := events.get()) is not None:
                event, new_picture = item
                picture, progress = new_picture or picture, event.progress
                if event.kind == 'epoch':
                    history.append(dict(epoch=event.epoch, train_loss=event.loss, train_accuracy=event.accuracy,
                                        val_loss=event.val_loss, val_accuracy=event.val_accuracy))
                elif event.kind == 'done' or time.monotonic() - last_yield < self.update_seconds:
                    continue
                last_yield = time.monotonic()
                yield Snapshot(event.progress, self._status(event), list(history), picture)
        finally:
            if worker.is_alive():  # the watcher left (browser closed): stop cleanly, keep what was learned
                self._stop.set()
                worker.join()
        if 'error' in outcome:
            release_memory()
            raise TrainingFailed(f'the training run failed ({outcome["error"]}); nothing is kept of it, and '
                                 'the server goes on')
        result = outcome['result']
        val = result.metrics.get('val_accuracy')
        status = ('stopped' if result.stopped else 'finished') + f' after {len(result.history)} epochs'
        status += f': validation accuracy {val:.1%}' if val is not None else ''
        status += f'; saved as trained/{out.stem}' if result.path else '; nothing was saved (no epoch completed)'
        yield Snapshot(progress, status, list(history), picture, checkpoint=result.path, done=True)

    @staticmethod
    def _status(event: TrainEvent) -> str:
        val = f', val acc {event.val_accuracy:.1%}' if event.val_accuracy is not None else ''
        return (f'epoch {event.epoch}, step {event.step}: loss {event.loss:.3f}, acc {event.accuracy:.1%}{val}, '
                f'lr {event.lr:.1e}, {event.images_per_sec:.0f} images/s, ETA {format_eta(event.eta_seconds)}')
