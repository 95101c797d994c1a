"""What one server lets a request take: public mode, and budgets for memory, time and disk.

On a Hugging Face Space (`SPACE_ID` is set there) or with `VITDEMO_PUBLIC=1`, the app serves strangers:
training is capped in minutes and model size, visitors' checkpoints are capped in number and bytes, and
each browser session may keep only a few requests queued. Run locally, one trusted user gets the machine,
but no training run is started that would not fit in memory.

Every limit can be set through the environment (see `ServerPolicy.from_env`), which is also how the tests
give a server small budgets.
"""
from __future__ import annotations

import ctypes
import gc
import math
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from .lazy import late_import

if TYPE_CHECKING:
    from .weights import ModelConfig

MB = 2 ** 20
CIFAR10_IMAGES = 50_000  # what the Train tab's data holds, for the estimate made before it is loaded


@dataclass(frozen=True)
class ServerPolicy:
    public: bool = False
    max_train_minutes: float | None = None  # public: a run cannot hold the one training slot for hours
    max_params: int | None = None  # public: caps a checkpoint's size too (4 bytes a parameter)
    train_memory_mb: float | None = None  # None: what the machine has available, less `serving_reserve_mb`
    serving_reserve_mb: float = 1500  # two predictions with ViT-B/16 and two decoded uploads, with room
    store_max_files: int | None = None  # visitors' checkpoints, all owners together; oldest evicted first
    store_max_mb: float | None = None
    queued_per_session: int | None = None  # requests one browser session may have waiting or running
    model_work_per_session: int | None = None  # of those, requests that run a model (MODEL_WORK's two slots)
    uploads_max_mb: float | None = None  # Gradio's upload folder; uploads past it are refused until the sweep
    max_explain_seconds: float | None = None  # one explanation (Score-CAM, Shapley values on ViT-B: minutes)
    slow_explanations: int | None = None  # slow explanations at once: the other model slot stays free

    @classmethod
    def from_env(cls, environ: dict | None = None) -> 'ServerPolicy':
        env = os.environ if environ is None else environ
        public = bool(env.get('SPACE_ID')) or env.get('VITDEMO_PUBLIC', '') not in ('', '0')
        # (environment variable, public default, local default)
        settings = dict(max_train_minutes=('VITDEMO_MAX_TRAIN_MINUTES', 30.0, None),
                        max_params=('VITDEMO_MAX_PARAMS', 12_000_000, None),  # ResNet-18 (11.2 M) fits
                        train_memory_mb=('VITDEMO_TRAIN_MEMORY_MB', None, None),
                        serving_reserve_mb=('VITDEMO_SERVING_RESERVE_MB', 1500.0, 1500.0),
                        store_max_files=('VITDEMO_STORE_MAX_FILES', 40, None),
                        store_max_mb=('VITDEMO_STORE_MAX_MB', 1000.0, None),
                        queued_per_session=('VITDEMO_QUEUED_PER_SESSION', 6, None),  # an upload alone fires 2
                        # one running and one waiting (a redraw, then Predict): never a queue of one's own
                        # in front of everyone else's
                        model_work_per_session=('VITDEMO_MODEL_WORK_PER_SESSION', 2, None),
                        uploads_max_mb=('VITDEMO_UPLOADS_MAX_MB', 2000.0, None),
                        max_explain_seconds=('VITDEMO_MAX_EXPLAIN_SECONDS', 90.0, None),
                        slow_explanations=('VITDEMO_SLOW_EXPLANATIONS', 1, None))
        values = {}
        for field_name, (var, public_default, local_default) in settings.items():
            raw = env.get(var, '')
            if raw == '':
                values[field_name] = public_default if public else local_default
                continue
            kind = int if field_name in ('max_params', 'store_max_files', 'queued_per_session',
                                         'model_work_per_session', 'slow_explanations') else float
            try:
                value = kind(float(raw))
            except ValueError:
                raise ValueError(f'{var} must be a number, got {raw!r}') from None
            if not value > 0:
                raise ValueError(f'{var} must be positive, got {raw!r}')
            values[field_name] = value
        return cls(public=public, **values)

    def training_memory_budget(self) -> int:
        """Bytes a training run may use: the set budget, or what this machine (or its container) has
        available now less what serving needs meanwhile."""
        if self.train_memory_mb is not None:
            return int(self.train_memory_mb * MB)
        return max(available_memory() - int(self.serving_reserve_mb * MB), 0)


