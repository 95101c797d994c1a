"""Train a ViT from scratch on CIFAR-10 (or any small image folder), on a CPU or a GPU.

Run from the repository root:

    # the 10-minute CPU demo, on the shipped archive
    python -m vitdemo.train --data ../shared/data/cifar10-train.tar.gz --minutes 10 --out weights/demo.safetensors
    # a quick smoke run: 2,000 training images, 500 validation images, one epoch
    python -m vitdemo.train --data ../shared/data/cifar10-train.tar.gz --epochs 1 --train-limit 2000 --val-limit 500
    # the CNN baseline (ResNet-18 for 32x32 images), same loop and recipe
    python -m vitdemo.train --arch resnet18 --data ../shared/data/cifar10-train.tar.gz --minutes 10 \
        --out weights/resnet18_cifar10.safetensors
    # distillation (DeiT): the shipped CNN teaches; a ViT student gets a distillation token
    python -m vitdemo.train --data ../shared/data/cifar10-train.tar.gz --minutes 10 \
        --teacher weights/convnet_cifar10.safetensors --distill hard --out weights/distilled.safetensors

The loop, top to bottom: AdamW (or Muon for a ViT's hidden matrices) with warm-up then cosine decay over the
budget (epochs, or minutes: the schedule follows the clock), label smoothing, gradient clipping, bf16 autocast
where the hardware has it (float16 with a loss scaler on older GPUs), batch augmentation on uint8 tensors.
After every epoch it evaluates on a seeded validation split and writes a safetensors checkpoint atomically. A
stop request ends at the next step and still saves what was learned.

Past one machine, the same entry point runs under torchrun with DistributedDataParallel (gloo on CPU,
nccl on GPU), each rank training on its shard of every epoch:

    torchrun --nproc_per_node 2 -m vitdemo.train --data ../shared/data/cifar10-train.tar.gz --epochs 30
"""
import argparse
import math
import os
import random
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.nn.parallel import DistributedDataParallel

from . import __version__
from .backends import timm_pretrained
from .catalog import WEIGHTS_DIR, ModelUnavailable
from .data import ImageData, augment, load_dataset, mix, rand_augment, to_model_input, train_val_split
from .distill import Distillation
from .filmstrip import IMAGES, Filmstrip
from .lazy import late_import
from .metadata import epochs_text
from .model import STEMS, ViTConfig, VisionTransformer, preset
from .optim import make_optimizer
from .train_form import ARCHS, FINETUNE_MODES, TRAIN_PRESETS, cpu_has_bf16, optimizer_choice
from .train_state import TrainState, existing_state, load_state, match_layouts, save_state
from .weights import (ARCHITECTURES, CheckpointError, Classifier, ModelConfig, build_model, config_of, from_timm,
                      load_checkpoint, read_metadata, save_checkpoint)


@dataclass
class TrainConfig:
    epochs: int | None = None  # budget in epochs, or ...
    minutes: float | None = 10.0  # ... in wall-clock minutes (the schedule follows the clock)
    batch_size: int = 256  # large enough to keep 2 CPU cores' matrix units busy
    lr: float = 2e-3  # peak learning rate, reached after warm-up
    weight_decay: float = 0.05
    warmup_frac: float = 0.05  # fraction of the budget spent warming up
    label_smoothing: float = 0.1
    crop_padding: int = 4  # random crops of the image padded by this many pixels (0: flips only)
    rand_augment: int = 0  # RandAugment strength, 1-30 (0: off); for long runs, where the model overfits
    mix_prob: float = 0.0  # share of batches mixed by CutMix or MixUp; likewise for long runs
    clip_grad: float = 1.0
    optimizer: str = 'adamw'  # 'muon': Muon for a ViT's hidden matrices, AdamW for the rest; a fine-tune: AdamW
    seed: int = 0
    val_size: int = 5000  # held out of the training images, never trained on
    train_limit: int | None = None  # use only this many training images (quick runs)
    val_limit: int | None = None  # and this many validation images; 0 skips validation
    amp: bool = True  # mixed precision where it pays: see `precision`
    amp_dtype: str = ''  # '' chooses by hardware; 'bfloat16' or 'float16' forces one (float16 with a loss scaler)
    compile: bool = False  # torch.compile the training forward: faster on long runs, slow to start
    half_checkpoint: bool = False  # store weights as float16: half the file, the same predictions to 3 digits
    keep_state: bool = False  # write NAME.state beside the checkpoint: what resuming the run needs
    filmstrip: int = IMAGES  # a ViT's CLS attention on this many validation images after each epoch, kept
    teacher: str = ''  # distillation: the teacher checkpoint's file name, kept in the student's metadata
    distill: str = ''  # 'hard' or 'soft' with a teacher (see `vitdemo.distill`)
    teacher_once: bool = False  # the teacher answers once per image and its mirror, before the first step
    finetune_from: str = ''  # a fine-tune: the pretrained timm ViT it starts from (see `FineTune`) ...
    finetune: str = ''  # ... how it learns (FINETUNE_MODES) ...
    frozen_blocks: int = 0  # ... and that mode's settings
    layer_decay: float = 0.75

    def __post_init__(self):
        if (self.epochs is None) == (self.minutes is None):
            raise ValueError('give a budget in epochs or in minutes, not both')
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f'epochs must be at least 1, got {self.epochs}')
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f'minutes must be positive, got {self.minutes}')
        if not 1 <= self.batch_size <= 4096:
            raise ValueError(f'batch size must be between 1 and 4096, got {self.batch_size}')
        if not 0 < self.lr <= 1:
            raise ValueError(f'learning rate must be in (0, 1], got {self.lr}')
        if self.weight_decay < 0:
            raise ValueError(f'weight decay must be non-negative, got {self.weight_decay}')
        if not 0 <= self.crop_padding <= 16:
            raise ValueError(f'crop padding must be between 0 and 16 pixels, got {self.crop_padding}')
        if not 0 <= self.rand_augment <= 30:
            raise ValueError(f'RandAugment strength must be between 0 and 30, got {self.rand_augment}')
        if not 0 <= self.mix_prob <= 1:
            raise ValueError(f'mix probability must be in [0, 1], got {self.mix_prob}')
        if self.optimizer not in ('adamw', 'muon'):
            raise ValueError(f"optimizer must be 'adamw' or 'muon', got {self.optimizer!r}")
        if self.optimizer == 'muon' and self.finetune_from:
            # Muon's orthogonal steps would move every direction of weights that AdamW pretrained
            raise ValueError('a fine-tune learns with AdamW: Muon is for a model trained from random weights')
        if self.amp_dtype not in ('', 'bfloat16', 'float16'):
            raise ValueError(f"amp dtype must be '', 'bfloat16' or 'float16', got {self.amp_dtype!r}")
        if not 0 <= self.warmup_frac < 1:
            raise ValueError(f'warm-up fraction must be in [0, 1), got {self.warmup_frac}')


