import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import CIFAR_ARCHIVE
from vitdemo.data import ImageData, augment, load_dataset, mix, normalize, rand_augment, train_val_split


def make_folder(root, classes=('cat', 'dog'), per_class=3, size=8, split='train'):
    for label, name in enumerate(classes):
        (root / split / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new('RGB', (size, size), (label * 100, i * 40, 7)).save(root / split / name / f'{i:04d}.png')


def test_image_folder_is_read_once_then_served_from_the_cache(tmp_path):
    make_folder(tmp_path / 'ds')
    cache = tmp_path / 'cache'
    data = load_dataset(tmp_path / 'ds', cache_dir=cache)
    assert data.images.shape == (6, 3, 8, 8) and data.images.dtype == torch.uint8
    assert data.classes == ['cat', 'dog'] and data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.images[4, :, 0, 0].tolist() == [100, 40, 7]
    assert len(list(cache.glob('*.safetensors'))) == 1
    for f in (tmp_path / 'ds' / 'train' / 'cat').iterdir():
        f.unlink()  # the cache alone answers now
    again = load_dataset(tmp_path / 'ds', cache_dir=cache)
    assert torch.equal(again.images, data.images) and again.classes == data.classes


def test_a_source_changed_since_replaces_its_cache_and_the_folders_archives_were_extracted_to_go(tmp_path):
    make_folder(tmp_path / 'src')
    archive = tmp_path / 'ds.tar'
    with tarfile.open(archive, 'w') as tar:
        tar.add(tmp_path / 'src' / 'train', arcname='train')
    cache = tmp_path / 'cache'
    load_dataset(archive, cache_dir=cache)
    first = next(cache.glob('ds.tar-train-*.safetensors'))
    others = [cache / 'ds.tar-train-x-0123456789abcdef.safetensors', cache / 'ds-train-0123456789abcdef.safetensors',
              cache / 'notes.txt']
    for other in others:  # another source's caches and a file of the user's: never touched
        other.write_bytes(b'kept')
    (cache / 'ds.tar-3f4c48f6' / 'train').mkdir(parents=True)  # where an earlier version extracted the archive
    os.utime(archive, (archive.stat().st_atime, archive.stat().st_mtime + 60))  # the file changed: a new key
    load_dataset(archive, cache_dir=cache)
    caches = list(cache.glob('ds.tar-train-[0-9a-f]*.safetensors'))
    assert len(caches) == 1 and caches[0] != first
    assert not (cache / 'ds.tar-3f4c48f6').exists() and all(o.read_bytes() == b'kept' for o in others)


def test_an_archive_is_read_in_place_as_the_folder_it_holds(tmp_path):
    make_folder(tmp_path / 'src')
    make_folder(tmp_path / 'src', per_class=2, split='test')
    archive = tmp_path / 'ds.tar.gz'
    with tarfile.open(archive, 'w:gz') as tar:
        tar.add(tmp_path / 'src' / 'test', arcname='./test')  # a leading './', as `tar -C src -czf ds.tar.gz .` writes
        tar.add(tmp_path / 'src' / 'train', arcname='train')
    cache = tmp_path / 'c'
    data = load_dataset(archive, cache_dir=cache)
    folder = load_dataset(tmp_path / 'src', cache_dir=tmp_path / 'c2')
    assert torch.equal(data.images, folder.images) and torch.equal(data.labels, folder.labels)
    assert data.classes == folder.classes == ['cat', 'dog']
    assert len(load_dataset(archive, split='test', cache_dir=cache)) == 4
    assert all(f.suffix == '.safetensors' for f in cache.iterdir())  # nothing extracted beside the cache
    with pytest.raises(FileNotFoundError, match='no valid/ folder of images'):
        load_dataset(archive, split='valid', cache_dir=cache)
    with pytest.raises(FileNotFoundError, match='no test/ folder'):
        make_folder(tmp_path / 'only_train')
        load_dataset(tmp_path / 'only_train', split='test', cache_dir=tmp_path / 'c', download=False)


def test_jpegs_decode_as_pil_decodes_them_beside_pngs_and_a_damaged_one_is_named(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / 'ds' / 'train'
    for name in ['cat', 'dog']:
        (folder / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f'{i}.jpg', quality=80)
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), 'L').save(folder / name / 'grey.jpg')
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / name / 'z.png')
    data = load_dataset(tmp_path / 'ds', cache_dir=tmp_path / 'c')
    files = sorted(folder.glob('*/*'))
    assert data.labels.tolist() == [0] * 5 + [1] * 5
    for got, f in zip(data.images, files):
        assert torch.equal(got, torch.from_numpy(np.array(Image.open(f).convert('RGB'))).permute(2, 0, 1)), f

    (folder / 'dog' / '1.jpg').write_bytes((folder / 'dog' / '1.jpg').read_bytes()[:40])
    with pytest.raises(ValueError, match=r'dog/1\.jpg could not be read'):
        load_dataset(tmp_path / 'ds', cache_dir=tmp_path / 'c3')
    Image.new('RGB', (9, 8)).save(folder / 'dog' / '1.jpg')
    with pytest.raises(ValueError, match=r'differ in size \(8x8, 8x9'):
        load_dataset(tmp_path / 'ds', cache_dir=tmp_path / 'c4')