def available_memory() -> int:
    """Bytes that can still be allocated: the kernel's MemAvailable, or less where a cgroup (a container,
    a Space) sets a lower limit."""
    available = _meminfo_available()
    for limit_file, usage_file in (('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory.current'),
                                   ('/sys/fs/cgroup/memory/memory.limit_in_bytes',
                                    '/sys/fs/cgroup/memory/memory.usage_in_bytes')):
        try:
            limit, usage = Path(limit_file).read_text().strip(), int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2 ** 60:  # 'max' or a huge number: no limit
            available = min(available, max(int(limit) - usage, 0))
        break
    return available


def _meminfo_available() -> int:
    try:
        for line in Path('/proc/meminfo').read_text().splitlines():
            if line.startswith('MemAvailable:'):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2 ** 30  # not Linux: assume a laptop's worth rather than refuse everything


@dataclass(frozen=True)
class MemoryEstimate:
    params: int
    state_bytes: int  # weights, gradients and AdamW's two moments, fp32: 16 bytes a parameter
    activation_bytes: int  # what the forward pass keeps for the backward pass, at the batch size
    data_bytes: int  # the decoded training images, and the copies the train/validation split makes

    @property
    def total(self) -> int:
        # Beside the saved activations the backward pass holds gradients of the widest ones (+25%), and glibc
        # keeps the blocks a step frees for the next step: its heap settles at up to the activations once more
        # (fp32 training, where no bf16 halves them). The first step also maps PyTorch's kernels (~200 MB).
        return self.state_bytes + int(2.25 * self.activation_bytes) + self.data_bytes + 256 * MB

    def describe(self) -> str:
        return (f'{size(self.total)} ({self.params / 1e6:.1f} M parameters with their gradients and optimiser '
                f'state {size(self.state_bytes)}, activations at this batch size {size(self.activation_bytes)}, '
                f'training images {size(self.data_bytes)})')


def size(nbytes: float) -> str:
    return f'{nbytes / 2 ** 30:,.1f} GB' if nbytes >= 10 * 2 ** 30 else f'{nbytes / MB:,.0f} MB'