@dataclass
class TrainEvent:
    kind: str  # 'step', 'epoch' or 'done'; a linear probe's 'features' while it computes them
    epoch: int
    step: int
    progress: float  # fraction of the budget used, 0..1
    lr: float
    loss: float  # 'step': this batch; 'epoch'/'done': mean over the epoch
    accuracy: float
    images_per_sec: float
    eta_seconds: float
    val_loss: float | None = None
    val_accuracy: float | None = None
    epoch_fraction: float = 1.0  # 'step': how far into its epoch this step is; 'features': how far through, 0..1
    budget_epochs: float | None = None  # 'step', 'epoch': the budget's epochs (minutes: at the pace so far, from 3%)
    model: Classifier | None = field(default=None, repr=False)  # on 'epoch' and 'done'
    filmstrip: Filmstrip | None = field(default=None, repr=False)  # on 'epoch', a ViT's attention so far
    normalization: tuple[list[float], list[float]] | None = None  # (mean, std) the model's inputs get
    record: dict | None = None  # 'epoch': its row of the run's history, as the checkpoint keeps it


@dataclass
class TrainResult:
    model: Classifier
    history: list[dict]
    metrics: dict
    path: Path | None
    stopped: bool


PROBE_EPOCHS = 30  # of the head over cached features: seconds, whatever the dataset
FEATURES_SHARE = 0.9  # of a probe's progress bar: computing the features is nearly all of its time


@dataclass
class FineTune:
    """Start from a pretrained ViT instead of random weights. Its head is replaced for the new classes,
    inputs are resized to its input size and normalised as it was pretrained."""
    model: VisionTransformer
    mean: list[float]
    std: list[float]
    mode: str = 'full'  # one of FINETUNE_MODES
    frozen_blocks: int = 0  # 'partial': the patch embedding and this many first blocks stay as pretrained
    layer_decay: float = 0.75  # 'full': each layer down from the head learns at this fraction of the one above

    def __post_init__(self):
        if self.mode not in FINETUNE_MODES:
            raise ValueError(f'fine-tuning must be one of {", ".join(FINETUNE_MODES)}, not {self.mode!r}')
        depth = self.model.config.depth
        if not 0 <= self.frozen_blocks <= depth:
            raise ValueError(f'frozen blocks must be between 0 and {depth}, got {self.frozen_blocks}')
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f'layer decay must be in (0, 1], got {self.layer_decay}')

    def lr_scale(self, name: str) -> float:
        """The learning rate of parameter `name` as a fraction of the head's; 0 keeps it frozen."""
        depth = self.model.config.depth
        # layers counted as in BEiT's layer-wise decay: 0 the embeddings, 1..depth the blocks, depth + 1 the rest
        layer = int(name.split('.')[1]) + 1 if name.startswith('blocks.') else \
            depth + 1 if name.startswith(('head.', 'head_dist.', 'norm.', 'fc_norm.')) else 0
        if self.mode == 'probe':
            return 1.0 if name.startswith(('head.', 'head_dist.')) else 0.0
        if self.mode == 'partial':
            return 0.0 if layer <= self.frozen_blocks else 1.0
        return self.layer_decay ** (depth + 1 - layer)


def prepare_finetune(arch: str, classes: list[str], mode: str = 'full', frozen_blocks: int = 0,
                     layer_decay: float = 0.75, weights_dir: Path | None = None) -> FineTune:
    """A timm-pretrained ViT (downloaded once, or weights/ARCH.safetensors offline) as our model; or, when
    `arch` is one of our ViT checkpoints (a .safetensors path), that model, to train it on with a new
    schedule. A checkpoint trained on the same `classes` keeps its head, its rows put in their order: a
    second run goes on from the first. Other classes, even as many, get a new head."""
    if Path(arch).suffix == '.safetensors':
        model, meta = load_checkpoint(arch)
        if not isinstance(model, VisionTransformer):
            raise CheckpointError(f'{Path(arch).name} is not a ViT: only a ViT is fine-tuned')
        mean, std = list(meta['mean']), list(meta['std'])
        known = list(meta.get('classes') or [])
        if sorted(known) == sorted(classes) and len(known) == model.num_classes:
            rows = [known.index(name) for name in classes]
            with torch.no_grad():
                for head in model.heads():
                    head.weight.copy_(head.weight[rows])
                    head.bias.copy_(head.bias[rows])
            return FineTune(model, mean, std, mode, frozen_blocks, layer_decay)
    else:
        resolve_data_config = late_import('timm.data').resolve_data_config
        timm_model = timm_pretrained(arch, Path(weights_dir or WEIGHTS_DIR))
        data_config = resolve_data_config({}, model=timm_model)
        model, mean, std = from_timm(timm_model), list(data_config['mean']), list(data_config['std'])
    model.reset_classifier(len(classes))
    return FineTune(model, mean, std, mode, frozen_blocks, layer_decay)


