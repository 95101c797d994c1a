"""What a run needs, beside its checkpoint, to continue where it stopped (`python -m vitdemo.train --resume`).

`NAME.state` sits next to `NAME.safetensors` and is a safetensors file too (never a pickle): the optimiser's
moments per parameter, the step, epoch and seconds already spent (the schedule follows them), the history
so far, and the random generators' states, so that a run stopped at an epoch's end and resumed draws the
same batches and crops as one that never stopped. A checkpoint stored in float16 (`--half-checkpoint`)
would resume from rounded weights: the state then keeps the model's own float32 weights too.
"""
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .weights import CheckpointError, save_atomically

FORMAT = 'vitdemo-train-state'


def state_path(checkpoint: str | Path) -> Path:
    return Path(checkpoint).with_suffix('.state')


@dataclass
class TrainState:
    step: int
    epoch: int
    seconds: float  # of the budget already spent
    history: list[dict]
    optimizer: dict  # torch.optim state_dict
    generators: dict[str, torch.Tensor]  # 'torch' (the global one), 'order', 'augment'
    weights: dict[str, torch.Tensor] | None = None  # the model's state dict, where the checkpoint rounds it


def save_state(checkpoint: str | Path, state: TrainState) -> Path:
    tensors = {f'generator.{k}': v for k, v in state.generators.items()}
    for index, moments in state.optimizer['state'].items():
        for key, value in moments.items():
            tensors[f'optimizer.{index}.{key}'] = value.detach().cpu().contiguous()
    for name, value in (state.weights or {}).items():
        tensors[f'model.{name}'] = value.detach().cpu().contiguous()
    metadata = {'format': FORMAT, 'step': str(state.step), 'epoch': str(state.epoch), 'seconds': repr(state.seconds),
                'history': json.dumps(state.history), 'param_groups': json.dumps(state.optimizer['param_groups'])}
    return save_atomically(tensors, state_path(checkpoint), metadata)


def existing_state(checkpoint: str | Path) -> Path:
    """The state file beside `checkpoint`; CheckpointError, saying why, when there is none."""
    path = state_path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f'no training state beside {Path(checkpoint).name} ({path.name}): only a run '
                              'saved with its state (the command line does, unless --no-state) can be resumed')
    return path


def load_state(checkpoint: str | Path) -> TrainState:
    path = existing_state(checkpoint)
    try:
        with safe_open(str(path), framework='pt') as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f'{path.name} is not a readable training state ({e})') from None
    if meta.get('format') != FORMAT:
        raise CheckpointError(f'{path.name} is not a vitdemo training state')
    moments: dict[int, dict] = {}
    generators, weights = {}, {}
    for name, value in tensors.items():
        kind, *rest = name.split('.')
        if kind == 'generator':
            generators[rest[0]] = value
        elif kind == 'model':
            weights['.'.join(rest)] = value
        else:
            moments.setdefault(int(rest[0]), {})[rest[1]] = value
    optimizer = {'state': moments, 'param_groups': json.loads(meta['param_groups'])}
    return TrainState(int(meta['step']), int(meta['epoch']), float(meta['seconds']), json.loads(meta['history']),
                      optimizer, generators, weights or None)


def match_layouts(optimizer: torch.optim.Optimizer) -> None:
    """Give each loaded moment its parameter's memory layout. The state file stores them contiguous, and a
    CNN's convolution weights are channels-last: the fused AdamW kernel walks a moment and its parameter
    element by element in memory, so moments of another layout would update the wrong weights."""
    for param, moments in optimizer.state.items():
        for key, value in moments.items():
            if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                moments[key] = torch.empty_like(param, dtype=value.dtype).copy_(value)
