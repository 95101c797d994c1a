import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Tests never reach a model hub: pretrained weights come from files the tests write themselves.
os.environ.setdefault('HF_HUB_OFFLINE', '1')
# Gradio's uploads and outputs go to a folder of this run's own, which tests inspect and which goes at the end
os.environ['GRADIO_TEMP_DIR'] = GRADIO_TEMP_DIR = tempfile.mkdtemp(prefix='vitdemo-gradio-')
atexit.register(shutil.rmtree, GRADIO_TEMP_DIR, ignore_errors=True)
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from vitdemo.model import ViTConfig, VisionTransformer  # noqa: E402
from vitdemo.weights import save_checkpoint  # noqa: E402

SHARED = ROOT.parent / 'shared'
CIFAR_ARCHIVE = SHARED / 'data' / 'cifar10-train.tar.gz'
TINY_CIFAR = ViTConfig(img_size=32, patch_size=8, num_classes=10, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0)


def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values, so that no test passes on zero-initialised heads or biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return module


@pytest.fixture(scope='session')
def weights_dir(tmp_path_factory) -> Path:
    """A weights folder as a user would have it offline: timm models saved as local safetensors files
    (random weights, since no hub is reachable here) and one small scratch checkpoint of ours."""
    d = tmp_path_factory.mktemp('weights')
    for i, arch in enumerate(['vit_tiny_patch16_224', 'deit_small_distilled_patch16_224']):
        save_file(randomize_(timm.create_model(arch, pretrained=False), seed=i).state_dict(),
                  str(d / f'{arch}.safetensors'))
    model = randomize_(VisionTransformer(TINY_CIFAR), seed=3)
    classes = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
    save_checkpoint(d / 'vit_cifar10.safetensors', model, classes, mean=[0.49, 0.48, 0.45], std=[0.25, 0.24, 0.26],
                    metrics={'val_accuracy': 0.5})
    return d


@pytest.fixture
def scalers(monkeypatch) -> list:
    """Every torch.amp.GradScaler a run makes, in order (the class is swapped for a recording subclass)."""
    made = []

    class Recording(torch.amp.GradScaler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(torch.amp, 'GradScaler', Recording)
    return made


def name_this_thread(name: str) -> None:
    """The calling thread's name as the operating system sees it (Linux). Threads it starts from then on, its
    OpenMP workers among them, are given the same name."""
    import ctypes
    ctypes.CDLL('libc.so.6').prctl(15, name.encode())  # PR_SET_NAME


def threads_named(name: str) -> int:
    """How many of this process's threads the operating system knows by `name`."""
    count = 0
    for task in Path('/proc/self/task').iterdir():
        try:
            count += (task / 'comm').read_text().strip() == name
        except OSError:  # it ended meanwhile
            pass
    return count


def openmp_teams_in_threads() -> bool:
    """Whether torch here spreads an operation over the cores with GNU OpenMP teams (what
    `vitdemo.policy.release_openmp_workers` lets go), on Linux, with two cores or more."""
    from vitdemo.policy import _torch_openmp
    return sys.platform == 'linux' and torch.get_num_threads() > 1 and bool(_torch_openmp())


needs_openmp_teams = pytest.mark.skipif(not openmp_teams_in_threads(),
                                        reason='GNU OpenMP on Linux with two cores or more')
