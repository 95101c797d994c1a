"""Checkpoints: safetensors files whose metadata carries everything needed to rebuild the model.

Nothing here unpickles: safetensors holds only tensors and a JSON header, so a hostile file can at
worst fail to load. Writes go to a temporary file that is renamed into place, so a crash mid-save leaves
the previous checkpoint intact.
"""
import json
import math
import os
import tempfile
from dataclasses import fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .archive import CLASS_NAME
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


def config_of(meta: dict, name: str = 'a checkpoint') -> ModelConfig:
    """The model config a checkpoint's metadata describes (see `read_metadata`)."""
    try:
        config_cls, _ = ARCHITECTURES[meta['arch']]
        return config_cls(**meta['config'])
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f'{name} has an invalid model config: {e}') from None


def load_checkpoint(path: str | Path) -> tuple[Classifier, dict]:
    """Rebuild the model a checkpoint describes and load its weights; refuse one that does not fit."""
    name = Path(path).name
    meta = read_metadata(path)
    tensors = read_tensors(path)
    config = config_of(meta, name)
    try:
        model = build_model(config)
    except (TypeError, ValueError) as e:  # values the config's own checks let by (a float for a count)
        raise CheckpointError(f'{name} has an invalid model config: {e}') from None
    check_fit(name, {k: tuple(v.shape) for k, v in tensors.items()},
              {k: tuple(v.shape) for k, v in model.state_dict().items()})
    model.load_state_dict(tensors)
    return model.eval(), meta


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f'{Path(path).name} has unreadable tensors ({e})') from None


def check_fit(name: str, stored: dict[str, tuple], expected: dict[str, tuple]) -> None:
    """Refuse a file whose tensors (name: shape) are not the ones its config's model has."""
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    wrong = [f'{k}: file {stored[k]}, config {v}' for k, v in expected.items() if k in stored and stored[k] != v]
    if missing or unexpected or wrong:
        problems = ([f'missing {", ".join(missing[:5])}'] if missing else []) + \
                   ([f'unexpected {", ".join(unexpected[:5])}'] if unexpected else []) + wrong[:5]
        raise CheckpointError(f'{name} does not fit its own config: ' + '; '.join(problems))


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


# what a checkpoint handed to a server may describe: the largest inputs this app trains (a fine-tune at 224 px) and
# token counts whose attention stays small (224 px in patches of 7, 64 px in patches of 2)
MAX_IMG_SIZE = 224
MAX_TOKENS = 1024
MAX_DEPTH = 64
MAX_CLASSES = 10_000
HISTORY_FIELDS = {'epoch', 'epochs', 'step', 'lr', 'train_loss', 'train_accuracy', 'val_loss', 'val_accuracy',
                  'seconds', 'images_per_sec'}


