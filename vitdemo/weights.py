"""Checkpoints: safetensors files whose metadata carries everything needed to rebuild the model.

Nothing here unpickles: safetensors holds only tensors and a JSON header, so a hostile file can at
worst fail to load. Writes go to a temporary file that is renamed into place, so a crash mid-save leaves
the previous checkpoint intact.
"""
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .cnn import CifarConvNet, CifarResNet, ConvNetConfig, ResNetConfig
from .metadata import FORMAT, VERSION, CheckpointError, read_metadata
from .model import ViTConfig, VisionTransformer

# what a checkpoint's `arch` names (`metadata.ARCH_NAMES`): its config and model classes
ARCHITECTURES = {VisionTransformer.arch: (ViTConfig, VisionTransformer), CifarResNet.arch: (ResNetConfig, CifarResNet),
                 CifarConvNet.arch: (ConvNetConfig, CifarConvNet)}
Classifier = VisionTransformer | CifarResNet | CifarConvNet
ModelConfig = ViTConfig | ResNetConfig | ConvNetConfig


def build_model(config: ModelConfig) -> Classifier:
    """A freshly initialised model of the kind `config` describes."""
    return next(cls for config_cls, cls in ARCHITECTURES.values() if isinstance(config, config_cls))(config)


def save_checkpoint(path: str | Path, model: Classifier, classes: list[str], mean: list[float],
                    std: list[float], dtype: torch.dtype = torch.float32, **extra) -> Path:
    """Write model weights and metadata (config, class names, normalisation, and any JSON-able extras).
    Floating-point tensors are stored as `dtype` (float16 halves the file); loading casts them back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {'format': FORMAT, 'version': VERSION, 'arch': model.arch, 'config': json.dumps(model.config.to_dict()),
                'classes': json.dumps(classes), 'mean': json.dumps(mean), 'std': json.dumps(std)}
    metadata.update({k: json.dumps(v) for k, v in extra.items()})
    tensors = {k: v.detach().to('cpu', dtype if v.is_floating_point() else v.dtype).contiguous()
               for k, v in model.state_dict().items()}
    return save_atomically(tensors, path, metadata)


def save_atomically(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """A safetensors file that appears whole or not at all (a reader never sees half of it)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def config_of(meta: dict) -> ModelConfig:
    """The model config a checkpoint's metadata describes (see `read_metadata`)."""
    try:
        config_cls, _ = ARCHITECTURES[meta['arch']]
        return config_cls(**meta['config'])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f'a checkpoint has an invalid model config: {e}') from None


def load_checkpoint(path: str | Path) -> tuple[Classifier, dict]:
    """Rebuild the model a checkpoint describes and load its weights; refuse one that does not fit."""
    meta = read_metadata(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f'{Path(path).name} has unreadable tensors ({e})') from None
    try:
        config_cls, model_cls = ARCHITECTURES[meta['arch']]
        model = model_cls(config_cls(**meta['config']))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f'{Path(path).name} has an invalid model config: {e}') from None
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [f'{k}: file {tuple(tensors[k].shape)}, config {tuple(v.shape)}'
             for k, v in expected.items() if k in tensors and tensors[k].shape != v.shape]
    if missing or unexpected or wrong:
        problems = ([f'missing {", ".join(missing[:5])}'] if missing else []) + \
                   ([f'unexpected {", ".join(unexpected[:5])}'] if unexpected else []) + wrong[:5]
        raise CheckpointError(f'{Path(path).name} does not fit its own config: ' + '; '.join(problems))
    model.load_state_dict(tensors)
    return model.eval(), meta


def from_timm(timm_vit: torch.nn.Module) -> VisionTransformer:
    """Our ViT with the weights of a timm `VisionTransformer` (same names and shapes: nothing to rename)."""
    blocks = timm_vit.blocks
    config = ViTConfig(img_size=timm_vit.patch_embed.img_size[0], patch_size=timm_vit.patch_embed.patch_size[0],
                       in_chans=timm_vit.patch_embed.proj.in_channels, num_classes=timm_vit.num_classes,
                       embed_dim=timm_vit.embed_dim, depth=len(blocks), num_heads=blocks[0].attn.num_heads,
                       mlp_ratio=blocks[0].mlp.fc1.out_features / timm_vit.embed_dim,
                       qkv_bias=blocks[0].attn.qkv.bias is not None, global_pool=timm_vit.global_pool,
                       distilled=getattr(timm_vit, 'dist_token', None) is not None)
    model = VisionTransformer(config)
    try:
        model.load_state_dict(timm_vit.state_dict())
    except RuntimeError as e:
        raise CheckpointError(f'this timm model is not a plain ViT our code can run: {e}') from None
    return model.eval()