def test_split_is_seeded_and_disjoint():
    data = ImageData(torch.zeros(100, 3, 4, 4, dtype=torch.uint8), torch.arange(100), ['x'])
    train, val = train_val_split(data, 20, seed=1)
    train2, val2 = train_val_split(data, 20, seed=1)
    assert len(train) == 80 and len(val) == 20
    assert torch.equal(val.labels, val2.labels)
    assert not set(train.labels.tolist()) & set(val.labels.tolist())
    assert not torch.equal(val.labels, train_val_split(data, 20, seed=2)[1].labels)


def test_augment_crops_and_flips_whole_batches():
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.int32).view(2, 3, 6, 6).to(torch.uint8)
    out = augment(images, padding=0, generator=torch.Generator().manual_seed(0))
    for a, b in zip(out, images):
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))  # no padding: only flips remain
    padded = augment(images.repeat(64, 1, 1, 1), padding=2, generator=torch.Generator().manual_seed(0))
    assert padded.shape == (128, 3, 6, 6) and padded.dtype == torch.uint8
    moved = sum(not torch.equal(p, images[i % 2]) and not torch.equal(p, images[i % 2].flip(-1))
                for i, p in enumerate(padded))
    assert moved > 64  # most crops are shifted


def test_rand_augment_gives_each_group_its_own_ops():
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    out = rand_augment(image.repeat(64, 1, 1, 1), magnitude=9, draws=16)  # groups of 4
    assert out.shape == (64, 3, 16, 16) and out.dtype == torch.uint8
    groups = out.view(16, 4, 3, 16, 16)
    assert all(torch.equal(g[0], g[3]) for g in groups)  # one draw per group ...
    assert len({g[0].numpy().tobytes() for g in groups}) > 8  # ... and different draws across groups
    assert sum(not torch.equal(g[0], image) for g in groups) > 8


def test_mix_labels_weigh_the_classes_as_the_pixels_do():
    torch.manual_seed(0)
    shade = torch.tensor([0.0, 10.0, 20.0, 30.0])
    labels = torch.tensor([0, 1, 2, 3, 0, 2, 1, 3])
    images = shade[labels].view(-1, 1, 1, 1).expand(-1, 3, 16, 16).clone()  # each class its own grey
    for _ in range(10):  # CutMix and MixUp both turn up
        mixed, target = mix(images, labels, num_classes=4)
        assert target.shape == (8, 4) and torch.allclose(target.sum(1), torch.ones(8))
        # a label's weight is the share of the image it covers (CutMix) or its blend weight (MixUp)
        torch.testing.assert_close(mixed.mean((1, 2, 3)), target @ shade)
        neighbour = labels.roll(1)
        assert ((target > 0) <= (F.one_hot(labels, 4) + F.one_hot(neighbour, 4)).bool()).all()


