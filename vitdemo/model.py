"""A Vision Transformer written from scratch, read top to bottom.

An image is cut into patches, each patch becomes a token, a learnable CLS token is put in front, and a
stack of pre-norm Transformer blocks mixes the tokens. The CLS token (or the mean of the patch tokens)
goes through a linear head.

Parameter names and shapes are those of timm's `VisionTransformer` for the same configuration, so
`ours.load_state_dict(timm_vit.state_dict())` works and real ImageNet weights run on this code. Trained
from scratch on small images, a few 3x3 convolutions in place of the patch projection (`stem='conv'`,
named like timm's hybrid ViTs) learn much faster; the rest of the network is unchanged.
"""
import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from .lazy import late_import


@dataclass
class ViTConfig:
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    num_classes: int = 1000
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    global_pool: Literal['token', 'avg'] = 'token'  # CLS token as in the paper; 'avg' pools patch tokens
    pos_embed: Literal['learn', 'sincos'] = 'learn'  # 'sincos' is fixed 2-D, no parameters to learn
    drop_rate: float = 0.0  # dropout before the head
    proj_drop_rate: float = 0.0  # dropout after attention and MLP projections
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # stochastic depth, growing linearly to this rate at the last block
    patch_drop_rate: float = 0.0  # share of patch tokens left out of each training image (PatchDropout)
    # 'conv': 3x3 convs (ConvStem); 'strided': the same without the full-size one; 'hybrid': a ResNet stage
    stem: Literal['patch', 'conv', 'strided', 'hybrid'] = 'patch'
    distilled: bool = False  # DeiT: a distillation token and head beside CLS, taught by a teacher

    def __post_init__(self):
        # raised, not asserted: these check what people type, and must hold under `python -O` too
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)
        check(min(self.embed_dim, self.num_heads, self.patch_size, self.depth) >= 1,
              'embed_dim, num_heads, patch_size and depth must be positive')
        check(self.embed_dim % self.num_heads == 0,
              f'embed_dim ({self.embed_dim}) must be divisible by num_heads ({self.num_heads})')
        check(self.img_size % self.patch_size == 0,
              f'img_size ({self.img_size}) must be divisible by patch_size ({self.patch_size})')
        check(self.global_pool in ('token', 'avg'), f'global_pool must be token or avg, not {self.global_pool!r}')
        check(self.pos_embed in ('learn', 'sincos'), f'pos_embed must be learn or sincos, not {self.pos_embed!r}')
        check(self.pos_embed == 'learn' or self.embed_dim % 4 == 0,
              f'sin-cos position embeddings need embed_dim divisible by 4, not {self.embed_dim}')
        check(0 <= self.patch_drop_rate < 1, f'patch_drop_rate must be in [0, 1), not {self.patch_drop_rate}')
        check(self.stem in STEMS, f'stem must be one of {", ".join(STEMS)}, not {self.stem!r}')
        check(not (self.distilled and self.global_pool == 'avg'),
              'a distilled ViT classifies its CLS and distillation tokens: global_pool must be token (the CLS token), '
              'not avg (the mean of the patch tokens)')
        check(self.stem not in ('conv', 'strided') or self.patch_size & (self.patch_size - 1) == 0,
              f'a conv stem halves the image per conv, so patch_size must be a power of 2, not {self.patch_size}')
        check(self.stem != 'strided' or self.patch_size > 1, 'a strided conv stem needs a patch of 2 or more')

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    def to_dict(self) -> dict:
        return asdict(self)


# The sizes of the ViT paper (and DeiT's Ti), named as timm names them, plus a CIFAR-10 size for training
# on a 2-core CPU: 32x32 images cut into 4x4 patches give 64 tokens, as many as a 224/28 ImageNet grid.
PRESETS: dict[str, dict] = {
    'vit_tiny_patch16_224': dict(embed_dim=192, depth=12, num_heads=3),
    'vit_small_patch16_224': dict(embed_dim=384, depth=12, num_heads=6),
    'vit_base_patch16_224': dict(embed_dim=768, depth=12, num_heads=12),
    'vit_large_patch16_224': dict(embed_dim=1024, depth=24, num_heads=16),
    'vit_huge_patch14_224': dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16),
    'vit_cifar10': dict(img_size=32, patch_size=4, num_classes=10, embed_dim=192, depth=6, num_heads=3,
                        mlp_ratio=2.0, stem='conv'),
}