METRICS = ('train_loss', 'train_accuracy', 'val_loss', 'val_accuracy')  # what a checkpoint reports


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def split(data: ImageData, cfg: TrainConfig) -> tuple[ImageData, ImageData | None]:
    """The training images and the held-out validation images (None without validation) of a run."""
    val_size = min(cfg.val_size, len(data) // 5)  # a small dataset keeps most of its images for training
    train_data, val_data = train_val_split(data, val_size, cfg.seed) if val_size else (data, None)
    if cfg.train_limit:
        train_data = train_data.subset(torch.arange(min(cfg.train_limit, len(train_data))))
    if val_data is not None and cfg.val_limit is not None:
        val_data = val_data.subset(torch.arange(min(cfg.val_limit, len(val_data)))) if cfg.val_limit else None
    return train_data, val_data


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def get_lr(progress: float, cfg: TrainConfig) -> float:
    # 1) linear warm-up, 2) cosine decay to zero at the end of the budget
    if progress < cfg.warmup_frac:
        return cfg.lr * progress / cfg.warmup_frac
    decay = (progress - cfg.warmup_frac) / (1 - cfg.warmup_frac)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(decay, 1.0)))


def training_device() -> torch.device:
    """Where `train` runs when it is given no device: the GPU, where there is one."""
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def precision(device: torch.device, amp: bool = True, forced: str = '') -> torch.dtype | None:
    """The autocast dtype of a step: bfloat16 where the hardware computes it (CPUs with AVX-512 BF16 or
    AMX, GPUs from Ampere on), float16 on older GPUs, None (float32) on other CPUs or without `amp`."""
    if not amp:
        return None
    if forced:
        return {'bfloat16': torch.bfloat16, 'float16': torch.float16}[forced]
    if device.type == 'cuda':
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


def autocast(device: torch.device, enabled: bool = True, forced: str = ''):
    dtype = precision(device, enabled, forced)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def param_groups(model: torch.nn.Module, weight_decay: float,
                 lr_scale: Callable[[str], float] = lambda name: 1.0, muon: bool = False) -> list[dict]:
    # no decay on biases, norms and what the model names (its tokens and position embeddings); each
    # parameter learns at its `lr_scale` of the schedule's rate (a fine-tune's), 0 leaves it frozen; with
    # `muon`, the hidden matrices the model names form groups of their own, marked for Muon
    groups = {}
    skip = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else set()
    matrices = model.hidden_matrices() if muon and hasattr(model, 'hidden_matrices') else set()
    for name, p in model.named_parameters():
        scale = lr_scale(name)
        if scale == 0:
            p.requires_grad_(False)
            continue
        decay = p.ndim >= 2 and name not in skip
        key = (scale, decay, name in matrices)
        group = groups.setdefault(key, {'params': [], 'weight_decay': weight_decay if decay else 0.0,
                                        'lr_scale': scale, 'muon': key[2]})
        group['params'].append(p)
    return list(groups.values())


def optimizer_of(model: torch.nn.Module, cfg: TrainConfig, device: torch.device,
                 lr_scale: Callable[[str], float] = lambda name: 1.0) -> torch.optim.Optimizer:
    """The run's optimiser: AdamW, with Muon for a ViT's hidden matrices where `cfg.optimizer` asks."""
    groups = param_groups(model, cfg.weight_decay, lr_scale, muon=cfg.optimizer == 'muon')
    # Muon orthogonalises in bfloat16 where the model computes in it, else in float32 (bf16 may be emulated)
    bf16 = precision(device, cfg.amp, cfg.amp_dtype) == torch.bfloat16
    return make_optimizer(groups, cfg.lr, ns_dtype=torch.bfloat16 if bf16 else torch.float32)


