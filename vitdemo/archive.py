"""A visitor's own images as a training set: a `.zip` of class folders, read without trusting it.

The archive's directory is checked whole before one byte is decompressed: its size, the number of entries,
the sizes they declare (in total, each, and against what they take compressed: a zip bomb declares far
more than it holds), names that climb out (`../`, absolute paths, drive letters), links, nested archives,
files that are not images, and the layout (`[any/folders/]<class>/<image>`). Then each image is
decompressed into memory, at most the size it declared, and decoded by `vitdemo.images` under its pixel
limits, the whole archive within a budget of pixels (read from each header first) and of seconds.
Nothing is extracted: no file is written, so none is left behind.
"""
from __future__ import annotations

import io
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

from .images import FORMATS, IMAGE_SUFFIXES, ImageError, load_image
from .lazy import late_import

if TYPE_CHECKING:
    from .data import ImageData

MB = 2 ** 20
ARCHIVE_SUFFIXES = ('.zip', '.tar', '.gz', '.tgz', '.bz2', '.xz', '.7z', '.rar', '.zst', '.jar')
# what macOS and Windows add to a zip they make: skipped, never read
JUNK = re.compile(r'(^|/)(__MACOSX/|\._|\.DS_Store$|Thumbs\.db$|desktop\.ini$)')
CLASS_NAME = re.compile(r'[^\x00-\x1f/\\]{1,48}')


class ArchiveError(ValueError):
    """A zip that is refused, with a message for the person who gave it."""


@dataclass(frozen=True)
class ZipLimits:
    max_bytes: int = 50 * MB  # the archive itself (the app's upload limit)
    max_entries: int = 5_000  # entries in its directory, folders and skipped files included
    max_images: int = 2_000
    min_classes: int = 2
    max_classes: int = 20
    max_member: int = 20 * MB  # what one image declares, decompressed
    max_total: int = 300 * MB  # what all of them declare together
    max_ratio: float = 200.0  # declared / compressed size of one entry; images hardly compress
    max_pixels: int = 400_000_000  # all images together, from their headers: decoding time is bounded too
    max_seconds: float = 120.0  # and measured

    def describe(self) -> str:
        return (f'a .zip of at most {self.max_bytes // MB} MB with one folder per class ({self.min_classes} to '
                f'{self.max_classes} classes) and at most {self.max_images:,} images (PNG, JPEG, WebP, GIF, BMP '
                'or TIFF)')


def read_image_zip(path: str | Path, size: int = 32, limits: ZipLimits = ZipLimits()) -> ImageData:
    """The images of the zip at `path`, centre-cropped and resized to `size` x `size`, labelled by folder."""
    path = Path(path)
    nbytes = path.stat().st_size
    if nbytes > limits.max_bytes:
        raise ArchiveError(f'the archive is {nbytes / MB:.0f} MB; the limit is {limits.max_bytes // MB} MB')
    try:
        with zipfile.ZipFile(path) as archive:
            members, classes = _check_directory(archive.infolist(), limits)
            images, labels, budget = [], [], _Budget(limits)
            for info, label in members:
                images.append(_decode(archive, info, size, budget))
                labels.append(label)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, NotImplementedError, RuntimeError) as e:
        # a damaged archive, a checksum that fails, an entry that holds more than it declares, encryption
        raise ArchiveError(f'the archive cannot be read ({e})') from None
    torch = late_import('torch')  # the training set's tensors: the page that describes the limits imports none
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return late_import('vitdemo.data').ImageData(stacked, torch.tensor(labels), classes)