def estimate_training_memory(model_config: ModelConfig, batch_size: int,
                             num_images: int = CIFAR10_IMAGES, img_size: int = 32,
                             frozen: bool = False) -> MemoryEstimate:
    """What a training run of this model and batch needs, counted without allocating it: the model is
    built on PyTorch's meta device (shapes only), and one forward pass at the real batch size counts
    every tensor autograd saves for the backward pass. Counted in fp32: an upper bound under bf16 autocast.
    A `frozen` model (a linear probe's) only answers: no optimiser state, and a pass that keeps one
    block's tensors at a time (bounded here by twice a block's share of what training saves)."""
    torch, weights = late_import('torch'), late_import('vitdemo.weights')  # not for the page: see `vitdemo.lazy`
    with torch.device('meta'):
        model = weights.build_model(model_config).train()
        if hasattr(model, 'set_fused_attn'):
            model.set_fused_attn(False)  # training reads no maps, but runs the manual path (see train.py)
        x = torch.empty(batch_size, 3, model_config.img_size, model_config.img_size)
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        if not isinstance(t, torch.nn.Parameter):  # weights are counted once, in the state
            saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    params = sum(p.numel() for p in model.parameters())
    data = 2 * num_images * 3 * img_size * img_size  # uint8 images, then the split's indexed copies
    if frozen:
        blocks = max(getattr(model_config, 'depth', 1), 1)
        return MemoryEstimate(params, 4 * params, 2 * saved // blocks, data)
    return MemoryEstimate(params, 16 * params, saved, data)


def run_memory(model_config: ModelConfig, batch_size: int, num_images: int = CIFAR10_IMAGES,
               teacher: ModelConfig | None = None, frozen: bool = False) -> MemoryEstimate:
    """The memory of a training run: its model's (`estimate_training_memory`) and, with a distillation
    `teacher`, the teacher's weights and what its pass at the batch size holds."""
    estimate = estimate_training_memory(model_config, batch_size, num_images, frozen=frozen)
    if teacher is not None:
        # the teacher only answers, in inference mode, for each image and its mirror image: what its training
        # pass of twice the batch would save bounds what it holds
        taught = estimate_training_memory(teacher, 2 * batch_size, 0)
        estimate = replace(estimate, state_bytes=estimate.state_bytes + 4 * taught.params,
                           activation_bytes=estimate.activation_bytes + taught.activation_bytes)
    return estimate


def check_training(policy: ServerPolicy, model_config: ModelConfig, minutes: float | None,
                   batch_size: int, num_images: int = CIFAR10_IMAGES,
                   teacher: ModelConfig | None = None, frozen: bool = False) -> MemoryEstimate:
    """Refuse, before any work, a run this server cannot afford; returns the run's memory estimate."""
    if policy.max_train_minutes is not None and (minutes is None or minutes > policy.max_train_minutes):
        asked = 'a budget in epochs' if minutes is None else f'{minutes:g} minutes'
        raise ValueError(f'this server trains for at most {policy.max_train_minutes:g} minutes a run, not '
                         f'{asked}; run the app on your own machine for longer runs')
    estimate = run_memory(model_config, batch_size, num_images, teacher, frozen)
    if policy.max_params is not None and estimate.params > policy.max_params:
        raise ValueError(f'this model has {estimate.params / 1e6:.1f} M parameters; this server trains models of '
                         f'at most {policy.max_params / 1e6:.1f} M. Make it smaller (embed dim, depth)')
    budget = policy.training_memory_budget()
    if estimate.total > budget:
        raise ValueError(f'this run would need about {estimate.describe()}, more than the '
                         f'{size(budget)} this server can give a training run now. Lower the batch size, '
                         'the embed dim, the depth, or use larger patches (fewer tokens)')
    return estimate


def fitting_batch(policy: ServerPolicy, model_config: ModelConfig, batch_size: int,
                  num_images: int = CIFAR10_IMAGES, teacher: ModelConfig | None = None,
                  frozen: bool = False) -> int:
    """`batch_size`, halved until the run `check_training` would weigh fits this server's training memory
    (at least 1): the batch a form suggests, so that a fine-tune at 224 px is not refused for CIFAR's batch."""
    budget = policy.training_memory_budget()
    while batch_size > 1 and run_memory(model_config, batch_size, num_images, teacher, frozen).total > budget:
        batch_size //= 2
    return batch_size


def release_memory() -> None:
    """Hand freed memory back to the operating system: collect reference cycles, then trim the heap."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Ask glibc to return the free pages of its heaps. After a large block is freed, glibc raises its
    threshold for serving large blocks from the heap, and keeps what such blocks leave behind for later:
    decoding big uploads would otherwise leave the server gigabytes larger."""
    try:
        ctypes.CDLL('libc.so.6').malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def release_openmp_workers() -> None:
    """Let the calling thread's OpenMP worker threads go; its next tensor operation spread over the cores makes
    them again (a fraction of a millisecond). A thread that has run such an operation keeps its team of workers
    while it lives, and while two teams live, GNU OpenMP (torch's on Linux) has more threads than cores and
    stops letting its workers wait actively between operations: each operation then waits to wake a sleeping
    worker, which makes a training step of small operations up to twice as slow (docs/benchmarks.md, *The
    Train tab's speed*). For a server thread about to wait, or idle, while another thread works. Does nothing
    where torch's OpenMP is not GNU's, or where no OpenMP library is loaded."""
    global _TORCH_OPENMP
    if _TORCH_OPENMP is None and 'torch' in sys.modules:  # none before torch: it loads the library
        _TORCH_OPENMP = _torch_openmp()
    for openmp in _TORCH_OPENMP or ():
        openmp.omp_pause_resource_all(1)  # omp_pause_soft: this thread's pool of workers


_TORCH_OPENMP: tuple[ctypes.CDLL, ...] | None = None


def _torch_openmp() -> tuple[ctypes.CDLL, ...]:
    """torch's GNU OpenMP, if that is what it runs on, and recent enough to let a pool go (GCC 9+). Other
    packages may load their own copy (scikit-learn does): torch's wheel keeps its own in its folder; a torch
    built against a shared one gets every copy loaded."""
    try:
        with open('/proc/self/maps') as maps:
            paths = list(dict.fromkeys(line.split()[-1] for line in maps
                                       if line.rstrip().rsplit('/', 1)[-1].startswith('libgomp')))
    except OSError:  # no /proc: not Linux
        return ()
    folder = str(Path(sys.modules['torch'].__file__).parent)
    paths = [p for p in paths if p.startswith(folder)] or paths
    loaded = []
    for path in paths:
        try:
            loaded.append(ctypes.CDLL(path))  # already loaded: the same library, not a second copy
        except OSError:  # unmapped meanwhile
            pass
    return tuple(lib for lib in loaded if hasattr(lib, 'omp_pause_resource_all'))


def checked_number(value, name: str, lo: float, hi: float, integer: bool = False) -> float | int:
    """A number from a form or a raw API call, checked: not None, not text, not NaN, within [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f'{name} must be a number, got {value!r}') from None
    if not math.isfinite(value) or not lo <= value <= hi:
        raise ValueError(f'{name} must be between {lo:g} and {hi:g}, got {value!r}')
    if integer:
        if value != int(value):
            raise ValueError(f'{name} must be a whole number, got {value!r}')
        return int(value)
    return float(value)