def rewrite_checkpoint(source: str | Path, dest: str | Path, max_params: int | None = None) -> list[str]:
    """Check a checkpoint someone hands the app and write it again, with this code, to `dest`. The config must
    lie within bounds, and the file's tensors fit it, before any model is built (its parameters counted and its
    shapes compared on the meta device: no memory); the weights must be finite, the class names and the
    normalisation sane. Of the rest of the metadata, only the training history and the filmstrip are kept,
    each only if it reads back as what vitdemo writes; returns what was left out, in words. CheckpointError
    says why a file is refused."""
    name = Path(source).name
    meta = read_metadata(source)
    config = config_of(meta, name)

    def refuse(why: str):
        raise CheckpointError(f'{name} {why}')
    if not _typed_as_declared(config):  # JSON lets a 3.0 or a "3" stand for a 3, which fails only when it runs
        refuse('has a model config with values of the wrong type')
    if not 8 <= config.img_size <= MAX_IMG_SIZE or config.in_chans != 3:
        refuse(f'takes {config.img_size} px images in {config.in_chans} channels; this app runs models of RGB '
               f'images of 8 to {MAX_IMG_SIZE} px')
    if isinstance(config, ViTConfig) and config.grid_size ** 2 > MAX_TOKENS:
        refuse(f'cuts its image into {config.grid_size ** 2:,} patches; this app runs ViTs of at most {MAX_TOKENS:,}')
    if isinstance(config, ViTConfig) and not config.depth <= MAX_DEPTH:  # a module per block: Python's memory
        refuse(f'has {config.depth:,} blocks; this app runs ViTs of at most {MAX_DEPTH}')
    classes, mean, std = meta.get('classes'), meta.get('mean'), meta.get('std')
    if not (isinstance(classes, list) and len(classes) == config.num_classes <= MAX_CLASSES and
            all(isinstance(c, str) and CLASS_NAME.fullmatch(c) for c in classes)):
        refuse(f'does not name its classes (at most {MAX_CLASSES:,}, each in at most 48 printable characters, as a '
               'folder of a training zip)')
    if not all(isinstance(v, list) and len(v) == 3 and all(_finite(x) for x in v) for v in (mean, std)) or \
            min(std) <= 0:
        refuse('has no usable normalisation (three finite means, three positive standard deviations)')
    try:
        with torch.device('meta'):
            sized = build_model(config)
    except (TypeError, ValueError, RuntimeError) as e:  # values of the wrong type the config's checks let by
        refuse(f'has an invalid model config: {e}')
    params = sum(p.numel() for p in sized.parameters())
    if max_params is not None and params > max_params:
        refuse(f'has {params / 1e6:.1f} M parameters; this server runs models of at most {max_params / 1e6:.1f} M')
    # the model is built for real only once the file holds every one of its tensors: its memory is then bounded
    # by the file's size, whatever the config claims
    with safe_open(str(source), 'pt') as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    check_fit(name, stored, {k: tuple(v.shape) for k, v in sized.state_dict().items()})
    model = build_model(config)  # as on the meta device, now that the file is known to fill it
    model.load_state_dict(read_tensors(source))
    if not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()):
        refuse('has weights that are not finite numbers (NaN or infinity)')
    extras, left_out = {}, []
    accuracy = (meta.get('metrics') or {}).get('val_accuracy') if isinstance(meta.get('metrics'), dict) else None
    if _finite(accuracy) and 0 <= accuracy <= 1:
        extras['metrics'] = {'val_accuracy': accuracy}
    if meta.get('history') is not None:
        if _valid_history(meta['history']):
            extras['history'] = meta['history']
        else:
            left_out.append('its training curves (they did not read back)')
    if meta.get('filmstrip') is not None:
        if isinstance(config, ViTConfig) and _valid_filmstrip(meta['filmstrip'], config):
            extras['filmstrip'] = meta['filmstrip']
        else:
            left_out.append('its attention through training (it did not read back)')
    half = dtypes & {'F16', 'F32'} == {'F16'}  # a file stored in float16 (half the size) stays so
    save_checkpoint(dest, model, classes, [float(v) for v in mean], [float(v) for v in std],
                    torch.float16 if half else torch.float32, **extras)
    return left_out


def _typed_as_declared(config: ModelConfig) -> bool:
    """Each field of a config holds a value of its default's type (a tuple checks its own items)."""
    for f in fields(config):
        value, default = getattr(config, f.name), f.default
        if isinstance(default, bool) and not isinstance(value, bool) or \
                isinstance(default, int) and not isinstance(default, bool) and \
                (not isinstance(value, int) or isinstance(value, bool)) or \
                isinstance(default, float) and not _finite(value) or \
                isinstance(default, str) and not isinstance(value, str):
            return False
    return True


def _finite(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _valid_history(history) -> bool:
    """Rows as `vitdemo.train` writes them: numbers, with the validation figures None for a run without any."""
    return isinstance(history, list) and len(history) <= 10_000 and all(
        isinstance(row, dict) and {'epoch', 'seconds'} <= set(row) <= HISTORY_FIELDS and
        all(_finite(v) or (v is None and k.startswith('val_')) for k, v in row.items())
        for row in history)


def _valid_filmstrip(packed, config: ViTConfig) -> bool:
    """A filmstrip (`vitdemo.filmstrip`) of this model: a few RGB images (at the data's size, which a fine-tune
    scales up), and for each epoch a map per image, layer and patch, and a class per image."""
    from .filmstrip import Filmstrip
    try:
        strip = Filmstrip.from_metadata(packed)
    except (KeyError, TypeError, ValueError, AttributeError):  # missing fields, wrong types, shapes that do not fit
        return False
    n = len(strip.labels)
    maps_fit = all(m.shape == (n, config.depth, config.grid_size, config.grid_size) for m in strip.maps)
    images_fit = strip.images.ndim == 4 and strip.images.shape[0] == n and strip.images.shape[3] == 3 and \
        all(8 <= side <= MAX_IMG_SIZE for side in strip.images.shape[1:3])
    return (0 < n <= 16 and images_fit and maps_fit and
            len(strip.maps) == len(strip.epochs) == len(strip.predicted) and
            all(isinstance(e, int) for e in strip.epochs) and
            all(isinstance(c, int) and 0 <= c < config.num_classes for c in strip.labels) and
            all(len(p) == n and all(isinstance(c, int) and 0 <= c < config.num_classes for c in p)
                for p in strip.predicted))