@torch.no_grad()
def batch_logits(model: Classifier, data: ImageData, mean: list[float], std: list[float],
                 batch_size: int = 500, amp: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(fp32 logits, labels) batch by batch over `data`, in eval mode (restores the previous mode)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for i in range(0, len(data), batch_size):
            x = to_model_input(data.images[i:i + batch_size], mean, std, model.config.img_size).to(device)
            with autocast(device, amp):
                logits = model(x).float()
            yield logits.cpu(), data.labels[i:i + batch_size]
    finally:
        model.train(was_training)


def evaluate(model: Classifier, data: ImageData, mean: list[float], std: list[float],
             batch_size: int = 500, amp: bool = True) -> tuple[float, float]:
    """Mean loss and accuracy over `data`."""
    total_loss, correct = 0.0, 0
    for logits, y in batch_logits(model, data, mean, std, batch_size, amp):
        total_loss += F.cross_entropy(logits, y, reduction='sum').item()
        correct += (logits.argmax(1) == y).sum().item()
    return total_loss / len(data), correct / len(data)


def train(model_config: ModelConfig | None, cfg: TrainConfig, data: ImageData,
          out: str | Path | None = None, on_event: Callable[[TrainEvent], None] | None = None,
          stop: threading.Event | None = None, device: str | None = None,
          finetune: FineTune | None = None, distillation: Distillation | None = None,
          resume: str | Path | None = None) -> TrainResult:
    """Train a new model of `model_config` (or fine-tune `finetune.model`) on `data` within `cfg`'s budget;
    with `distillation`, a teacher's predictions join the labels (DeiT); with `resume`, go on from that
    checkpoint and the state saved beside it (`train_state`), in the same schedule and budget."""
    device = torch.device(device) if device else training_device()
    if finetune is not None and finetune.mode == 'probe':
        return linear_probe(finetune, cfg, data, out, on_event, stop, device)
    model_config = finetune.model.config if finetune else model_config
    assert model_config.num_classes == len(data.classes), \
        f'model has {model_config.num_classes} classes, data has {len(data.classes)}'
    seed_everything(cfg.seed)
    train_data, val_data = split(data, cfg)
    mean, std = (finetune.mean, finetune.std) if finetune else train_data.mean_std()

    rank, world = rank_and_world()
    model = (finetune.model if finetune else build_model(model_config)).to(device).train()
    # what the run records is what it learns with: Muon asked for a CNN trains (and is recorded) as AdamW
    cfg = replace(cfg, optimizer=optimizer_choice(cfg.optimizer, model.arch, finetune is not None))
    if isinstance(model, VisionTransformer):
        # SDPA's fused kernels pay on a GPU; on a CPU the manual path measured faster for bf16 training at
        # CIFAR's 65 tokens
        model.set_fused_attn(device.type == 'cuda')
        model.set_distilled_training(distillation is not None)  # a distilled ViT's heads, each with its target
    if distillation is not None:
        distillation.teacher.to(device)
    net = DistributedDataParallel(model) if world > 1 else model  # DDP broadcasts rank 0's initial weights
    # the initial weights are drawn: from here on each rank draws its own augmentation and drop-path, as its
    # images are its own (crops from augment_generator; RandAugment, CutMix/MixUp and drop-path from the global one)
    rank_seed = cfg.seed + 1000 * rank
    torch.manual_seed(rank_seed)
    forward = torch.compile(net) if cfg.compile else net
    optimizer = optimizer_of(model, cfg, device, *([finetune.lr_scale] if finetune else []))
    # float16's narrow range lets small gradients underflow to zero: the scaler multiplies the loss before
    # the backward pass and divides the gradients after it (skipping a step that overflowed); off otherwise
    scaler = torch.amp.GradScaler(device.type, enabled=precision(device, cfg.amp, cfg.amp_dtype) == torch.float16)
    batch_size = min(cfg.batch_size, len(train_data) // world)
    steps_per_epoch = len(train_data) // world // batch_size  # whole batches only: one shape for compile
    total_steps = cfg.epochs * steps_per_epoch if cfg.epochs else None
    budget_seconds = cfg.minutes * 60 if cfg.minutes else None
    order_generator = torch.Generator().manual_seed(cfg.seed)  # the same on every rank: disjoint shards
    augment_generator = torch.Generator().manual_seed(rank_seed)

    history: list[dict] = []
    step, epoch, stopped = 0, 0, False
    start = time.perf_counter()
    filmstrip = None
    if cfg.filmstrip and isinstance(model, VisionTransformer):  # the same few images, every epoch
        filmstrip = Filmstrip.of(val_data or train_data, cfg.filmstrip)
    if resume is not None:  # the weights, moments, schedule position and random draws where the run stopped
        if world > 1:
            raise ValueError('resume a run in a single process (its random state is one process\'s)')
        state = load_state(resume)
        model.load_state_dict(state.weights or load_file(str(resume)))
        optimizer.load_state_dict(state.optimizer)
        match_layouts(optimizer)
        step, epoch, history = state.step, state.epoch, state.history
        start -= state.seconds
        torch.set_rng_state(state.generators['torch'])
        order_generator.set_state(state.generators['order'])
        augment_generator.set_state(state.generators['augment'])
        kept = read_metadata(resume).get('filmstrip')
        filmstrip = Filmstrip.from_metadata(kept) if kept and filmstrip is not None else filmstrip

    def progress_now() -> float:
        if total_steps:
            return step / total_steps
        return (time.perf_counter() - start) / budget_seconds

    def agreed_progress() -> tuple[float, bool]:
        """Progress and stop request; under DDP rank 0's clock decides, so every rank steps alike."""
        state = torch.tensor([progress_now(), float(stop is not None and stop.is_set())], dtype=torch.float64)
        if world > 1:
            dist.broadcast(state, src=0)
        return state[0].item(), bool(state[1].item())

    def budget_epochs(done: float, p: float) -> float | None:
        # the minutes' epochs from the pace, once past the first steps' warm-up (which would make them look few)
        return cfg.epochs or (done / p if p >= 0.03 else None)

    def emit(kind: str, **kw) -> None:
        if on_event is not None:
            on_event(TrainEvent(kind=kind, epoch=epoch, step=step, progress=min(progress_now(), 1.0), **kw))

    if distillation is not None and distillation.once:  # inside the budget: what it costs counts
        with autocast(device, cfg.amp, cfg.amp_dtype):
            distillation.remember(train_data.images, mean, std,
                                  lambda c, m, sd: to_model_input(c, m, sd, model_config.img_size).to(device))
    while progress_now() < 1.0 and not stopped:
        epoch += 1
        epoch_start, seen, loss_sum, correct = time.perf_counter(), 0, 0.0, 0
        shard = torch.randperm(len(train_data), generator=order_generator)[rank::world]
        for i in range(steps_per_epoch):
            progress, stopped = agreed_progress()
            if progress >= 1.0 or stopped:
                break
            lr = get_lr(progress, cfg)
            for group in optimizer.param_groups:
                group['lr'] = lr * group['lr_scale']
            # the batch, augmented where the model is: to a GPU go uint8 pixels, and the CPU only launches the work
            idx = shard[i * batch_size:(i + 1) * batch_size]
            images = augment(train_data.images[idx].to(device), cfg.crop_padding, augment_generator)
            if cfg.rand_augment:
                images = rand_augment(images, cfg.rand_augment)
            x = to_model_input(images, mean, std, model_config.img_size)
            y = target = train_data.labels[idx].to(device)
            if torch.rand((), generator=augment_generator) < cfg.mix_prob:
                x, target = mix(x, y, model_config.num_classes)
            # forward, the teacher's answer when there is one, and the loss
            with autocast(device, cfg.amp, cfg.amp_dtype):
                outputs = forward(x)
                taught = distillation.answer(x, mean, std, idx) if distillation is not None else None
            if distillation is not None:
                loss, logits = distillation.loss(outputs, taught, target, cfg.label_smoothing)
            else:
                logits = outputs
                loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)  # clip the true gradients
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == y).sum().item()
            elapsed = time.perf_counter() - start
            rate = seen / (time.perf_counter() - epoch_start)
            p = progress_now()
            emit('step', lr=lr, loss=loss.item(), accuracy=correct / seen, images_per_sec=rate,
                 eta_seconds=elapsed * (1 - p) / max(p, 1e-9), epoch_fraction=(i + 1) / steps_per_epoch,
                 budget_epochs=budget_epochs(step / steps_per_epoch, p))
        if seen == 0:
            break
        val_loss, val_acc = evaluate(model, val_data, mean, std, amp=cfg.amp) if val_data else (None, None)
        # `epochs`: the data seen so far, in epochs; a stop, or the minutes running out, ends an epoch early
        record = dict(epoch=epoch, epochs=round(step / steps_per_epoch, 3), step=step, lr=lr,
                      train_loss=loss_sum / seen, train_accuracy=correct / seen,
                      val_loss=val_loss, val_accuracy=val_acc, seconds=round(time.perf_counter() - start, 1),
                      images_per_sec=round(seen / (time.perf_counter() - epoch_start), 1))
        history.append(record)
        if filmstrip is not None:
            filmstrip.record(model, mean, std, epoch)
        if out and rank == 0:
            _save(out, model, data.classes, mean, std, history, cfg, filmstrip)
            if cfg.keep_state:
                save_state(out, TrainState(step, epoch, time.perf_counter() - start, history, optimizer.state_dict(),
                                           {'torch': torch.get_rng_state(), 'order': order_generator.get_state(),
                                            'augment': augment_generator.get_state()},
                                           model.state_dict() if cfg.half_checkpoint else None))
        elapsed = time.perf_counter() - start
        p = progress_now()
        emit('epoch', lr=lr, loss=record['train_loss'], accuracy=record['train_accuracy'],
             images_per_sec=record['images_per_sec'], eta_seconds=elapsed * (1 - p) / max(p, 1e-9),
             budget_epochs=budget_epochs(record['epochs'], p), val_loss=val_loss, val_accuracy=val_acc, model=model,
             normalization=(mean, std), filmstrip=filmstrip, record=record)

    model.eval()
    if isinstance(model, VisionTransformer):
        model.set_distilled_training(False)
    path = Path(out) if out and history and rank == 0 else None
    emit('done', eta_seconds=0.0, model=model, normalization=(mean, std), **_last_epoch(history))
    return TrainResult(model=model, history=history, metrics=_metrics(history), path=path, stopped=stopped)


