"""The training form: the Train tab's fields, the `/train` API's named parameters and the CLI's `--preset`, in
one definition (`TrainForm`), the presets, and which one a run on this machine starts from.

No torch: the page builds the form from this module before torch is imported. `TrainForm.configs()` makes the
training code's configs, and imports it.
"""
from __future__ import annotations

import functools
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .catalog import TIMM_ARCHS
from .lazy import late_import
from .metadata import ARCH_NAMES
from .policy import checked_number

if TYPE_CHECKING:
    from .model import ViTConfig
    from .train import TrainConfig
    from .weights import ModelConfig

FINETUNE_MODES = {  # how a pretrained ViT learns the new classes
    'probe': 'linear probe: the head alone, on features computed once',
    'partial': 'partial: the first K blocks frozen, the rest and the head learn',
    'full': 'full: every weight, earlier layers slower (layer-wise learning-rate decay)',
}


@dataclass(frozen=True)
class TrainForm:
    """The training form: the Train tab's fields, the `/train` API's named parameters and the CLI's
    `--preset`, in one definition. The defaults are the default preset's. Values arrive as people and raw
    API calls send them; `configs()` checks each before any work. The ViT's own fields (dim, depth,
    heads, patch, positions, stem) count only for `arch='vit'`: the form hides them for the CNN."""
    arch: str = 'vit'  # 'vit', or a CNN of ARCHS
    embed_dim: int = 128
    depth: int = 4
    num_heads: int = 4
    patch_size: int = 4
    pos_embed: str = 'sincos'  # fixed positions: one thing less to learn in a short run
    stem: str = 'conv'  # 3x3 convolutions make the tokens: ~6 points over a patch projection in ten minutes
    patch_drop: float = 0.0  # share of patch tokens each training image leaves out (PatchDropout): cheaper steps
    minutes: float = 10.0
    batch_size: int = 128
    lr: float = 2e-3
    crop_padding: int = 2  # a ten-minute run underfits: light augmentation
    teacher: str = ''  # distillation: a model of the list (ours, the same classes) teaches; '' none
    distill: str = 'hard'  # with a teacher: 'hard' (its top class) or 'soft' (its distribution)
    teacher_once: bool = True  # with a teacher: its answers once per image and mirror (more epochs in the time)
    start_from: str = ''  # '' random weights; or a pretrained ViT of FINETUNE_ARCHS, fine-tuned instead
    finetune: str = 'probe'  # with start_from: one of FINETUNE_MODES
    frozen_blocks: int = 8  # with 'partial': the first blocks kept as pretrained
    layer_decay: float = 0.75  # with 'full': each layer learns at this fraction of the one above
    global_pool: str = 'token'  # classify the CLS token ('token', as the paper), or the patch tokens' mean ('avg')
    optimizer: str = 'muon'  # for a ViT's hidden matrices, AdamW for the rest (`vitdemo.optim`); or 'adamw' alone

    def configs(self, img_size: int = 32, mlp_ratio: float = 2.0, seed: int = 0) -> tuple[ModelConfig, TrainConfig]:
        # the configs are the training code's (with torch): imported when a run or an estimate asks, not by the page
        TrainConfig, ViTConfig = late_import('vitdemo.train').TrainConfig, late_import('vitdemo.model').ViTConfig
        if self.arch not in ARCHS:
            raise ValueError(f'model must be one of {", ".join(ARCHS)}, not {self.arch!r}')
        batch_size = checked_number(self.batch_size, 'batch size', 1, 4096, integer=True)
        minutes = checked_number(self.minutes, 'minutes', 0, 10 ** 6)
        lr = checked_number(self.lr, 'learning rate', 0, 1)
        crop_padding = checked_number(self.crop_padding, 'crop padding', -10 ** 6, 10 ** 6, integer=True)
        if not isinstance(self.teacher, str) or (self.teacher and self.distill not in ('hard', 'soft')):
            raise ValueError("the teacher must be a model's name and the distillation 'hard' or 'soft'")
        if self.start_from:
            return self._finetune_configs(TrainConfig(minutes=minutes, batch_size=batch_size, lr=lr,
                                                      crop_padding=crop_padding, seed=seed))
        if self.arch != 'vit':
            config_cls, _ = late_import('vitdemo.weights').ARCHITECTURES[self.arch]
            model_config = config_cls(img_size=img_size)
        else:
            model_config = ViTConfig(
                img_size=img_size, num_classes=10, mlp_ratio=mlp_ratio, pos_embed=self.pos_embed, stem=self.stem,
                global_pool=self.global_pool,
                embed_dim=checked_number(self.embed_dim, 'embed dim', 1, 1024, integer=True),
                depth=checked_number(self.depth, 'depth', 1, 24, integer=True),
                num_heads=checked_number(self.num_heads, 'heads', 1, 64, integer=True),
                patch_size=checked_number(self.patch_size, 'patch size', 1, img_size, integer=True),
                patch_drop_rate=checked_number(self.patch_drop, 'patch tokens left out', 0, 0.9),
                distilled=bool(self.teacher))  # a taught ViT gets DeiT's distillation token
        return model_config, TrainConfig(minutes=minutes, batch_size=batch_size, lr=lr, crop_padding=crop_padding,
                                         seed=seed, teacher=self.teacher,
                                         optimizer=optimizer_choice(self.optimizer, self.arch),
                                         distill=self.distill if self.teacher else '',
                                         teacher_once=bool(self.teacher_once) and bool(self.teacher))

    def _finetune_configs(self, cfg: TrainConfig) -> tuple[ViTConfig, TrainConfig]:
        """The pretrained ViT's shape (what the server's limits are checked against) and the run's recipe."""
        if self.start_from not in FINETUNE_ARCHS:
            raise ValueError(f'fine-tune one of {", ".join(FINETUNE_ARCHS)}, not {self.start_from!r}')
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f'fine-tuning must be one of {", ".join(FINETUNE_MODES)}, not {self.finetune!r}')
        if self.teacher:
            raise ValueError('a fine-tune learns from the labels alone: choose no teacher, or random weights')
        model_config = late_import('vitdemo.model').preset(self.start_from, num_classes=10)
        frozen = checked_number(self.frozen_blocks, 'frozen blocks', 0, model_config.depth, integer=True)
        decay = checked_number(self.layer_decay, 'layer decay', 0, 1)
        if decay == 0:
            raise ValueError('layer decay must be above 0 (1 gives every layer the same rate)')
        return model_config, replace(cfg, finetune_from=self.start_from, finetune=self.finetune,
                                     frozen_blocks=frozen, layer_decay=decay)


