"""A checkpoint's metadata, read from its safetensors header alone: what the page needs to list a model,
size its controls and name its classes, without torch (which `vitdemo.weights` imports to load the weights)."""
import json
from pathlib import Path

from safetensors import SafetensorError, safe_open

FORMAT = 'vitdemo.vit'
VERSION = '1'
# what a checkpoint's `arch` may name; `vitdemo.weights.ARCHITECTURES` gives each its classes (a test holds the
# two equal). Checkpoints without `arch` are ViTs.
ARCH_NAMES = ('vit', 'resnet18', 'convnet')


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message a person can act on."""


def read_metadata(path: str | Path) -> dict:
    """Decoded metadata of a vitdemo checkpoint, from its header alone; CheckpointError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'no checkpoint file at {path}')
    try:
        with safe_open(str(path), framework='numpy') as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f'{path.name} is not a readable safetensors file ({e})') from None
    if raw.get('format') != FORMAT or 'config' not in raw:
        raise CheckpointError(f'{path.name} is a safetensors file but not a vitdemo checkpoint: '
                              'its metadata has no model config')
    try:
        meta = {k: json.loads(v) for k, v in raw.items() if k not in ('format', 'version', 'arch')}
    except json.JSONDecodeError as e:
        raise CheckpointError(f'{path.name} has corrupt metadata ({e})') from None
    meta['arch'] = raw.get('arch', ARCH_NAMES[0])
    if meta['arch'] not in ARCH_NAMES:
        raise CheckpointError(f'{path.name} holds a {meta["arch"]!r} model; this version of vitdemo knows '
                              f'{", ".join(ARCH_NAMES)}')
    return meta


def epochs_seen(record: dict) -> float:
    """Where a record of a training history ends, in epochs of data seen: a run stopped, or out of time, within
    an epoch records part of it. Histories written before the field existed count whole epochs."""
    return record.get('epochs', record['epoch'])


def epochs_text(history: list[dict]) -> str:
    """How far a run got, in words: '1 epoch', '4 epochs', '0.46 epochs', '13.4 epochs'."""
    n = epochs_seen(history[-1]) if history else 0
    if n == 1:
        return '1 epoch'
    return f'{n:.0f} epochs' if n == int(n) else f'{n:.2f} epochs' if n < 1 else f'{n:.1f} epochs'