def linear_probe(finetune: FineTune, cfg: TrainConfig, data: ImageData, out: str | Path | None = None,
                 on_event: Callable[[TrainEvent], None] | None = None, stop: threading.Event | None = None,
                 device: torch.device = torch.device('cpu')) -> TrainResult:
    """Fit a new head on a frozen pretrained ViT: every image's features once (the slow part, the first
    FEATURES_SHARE of the progress bar), then PROBE_EPOCHS (or `cfg.epochs`) of the head alone over them,
    in seconds. The run ends early, with what it has, on a stop request or when the minutes run out."""
    seed_everything(cfg.seed)
    train_data, val_data = split(data, cfg)
    model = finetune.model.to(device).eval()
    epochs = cfg.epochs or PROBE_EPOCHS
    total = len(train_data) + (len(val_data) if val_data else 0)
    start, embedded, epoch, step, stopped = time.perf_counter(), 0, 0, 0, False

    def emit(kind: str, progress: float, **kw) -> None:
        if on_event is not None:
            elapsed = time.perf_counter() - start
            eta = elapsed * (1 - progress) / max(progress, 1e-9)
            on_event(TrainEvent(kind=kind, epoch=epoch, step=step, progress=progress, eta_seconds=eta, **kw))

    def out_of_time() -> bool:
        late = bool(cfg.minutes) and time.perf_counter() - start > 60 * cfg.minutes
        return late or (stop is not None and stop.is_set())

    @torch.no_grad()
    def features(images: torch.Tensor) -> torch.Tensor:
        nonlocal embedded, stopped
        chunks = []
        for i in range(0, len(images), cfg.batch_size):
            if stopped or (stopped := out_of_time()):
                break
            x = to_model_input(images[i:i + cfg.batch_size], finetune.mean, finetune.std, model.config.img_size)
            with autocast(device, cfg.amp, cfg.amp_dtype):
                chunks.append(model.forward_head(model.forward_features(x.to(device)), pre_logits=True).float())
            embedded += len(chunks[-1])
            emit('features', FEATURES_SHARE * embedded / total, lr=0.0, loss=float('nan'), accuracy=0.0,
                 epoch_fraction=embedded / total, images_per_sec=embedded / (time.perf_counter() - start))
        return torch.cat(chunks) if chunks else torch.empty(0, model.config.embed_dim, device=device)

    # 1) the features, once: the training images unaugmented, and the validation images
    train_x = features(train_data.images)
    train_y = train_data.labels[:len(train_x)].to(device)
    val_x = features(val_data.images) if val_data else None
    val_y = val_data.labels[:len(val_x)].to(device) if val_data else None
    if val_x is not None and len(val_x) == 0:
        val_x = None
    # 2) the head alone, on those features, with the run's schedule over its epochs
    head = model.head.train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    batch_size = max(1, min(cfg.batch_size, len(train_x)))
    steps_per_epoch = len(train_x) // batch_size
    generator = torch.Generator().manual_seed(cfg.seed)
    history: list[dict] = []
    while steps_per_epoch and epoch < epochs and not (history and out_of_time()):
        epoch += 1
        order, loss_sum, correct = torch.randperm(len(train_x), generator=generator), 0.0, 0
        for i in range(steps_per_epoch):
            lr = get_lr((step + 1) / (epochs * steps_per_epoch), cfg)
            optimizer.param_groups[0]['lr'] = lr
            idx = order[i * batch_size:(i + 1) * batch_size].to(device)
            logits = head(train_x[idx])
            loss = F.cross_entropy(logits, train_y[idx], label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == train_y[idx]).sum().item()
        seen = steps_per_epoch * batch_size
        val_loss = val_acc = None
        if val_x is not None:
            with torch.no_grad():
                val_logits = head(val_x)
            val_loss = F.cross_entropy(val_logits, val_y).item()
            val_acc = (val_logits.argmax(1) == val_y).float().mean().item()
        history.append(dict(epoch=epoch, epochs=float(epoch), step=step, lr=lr, train_loss=loss_sum / seen,
                            train_accuracy=correct / seen,
                            val_loss=val_loss, val_accuracy=val_acc, seconds=round(time.perf_counter() - start, 1),
                            images_per_sec=round(embedded / (time.perf_counter() - start), 1)))
        emit('epoch', FEATURES_SHARE + (1 - FEATURES_SHARE) * epoch / epochs, lr=lr, loss=history[-1]['train_loss'],
             accuracy=history[-1]['train_accuracy'], images_per_sec=history[-1]['images_per_sec'],
             val_loss=val_loss, val_accuracy=val_acc, model=model, normalization=(finetune.mean, finetune.std),
             record=history[-1])
    model.eval()
    if out and history:
        _save(out, model, data.classes, finetune.mean, finetune.std, history, cfg)
    emit('done', 1.0, model=model, normalization=(finetune.mean, finetune.std), **_last_epoch(history))
    path = Path(out) if out and history else None
    return TrainResult(model=model, history=history, metrics=_metrics(history), path=path, stopped=stopped)


