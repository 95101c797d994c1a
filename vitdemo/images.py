"""Turn whatever a person uploads into an RGB PIL image, or refuse it with a message they can act on.

Every PIL mode is handled (L, LA, P, RGBA, CMYK, I;16, ...), EXIF rotation is applied, transparency is
put on white, animated images give their first frame, and large images are shrunk before anything else.
"""
import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .policy import trim_heap

MAX_PIXELS = 50_000_000  # refuse above this (a 6000x4000 photo is 24 MP): decompression bombs
# 16-bit and float images take 2-4 bytes a sample decoded, and scaling them to 8 bits wants float copies
DEEP_MAX_PIXELS = 16_000_000
DEEP_MODES = ('I', 'I;16', 'I;16L', 'I;16B', 'I;16N', 'F')
MAX_SIDE = 1024  # shrink to this before anything else; models see at most 224-448 pixels
TRIM_PIXELS = 4_000_000  # after decoding more than this, hand the freed memory back to the system
# the decoders the README lists (JPEG's also opens cameras' multi-picture files); no others run, so an EPS upload
# never reaches Ghostscript, nor any other decoder PIL knows of
FORMATS = ('PNG', 'JPEG', 'WEBP', 'GIF', 'BMP', 'TIFF')
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')  # the files a folder or a zip of images is read for


class ImageError(ValueError):
    """An input that is not a usable image, with a message for the person who gave it."""


def load_image(source) -> Image.Image:
    """An RGB image at most MAX_SIDE on its longer side, from a PIL image, a numpy array, a file path or
    the bytes of a file."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        image = _from_array(source)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f'no file at {path}')
        image = _open(path, path.name, path.stat().st_size)
    elif isinstance(source, (bytes, bytearray)):
        image = _open(io.BytesIO(source), 'the uploaded file', len(source))
    elif source is None:
        raise ImageError('no image given: upload an image first')
    else:
        raise ImageError(f'cannot read an image from a {type(source).__name__}')
    _check_size(image.size, image.mode)
    decoded = image.width * image.height
    try:
        image = ImageOps.exif_transpose(image)
        if image.mode in DEEP_MODES:  # shrink first: the scaling to 8 bits then works on a million pixels
            image = image.convert('F') if image.mode.startswith('I;16') else image
            image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BOX)
        image = to_rgb(image)
    except (OSError, ValueError) as e:  # truncated data surfaces when the pixels are decoded
        raise ImageError(f'the image data is corrupt or truncated ({e})') from None
    image.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
    if decoded > TRIM_PIXELS:
        trim_heap()
    return image


def _check_size(size: tuple[int, int], mode: str = 'RGB') -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageError(f'the image is empty ({w}x{h} pixels)')
    limit = DEEP_MAX_PIXELS if mode in DEEP_MODES else MAX_PIXELS
    if w * h > limit:
        deep = ' for 16-bit and float images' if mode in DEEP_MODES else ''
        raise ImageError(f'the image is too large ({w}x{h} = {w * h / 1e6:.0f} megapixels); '
                         f'the limit{deep} is {limit / 1e6:.0f} megapixels')


def _open(file: Path | BinaryIO, name: str, size: int) -> Image.Image:
    if size == 0:
        raise ImageError(f'{name} is an empty file')
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)
            image = Image.open(file, formats=FORMATS)
            _check_size(image.size, image.mode)  # from the header, before any pixel is decoded
            image.draft('RGB', (MAX_SIDE, MAX_SIDE))  # JPEG: decode at a reduced scale, far faster
            image.load()
    except ImageError:
        raise
    except UnidentifiedImageError:  # also SVG, text, HTML ...: PIL knows no decoder for them
        raise ImageError(f'{name} is not an image format this app can read '
                         '(use PNG, JPEG, WebP, GIF, BMP or TIFF)') from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(f'{name} declares too many pixels to be decoded safely') from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f'{name} is corrupt or truncated ({e})') from None
    return image


def _from_array(array: np.ndarray) -> Image.Image:
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
        raise ImageError(f'an image array must be HxW, HxWx3 or HxWx4, got shape {array.shape}')
    _check_size((array.shape[1], array.shape[0]))
    if array.dtype != np.uint8:
        array = _to_uint8(array.astype(np.float32))
    return Image.fromarray(array)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Stretch any numeric range (16-bit, float, negative) to 0..255."""
    lo, hi = float(np.nanmin(array)), float(np.nanmax(array))
    if lo >= 0 and hi <= 1:
        lo, hi = 0.0, 1.0  # a float image in [0, 1]
    elif lo >= 0 and hi <= 255:
        lo, hi = 0.0, 255.0
    elif lo >= 0 and hi <= 65535:
        lo, hi = 0.0, 65535.0
    scaled = (np.nan_to_num(array, nan=lo) - lo) / max(hi - lo, 1e-12) * 255
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == 'RGB':
        return image
    if image.mode in ('I', 'I;16', 'I;16L', 'I;16B', 'I;16N', 'F'):
        # PIL's own conversion clips 16-bit and float values to 255: scale them instead
        return Image.fromarray(_to_uint8(np.asarray(image, dtype=np.float32))).convert('RGB')
    if image.mode in ('RGBA', 'LA', 'PA', 'La', 'RGBa') or 'transparency' in image.info:
        rgba = image.convert('RGBA')
        background = Image.new('RGBA', rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert('RGB')
    try:
        return image.convert('RGB')
    except ValueError as e:
        raise ImageError(f'images in PIL mode {image.mode} are not supported ({e})') from None
