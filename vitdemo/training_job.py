"""Training from the app: one run at a time per server, in a background thread, reported as snapshots.

The UI iterates `TrainingJob.run(...)` and shows each `Snapshot` (progress, ETA, curves, the attention of
one fixed validation image after every epoch). A second person who presses Start is told at once that
the server is busy rather than queued behind a run of many minutes. Before any work, the run is checked
against the server's policy (minutes, model size, memory) and given a checkpoint path in the model store
that replaces no one's file. In public mode a run belongs to the session that started it: only that
session can stop it.

The page creates its `TrainingJob` before torch is imported: a run imports the training code when it starts.
"""
from __future__ import annotations

import logging
import os
import queue
import re
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from PIL import Image

from .catalog import TIMM_ARCHS, ModelUnavailable
from .lazy import late_import
from .metadata import epochs_text, read_metadata
from .policy import (CIFAR10_IMAGES, ServerPolicy, check_training, fitting_batch, release_memory,
                     release_openmp_workers)
from .store import NAME_PATTERN, ModelStore

if TYPE_CHECKING:
    import torch

    from .data import ImageData
    from .filmstrip import Filmstrip
    from .train_form import TrainForm
    from .train import TrainConfig, TrainEvent
    from .weights import Classifier, ModelConfig

log = logging.getLogger(__name__)


class TrainingBusy(RuntimeError):
    """Another training run holds this server."""


class TrainingFailed(RuntimeError):
    """A run that broke off; the message says why, and nothing of the run is kept."""


@dataclass
class Snapshot:
    progress: float  # 0..1 of the budget
    status: str  # one line for people
    history: list[dict] = field(default_factory=list)  # one row per finished epoch
    steps: list[dict] = field(default_factory=list)  # training loss and accuracy within epochs, ~20 an epoch
    strip: list[tuple[Image.Image, str]] = field(default_factory=list)  # the fixed image's attention, an epoch each
    subject: str = ''  # the fixed image's true class
    filmstrip: Filmstrip | None = None  # a ViT's every layer on a few fixed images, an epoch each
    classes: list[str] = field(default_factory=list)
    checkpoint: Path | None = None  # set on the final snapshot when a checkpoint was written
    done: bool = False


def checkpoint_name(name: str, reserved: set[str] = frozenset()) -> str:
    """A run's name, checked: letters, digits, - and _, and none of `reserved` (compared without case)."""
    name = (name or '').strip() if isinstance(name, str) else ''
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError('name the model with letters, digits, - and _ (at most 48 characters)')
    if name.casefold() in {r.casefold() for r in reserved}:
        raise ValueError(f'{name} is the name of a model the app ships; choose another name')
    return name


def reserved_names(store: ModelStore) -> set[str]:
    """Names a visitor's model may not take: the pretrained models' and the shipped checkpoints'."""
    return set(TIMM_ARCHS) | {n.split('/')[1] for n in store.checkpoint_names() if n.startswith('scratch/')}


def add_checkpoint(store: ModelStore, source: str | Path, owner: str | None,
                   max_params: int | None = None) -> tuple[Path, list[str]]:
    """A checkpoint a visitor hands the app (one they downloaded, or trained elsewhere), added to their models as
    `trained/NAME`, NAME from its file's name: checked and written again by this code, never kept as it came
    (`vitdemo.weights.rewrite_checkpoint`). Returns its path and what of its metadata was left out."""
    # a browser names a second download "my_vit (1).safetensors"
    stem = re.sub(r'[^A-Za-z0-9_-]+', '_', Path(source).stem).strip('_-')[:48] or 'uploaded'
    name = checkpoint_name(stem, reserved_names(store))
    store.runs_dir.mkdir(parents=True, exist_ok=True)
    checked = store.runs_dir / f'.{secrets.token_hex(8)}.tmp'  # what a kill leaves, `clean_partials` removes
    try:
        left_out = late_import('vitdemo.weights').rewrite_checkpoint(source, checked, max_params)
        # room is made once the file is known good (a refused one costs the visitor nothing), and among the
        # owner's own models alone: an addition costs a flood milliseconds, a training run minutes
        out = store.reserve(name, owner, checked.stat().st_size, others_make_room=False)
        os.replace(checked, out)
    finally:
        checked.unlink(missing_ok=True)
    return out, left_out