def _last_epoch(history: list[dict]) -> dict:
    """The 'done' event's figures: the last epoch's (none yet: zeros and no loss)."""
    last = history[-1] if history else {}
    return dict(lr=last.get('lr', 0.0), loss=last.get('train_loss', float('nan')),
                accuracy=last.get('train_accuracy', 0.0), images_per_sec=last.get('images_per_sec', 0.0),
                val_loss=last.get('val_loss'), val_accuracy=last.get('val_accuracy'))


def _metrics(history: list[dict]) -> dict:
    return {k: history[-1][k] for k in METRICS} if history else {}


def _save(out, model, classes, mean, std, history, cfg, filmstrip: Filmstrip | None = None) -> Path:
    extra = {'filmstrip': filmstrip.to_metadata()} if filmstrip is not None and filmstrip.epochs else {}
    return save_checkpoint(out, model, classes, mean, std, torch.float16 if cfg.half_checkpoint else torch.float32,
                           history=history, train_config=asdict(cfg), metrics=_metrics(history),
                           seed=cfg.seed, vitdemo_version=__version__, **extra)


def resumed(checkpoint: str, teacher: str | None) -> tuple[ModelConfig, TrainConfig, list[str]]:
    """The model, recipe and classes of the run that wrote `checkpoint`, to go on with it."""
    meta = read_metadata(checkpoint)
    existing_state(checkpoint)
    known = {f.name for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in (meta.get('train_config') or {}).items() if k in known})
    if cfg.finetune == 'probe':
        raise ValueError('a linear probe is not resumed: its head trains in seconds once the features are computed; '
                         'run it again')
    if cfg.teacher and not teacher:
        raise ValueError(f'{Path(checkpoint).name} learned from the teacher {cfg.teacher}: give --teacher again')
    return config_of(meta), replace(cfg, keep_state=True), meta['classes']


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--preset', choices=list(TRAIN_PRESETS),
                        help="a Train-tab preset's model, budget and recipe as the defaults; flags given still win")
    # data and output
    parser.add_argument('--data', required=True, help='CIFAR-10 root, image folder (train/<class>/...) or .tar.gz')
    parser.add_argument('--out', help='checkpoint to write (default weights/vit_cifar10_run.safetensors; '
                        'with --resume, the checkpoint resumed)')
    parser.add_argument('--resume', metavar='CHECKPOINT',
                        help='continue the run that wrote CHECKPOINT where it stopped: its model, recipe and budget '
                             'from the checkpoint, the optimiser and schedule from CHECKPOINT.state beside it. Give '
                             'the same --data (and --teacher again for a distilled run); other flags are ignored')
    parser.add_argument('--no-state', action='store_true',
                        help="don't keep the optimiser and schedule beside the checkpoint (NAME.state, ~3x its "
                             'size); such a run cannot be resumed')
    # budget
    parser.add_argument('--epochs', type=int, help='train for this many epochs (instead of --minutes)')
    parser.add_argument('--minutes', type=float, help='train for this many minutes (default 10)')
    # model
    parser.add_argument('--arch', choices=ARCHS, default='vit',
                        help='our ViT (configured below), or a CNN baseline: ResNet-18 for 32x32 images, or a fast '
                             '8-layer CNN (convnet: a teacher for the ViT in minutes)')
    base = preset('vit_cifar10')
    parser.add_argument('--embed-dim', type=int, default=base.embed_dim, help='token width')
    parser.add_argument('--depth', type=int, default=base.depth, help='number of Transformer blocks')
    parser.add_argument('--heads', type=int, default=base.num_heads, help='attention heads (must divide embed dim)')
    parser.add_argument('--mlp-ratio', type=float, default=base.mlp_ratio, help='MLP width / embed dim')
    parser.add_argument('--patch-size', type=int, default=base.patch_size, help='patch side (must divide 32)')
    parser.add_argument('--global-pool', choices=['token', 'avg'], default=None,
                        help="classify from the CLS token or the mean patch token (default: the preset's; always the "
                             'CLS token with --teacher)')
    parser.add_argument('--pos-embed', choices=['learn', 'sincos'], default=base.pos_embed,
                        help='learned position embeddings, or fixed 2-D sin-cos ones')
    parser.add_argument('--stem', choices=list(STEMS), default=base.stem,
                        help='tokens from one patch projection, from small convolutions (learns faster), from the '
                             'same without the one at full size (cheaper), or from a ResNet\'s first stage (the ViT '
                             "paper's hybrid)")
    parser.add_argument('--drop-path', type=float, default=0.0, help='stochastic depth rate at the last block')
    parser.add_argument('--patch-drop', type=float, default=0.0,
                        help='share of patch tokens each training image leaves out (PatchDropout; 0: none)')
    # fine-tuning a pretrained ViT instead (inputs upscaled to its size: wants a GPU)
    parser.add_argument('--finetune', metavar='ARCH', help='start from timm ARCH, e.g. vit_tiny_patch16_224 '
                        '(downloaded once, or weights/ARCH.safetensors), or from one of our ViT checkpoints (a '
                        '.safetensors path: a longer second run, its head kept for the same classes); the model '
                        'flags above are ignored')
    parser.add_argument('--finetune-mode', choices=list(FINETUNE_MODES), default='full',
                        help='with --finetune: ' + '; '.join(FINETUNE_MODES.values()))
    parser.add_argument('--frozen-blocks', type=int, default=0, metavar='K',
                        help='with --finetune-mode partial: keep the embedding and the first K blocks as pretrained')
    parser.add_argument('--layer-decay', type=float, default=0.75,
                        help='with --finetune-mode full: each layer learns at this fraction of the one above')
    # distillation (DeiT): a trained teacher's predictions join the labels
    parser.add_argument('--teacher', metavar='CHECKPOINT', help='a checkpoint of ours over the same classes, e.g. '
                        'weights/convnet_cifar10.safetensors; a ViT student gets a distillation token')
    parser.add_argument('--teacher-once', action='store_true',
                        help="with --teacher: answer once per image and its mirror before training (faster; "
                             "stands in for the crops' answers)")
    parser.add_argument('--distill', choices=['hard', 'soft'], default='hard',
                        help="with --teacher: learn the teacher's top class, or its distribution at temperature 3")
    # optimisation
    d = TrainConfig()
    parser.add_argument('--batch-size', type=int, default=d.batch_size, help='images per step')
    parser.add_argument('--lr', type=float, default=d.lr, help='peak learning rate (AdamW; Muon scales it to match)')
    parser.add_argument('--optimizer', choices=['adamw', 'muon'], default=d.optimizer,
                        help="muon: Muon for a ViT's hidden matrices, AdamW for the rest (learns faster from "
                             'scratch); a CNN and a fine-tune use AdamW')
    parser.add_argument('--crop-padding', type=int, default=d.crop_padding,
                        help='random crops from the image padded by this many pixels; 0 flips only')
    parser.add_argument('--rand-augment', type=int, default=d.rand_augment, metavar='STRENGTH',
                        help='RandAugment, two ops of this strength (1-30) per image; 0 is off')
    parser.add_argument('--mix-prob', type=float, default=d.mix_prob,
                        help='share of batches mixed by CutMix or MixUp (0 is off)')
    parser.add_argument('--weight-decay', type=float, default=d.weight_decay, help='AdamW weight decay')
    parser.add_argument('--seed', type=int, default=d.seed, help='seed for init, split, order and augmentation')
    parser.add_argument('--val-size', type=int, default=d.val_size, help='training images held out for validation')
    parser.add_argument('--train-limit', type=int, help='use only N training images')
    parser.add_argument('--val-limit', type=int, help='use only M validation images (0 skips validation)')
    parser.add_argument('--no-amp', action='store_true', help='train in fp32')
    parser.add_argument('--amp-dtype', choices=['bfloat16', 'float16'], default='',
                        help='force this autocast dtype (default: bfloat16 where the hardware has it, float16 on '
                             'older GPUs; float16 always with a loss scaler)')
    parser.add_argument('--compile', action='store_true', help='torch.compile the model (faster on long runs)')
    parser.add_argument('--half-checkpoint', action='store_true', help='store the weights as float16 (half the file)')
    preset_name = parser.parse_known_args(argv)[0].preset
    if preset_name:
        form = asdict(TRAIN_PRESETS[preset_name])
        # the form's names where the flags are named otherwise
        form['heads'] = form.pop('num_heads')
        form['finetune'], form['finetune_mode'] = form.pop('start_from') or None, form['finetune']
        form['teacher'] = form['teacher'] or None
        parser.set_defaults(**{k: v for k, v in form.items() if k != 'global_pool'})
    args = parser.parse_args(argv)
    if args.global_pool is None:  # not given: a taught ViT classifies its CLS token (as the Train tab switches)
        args.global_pool = 'token' if args.teacher else \
            (TRAIN_PRESETS[preset_name].global_pool if preset_name else base.global_pool)

    from tqdm import tqdm
    if int(os.environ.get('WORLD_SIZE', '1')) > 1:  # started by torchrun
        dist.init_process_group('nccl' if torch.cuda.is_available() else 'gloo')
        local = int(os.environ.get('LOCAL_RANK', 0))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        else:  # share the cores instead of every rank spinning on all of them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ['LOCAL_WORLD_SIZE'])))
    rank, world = rank_and_world()
    try:
        model_config = ARCHITECTURES[args.arch][0](img_size=32) if args.arch != VisionTransformer.arch else \
            ViTConfig(img_size=32, patch_size=args.patch_size, num_classes=10, embed_dim=args.embed_dim,
                      depth=args.depth, num_heads=args.heads, mlp_ratio=args.mlp_ratio,
                      global_pool=args.global_pool, pos_embed=args.pos_embed, drop_path_rate=args.drop_path,
                      patch_drop_rate=args.patch_drop, stem=args.stem, distilled=bool(args.teacher))
        # a budget in epochs replaces the preset's (or the default) ten minutes
        minutes = None if args.epochs and args.minutes == parser.get_default('minutes') else args.minutes
        minutes = minutes if minutes is not None or args.epochs else 10.0
        cfg = TrainConfig(epochs=args.epochs, minutes=minutes, batch_size=args.batch_size, lr=args.lr,
                          weight_decay=args.weight_decay, crop_padding=args.crop_padding,
                          rand_augment=args.rand_augment, mix_prob=args.mix_prob, seed=args.seed,
                          optimizer=optimizer_choice(args.optimizer, args.arch, bool(args.finetune)),
                          val_size=args.val_size, train_limit=args.train_limit, val_limit=args.val_limit,
                          amp=not args.no_amp, amp_dtype=args.amp_dtype, compile=args.compile,
                          half_checkpoint=args.half_checkpoint,
                          teacher=Path(args.teacher).name if args.teacher else '',
                          distill=args.distill if args.teacher else '',
                          teacher_once=args.teacher_once and bool(args.teacher),
                          finetune_from=args.finetune or '',
                          finetune=args.finetune_mode if args.finetune else '', frozen_blocks=args.frozen_blocks,
                          layer_decay=args.layer_decay, keep_state=not args.no_state)
        if args.resume:
            model_config, cfg, resumed_classes = resumed(args.resume, args.teacher)
    except (AssertionError, ValueError, CheckpointError) as e:
        parser.error(str(e))
    out = args.out or args.resume or 'weights/vit_cifar10_run.safetensors'
    data = load_dataset(args.data)  # every rank decodes from the same cache; the first run builds it
    model_config.num_classes = len(data.classes)
    if args.resume and resumed_classes != data.classes:
        parser.error(f'{args.resume} was trained on other classes than those of {args.data}: give the same --data')
    finetune = None
    if cfg.finetune_from:
        try:
            finetune = prepare_finetune(cfg.finetune_from, data.classes, cfg.finetune, cfg.frozen_blocks,
                                        cfg.layer_decay)
        except (ModelUnavailable, CheckpointError, ValueError) as e:
            parser.error(str(e))
    distillation = None
    if args.teacher:
        try:
            distillation = Distillation.from_checkpoint(args.teacher, data.classes, cfg.distill,
                                                        once=cfg.teacher_once)
        except (CheckpointError, FileNotFoundError, ValueError) as e:
            parser.error(str(e))
    # the trainer's own ETA: tqdm's would count a resumed run's earlier epochs as done in this process's time
    bar = tqdm(total=1000, unit='‰', bar_format='{l_bar}{bar}| {postfix}', disable=rank > 0)

    def report(ev: TrainEvent) -> None:
        bar.n = int(ev.progress * 1000)
        eta = f'ETA {tqdm.format_interval(ev.eta_seconds)}'
        post = f'ep {ev.epoch} loss {ev.loss:.3f} acc {ev.accuracy:.3f} {ev.images_per_sec:.0f} img/s, {eta}'
        if ev.kind == 'features':
            post = f'features {ev.epoch_fraction:.0%} {ev.images_per_sec:.0f} img/s, {eta}'
        if ev.kind == 'epoch':
            val = f' val {ev.val_accuracy:.4f}' if ev.val_accuracy is not None else ''
            tqdm.write(f'epoch {ev.epoch}: train loss {ev.loss:.4f} acc {ev.accuracy:.4f}{val} '
                       f'lr {ev.lr:.2e} {ev.images_per_sec:.0f} img/s')
        bar.set_postfix_str(post, refresh=True)

    device = f'cuda:{torch.cuda.current_device()}' if torch.cuda.is_available() else 'cpu'
    result = train(model_config, cfg, data, out=out, on_event=report if rank == 0 else None, device=device,
                   finetune=finetune, distillation=distillation, resume=args.resume)
    bar.close()
    if world > 1:
        dist.destroy_process_group()
    if rank > 0:
        return
    m = result.metrics
    print(f'done: {epochs_text(result.history)}, train acc {m.get("train_accuracy", 0):.4f}, '
          f'val acc {m.get("val_accuracy") if m.get("val_accuracy") is not None else "n/a"}, '
          f'saved to {result.path}')


if __name__ == '__main__':
    main()
