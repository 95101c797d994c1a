"""A visitor's zip of class folders: read when it is one, refused with a message when it is hostile, and
nothing written to disk either way."""
import io
import os
import struct
import tempfile
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from vitdemo.archive import ArchiveError, ZipLimits, read_image_zip


def png(colour=(200, 30, 30), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new('RGB', size, colour).save(buffer, 'PNG')
    return buffer.getvalue()


def make_zip(path: Path, entries: dict[str, bytes], method=zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, 'w', method) as z:
        for name, data in entries.items():
            z.writestr(name, data)
    return path


def good_entries(prefix=''):
    return {f'{prefix}cat/{i}.png': png((200, 10 * i, 0)) for i in range(3)} | \
           {f'{prefix}dog/{i}.png': png((0, 10 * i, 200)) for i in range(2)}


def listing(root: Path) -> set:
    """Every file under `root`, and whether the absolute target of a hostile entry exists."""
    found = {os.path.join(dirpath, n) for dirpath, _, names in os.walk(root) for n in names}
    return found | ({'/tmp/cat/evil.png'} if Path('/tmp/cat/evil.png').exists() else set())


@pytest.fixture
def landing(tmp_path, monkeypatch) -> Path:
    """Where an extraction would land, private to the test: the temporary folder and the working folder, two
    levels inside `tmp_path` so that entries climbing out land inside it too. Anything else writing to the
    machine's temporary folder meanwhile (a download, another job) cannot fail the test."""
    inner = tmp_path / 'outer' / 'inner'
    (inner / 'tmp').mkdir(parents=True)
    monkeypatch.setattr(tempfile, 'tempdir', str(inner / 'tmp'))
    monkeypatch.chdir(inner)
    return tmp_path


@pytest.mark.parametrize('prefix', ['', 'my_pets/'])
def test_class_folders_become_labelled_images(tmp_path, prefix):
    entries = good_entries(prefix) | {f'__MACOSX/{prefix}cat/._0.png': b'junk', f'{prefix}.DS_Store': b'junk'}
    data = read_image_zip(make_zip(tmp_path / 'pets.zip', entries), size=16)
    assert data.classes == ['cat', 'dog']
    assert data.labels.tolist() == [0, 0, 0, 1, 1]
    assert data.images.shape == (5, 3, 16, 16)
    assert data.images[0, :, 8, 8].tolist() == [200, 0, 0]  # colours survive the crop and resize
    assert data.images[4, :, 8, 8].tolist() == [0, 10, 200]


def bomb(tmp_path):
    # 10 MB of zeros deflate to ~10 KB: declared size / compressed size ~1,000
    return make_zip(tmp_path / 'bomb.zip', good_entries() | {'cat/big.png': bytes(10 * 2 ** 20)})


def symlink(tmp_path):
    path = tmp_path / 'link.zip'
    with zipfile.ZipFile(path, 'w') as z:
        for name, data in good_entries().items():
            z.writestr(name, data)
        info = zipfile.ZipInfo('cat/passwd.png')
        info.external_attr = (0o120777 << 16)  # a symbolic link to /etc/passwd
        z.writestr(info, '/etc/passwd')
    return path


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def lying_sizes(tmp_path):
    """An entry whose directory declares 100 bytes while it holds a whole image."""
    noise = Image.frombytes('RGB', (40, 30), os.urandom(40 * 30 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, 'PNG')
    entries = {'cat/noise.png': buffer.getvalue()} | good_entries()
    path = make_zip(tmp_path / 'liar.zip', entries, method=zipfile.ZIP_STORED)
    raw = bytearray(path.read_bytes())
    central = raw.find(b'PK\x01\x02')  # the first entry's central directory record
    compressed = struct.unpack_from('<I', raw, central + 20)[0]
    struct.pack_into('<I', raw, central + 24, 100)  # uncompressed size
    struct.pack_into('<I', raw, 22, 100)  # and the local header's
    assert compressed > 100
    path.write_bytes(bytes(raw))
    return path


HOSTILE = {
    'zip bomb': (bomb, 'zip bomb'),
    'climbs out': (lambda t: make_zip(t / 'a.zip', good_entries() | {'../cat/evil.png': png()}), 'outside'),
    'climbs out deeper': (lambda t: make_zip(t / 'a.zip', good_entries() | {'cat/../../evil.png': png()}), 'outside'),
    'absolute path': (lambda t: make_zip(t / 'a.zip', good_entries() | {'/tmp/cat/evil.png': png()}), 'outside'),
    'drive letter': (lambda t: make_zip(t / 'a.zip', good_entries() | {'C:/cat/evil.png': png()}), 'outside'),
    'link': (symlink, 'link'),
    'nested archive': (lambda t: make_zip(t / 'a.zip', good_entries() | {'cat/more.zip': b'PK\x03\x04'}),
                       'archive inside'),
    'non-image by name': (lambda t: make_zip(t / 'a.zip', good_entries() | {'cat/run.sh': b'rm -rf /'}),
                          'not an image'),
    'non-image by content': (lambda t: make_zip(t / 'a.zip', good_entries() | {'cat/fake.png': b'<html>'}),
                             'not an image format'),
    'entry larger than declared': (lying_sizes, 'cannot be read'),
    'not a zip': (lambda t: write(t / 'a.zip', b'PK\x03\x04 hello'), 'cannot be read'),
    'flat layout': (lambda t: make_zip(t / 'a.zip', {'1.png': png(), '2.png': png()}), 'folder named by its class'),
    'mixed depths': (lambda t: make_zip(t / 'a.zip', good_entries() | {'x/cat/3.png': png()}),
                     'folder named by its class'),
    'one class': (lambda t: make_zip(t / 'a.zip', {'cat/1.png': png(), 'cat/2.png': png()}), '2 to 20'),
    'empty': (lambda t: make_zip(t / 'a.zip', {}), 'no images'),
}


@pytest.mark.parametrize('case', list(HOSTILE))
def test_hostile_zip_is_refused_with_a_message_and_nothing_written(landing, case):
    make, words = HOSTILE[case]
    path = make(landing)
    before = listing(landing)
    with pytest.raises(ArchiveError, match=words):
        read_image_zip(path)
    assert listing(landing) == before


def test_limits_are_checked_from_the_directory(tmp_path):
    path = make_zip(tmp_path / 'a.zip', good_entries())
    with pytest.raises(ArchiveError, match='holds 5 images; the limit is 4'):
        read_image_zip(path, limits=ZipLimits(max_images=4))
    with pytest.raises(ArchiveError, match='1 class folders|2 class folders; 3 to'):
        read_image_zip(path, limits=ZipLimits(min_classes=3))
    with pytest.raises(ArchiveError, match='declare more than 0 MB'):
        read_image_zip(path, limits=ZipLimits(max_total=200))
    with pytest.raises(ArchiveError, match='the limit is 0 MB'):
        read_image_zip(path, limits=ZipLimits(max_bytes=100))
    with pytest.raises(ArchiveError, match='entries; the limit is 3'):
        read_image_zip(path, limits=ZipLimits(max_entries=3))


def test_an_image_over_the_pixel_limit_is_refused_by_its_header(tmp_path, monkeypatch):
    import vitdemo.images
    monkeypatch.setattr(vitdemo.images, 'MAX_PIXELS', 1000)
    with pytest.raises(ArchiveError, match=r"'cat/0.png': the image is too large"):
        read_image_zip(make_zip(tmp_path / 'a.zip', good_entries()))


def test_the_pixels_and_seconds_of_a_whole_archive_are_bounded(tmp_path):
    path = make_zip(tmp_path / 'a.zip', good_entries())  # five 40x30 images: 6,000 pixels
    with pytest.raises(ArchiveError, match=r"more than 0 megapixels together \(reached at 'cat/2.png'\)"):
        read_image_zip(path, limits=ZipLimits(max_pixels=3 * 1200 - 1))
    with pytest.raises(ArchiveError, match='took more than 0 s'):
        read_image_zip(path, limits=ZipLimits(max_seconds=0))
    assert len(read_image_zip(path, limits=ZipLimits(max_pixels=5 * 1200))) == 5