def attention_snapshot(model: Classifier, image: torch.Tensor, mean: list[float], std: list[float],
                       display: int = 192) -> tuple[Image.Image, int]:
    """Where the model looks at its last depth (a ViT: the last layer's CLS attention; a CNN: its last
    stage's Grad-CAM), for one uint8 (3, H, W) image, drawn large; and the class the model gives it."""
    checkpoint_model = late_import('vitdemo.backends').checkpoint_model
    from_prediction, overlay = late_import('vitdemo.explain').from_prediction, late_import('vitdemo.attention').overlay
    was_training = model.training
    model.eval()
    picture = Image.fromarray(image.permute(1, 2, 0).numpy())
    pred = checkpoint_model('training', model, [str(i) for i in range(model.config.num_classes)], mean,
                            std).predict(picture)
    model.train(was_training)
    heat = from_prediction(pred).maps[-1][1]
    return (overlay(picture.resize((display, display), Image.Resampling.NEAREST), heat, opacity=0.55),
            int(pred.probs.argmax()))


def format_eta(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    return f'{seconds // 60}:{seconds % 60:02d}'


def of_budget(epochs: float | None) -> str:
    """' of N' epochs: those asked for, or an estimate from the minutes; where the minutes end within the first
    epoch, when its curves come (a slow model on a slow CPU would otherwise show a bare bar for minutes)."""
    if epochs is None:
        return ''
    if epochs == int(epochs):
        return f' of {epochs:.0f}'
    if epochs < 1:
        return f' of about {epochs:.1f} (the time runs out within it: the curves come at its end)'
    return f' of about {epochs:.1f}' if epochs < 3 else f' of about {epochs:.0f}'


class TrainingCurve:
    """The training curves' points within epochs, one every 5% of an epoch: the mean loss and the accuracy of the
    batches since the point before. A step reports its own batch's loss but the accuracy of its epoch so far,
    which lags behind the model and starts again at each epoch: drawn as it is, it jumps at every epoch's start."""

    def __init__(self):
        self.points: list[dict] = []
        self._losses: list[float] = []
        self._last = (0, 0.0, 0.0)  # the epoch, its fraction done and its accuracy so far at the last point

    def add(self, event: TrainEvent) -> None:
        self._losses.append(event.loss)
        at = event.epoch - 1 + event.epoch_fraction
        if self.points and at - self.points[-1]['epoch'] < 0.05:
            return
        epoch, done, accuracy = self._last
        if epoch != event.epoch:  # a new epoch: its accuracy so far counts its own batches alone
            done, accuracy = 0.0, 0.0
        # the epoch's correct answers so far, less those counted at the last point, over the images since
        window = (event.accuracy * event.epoch_fraction - accuracy * done) / (event.epoch_fraction - done)
        self.points.append(dict(epoch=at, train_loss=sum(self._losses) / len(self._losses), train_accuracy=window))
        self._losses.clear()
        self._last = (event.epoch, event.epoch_fraction, event.accuracy)


class TrainingJob:
    """Runs `vitdemo.train.train` for the app; at most one run at a time.

    Args:
        data_path: the training images (see `data.load_dataset`); None: `data.default_data_path()`, looked up
            when a run starts.
        store: where checkpoints go (`trained/`), and which names the shipped models hold.
        policy: the server's limits, checked before any work.
        update_seconds: at most one step snapshot per this many seconds.
    """

    def __init__(self, data_path: str | Path | None, store: ModelStore, policy: ServerPolicy = ServerPolicy(),
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

    def batch_for(self, form: TrainForm) -> int:
        """The form's batch size, or the largest half of it this server can train (a fine-tune's 224 px
        inputs need ~50x the memory of CIFAR's 32 px at the same batch)."""
        model_config, cfg = form.configs()
        return fitting_batch(self.policy, model_config, cfg.batch_size, frozen=cfg.finetune == 'probe')

    def run(self, model_config: ModelConfig, cfg: TrainConfig, name: str, owner: str | None = None,
            data: ImageData | None = None) -> Iterator[Snapshot]:
        training, weights = late_import('vitdemo.train'), late_import('vitdemo.weights')
        name = checkpoint_name(name, reserved_names(self.store))
        teacher = self._teacher(cfg.teacher, owner)
        teacher_config = weights.config_of(read_metadata(teacher)) if teacher else None
        probe = cfg.finetune == 'probe'
        estimate = check_training(self.policy, model_config, cfg.minutes, cfg.batch_size,
                                  len(data) if data is not None else CIFAR10_IMAGES, teacher_config, probe)
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
                data_module = late_import('vitdemo.data')
                data = data_module.load_dataset(self.data_path or data_module.default_data_path())
                # the first check assumed CIFAR-10's size: check again with the real one
                check_training(self.policy, model_config, cfg.minutes, cfg.batch_size, len(data), teacher_config,
                               probe)
            model_config = replace(model_config, num_classes=len(data.classes))  # the form's 10 is a guess
            Distillation = late_import('vitdemo.distill').Distillation
            distillation = (Distillation.from_checkpoint(teacher, data.classes, cfg.distill, once=cfg.teacher_once)
                            if teacher else None)
            finetune = None
            if cfg.finetune_from:
                yield Snapshot(0.0, f'loading the pretrained {cfg.finetune_from} (downloaded the first time)')
                try:
                    finetune = training.prepare_finetune(cfg.finetune_from, data.classes, cfg.finetune,
                                                         cfg.frozen_blocks, cfg.layer_decay, self.store.weights_dir)
                except ModelUnavailable as e:
                    raise TrainingFailed(f'the pretrained weights are not at hand ({e})') from None
            train_data, val_data = training.split(data, cfg)
            shown = val_data or train_data  # one image: what changes is the model
            fixed, fixed_class = shown.images[0], data.classes[int(shown.labels[0])]
            yield from self._follow(model_config, cfg, data, fixed, fixed_class, out, distillation, finetune)
        finally:
            self._stop.clear()
            self._owner = None
            self._running.release()

    def _teacher(self, name: str, owner: str | None) -> Path | None:
        """A distillation teacher by list name: only a checkpoint this owner may use, never a path."""
        if not name:
            return None
        path = self.store.path(name, owner)
        if path is None:
            raise ValueError(f'the teacher must be one of your models of the list (scratch/ or trained/), '
                             f'not {name!r}')
        return path

    def _follow(self, model_config, cfg, data, fixed, fixed_class, out, distillation=None,
                finetune=None) -> Iterator[Snapshot]:
        events: queue.Queue = queue.Queue()
        outcome: dict = {}

        def on_event(event: TrainEvent) -> None:
            # runs in the training thread, between steps: safe to look at the model here
            picture = None
            # a linear probe's backbone never changes: one picture, of the final model, instead of one an epoch
            if event.kind == ('done' if cfg.finetune == 'probe' else 'epoch') and event.model is not None:
                overlaid, predicted = attention_snapshot(event.model, fixed, *event.normalization)
                right = ' ✓' if data.classes[predicted] == fixed_class else ''
                picture = (overlaid, f'epoch {event.epoch}: {data.classes[predicted]}{right}')
            if event.filmstrip is not None:  # the training thread appends to it: hand the watcher a copy
                f = event.filmstrip
                event.filmstrip = replace(f, epochs=list(f.epochs), maps=list(f.maps), predicted=list(f.predicted))
            events.put((event, picture))

        def work() -> None:
            try:
                train = late_import('vitdemo.train').train
                outcome['result'] = train(model_config, cfg, data, out=out, on_event=on_event, stop=self._stop,
                                          distillation=distillation, finetune=finetune)
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
        curve = TrainingCurve()
        strip: list[tuple[Image.Image, str]] = []
        progress, last_yield, filmstrip = 0.0, 0.0, None

        def next_event():
            # this thread (one of the server's) waits here through the run, maybe with OpenMP workers of its own
            # from earlier work: it lets them go, or the training thread's would sleep between operations
            release_openmp_workers()
            return events.get()
        try:
            while (item := next_event()) is not None:
                event, picture = item
                progress = event.progress
                if picture is not None:
                    strip.append(picture)
                filmstrip = event.filmstrip or filmstrip
                if event.kind == 'step':
                    curve.add(event)
                if event.kind == 'epoch':
                    history.append(event.record)
                elif event.kind == 'done' or time.monotonic() - last_yield < self.update_seconds:
                    continue
                last_yield = time.monotonic()
                yield Snapshot(event.progress, self._status(event), list(history), list(curve.points), list(strip),
                               fixed_class, filmstrip=filmstrip, classes=data.classes)
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
        status = ('stopped' if result.stopped else 'finished') + f' after {epochs_text(result.history)}'
        status += f': validation accuracy {val:.1%}' if val is not None else ''
        status += f'; saved as trained/{out.stem}' if result.path else \
            '; nothing was saved (it ended before its first step)'
        yield Snapshot(progress, status, list(history), list(curve.points), list(strip), fixed_class,
                       checkpoint=result.path, done=True, filmstrip=filmstrip, classes=data.classes)

    @staticmethod
    def _status(event: TrainEvent) -> str:
        if event.kind == 'features':
            return (f'computing the pretrained features of every image (then the head trains in seconds): '
                    f'{event.epoch_fraction:.0%}, {event.images_per_sec:.0f} images/s, '
                    f'ETA {format_eta(event.eta_seconds)}')
        val = f', val acc {event.val_accuracy:.1%}' if event.val_accuracy is not None else ''
        return (f'epoch {event.epoch}{of_budget(event.budget_epochs)}, step {event.step}: loss {event.loss:.3f}, '
                f'acc {event.accuracy:.1%}{val}, lr {event.lr:.1e}, {event.images_per_sec:.0f} images/s, '
                f'ETA {format_eta(event.eta_seconds)}')
