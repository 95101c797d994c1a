"""The CNN baselines and where they look (Grad-CAM): torchvision's ResNet-18 adapted to 32x32 images, and a
small fast network of plain convolutions that a ViT can learn from.

ImageNet's ResNet stem (a 7x7 stride-2 convolution, then max-pooling) shrinks a 32x32 image to 8x8
before the first stage; small-image ResNets (He et al., 2016, section 4.2) start with a 3x3 stride-1
convolution and no pooling, so the four stages see 32, 16, 8 and 4 pixels a side. The fast network keeps
those four sides with a tenth of ResNet-18's parameters and a quarter of its arithmetic (the layout of
Page's and Jordan's fast CIFAR-10 networks: each stage a convolution, a max-pool, and a second
convolution), so on two cores it trains to a teacher's accuracy in minutes. Both train with the same
trainer as the ViT (`python -m vitdemo.train --arch resnet18` or `--arch convnet`), so "ViT vs CNN on
small data" is one command and one Compare away.
"""
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .lazy import late_import


@dataclass
class ConvConfig:
    """What every CNN here is configured by: its input and its classes."""
    img_size: int = 32
    in_chans: int = 3
    num_classes: int = 10

    def __post_init__(self):
        if self.img_size < 8:
            raise ValueError(f'img_size must be at least 8 (three stages that halve it), got {self.img_size}')
        if self.num_classes < 1 or self.in_chans < 1:
            raise ValueError('num_classes and in_chans must be positive')

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class ResNetConfig(ConvConfig):
    """ResNet-18 for small images: nothing to choose but the input and the classes."""


class ConvClassifier(nn.Module):
    """A CNN as the app shows it: a stem, four stages that halve the side (or keep it, the first), global
    pooling and a linear head. Subclasses say what each part is; Grad-CAM reads every stage."""

    num_features: int  # channels of the last stage, what the head reads (timm's name)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stages(self) -> list[nn.Module]:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for stage in self.stages():
            x = stage(x)
        return self.forward_head(x)

    def forward_with_saliency(self, x: torch.Tensor,
                              target: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits, and after each stage the Grad-CAM of each image's top class, or of `target` (one class
        index per image) when given (Selvaraju et al., 2017):
        the stage's channels weighted by the mean gradient of the class score, summed, negatives dropped.
        Each map (B, rows, cols) sums to 1, like a row of attention, so the two kinds compare directly."""
        with torch.inference_mode(False), torch.enable_grad():  # Grad-CAM needs gradients, even in predict
            h = self.stem(x.clone())
            features = []
            for stage in self.stages():
                h = stage(h)
                features.append(h)
            logits = self.forward_head(h)
            classes = logits.argmax(1) if target is None else target.to(logits.device)
            score = logits.gather(1, classes[:, None]).sum()  # images are independent in eval
            grads = torch.autograd.grad(score, features)
        maps = []
        for feature, grad in zip(features, grads):
            cam = F.relu((grad.mean(dim=(2, 3), keepdim=True) * feature).sum(dim=1)).detach()
            total = cam.flatten(1).sum(1)[:, None, None]
            # where no position argues for the class (every weighted sum negative) no position stands out:
            # an even map, so that every map sums to 1 (an untrained CNN's did not, about one time in ten)
            even = torch.full_like(cam, 1 / cam[0].numel())
            maps.append(torch.where(total > 0, cam / total.clamp_min(1e-12), even))
        return logits.detach(), maps


class CifarResNet(ConvClassifier):
    """ResNet-18 (four stages of two basic blocks) with a small-image stem: torchvision's own modules under
    their own names, so its checkpoints load as torchvision's would."""

    arch = 'resnet18'  # recorded in checkpoints, next to the config
    title = 'ResNet-18 for small images'

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
        self.num_features = self.fc.in_features

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))


@dataclass
class ConvNetConfig(ConvConfig):
    widths: tuple[int, int, int, int] = (32, 64, 256, 256)  # the stem's and each pooling stage's channels

    def __post_init__(self):
        super().__post_init__()
        self.widths = tuple(self.widths)  # JSON gives a list back
        if len(self.widths) != 4 or not all(isinstance(w, int) and 0 < w <= 1024 for w in self.widths):
            raise ValueError(f'widths must be four channel counts from 1 to 1024, got {self.widths}')


def conv_bn(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    """A 3x3 convolution (then a 2x2 max-pool, halving the side), batch norm and GELU."""
    layers = [nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False)]
    layers += [nn.MaxPool2d(2)] if pool else []
    return nn.Sequential(*layers, nn.BatchNorm2d(c_out), nn.GELU())


class CifarConvNet(ConvClassifier):
    """Eight 3x3 convolutions, no shortcuts: a first stage at full resolution (the stem's width), then three
    stages of a pooled convolution and a plain one (16, 8 and 4 pixels a side), a global max-pool and a
    linear head. ~2 M parameters; the tensors stay channels-last, the layout oneDNN's CPU kernels want."""

    arch = 'convnet'
    title = 'a fast 8-layer CNN'

    def __init__(self, config: ConvNetConfig):
        super().__init__()
        self.config = config
        w0, w1, w2, w3 = config.widths
        self.stem_conv = conv_bn(config.in_chans, w0)
        self.layer1 = nn.Identity()  # the first stage is the stem's output itself, as in the ResNet at 32 px
        self.layer2 = nn.Sequential(conv_bn(w0, w1, pool=True), conv_bn(w1, w1))
        self.layer3 = nn.Sequential(conv_bn(w1, w2, pool=True), conv_bn(w2, w2))
        self.layer4 = nn.Sequential(conv_bn(w2, w3, pool=True), conv_bn(w3, w3))
        self.head = nn.Linear(w3, config.num_classes)
        self.num_features = w3
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
        self.to(memory_format=torch.channels_last)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem_conv(x.contiguous(memory_format=torch.channels_last))

    def stages(self) -> list[nn.Module]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.amax(x, dim=(2, 3)))
