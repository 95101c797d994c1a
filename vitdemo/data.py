"""CIFAR-10 (or any small image-folder dataset) as uint8 tensors in memory, augmented a batch at a time.

Sources, by what `path` is:
- a `.tar.gz` / `.tgz` archive of an image folder (such as the shipped `cifar10-train.tar.gz`): read in place,
  member by member, as the folder it holds (nothing is extracted to disk);
- an image folder `train/<class>/*.jpg|png` (and `test/<class>/...` if present);
- an official CIFAR-10 root (`cifar-10-batches-py`, downloaded by torchvision when missing).

Each source is decoded once into a safetensors cache (~150 MB for CIFAR-10); later runs load it in a second. A
cache is keyed by the source's path and time of change, and one per source name and split is kept: the cache of
a copy made later, or of a file changed since, replaces the older one rather than joining it.
"""
import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from .images import IMAGE_SUFFIXES
from .lazy import late_import

CACHE_DIR = Path(os.environ.get('VITDEMO_CACHE', Path.home() / '.cache' / 'vitdemo'))


def default_data_path() -> Path:
    """Where the app finds CIFAR-10: $VITDEMO_DATA, else the archive shipped beside the repository, else
    an official CIFAR-10 folder in the cache (torchvision downloads it the first time)."""
    if 'VITDEMO_DATA' in os.environ:
        return Path(os.environ['VITDEMO_DATA'])
    shipped = Path(__file__).resolve().parent.parent.parent / 'shared' / 'data' / 'cifar10-train.tar.gz'
    return shipped if shipped.exists() else CACHE_DIR / 'cifar10'


@dataclass
class ImageData:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> 'ImageData':
        return ImageData(self.images[index], self.labels[index], self.classes)

    def mean_std(self) -> tuple[list[float], list[float]]:
        x = self.images.float().div_(255)
        # a channel that never varies would divide by zero: floor the spread at one grey level
        return x.mean(dim=(0, 2, 3)).tolist(), x.std(dim=(0, 2, 3)).clamp(min=1 / 255).tolist()


def train_val_split(data: ImageData, val_size: int, seed: int = 0) -> tuple[ImageData, ImageData]:
    """A seeded random held-out split; the same seed gives the same split on every machine."""
    assert 0 <= val_size < len(data), f'val_size must be in [0, {len(data)}), got {val_size}'
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))
    return data.subset(order[val_size:]), data.subset(order[:val_size])


def load_dataset(path: str | Path, split: str = 'train', cache_dir: Path = CACHE_DIR,
                 download: bool = True) -> ImageData:
    """Load `split` ('train' or 'test') from an archive, an image folder or an official CIFAR-10 root."""
    path = Path(path).expanduser().resolve()
    if not path.exists() and not download:
        raise FileNotFoundError(f'no dataset at {path}')
    key = hashlib.sha1(f'{path}:{path.stat().st_mtime if path.exists() else 0}:{split}'.encode()).hexdigest()[:16]
    cache = cache_dir / f'{path.name}-{split}-{key}.safetensors'
    if cache.exists():
        with safe_open(str(cache), framework='pt') as f:
            return ImageData(f.get_tensor('images'), f.get_tensor('labels'), json.loads(f.metadata()['classes']))

    if path.name.endswith(('.tar.gz', '.tgz', '.tar')):
        data = _read_archive(path, split)
    elif (path / 'train').is_dir() or (path / split).is_dir():
        data = _read_folder(path, split)
    else:
        data = _read_official(path, split, download)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f'.{os.getpid()}.tmp')  # ranks of one torchrun may build it at once
    save_file({'images': data.images.contiguous(), 'labels': data.labels},
              str(tmp), metadata={'classes': json.dumps(data.classes)})
    tmp.replace(cache)
    _drop_older_caches(cache_dir, path.name, split, keep=cache)
    return data


def _drop_older_caches(cache_dir: Path, name: str, split: str, keep: Path) -> None:
    """The other caches of a source of this name and split (its path or time of change differed), and the
    folders that archives were once extracted to beside them (`NAME-KEY8/`, ~200 MB for CIFAR-10)."""
    stale = re.compile(re.escape(f'{name}-{split}-') + r'[0-9a-f]{16}\.safetensors')
    extracted = re.compile(re.escape(f'{name}-') + r'[0-9a-f]{8}')
    for entry in cache_dir.iterdir():
        if entry != keep and stale.fullmatch(entry.name) and entry.is_file():
            with contextlib.suppress(OSError):  # another process may hold it open where that forbids removal
                entry.unlink()
        elif extracted.fullmatch(entry.name) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def _read_archive(archive: Path, split: str) -> ImageData:
    """The images of `split/<class>/` in a tar archive, read from its stream in member order."""
    found: dict[str, dict[str, bytes]] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = PurePosixPath(member.name).parts  # './train/cat/1.jpg' reads as ('train', 'cat', '1.jpg')
            if (member.isfile() and len(parts) == 3 and parts[0] == split
                    and PurePosixPath(parts[2]).suffix.lower() in IMAGE_SUFFIXES):
                found.setdefault(parts[1], {})[parts[2]] = tar.extractfile(member).read()
    if not found:
        raise FileNotFoundError(f'no {split}/ folder of images in {archive}: expected {split}/<class>/<image>.jpg')
    classes = sorted(found)
    # the order a folder is read in (classes, then file names, sorted): the same images get the same indices,
    # and so the same seeded validation split, from the archive and from the folder it holds
    files = [(f'{split}/{name}/{file}', label, found[name][file])
             for label, name in enumerate(classes) for file in sorted(found[name])]
    return _decode(files, classes)


