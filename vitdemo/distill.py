"""Knowledge distillation (Touvron et al., "Training data-efficient image transformers & distillation
through attention", DeiT, 2021): a trained teacher's predictions as a second target for the student.

- hard: the class head learns the label and the distillation head the teacher's top class, equally:
  `0.5 CE(z_cls, y) + 0.5 CE(z_dist, argmax z_teacher)`.
- soft: `(1 - alpha) CE(z_cls, y) + alpha tau^2 KL(softmax(z_teacher / tau) || softmax(z_dist / tau))`;
  DeiT used tau = 3 and alpha = 0.1.

A student with a distillation token (`ViTConfig(distilled=True)`) gives each term its own head; any other
student (our plain ViT, the CNN) uses its one head for both. The teacher runs on the fly, on the very
batch the student sees (crops, flips, RandAugment and CutMix included), in inference mode; or, with
`once=True`, once per training image before the first step (`remember`), whose answers stand in for those
of the cropped, augmented or mixed images after (an approximation, for speed). Either way it answers for
the image and its mirror image and averages the two (test-time augmentation): a mirror image is as likely
a photograph as the image itself, and the averaged answer is the better one (docs/benchmarks.md).
"""
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .weights import load_checkpoint

DistillKind = Literal['hard', 'soft']


@dataclass
class Distillation:
    """The distillation task: the teacher, how it teaches, and the loss that mixes its target with the label.

    Args:
        teacher: a trained classifier over the same classes, in eval mode; never updated.
        teacher_mean, teacher_std: the normalisation the teacher was trained with.
        kind: 'hard' (the teacher's top class) or 'soft' (its distribution at `temperature`).
        alpha: the teacher's share of the loss, for 'soft' ('hard' splits evenly, as DeiT does).
        temperature: softens both distributions for 'soft'.
    """
    teacher: nn.Module
    teacher_mean: tuple[float, ...]
    teacher_std: tuple[float, ...]
    kind: DistillKind = 'hard'
    alpha: float = 0.1
    temperature: float = 3.0
    once: bool = False  # answer once per image, before training, not on every batch
    answers: torch.Tensor | None = None  # with `once`: (images, classes)

    def __post_init__(self):
        if self.kind not in ('hard', 'soft'):
            raise ValueError(f"distillation must be 'hard' or 'soft', not {self.kind!r}")
        if not 0.0 <= self.alpha <= 1.0 or self.temperature <= 0:
            raise ValueError('the teacher\'s share must be in [0, 1] and the temperature positive')
        self.teacher.eval().requires_grad_(False)

    @torch.inference_mode()
    def teach(self, x: torch.Tensor, mean, std) -> torch.Tensor:
        """The teacher's logits (fp32) for the student's batch `x`, normalised with the student's `mean`, `std`:
        the mean of its logits for each image and its mirror image."""
        pixels = x * torch.tensor(std, device=x.device).view(1, -1, 1, 1) + \
            torch.tensor(mean, device=x.device).view(1, -1, 1, 1)
        x = (pixels - torch.tensor(self.teacher_mean, device=x.device).view(1, -1, 1, 1)) / \
            torch.tensor(self.teacher_std, device=x.device).view(1, -1, 1, 1)
        size = self.teacher.config.img_size
        if x.shape[-1] != size:
            x = F.interpolate(x, size=(size, size), mode='bilinear', antialias=True, align_corners=False)
        return self.teacher(torch.cat([x, x.flip(-1)])).float().view(2, len(x), -1).mean(0)

    def remember(self, images: torch.Tensor, mean, std, to_input, batch_size: int = 250) -> None:
        """The teacher's answers for every uint8 training image, `batch_size` images (and their mirrors) a pass;
        `to_input` makes the student's input of a uint8 batch (normalised, at the student's size)."""
        self.answers = torch.cat([self.teach(to_input(c, mean, std), mean, std).cpu()
                                  for c in images.split(batch_size)])

    def answer(self, x: torch.Tensor, mean, std, idx: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for the batch `x` of training images `idx`: remembered, or computed now."""
        if self.answers is not None:
            return self.answers[idx].to(x.device)
        return self.teach(x, mean, std)

    def loss(self, outputs, teacher_logits: torch.Tensor, target: torch.Tensor,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, the logits to score the student by). `outputs` is the student's forward: (class logits,
        distillation logits) for a distilled ViT while taught, one tensor for any other student;
        `target` class indices or (mixed) class probabilities."""
        cls_logits, dist_logits = outputs if isinstance(outputs, tuple) else (outputs, outputs)
        cls_logits, dist_logits = cls_logits.float(), dist_logits.float()
        label = F.cross_entropy(cls_logits, target, label_smoothing=label_smoothing)
        if self.kind == 'hard':
            loss = 0.5 * label + 0.5 * F.cross_entropy(dist_logits, teacher_logits.argmax(-1))
        else:
            t = self.temperature
            taught = F.kl_div(F.log_softmax(dist_logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                              reduction='batchmean', log_target=True) * t * t
            loss = (1 - self.alpha) * label + self.alpha * taught
        return loss, (cls_logits + dist_logits) / 2

    @classmethod
    def from_checkpoint(cls, path: str | Path, classes: list[str], kind: DistillKind = 'hard',
                        device: torch.device | str = 'cpu', **options) -> 'Distillation':
        """A teacher from one of our checkpoints (`weights/*.safetensors`), which must know `classes`."""
        module, meta = load_checkpoint(path)
        if list(meta['classes']) != list(classes):
            raise ValueError(f'the teacher {Path(path).name} knows other classes ({", ".join(meta["classes"][:3])}, '
                             f'...: {len(meta["classes"])}) than this data ({", ".join(classes[:3])}, ...: '
                             f'{len(classes)}): a teacher must answer in the same classes')
        return cls(module.to(device), tuple(meta['mean']), tuple(meta['std']), kind, **options)