def preset(name: str, **overrides) -> ViTConfig:
    assert name in PRESETS, f'unknown preset {name!r}; choose from {sorted(PRESETS)}'
    return ViTConfig(**{**PRESETS[name], **overrides})


def sincos_pos_embed(grid_size: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, (grid_size**2, dim): a quarter of the channels each for
    sin(y), cos(y), sin(x), cos(x) at geometrically spaced frequencies (MoCo v3, "Simple ViT")."""
    assert dim % 4 == 0, f'sincos position embedding needs embed_dim divisible by 4, got {dim}'
    y, x = torch.meshgrid(torch.arange(grid_size, dtype=torch.float32),
                          torch.arange(grid_size, dtype=torch.float32), indexing='ij')
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    y = y.flatten()[:, None] * omega[None, :]
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=1)


class PatchEmbed(nn.Module):
    """Cut the image into non-overlapping patches and project each to embed_dim (a strided conv does both)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the conv's arithmetic as one matrix product over the patches: the same numbers, but oneDNN's
        # strided conv took 16 ms of a ~300 ms CIFAR training step on a 2-core CPU, the product 1 ms
        b, c, h, w = x.shape
        p = self.proj.kernel_size[0]
        patches = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2)
        return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)  # (B, N, embed_dim)


class ConvStem(nn.Module):
    """Tokens from a few 3x3 convolutions instead of one patch projection ("Early convolutions help
    transformers see better", Xiao et al. 2021): a 3x3 conv at full resolution, then one stride-2 conv per
    halving until each output position covers a patch, then a 1x1 projection to embed_dim. Trained from
    scratch on small images it learns much faster than a patch projection, for a few percent more time.

    The names follow timm's `HybridEmbed` (`patch_embed.backbone`, `patch_embed.proj`).
    """

    full_resolution = True  # the first conv keeps the image's size; the halvings follow

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 192):
        super().__init__()
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        first = max(8, embed_dim // patch_size // 2)  # widths double with every halving, up to embed_dim / 2
        widths = [first * 2 ** i for i in range(patch_size.bit_length())]
        strides = [1] + [2] * (len(widths) - 1)
        if not self.full_resolution:
            widths, strides = widths[1:], strides[1:]
        layers, c = [], in_chans
        for width, stride in zip(widths, strides):
            layers += [nn.Conv2d(c, width, 3, stride=stride, padding=1, bias=False),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            c = width
        self.backbone = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c, embed_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # channels-last memory is oneDNN's native layout: measured 10% faster for these convs on a CPU
        x = self.backbone(x.contiguous(memory_format=torch.channels_last))
        # the 1x1 projection as a matrix product over the positions (channels-last is already (B, N, C) in
        # memory): the same numbers, 3% faster, and the weight's gradient comes in the weight's own layout,
        # where the conv gave it channels-last and DistributedDataParallel warned about the mismatch
        return F.linear(x.flatten(2).transpose(1, 2), self.proj.weight.flatten(1), self.proj.bias)  # (B, N, D)


class StridedConvStem(ConvStem):
    """`ConvStem` without its conv at full resolution: every 3x3 conv halves the image, as in Xiao et al.'s
    own stem. That first conv, its norm and its ReLU work on the most pixels: for a small model on a CPU they
    were most of the stem's time, and the stem about a third of a training step once PatchDropout had halved
    the blocks' tokens (docs/benchmarks.md)."""
    full_resolution = False


class HybridEmbed(nn.Module):
    """Tokens from a ResNet's first stage (the ViT paper's hybrid, with ResNet-18's stage for a small image):
    a 3x3 stem conv at half resolution, two residual basic blocks, then the rest of the patch as one strided
    projection. Deeper features than `ConvStem`'s for the same grid; about as much arithmetic as a small
    ViT's blocks on CIFAR's 32 px. Named as timm's `HybridEmbed` (`patch_embed.backbone`, `patch_embed.proj`).
    """

    def __init__(self, img_size: int = 32, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 192,
                 width: int = 64):
        super().__init__()
        BasicBlock = late_import('torchvision.models.resnet').BasicBlock  # the ResNet's own block, not a copy
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size ** 2
        stride = 2 if patch_size % 2 == 0 else 1
        self.backbone = nn.Sequential(nn.Conv2d(in_chans, width, 3, stride=stride, padding=1, bias=False),
                                      nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                                      BasicBlock(width, width), BasicBlock(width, width))
        self.proj = nn.Conv2d(width, embed_dim, kernel_size=patch_size // stride, stride=patch_size // stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.backbone(x.contiguous(memory_format=torch.channels_last)))
        return x.flatten(2).transpose(1, 2)  # (B, N, embed_dim)


class Attention(nn.Module):
    """Multi-head self-attention.

    Args:
        dim: token width.
        num_heads: heads; each gets dim // num_heads channels.
        qkv_bias: bias on the query/key/value projection.
        attn_drop: dropout on the attention probabilities.
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0):
        super().__init__()
        assert dim % num_heads == 0, 'dim should be divisible by num_heads'
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        # SDPA is the faster path at inference, but gives no weights; the manual path yields the maps and,
        # measured on a 2-core CPU, is faster for bf16 training at CIFAR's 65 tokens. The model sets it.
        self.fused_attn = True
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # q, k, v: (B, heads, N, head_dim)
        attn = None
        if self.fused_attn and not return_attention:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, heads, N, N)
            x = self.attn_drop(attn) @ v
        x = self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))
        return (x, attn) if return_attention else x


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch for some samples, scale the rest to keep the mean."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class Block(nn.Module):
    """Pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=proj_drop)
        self.drop_path1 = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.drop_path2 = DropPath(drop_path)

    def forward(self, x: torch.Tensor, return_attention: bool = False):
        y = self.attn(self.norm1(x), return_attention=return_attention)
        y, attn = y if return_attention else (y, None)
        x = x + self.drop_path1(y)
        x = x + self.drop_path2(self.mlp(self.norm2(x)))
        return (x, attn) if return_attention else x


# how tokens are made
STEMS = {'patch': PatchEmbed, 'conv': ConvStem, 'strided': StridedConvStem, 'hybrid': HybridEmbed}


class VisionTransformer(nn.Module):
    arch = 'vit'  # recorded in checkpoints, next to the config
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = c = config
        self.num_classes = c.num_classes
        self.num_prefix_tokens = 2 if c.distilled else 1  # CLS, and DeiT's distillation token
        self.patch_embed = STEMS[c.stem](c.img_size, c.patch_size, c.in_chans, c.embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, c.embed_dim)) if c.distilled else None
        num_tokens = self.patch_embed.num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, c.embed_dim), requires_grad=c.pos_embed == 'learn')
        self.pos_drop = nn.Dropout(c.proj_drop_rate)
        self.blocks = nn.Sequential(*[
            Block(c.embed_dim, c.num_heads, c.mlp_ratio, c.qkv_bias, c.proj_drop_rate, c.attn_drop_rate,
                  drop_path=c.drop_path_rate * i / max(c.depth - 1, 1))
            for i in range(c.depth)])
        # timm's layout: final norm on all tokens for CLS pooling, on the pooled vector for mean pooling
        use_fc_norm = c.global_pool == 'avg'
        self.norm = nn.Identity() if use_fc_norm else nn.LayerNorm(c.embed_dim, eps=1e-6)
        self.fc_norm = nn.LayerNorm(c.embed_dim, eps=1e-6) if use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(c.drop_rate)
        self.head = nn.Linear(c.embed_dim, c.num_classes)
        # DeiT (Touvron et al. 2021), with timm's names: the distillation token's own head
        self.head_dist = nn.Linear(c.embed_dim, c.num_classes) if c.distilled else None
        self.distilled_training = False  # set while a teacher teaches: forward then returns both heads' logits
        self.init_weights()

    def init_weights(self) -> None:
        if self.config.pos_embed == 'sincos':
            with torch.no_grad():
                self.pos_embed[0, self.num_prefix_tokens:] = sincos_pos_embed(self.patch_embed.grid_size,
                                                                              self.config.embed_dim)
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # the patch projection is a linear layer over flattened patches: initialise it as one
        w = self.patch_embed.proj.weight
        nn.init.trunc_normal_(w.view(w.shape[0], -1), std=math.sqrt(1.0 / w[0].numel()))
        nn.init.zeros_(self.patch_embed.proj.bias)
        for head in self.heads():
            nn.init.zeros_(head.weight)  # every class equally likely at the start

    def heads(self) -> list[nn.Linear]:
        """The classifier heads: CLS's, and a distilled ViT's distillation head; both answer for the same classes."""
        return [h for h in (self.head, self.head_dist) if h is not None]

    def reset_classifier(self, num_classes: int) -> None:
        """New heads for `num_classes` classes, every class equally likely (timm's name, for a fine-tune)."""
        self.config.num_classes = self.num_classes = num_classes
        self.head = nn.Linear(self.config.embed_dim, num_classes)
        if self.head_dist is not None:
            self.head_dist = nn.Linear(self.config.embed_dim, num_classes)
        for head in self.heads():
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters kept out of weight decay besides biases and norms (timm's convention)."""
        return {'pos_embed', 'cls_token', 'dist_token'}

    def hidden_matrices(self) -> set[str]:
        """The blocks' 2-D weights: the hidden layers' matrices, which Muon may update (see `vitdemo.optim`)."""
        return {f'blocks.{name}' for name, p in self.blocks.named_parameters() if p.ndim == 2}

    def set_distilled_training(self, enabled: bool = True) -> None:
        self.distilled_training = enabled

    def set_fused_attn(self, enabled: bool) -> None:
        for block in self.blocks:
            block.attn.fused_attn = enabled

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        c = self.config
        assert (H, W) == (c.img_size, c.img_size), f'expected {c.img_size}x{c.img_size} input, got {H}x{W}'
        x = self.patch_embed(x)  # (B, N, D)
        prefix = [self.cls_token] + ([self.dist_token] if self.dist_token is not None else [])
        x = torch.cat([t.expand(B, -1, -1) for t in prefix] + [x], dim=1)  # (B, prefix + N, D)
        x = self.pos_drop(x + self.pos_embed)
        if self.training and c.patch_drop_rate:
            # PatchDropout (Liu et al. 2022): each training image keeps a random subset of its patch tokens, so a
            # step does less arithmetic and a run fixed in minutes sees more epochs; evaluation keeps them all
            x, _ = late_import('timm.layers').patch_dropout_forward(x, c.patch_drop_rate, self.num_prefix_tokens,
                                                                    ordered=False, training=True)
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(self.embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        if self.head_dist is not None:  # as timm's VisionTransformerDistilled
            x, x_dist = x[:, 0], x[:, 1]
            if pre_logits:
                return (x + x_dist) / 2
            x, x_dist = self.head(self.head_drop(x)), self.head_dist(self.head_drop(x_dist))
            if self.distilled_training and self.training:
                return x, x_dist  # the teacher's loss needs the distillation head's own logits
            return (x + x_dist) / 2
        x = x[:, self.num_prefix_tokens:].mean(dim=1) if self.config.global_pool == 'avg' else x[:, 0]
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits and, per layer, the softmax attention probabilities (B, heads, tokens, tokens)."""
        x = self.embed(x)
        attentions = []
        for block in self.blocks:
            x, attn = block(x, return_attention=True)
            attentions.append(attn)
        return self.forward_head(self.norm(x)), attentions
