import io

import numpy as np
import pytest
from PIL import Image

from vitdemo.images import MAX_SIDE, ImageError, load_image


def saved(tmp_path, image: Image.Image, name: str, **kw) -> str:
    path = tmp_path / name
    image.save(path, **kw)
    return str(path)


@pytest.mark.parametrize('mode', ['L', 'LA', 'RGBA', 'P', 'CMYK', 'I;16', 'I', 'F', '1', 'YCbCr'])
def test_every_mode_becomes_rgb(mode):
    image = Image.new('RGB', (20, 10), (30, 120, 220)).convert(mode) if mode not in ('I;16', 'I', 'F') \
        else Image.new(mode, (20, 10))
    out = load_image(image)
    assert out.mode == 'RGB' and out.size == (20, 10)


def test_sixteen_bit_values_are_scaled_not_clipped():
    array = np.linspace(0, 65535, 64 * 8).reshape(8, 64).astype(np.uint16)
    out = np.asarray(load_image(Image.fromarray(array)))[..., 0]
    assert out.min() == 0 and out.max() == 255
    assert len(np.unique(out)) > 100  # a gradient, not a white image


def test_transparency_goes_on_white():
    image = Image.new('RGBA', (4, 4), (255, 0, 0, 0))
    assert np.asarray(load_image(image)).min() == 255
    la = Image.new('LA', (4, 4), (0, 255))
    assert np.asarray(load_image(la)).max() == 0
    p = Image.new('P', (4, 4), 0)
    p.putpalette([10, 20, 30] * 256)
    p.info['transparency'] = 0
    assert np.asarray(load_image(p)).min() == 255


def test_files_in_odd_modes_and_formats(tmp_path):
    for mode, name in [('CMYK', 'cmyk.jpg'), ('L', 'gray.png'), ('RGBA', 'alpha.png'), ('P', 'palette.gif'),
                       ('I;16', 'deep.png'), ('RGB', 'photo.webp'), ('RGB', 'scan.tiff'), ('RGB', 'old.bmp')]:
        base = Image.new('RGB', (30, 20), (90, 60, 30))
        image = Image.fromarray(np.full((20, 30), 4000, np.uint16)) if mode == 'I;16' \
            else base.convert(mode)
        out = load_image(saved(tmp_path, image, name))
        assert out.mode == 'RGB' and out.size == (30, 20), name


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new('RGB', (40, 10), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = saved(tmp_path, image, 'rotated.jpg', exif=exif)
    assert load_image(path).size == (10, 40)


def test_animated_gif_gives_its_first_frame(tmp_path):
    frames = [Image.new('RGB', (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / 'anim.gif'
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    r, g, b = np.asarray(load_image(str(path))).reshape(-1, 3).mean(0)
    assert r > 200 and b < 50


def test_huge_image_is_shrunk_first_and_one_pixel_is_fine(tmp_path):
    big = load_image(saved(tmp_path, Image.new('RGB', (6000, 4000), (1, 2, 3)), 'photo.jpg'))
    assert max(big.size) == MAX_SIDE and big.size[0] / big.size[1] == pytest.approx(1.5, rel=0.01)
    assert load_image(Image.new('RGB', (1, 1))).size == (1, 1)


def test_numpy_arrays_of_any_dtype():
    assert load_image(np.zeros((5, 6, 3), np.uint8)).size == (6, 5)
    assert load_image(np.ones((5, 6), np.float32)).getpixel((0, 0)) == (255, 255, 255)
    assert load_image(np.full((5, 6, 4), 65535, np.uint16)).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ImageError, match='HxW'):
        load_image(np.zeros((5, 6, 2), np.uint8))


@pytest.mark.parametrize('content,message', [
    (b'', 'empty file'),
    (b'this is text, not an image', 'not an image format'),
    (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', 'not an image format'),
])
def test_non_images_are_refused_clearly(tmp_path, content, message):
    path = tmp_path / 'upload.jpg'
    path.write_bytes(content)
    for source in (str(path), content):  # a path, or the bytes as the app's upload box hands them over
        with pytest.raises(ImageError, match=message):
            load_image(source)


def test_the_bytes_of_a_file_read_as_the_file(tmp_path):
    path = tmp_path / 'photo.png'
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 40, 4), np.uint8)).save(path)
    assert np.array_equal(np.asarray(load_image(path.read_bytes())), np.asarray(load_image(str(path))))


def test_truncated_and_bomb_images_are_refused(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), np.uint8)).save(buffer, 'PNG')
    truncated = tmp_path / 'cut.png'
    truncated.write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    with pytest.raises(ImageError, match='corrupt or truncated'):
        load_image(str(truncated))
    # a PNG header that declares 20000x20000 pixels: refused before a single pixel is decoded
    bomb = tmp_path / 'bomb.png'
    Image.new('1', (20000, 20000)).save(bomb, optimize=True)
    with pytest.raises(ImageError, match='too large|too many pixels'):
        load_image(str(bomb))


def test_missing_inputs_are_refused():
    with pytest.raises(ImageError, match='upload an image'):
        load_image(None)
    with pytest.raises(ImageError, match='no file'):
        load_image('/nonexistent/image.png')
    with pytest.raises(ImageError, match='cannot read an image from a int'):
        load_image(42)


@pytest.mark.parametrize('name,content', [
    ('drawing.eps', b'%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n0 0 moveto 10 10 lineto stroke\nshowpage\n'),
    ('icon.ico', None),
    ('picture.pcx', None),
])
def test_only_the_listed_formats_are_decoded(name, content, monkeypatch):
    """Formats PIL knows but the README does not list are refused unopened: an EPS never reaches
    Ghostscript, which would run the uploader's PostScript."""
    from PIL import EpsImagePlugin
    monkeypatch.setattr(EpsImagePlugin, 'Ghostscript', lambda *a, **k: pytest.fail('Ghostscript was called'))
    if content is None:
        buffer = io.BytesIO()
        Image.new('RGB', (16, 16), 'red').save(buffer, name.rsplit('.', 1)[1].upper())
        content = buffer.getvalue()
        Image.open(io.BytesIO(content)).load()  # a file PIL itself reads
    with pytest.raises(ImageError, match='not an image format this app can read'):
        load_image(content)
