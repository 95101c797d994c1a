"""The CNN baseline: torchvision's ResNet-18 adapted to 32x32 images, and where it looks (Grad-CAM).

ImageNet's ResNet stem (a 7x7 stride-2 convolution, then max-pooling) shrinks a 32x32 image to 8x8
before the first stage; small-image ResNets (He et al., 2016, section 4.2) start with a 3x3 stride-1
convolution and no pooling, so the four stages see 32, 16, 8 and 4 pixels a side. It trains with the same
trainer as the ViT (`python -m vitdemo.train --arch resnet18`), so "ViT vs CNN on small data" is one
command and one Compare away.
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .lazy import late_import


@dataclass
class ResNetConfig:
    img_size: int = 32
    in_chans: int = 3
    num_classes: int = 10

    def __post_init__(self):
        if self.img_size < 8:
            raise ValueError(f'img_size must be at least 8 (three stride-2 stages), got {self.img_size}')
        if self.num_classes < 1 or self.in_chans < 1:
            raise ValueError('num_classes and in_chans must be positive')

    def to_dict(self) -> dict:
        return asdict(self)


class CifarResNet(nn.Module):
    """ResNet-18 (four stages of two basic blocks) with a small-image stem: torchvision's own modules under
    their own names, so its checkpoints load as torchvision's would."""

    arch = 'resnet18'  # recorded in checkpoints, next to the config

    def __init__(self, config: ResNetConfig):
        super().__init__()
        # imported here: torchvision's package import (its models and ops) costs a second of the app's start
        resnet = late_import('torchvision.models.resnet')
        BasicBlock, ResNet = resnet.BasicBlock, resnet.ResNet
        self.config = config
        for name, module in ResNet(BasicBlock, [2, 2, 2, 2], num_classes=config.num_classes).named_children():
            self.add_module(name, module)
        self.conv1 = nn.Conv2d(config.in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.maxpool = nn.Identity()
        nn.init.kaiming_normal_(self.conv1.weight, mode='fan_out', nonlinearity='relu')  # as ResNet does its own

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward_with_saliency(self, x: torch.Tensor,
                              target: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits, and after each stage the Grad-CAM of each image's top class, or of `target` (one class
        index per image) when given (Selvaraju et al., 2017):
        the stage's channels weighted by the mean gradient of the class score, summed, negatives dropped.
        Each map (B, rows, cols) sums to 1, like a row of attention, so the two kinds compare directly."""
        with torch.inference_mode(False), torch.enable_grad():  # Grad-CAM needs gradients, even in predict
            h = self.maxpool(self.relu(self.bn1(self.conv1(x.clone()))))
            features = []
            for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
                h = stage(h)
                features.append(h)
            logits = self.fc(torch.flatten(self.avgpool(h), 1))
            classes = logits.argmax(1) if target is None else target.to(logits.device)
            score = logits.gather(1, classes[:, None]).sum()  # images are independent in eval
            grads = torch.autograd.grad(score, features)
        maps = []
        for feature, grad in zip(features, grads):
            cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * feature).sum(dim=1)).detach()
            maps.append(cam / cam.flatten(1).sum(1).clamp_min(1e-12)[:, None, None])
        return logits.detach(), maps