def optimizer_choice(asked: str, arch: str, finetune: bool = False) -> str:
    """The optimiser a run records: the one asked for where Muon applies (a ViT from random weights); AdamW
    alone for a CNN, which names no hidden matrices, and for a fine-tune, whose weights AdamW shaped."""
    return asked if arch == 'vit' and not finetune else 'adamw'


ARCHS = list(ARCH_NAMES)  # the ViT, then the CNN baselines: every architecture a checkpoint can hold
# the plain ViTs, whose sizes `model.PRESETS` has (not DeiT's: its distilled one has a second token)
FINETUNE_ARCHS = [a for a in TIMM_ARCHS if a.startswith('vit_')]
# Presets for the Train tab and `--preset`, sized for a 2-core CPU. The first is the default where a run trains
# in bf16 (or on a GPU); `default_preset` picks the smaller one where it would train in float32.
SMALL_PRESET = '10-minute, smaller model (float32 CPUs)'
TRAIN_PRESETS: dict[str, TrainForm] = {
    # each preset's choices are measured in docs/benchmarks.md ("The Train tab's ten-minute runs")
    '10-minute CPU demo': TrainForm(),
    # a CPU without bf16 trains in float32, ~4x slower: every choice here buys epochs (a smaller model, half the
    # patch tokens left out, a stem without a full-size conv) or learns more from each (the patch tokens' mean)
    SMALL_PRESET: TrainForm(embed_dim=96, depth=3, num_heads=3, stem='strided', patch_drop=0.5, global_pool='avg'),
    # two minutes are a few epochs, where each more pays most, and a schedule that short gains from a higher peak rate
    '2-minute quick look': TrainForm(embed_dim=96, depth=3, num_heads=3, stem='strided', minutes=2.0, lr=4e-3,
                                     crop_padding=0, patch_drop=0.5, global_pool='avg'),
    '30-minute, larger model': TrainForm(embed_dim=192, depth=6, num_heads=3, minutes=30.0, batch_size=256,
                                         pos_embed='learn', crop_padding=4),
    # ResNet-18 does ~8x the arithmetic per image of the 10-minute ViT: about one epoch in ten minutes
    '10-minute CNN baseline (ResNet-18)': TrainForm(arch='resnet18', crop_padding=4),
    # as good as the shipped ViT in ten minutes: the distillation teacher to train first
    '10-minute fast CNN (a teacher)': TrainForm(arch='convnet', batch_size=256, lr=3e-3, crop_padding=4),
}


# a GPU driver's device files on Linux (NVIDIA's, ROCm's, WSL2's): without one, torch finds no GPU
GPU_DRIVER_FILES = ('/dev/nvidiactl', '/dev/kfd', '/dev/dxg')


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 (AVX-512 BF16, which AMX CPUs have too): where PyTorch's CPU autocast to
    bf16 pays. From the flags Linux lists; elsewhere, PyTorch's own check."""
    try:
        flags = Path('/proc/cpuinfo').read_text()
    except OSError:
        return bool(late_import('torch').cpu._is_avx512_bf16_supported())
    return re.search(r'\bavx512_bf16\b', flags) is not None


def has_gpu() -> bool:
    """Whether a run here trains on a GPU (`train.training_device`): asks torch only where a GPU driver could be."""
    if sys.platform == 'linux' and not any(Path(p).exists() for p in GPU_DRIVER_FILES):
        return False
    return bool(late_import('torch').cuda.is_available())


def trains_in_float32() -> bool:
    """Whether a run here trains in float32, ~4x slower: on a CPU without bf16 arithmetic (emulated, it is slower
    still) and no GPU (`train.precision` decides each run's precision by the same two questions)."""
    return not has_gpu() and not cpu_has_bf16()


def default_preset() -> str:
    """The preset a run here starts from: the first, or the smaller model where a run trains in float32."""
    return SMALL_PRESET if trains_in_float32() else next(iter(TRAIN_PRESETS))