def _check_directory(infos: list[zipfile.ZipInfo], limits: ZipLimits) -> tuple[list[tuple[zipfile.ZipInfo, int]],
                                                                                list[str]]:
    """The entries to read with their labels, and the classes, from the directory alone (nothing decompressed)."""
    if len(infos) > limits.max_entries:
        raise ArchiveError(f'the archive lists {len(infos):,} entries; the limit is {limits.max_entries:,}')
    files, total = [], 0
    for info in infos:
        name = info.filename
        if name.startswith(('/', '\\')) or re.match(r'[A-Za-z]:', name) or '..' in re.split(r'[/\\]', name):
            raise ArchiveError(f'{name!r} points outside the archive; refused')
        if (info.external_attr >> 16) & 0o170000 == 0o120000:
            raise ArchiveError(f'{name!r} is a link; the archive may hold only folders and images')
        if info.flag_bits & 0x1:
            raise ArchiveError(f'{name!r} is encrypted; upload an archive without a password')
        if info.is_dir() or JUNK.search(name):
            continue
        suffix = PurePosixPath(name).suffix.lower()
        if suffix in ARCHIVE_SUFFIXES:
            raise ArchiveError(f'{name!r} is an archive inside the archive; put the images themselves in it')
        if suffix not in IMAGE_SUFFIXES:
            raise ArchiveError(f'{name!r} is not an image (use {", ".join(IMAGE_SUFFIXES)})')
        if info.file_size > limits.max_member:
            raise ArchiveError(f'{name!r} declares {info.file_size / MB:.0f} MB; an image may be at most '
                               f'{limits.max_member // MB} MB')
        if info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise ArchiveError(f'{name!r} would grow {info.file_size / max(info.compress_size, 1):,.0f} times '
                               'when decompressed: this looks like a zip bomb; refused')
        total += info.file_size
        if total > limits.max_total:
            raise ArchiveError(f'the images declare more than {limits.max_total // MB} MB together; refused')
        files.append(info)
    if len(files) > limits.max_images:
        raise ArchiveError(f'the archive holds {len(files):,} images; the limit is {limits.max_images:,}')
    if not files:
        raise ArchiveError('the archive holds no images; ' + limits.describe())
    parts = [PurePosixPath(info.filename).parts for info in files]
    if any(len(p) < 2 for p in parts) or len({(len(p), p[:-2]) for p in parts}) > 1:
        raise ArchiveError('put every image in a folder named by its class, all folders side by side '
                           '(cat/1.jpg, dog/2.jpg, ...), optionally inside one more folder')
    classes = sorted({p[-2] for p in parts})
    if not limits.min_classes <= len(classes) <= limits.max_classes:
        raise ArchiveError(f'the archive has {len(classes)} class folders; {limits.min_classes} to '
                           f'{limits.max_classes} are needed')
    for c in classes:
        if not CLASS_NAME.fullmatch(c):
            raise ArchiveError(f'{c[:60]!r} cannot name a class: at most 48 printable characters')
    index = {c: i for i, c in enumerate(classes)}
    return [(info, index[p[-2]]) for info, p in zip(files, parts)], classes


class _Budget:
    """The pixels and seconds a whole archive may take to decode."""

    def __init__(self, limits: ZipLimits):
        self.limits, self.pixels, self.start = limits, 0, time.monotonic()

    def spend(self, name: str, pixels: int) -> None:
        self.pixels += pixels
        if self.pixels > self.limits.max_pixels:
            raise ArchiveError(f'the images hold more than {self.limits.max_pixels / 1e6:,.0f} megapixels together '
                               f'(reached at {name!r}); shrink them before zipping')
        if time.monotonic() - self.start > self.limits.max_seconds:
            raise ArchiveError(f'decoding the images took more than {self.limits.max_seconds:.0f} s '
                               f'(reached at {name!r}); send fewer or smaller images')


def _decode(archive: zipfile.ZipFile, info: zipfile.ZipInfo, size: int, budget: _Budget) -> np.ndarray:
    with archive.open(info) as f:
        # the reader stops at the declared size, and the checksum then fails on an entry that holds more
        data = f.read()
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as header:  # the header only, before any pixel
            pixels = header.width * header.height
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        pixels = 0  # not an image PIL can open: load_image says so in its words
    budget.spend(info.filename, pixels)
    try:
        image = load_image(data)
    except ImageError as e:
        raise ArchiveError(f'{info.filename!r}: {e}') from None
    return np.asarray(ImageOps.fit(image, (size, size)))