def test_normalize_standardises_per_channel():
    images = torch.full((1, 3, 2, 2), 128, dtype=torch.uint8)
    out = normalize(images, [0.5, 0.0, 1.0], [0.5, 1.0, 0.25])
    np.testing.assert_allclose(out[0, :, 0, 0].tolist(), [(128 / 255 - 0.5) / 0.5, 128 / 255, (128 / 255 - 1) / 0.25],
                               rtol=1e-5)


@pytest.mark.slow  # decodes the 50,000 real images
@pytest.mark.skipif(not CIFAR_ARCHIVE.exists(), reason='needs ../shared/data/cifar10-train.tar.gz')
def test_the_shipped_cifar_archive(tmp_path_factory):
    data = load_dataset(CIFAR_ARCHIVE)
    assert data.images.shape == (50000, 3, 32, 32)
    assert data.classes == ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
    assert torch.bincount(data.labels).tolist() == [5000] * 10


@pytest.mark.skipif(not CIFAR_ARCHIVE.exists(), reason='needs ../shared/data/cifar10-train.tar.gz')
def test_the_shipped_jpegs_decode_to_the_pixels_pil_gives(tmp_path):
    # the shipped models were trained and scored on the archive as PIL decoded it: the same pixels now
    with tarfile.open(CIFAR_ARCHIVE) as tar, tarfile.open(tmp_path / 'part.tar', 'w') as part:
        members = [m for _, m in zip(range(300), tar) if m.isfile()]
        expected = []
        for m in members:
            blob = tar.extractfile(m).read()
            part.addfile(m, io.BytesIO(blob))
            expected.append(torch.from_numpy(np.array(Image.open(io.BytesIO(blob)).convert('RGB'))).permute(2, 0, 1))
    data = load_dataset(tmp_path / 'part.tar', cache_dir=tmp_path / 'cache')
    assert len(data) == len(members) > 200
    assert torch.equal(data.images, torch.stack(expected))


def test_a_constant_channel_does_not_divide_by_zero():
    data = ImageData(torch.full((4, 3, 2, 2), 9, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), ['x'])
    mean, std = data.mean_std()
    assert min(std) > 0 and torch.isfinite(normalize(data.images, mean, std)).all()


def fake_official_cifar(root, per_batch=4):
    """The official python layout (cifar-10-batches-py: five training batches, a test batch, metadata)
    with a few random images each; torchvision reads it as it reads the real download."""
    folder = root / 'cifar-10-batches-py'
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        batch = {'data': rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 'labels': [int(v) for v in rng.integers(0, 10, per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    classes = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
    (folder / 'batches.meta').write_bytes(pickle.dumps({'label_names': classes}))
    return classes


def test_official_cifar_layout_through_torchvision(tmp_path, monkeypatch):
    from torchvision.datasets import cifar
    classes = fake_official_cifar(tmp_path / 'cifar')
    # our files are not the real ones, so they cannot pass torchvision's MD5 check; everything else is real
    monkeypatch.setattr(cifar, 'check_integrity', lambda path, md5=None: True)
    train = load_dataset(tmp_path / 'cifar', 'train', cache_dir=tmp_path / 'cache', download=False)
    test = load_dataset(tmp_path / 'cifar', 'test', cache_dir=tmp_path / 'cache', download=False)
    assert train.images.shape == (20, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.classes == classes and train.labels.max() < 10
    raw = pickle.loads((tmp_path / 'cifar' / 'cifar-10-batches-py' / 'data_batch_1').read_bytes())
    assert torch.equal(train.images[0], torch.from_numpy(raw['data'][0].reshape(3, 32, 32)))


def test_official_cifar_that_cannot_be_had_is_a_clear_error(tmp_path, monkeypatch):
    from torchvision.datasets import CIFAR10
    (tmp_path / 'empty').mkdir()

    def offline(self):
        raise OSError('network is unreachable')

    monkeypatch.setattr(CIFAR10, 'download', offline)
    with pytest.raises(FileNotFoundError, match='no usable official CIFAR-10.*network is unreachable'):
        load_dataset(tmp_path / 'empty', cache_dir=tmp_path / 'cache')