def _read_folder(root: Path, split: str) -> ImageData:
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f'no {split}/ folder in {root}: expected {split}/<class>/<image>.jpg')
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    files = [(str(f), label, f.read_bytes()) for label, name in enumerate(classes)
             for f in sorted((split_dir / name).iterdir()) if f.suffix.lower() in IMAGE_SUFFIXES]
    if not files:
        raise FileNotFoundError(f'no images under {split_dir}')
    return _decode(files, classes)


def _decode(files: list[tuple[str, int, bytes]], classes: list[str]) -> ImageData:
    """Decode (name, label, file bytes) to (N, 3, H, W) uint8. JPEGs go to torchvision in one call, which loops
    in C++: through PIL, the Python round trip per image costs more than decoding 32 x 32 pixels."""
    tv_io = late_import('torchvision.io')
    jpegs = [i for i, (_, _, blob) in enumerate(files) if blob[:3] == b'\xff\xd8\xff']
    images: list[torch.Tensor | None] = [None] * len(files)
    try:
        decoded = tv_io.decode_jpeg([torch.frombuffer(bytearray(files[i][2]), dtype=torch.uint8) for i in jpegs],
                                    mode=tv_io.ImageReadMode.RGB) if jpegs else []
        for i, image in zip(jpegs, decoded):
            images[i] = image
    except RuntimeError:  # one damaged JPEG fails the whole call: PIL then reads every one and names the culprit
        pass
    for i, image in enumerate(images):
        if image is None:  # PNG, BMP, WebP; or, after a failed call, every JPEG
            name, _, blob = files[i]
            try:
                images[i] = torch.from_numpy(np.array(Image.open(io.BytesIO(blob)).convert('RGB'))).permute(2, 0, 1)
            except (OSError, ValueError) as e:
                raise ValueError(f'{name} could not be read as an image ({e})') from None
    sizes = sorted({tuple(image.shape[1:]) for image in images})
    if len(sizes) > 1:
        raise ValueError(f'the images differ in size ({", ".join(f"{h}x{w}" for h, w in sizes[:3])}, ...): '
                         'resize them to one size first')
    return ImageData(torch.stack(images), torch.tensor([label for _, label, _ in files]), classes)


def _read_official(root: Path, split: str, download: bool) -> ImageData:
    CIFAR10 = late_import('torchvision.datasets').CIFAR10
    try:  # torchvision checks every file's MD5 before it unpickles it: only the genuine batches are read
        ds = CIFAR10(str(root), train=split == 'train', download=download)
    except (OSError, RuntimeError) as e:  # no network, a partial download, files that fail their checksum
        raise FileNotFoundError(f'no usable official CIFAR-10 at {root} ({e}). Give --data an image folder '
                                'train/<class>/*.jpg, its .tar.gz, or a folder torchvision can download '
                                'into.') from None
    return ImageData(torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets),
                     list(ds.classes))


def augment(images: torch.Tensor, padding: int = 4, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with reflect padding and horizontal flip, for a whole uint8 batch (B, C, H, W) at once, on
    the batch's device; the draws come from `generator` on the CPU, so a run draws alike on any device."""
    B, C, H, W = images.shape
    padded = F.pad(images, (padding,) * 4, mode='reflect') if padding else images
    dy = torch.randint(0, 2 * padding + 1, (B,), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (B,), generator=generator)
    rows = (dy[:, None] + torch.arange(H))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(W))  # (B, W)
    flip = torch.rand(B, generator=generator) < 0.5
    cols = torch.where(flip[:, None], cols.flip(1), cols)[:, None, None, :]  # (B, 1, 1, W)
    index = torch.arange(B)[:, None, None, None], torch.arange(C)[None, :, None, None], rows, cols
    return padded[tuple(i.to(images.device) for i in index)]


def rand_augment(images: torch.Tensor, magnitude: int, draws: int = 16) -> torch.Tensor:
    """RandAugment (two random ops of the given strength, 0-30) on a uint8 batch. torchvision draws one
    choice of ops per call, so the batch is cut into `draws` groups, each with its own draw (a batch of 128:
    groups of 8); a fixed number of calls, not of images, per batch keeps a GPU's large batches cheap."""
    v2 = late_import('torchvision.transforms.v2')
    augmenter = v2.RandAugment(num_ops=2, magnitude=magnitude)
    return torch.cat([augmenter(chunk) for chunk in images.chunk(draws)])


def mix(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix or MixUp, one of the two at random (DeiT's strengths), of a float batch with itself rolled
    by one: the mixed images and their soft labels (B, num_classes)."""
    v2 = late_import('torchvision.transforms.v2')
    mixer = v2.RandomChoice([v2.CutMix(alpha=1.0, num_classes=num_classes),
                             v2.MixUp(alpha=0.8, num_classes=num_classes)])
    return mixer(images, labels)


def normalize(images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """uint8 (B, C, H, W) to float, scaled to [0, 1] and standardised per channel."""
    mean_t = torch.tensor(mean, device=images.device).view(1, -1, 1, 1) * 255
    std_t = torch.tensor(std, device=images.device).view(1, -1, 1, 1) * 255
    return (images.float() - mean_t) / std_t


def to_model_input(images: torch.Tensor, mean: list[float], std: list[float], size: int) -> torch.Tensor:
    """uint8 batch -> normalised float batch at the model's input size (upscaled for a pretrained ViT)."""
    x = normalize(images, mean, std)
    return x if x.shape[-1] == size else F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
