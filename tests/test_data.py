"""Tests of bitalloc.data: IDX, CIFAR-10, ImageFolder readers, transforms, cache, splits and loaders.

Every test builds its own tiny files in ``tmp_path``; the independent references are hand-written numpy
decodings of the formats (IDX header, CIFAR's channel-first rows) and direct PIL calls for the transforms.
Debian's Fashion-MNIST is used when installed and skipped otherwise.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset, TensorDataset

from bitalloc.data import (CIFAR10_NORM, CacheWarning, ImageFolder, ImageSource, InMemoryImageDataset,
                           Normalization, calibration_split, center_crop, dataset_info, get_transform,
                           load_cifar10_imagefolder, load_cifar10_python, load_dataset, make_loader,
                           random_crop_flip, read_cifar_batch, read_idx, resize_short_side, resolve_cache_dir,
                           resolve_data_root, write_idx)
from bitalloc.errors import ConfigError, DataError

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """No test reads the user's data path or writes the user's cache."""
    monkeypatch.delenv("BITALLOC_DATA", raising=False)
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache-env"))


# ----------------------------------------------------------------------------------------------------- IDX


def _manual_idx(arr: np.ndarray, code: int) -> bytes:
    """Independent IDX encoder: magic 0 0 code ndim, big-endian dims, big-endian data."""
    head = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", d) for d in arr.shape)
    return head + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype,code,shape", [(np.uint8, 0x08, (5, 7, 3)), (np.int32, 0x0C, (11,)),
                                              (np.float32, 0x0D, (2, 3)), (np.int16, 0x0B, (4, 1))])
def test_idx_round_trip(tmp_path, suffix, dtype, code, shape):
    rng = np.random.default_rng(0)
    arr = (rng.random(shape) * 200 - (0 if dtype == np.uint8 else 100)).astype(dtype)
    raw = _manual_idx(arr, code)
    p = tmp_path / f"a-idx{len(shape)}-ubyte{suffix}"
    p.write_bytes(gzip.compress(raw) if suffix else raw)
    out = read_idx(p)
    assert out.dtype == np.dtype(dtype) and out.shape == shape
    np.testing.assert_array_equal(out, arr)
    # write_idx is the inverse
    q = write_idx(tmp_path / f"b{suffix}", arr)
    np.testing.assert_array_equal(read_idx(q), arr)
    assert (gzip.decompress(q.read_bytes()) if suffix else q.read_bytes()) == raw


def test_idx_truncated_raw(tmp_path):
    arr = np.zeros((10, 28, 28), np.uint8)
    p = tmp_path / "train-images-idx3-ubyte"
    p.write_bytes(_manual_idx(arr, 0x08)[:1000])
    with pytest.raises(DataError) as e:
        read_idx(p)
    msg = str(e.value)
    assert str(p) in msg and "expected 7856 bytes, got 1000" in msg and "truncated" in msg


def test_idx_truncated_gzip(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte.gz"
    noise = np.random.default_rng(0).integers(0, 256, (50, 28, 28), dtype=np.uint8)
    p.write_bytes(gzip.compress(_manual_idx(noise, 0x08))[:2000])
    with pytest.raises(DataError, match="truncated") as e:
        read_idx(p)
    assert str(p) in str(e.value)


def test_idx_bad_magic_and_dtype(tmp_path):
    p = tmp_path / "x-idx1-ubyte"
    p.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(DataError, match="magic") as e:
        read_idx(p)
    assert str(p) in str(e.value)
    p.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(DataError, match="dtype code 0x07"):
        read_idx(p)
    p.write_bytes(_manual_idx(np.zeros(3, np.uint8), 0x08) + b"extra")
    with pytest.raises(DataError, match="trailing"):
        read_idx(p)


def test_idx_missing_path_names_expected_files(tmp_path):
    p = tmp_path / "nope" / "train-images-idx3-ubyte.gz"
    with pytest.raises(DataError) as e:
        read_idx(p)
    assert str(p) in str(e.value) and "t10k-labels-idx1-ubyte" in str(e.value)


def _write_mnist_folder(folder: Path, n_train: int = 6, n_test: int = 4, gz: bool = True) -> dict:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        sfx = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{sfx}", imgs)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{sfx}", labels)
        arrays[split] = (imgs, labels)
    return arrays


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_folder_items_normalized(tmp_path, gz):
    arrays = _write_mnist_folder(tmp_path / "mnist", gz=gz)
    for split in ("train", "test"):
        ds = load_dataset("mnist", tmp_path / "mnist", split)
        imgs, labels = arrays[split]
        assert len(ds) == len(labels)
        x, y = ds[2]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and isinstance(y, int)
        expected = (imgs[2].astype(np.float32) / 255 - 0.1307) / 0.3081
        np.testing.assert_allclose(x[0].numpy(), expected, rtol=1e-6, atol=1e-6)
        assert y == int(labels[2])
    fm = load_dataset("fashion-mnist", tmp_path / "mnist", "test")
    np.testing.assert_allclose(fm[0][0][0].numpy(), (arrays["test"][0][0] / 255 - 0.2860) / 0.3530,
                               rtol=1e-6, atol=1e-6)


def test_mnist_missing_files_and_roots(tmp_path, monkeypatch):
    folder = tmp_path / "mnist"
    _write_mnist_folder(folder)
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", folder, "test")
    with pytest.raises(DataError, match="BITALLOC_DATA"):  # no root, no env
        load_dataset("mnist", None, "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty"):
        load_dataset("mnist", tmp_path / "empty", "train")
    with pytest.raises(DataError, match="does not exist"):
        load_dataset("mnist", tmp_path / "missing", "train")
    with pytest.raises(ConfigError, match="split"):
        load_dataset("mnist", folder, "val")
    with pytest.raises(ConfigError, match="augment"):
        load_dataset("mnist", folder, "train", augment=True)
    # BITALLOC_DATA may name a parent folder that holds mnist/
    monkeypatch.setenv("BITALLOC_DATA", str(tmp_path))
    assert resolve_data_root("mnist") == folder
    assert len(load_dataset("mnist", split="train")) == 6


@pytest.mark.needs_fashion_mnist
def test_fashion_mnist_real_files():
    if not (FASHION_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Debian dataset-fashion-mnist is not installed ({FASHION_DIR} missing)")
    train = load_dataset("fashion-mnist", FASHION_DIR, "train")
    test = load_dataset("fashion-mnist", FASHION_DIR, "test")
    assert len(train) == 60000 and len(test) == 10000
    assert train.images.shape == (60000, 28, 28, 1) and train.labels.bincount().tolist() == [6000] * 10
    x, y = test[0]
    assert x.shape == (1, 28, 28) and y == 9  # the first test image is an ankle boot
    assert train.classes[9] == "Ankle boot"


# ------------------------------------------------------------------------------------------------ CIFAR-10


def _write_cifar_py(folder: Path) -> dict:
    """A fake cifar-10-batches-py: 5 train batches of 2 images, a test batch of 3, batches.meta."""
    rng = np.random.default_rng(2)
    folder.mkdir(parents=True)
    out = {}
    for name, n in [(f"data_batch_{i}", 2) for i in range(1, 6)] + [("test_batch", 3)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, n)]
        blob = pickle.dumps({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                             b"filenames": [b"x.png"] * n}, protocol=2)
        if name == "data_batch_1":  # the official files name numpy's pre-2.0 module
            blob = blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
            assert b"cnumpy.core.multiarray\n" in blob
        (folder / name).write_bytes(blob)
        out[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in "abcdefghij"], b"num_vis": 3072}, f, protocol=2)
    return out


def _manual_hwc(row: np.ndarray) -> np.ndarray:
    """Pixel (r, c) channel k is row[k * 1024 + r * 32 + c] (CIFAR's documented layout)."""
    img = np.empty((32, 32, 3), np.uint8)
    for k in range(3):
        for r in range(32):
            img[r, :, k] = row[k * 1024 + r * 32: k * 1024 + r * 32 + 32]
    return img


def test_cifar_python_batches_decoding(tmp_path):
    batches = _write_cifar_py(tmp_path / "cifar-10-batches-py")
    data, labels = batches["data_batch_3"]
    imgs, lbls = read_cifar_batch(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    np.testing.assert_array_equal(imgs[1], _manual_hwc(data[1]))
    assert lbls.tolist() == labels
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the folder or its parent
        train = load_dataset("cifar10", root, "train")
        assert isinstance(train, InMemoryImageDataset) and len(train) == 10 and train.classes[0] == "a"
        # order: data_batch_1 .. 5
        for i, (name, j) in enumerate([(f"data_batch_{b}", j) for b in range(1, 6) for j in range(2)]):
            np.testing.assert_array_equal(train.images[i].numpy(), _manual_hwc(batches[name][0][j]))
            assert int(train.labels[i]) == batches[name][1][j]
        test = load_cifar10_python(root, "test")
        assert len(test) == 3
        x, y = test[2]
        mean = np.array(CIFAR10_NORM.mean, np.float32)[:, None, None]
        std = np.array(CIFAR10_NORM.std, np.float32)[:, None, None]
        ref = (_manual_hwc(batches["test_batch"][0][2]).transpose(2, 0, 1) / np.float32(255) - mean) / std
        np.testing.assert_allclose(x.numpy(), ref, rtol=1e-5, atol=1e-5)
        assert y == batches["test_batch"][1][2]


def test_cifar_python_corrupt_and_unsafe(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar_py(folder)
    raw = (folder / "test_batch").read_bytes()
    (folder / "test_batch").write_bytes(raw[:500])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load_dataset("cifar10", folder, "test")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": []}, f)
    with pytest.raises(DataError, match="refusing"):
        load_dataset("cifar10", folder, "test")
    (folder / "data_batch_2").unlink()
    with pytest.raises(DataError, match="data_batch_2"):
        load_dataset("cifar10", folder, "train")


_CLASSES = ["truck", "airplane", "cat", "bird", "automobile", "ship", "horse", "frog", "dog", "deer"]  # unsorted


def _write_image_tree(root: Path, splits=("train", "test"), classes=_CLASSES, per_class: int = 2,
                      size=(32, 32), fmt: str = "png", seed: int = 3) -> dict:
    """root/<split>/<class>/<k>.<fmt> with random smooth images; returns {(split, class, k): uint8 array}."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size[1], 0:size[0]].astype(np.float32)
    out = {}
    for split in splits:
        for cls in classes:
            d = root / split / cls if split else root / cls
            d.mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                a, b, c = rng.uniform(-4, 4, 3), rng.uniform(-4, 4, 3), rng.uniform(40, 200, 3)
                smooth = c + a * xx[..., None] + b * yy[..., None] + rng.normal(0, 2, (size[1], size[0], 3))
                arr = np.clip(smooth, 0, 255).astype(np.uint8)
                Image.fromarray(arr).save(d / f"{k:04d}.{fmt}")
                out[(split, cls, k)] = arr
    return out


def _zip_tree(src: Path, zpath: Path, top: str) -> Path:
    with zipfile.ZipFile(zpath, "w") as z:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                z.write(p, f"{top}/{p.relative_to(src).as_posix()}")
    return zpath


def test_cifar_imagefolder_folder_and_zip(tmp_path):
    tree = _write_image_tree(tmp_path / "cifar10-png")
    zpath = _zip_tree(tmp_path / "cifar10-png", tmp_path / "cifar10-png.zip", "cifar10-png")
    cache = tmp_path / "cache"
    a = load_cifar10_imagefolder(tmp_path / "cifar10-png", "test", cache_dir=cache)
    b = load_dataset("cifar10", zpath, "test", cache_dir=cache)
    assert a.classes == sorted(_CLASSES) == b.classes
    assert a.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    torch.testing.assert_close(a.images, b.images)
    torch.testing.assert_close(a.labels, b.labels)
    i = 0
    for label, cls in enumerate(sorted(_CLASSES)):
        for k in range(2):
            np.testing.assert_array_equal(a.images[i].numpy(), tree[("test", cls, k)])  # PNG is lossless
            assert int(a.labels[i]) == label
            i += 1
    # editing an image inside a folder source invalidates its cache entry (the folder's mtime would not)
    new = np.full((32, 32, 3), 9, np.uint8)
    target = tmp_path / "cifar10-png" / "test" / "airplane" / "0000.png"
    Image.fromarray(new).save(target)
    os.utime(target, ns=(10**18, 10**18))
    edited = load_cifar10_imagefolder(tmp_path / "cifar10-png", "test", cache_dir=cache)
    np.testing.assert_array_equal(edited.images[0].numpy(), new)
    train = load_dataset("cifar10", zpath, "train", augment=True, cache_dir=cache)
    assert len(train) == 20 and train.augment
    x, y = train[0]
    assert x.shape == (3, 32, 32)


def test_generic_imagefolder_folder_zip_and_jpeg(tmp_path):
    classes = ["zebra", "ant", "moose"]
    tree = _write_image_tree(tmp_path / "imgs", splits=("",), classes=classes, per_class=2, size=(20, 12),
                             fmt="jpg")
    zpath = _zip_tree(tmp_path / "imgs", tmp_path / "imgs.zip", "imgs")
    a = load_dataset("imagefolder", tmp_path / "imgs")
    b = ImageFolder(zpath, "all")
    assert a.classes == b.classes == ["ant", "moose", "zebra"]
    assert a.targets == b.targets == [0, 0, 1, 1, 2, 2]
    for i in range(len(a)):
        xa, ya = a[i]
        xb, yb = b[i]
        assert xa.shape == (3, 12, 20) and ya == yb
        torch.testing.assert_close(xa, xb)  # same JPEG bytes -> same decode
    ref = tree[("", "moose", 1)].astype(np.float32) / 255  # JPEG is lossy: only close
    assert np.abs(a[3][0].numpy().transpose(1, 2, 0) - ref).mean() < 0.03
    # a zip without a single top folder, and split folders
    with zipfile.ZipFile(tmp_path / "flat.zip", "w") as z:
        for cls in classes:
            z.write(tmp_path / "imgs" / cls / "0000.jpg", f"{cls}/0000.jpg")
    assert ImageFolder(tmp_path / "flat.zip").classes == ["ant", "moose", "zebra"]
    with pytest.raises(DataError, match="no 'train' folder"):
        ImageFolder(tmp_path / "imgs", "train")
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "cls").mkdir()
    (tmp_path / "none" / "cls" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="no images"):
        ImageFolder(tmp_path / "none")
    (tmp_path / "bad.zip").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a zip"):
        ImageSource(tmp_path / "bad.zip")


# ------------------------------------------------------------------------------------------------ transforms


def _manual_lite(img: Image.Image) -> np.ndarray:
    """Reference: PIL bilinear resize of the short side to 256, central 224 crop (torchvision's rules)."""
    w, h = img.size
    if w <= h:
        nw, nh = 256, int(256 * h / w)
    else:
        nw, nh = int(256 * w / h), 256
    r = img.resize((nw, nh), Image.BILINEAR) if min(w, h) != 256 else img
    left, top = int(round((nw - 224) / 2)), int(round((nh - 224) / 2))
    return np.array(r.crop((left, top, left + 224, top + 224)).convert("RGB"))


@pytest.mark.parametrize("size", [(300, 200), (211, 397), (256, 341), (500, 256), (225, 225)])
def test_imagenet_lite_transform_matches_pil(size):
    rng = np.random.default_rng(4)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    pre = get_transform("imagenet-lite")
    arr = pre.to_array(img)
    ref = _manual_lite(img)
    assert arr.shape == (224, 224, 3)
    np.testing.assert_array_equal(arr, ref)
    x = pre(img)
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32
    np.testing.assert_array_equal(x.numpy(), (ref.transpose(2, 0, 1).astype(np.float32) - 127) / 128)


def test_resize_and_crop_helpers():
    img = Image.new("RGB", (300, 200))
    assert resize_short_side(img, 256).size == (384, 256)
    assert resize_short_side(Image.new("RGB", (200, 301)), 256).size == (256, 385)
    same = Image.new("RGB", (256, 300))
    assert resize_short_side(same, 256) is same
    assert center_crop(Image.new("RGB", (230, 227)), 224).size == (224, 224)
    with pytest.raises(ConfigError):
        center_crop(Image.new("RGB", (100, 300)), 224)
    with pytest.raises(ConfigError, match="valid names"):
        get_transform("nope")
    gray = Image.fromarray(np.full((260, 260), 7, np.uint8), "L")  # converted to RGB
    assert get_transform("imagenet-lite").to_array(gray).shape == (224, 224, 3)


def test_normalization_formulas():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    y = CIFAR10_NORM(x)
    for c in range(3):
        ref = (x[0, c].float() / 255 - CIFAR10_NORM.mean[c]) / CIFAR10_NORM.std[c]
        torch.testing.assert_close(y[0, c], ref)
    torch.testing.assert_close(CIFAR10_NORM.invert(y), x.float(), rtol=0, atol=1e-4)
    lite = get_transform("imagenet-lite").normalization
    torch.testing.assert_close(lite(x), (x.float() - 127) / 128, rtol=0, atol=0)
    with pytest.raises(ConfigError):
        Normalization((0.5,), (0.0,))


def test_random_crop_flip_is_a_padded_crop():
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8)  # no zeros: padding is recognisable
    out = random_crop_flip(batch, padding=2, generator=g)
    assert out.shape == batch.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(batch, (2, 2, 2, 2))
    flips = 0
    for i in range(16):
        cands = [(dy, dx, f) for dy in range(5) for dx in range(5) for f in (False, True)
                 if torch.equal(out[i], (lambda c: c.flip(-1) if f else c)(padded[i, :, dy:dy + 8, dx:dx + 8]))]
        assert cands, f"image {i} is not a crop of its padded image"
        flips += cands[0][2]
    assert 0 < flips < 16
    again = random_crop_flip(batch, padding=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(random_crop_flip(batch, padding=0, flip=False), batch)
    single = random_crop_flip(batch[0], padding=2)
    assert single.shape == (3, 8, 8)


# ----------------------------------------------------------------------------------------------------- cache


def _write_imagenet_zip(tmp_path: Path) -> Path:
    src = tmp_path / "imagenet-src"
    rng = np.random.default_rng(5)
    wnids = ["n03000000", "n01000000", "n02000000"]
    sizes = [(300, 256), (256, 320), (400, 300)]
    for wnid, (w, h) in zip(wnids, sizes):
        (src / wnid).mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(src / wnid / f"{wnid}_x.JPEG",
                                                                             quality=90)
    return _zip_tree(src, tmp_path / "imagenet-sample.zip", "imagenet-sample")


def test_imagenet_zip_preprocessing_and_cache_hit(tmp_path, monkeypatch):
    zpath = _write_imagenet_zip(tmp_path)
    cache = tmp_path / "cache"
    ds = load_dataset("imagenet", zpath, cache_dir=cache)
    assert ds.classes == ["n01000000", "n02000000", "n03000000"] and ds.labels.tolist() == [0, 1, 2]
    src = ImageSource(zpath)
    for i, wnid in enumerate(ds.classes):
        ref = _manual_lite(src.open_image(f"{wnid}/{wnid}_x.JPEG").convert("RGB"))
        np.testing.assert_array_equal(ds.images[i].numpy(), ref)
        x, y = ds[i]
        assert x.shape == (3, 224, 224) and y == i
        torch.testing.assert_close(x, (torch.from_numpy(ref).permute(2, 0, 1).float() - 127) / 128)
    assert len(list(cache.glob("imagenet-*.images.npy"))) == 1

    def boom(*a, **k):
        raise AssertionError("decoder called although the cache is valid")

    monkeypatch.setattr(ImageSource, "open_image", boom)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = load_dataset("imagenet", tmp_path, cache_dir=cache)  # parent folder holding imagenet-sample.zip
    torch.testing.assert_close(again.images, ds.images)
    assert again.classes == ds.classes
    monkeypatch.undo()
    # a changed source (mtime) is a new cache entry
    st = zpath.stat()
    os.utime(zpath, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_dataset("imagenet", zpath, cache_dir=cache)
    assert len(list(cache.glob("imagenet-*.images.npy"))) == 2


@pytest.mark.parametrize("damage", ["truncate", "flip", "json"])
def test_corrupt_cache_is_rebuilt(tmp_path, damage):
    zpath = _write_imagenet_zip(tmp_path)
    cache = tmp_path / "cache"
    ds = load_dataset("imagenet", zpath, cache_dir=cache)
    npy = next(cache.glob("imagenet-*.images.npy"))
    if damage == "truncate":
        npy.write_bytes(npy.read_bytes()[:5000])
    elif damage == "flip":
        raw = bytearray(npy.read_bytes())
        raw[-10] ^= 0xFF
        npy.write_bytes(bytes(raw))
    else:
        next(cache.glob("imagenet-*.json")).write_text("{not json")
    with pytest.warns(CacheWarning, match="rebuilding"):
        again = load_dataset("imagenet", zpath, cache_dir=cache)
    torch.testing.assert_close(again.images, ds.images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dataset("imagenet", zpath, cache_dir=cache)  # the rebuilt entry is valid


def test_cache_dir_resolution(tmp_path, monkeypatch):
    assert resolve_cache_dir(tmp_path / "a") == tmp_path / "a"
    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("BITALLOC_CACHE")
    assert resolve_cache_dir() == Path.home() / ".cache" / "bitalloc"


def test_unwritable_cache_only_warns(tmp_path):
    zpath = _write_imagenet_zip(tmp_path)
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    with pytest.warns(CacheWarning, match="could not write"):
        ds = load_dataset("imagenet", zpath, cache_dir=blocker / "sub")
    assert len(ds) == 3


# ---------------------------------------------------------------------------------------- splits and loaders


def _tiny_memory_dataset(n: int = 37, augment: bool = False) -> InMemoryImageDataset:
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (n, 8, 8, 3), dtype=torch.uint8, generator=g)
    return InMemoryImageDataset(imgs, torch.arange(n) % 5, CIFAR10_NORM, augment=augment, crop_padding=2)


def test_calibration_split_deterministic_and_disjoint():
    ds = _tiny_memory_dataset(100)
    c1, r1 = calibration_split(ds, 32, seed=0)
    c2, r2 = calibration_split(ds, 32, seed=0)
    assert c1.indices == c2.indices and r1.indices == r2.indices
    assert len(c1) == 32 and len(r1) == 68
    assert set(c1.indices).isdisjoint(r1.indices) and set(c1.indices) | set(r1.indices) == set(range(100))
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0)).tolist()  # the documented recipe
    assert c1.indices == perm[:32] and r1.indices == perm[32:]
    assert calibration_split(ds, 32, seed=1)[0].indices != c1.indices
    for bad in (0, -1, 100, 101):
        with pytest.raises(ConfigError):
            calibration_split(ds, bad)


def test_make_loader_matches_items_and_subsets():
    ds = _tiny_memory_dataset()
    xs, ys = zip(*[ds[i] for i in range(len(ds))])
    batches = list(make_loader(ds, 10))
    assert [len(b[1]) for b in batches] == [10, 10, 10, 7]
    torch.testing.assert_close(torch.cat([b[0] for b in batches]), torch.stack(xs))
    assert torch.cat([b[1] for b in batches]).tolist() == list(ys)
    calib, rest = calibration_split(ds, 5, seed=3)
    sub = Subset(rest, [4, 0, 2])  # nested subsets are unwrapped
    x, y = next(iter(make_loader(sub, 8)))
    want = [rest.indices[i] for i in (4, 0, 2)]
    torch.testing.assert_close(x, torch.stack([xs[i] for i in want]))
    assert y.tolist() == [ys[i] for i in want]
    # seeded shuffling is reproducible and a permutation
    a = torch.cat([b[1] for b in make_loader(ds, 8, shuffle=True, seed=7)])
    b = torch.cat([b[1] for b in make_loader(ds, 8, shuffle=True, seed=7)])
    assert torch.equal(a, b) and sorted(a.tolist()) == sorted(ds.labels.tolist())
    assert len(list(make_loader(ds, 10, drop_last=True))) == 3


def test_make_loader_augmentation_seeded_and_workers():
    ds = _tiny_memory_dataset(augment=True)
    a = torch.cat([b[0] for b in make_loader(ds, 16, seed=1)])
    b = torch.cat([b[0] for b in make_loader(ds, 16, seed=1)])
    c = torch.cat([b[0] for b in make_loader(ds, 16, seed=2)])
    assert torch.equal(a, b) and not torch.equal(a, c)
    w1 = torch.cat([b[0] for b in make_loader(ds, 16, seed=1, workers=1)])
    w2 = torch.cat([b[0] for b in make_loader(ds, 16, seed=1, workers=1)])
    assert torch.equal(w1, w2) and w1.shape == a.shape


def test_make_loader_generic_dataset():
    td = TensorDataset(torch.arange(10).float().unsqueeze(1), torch.arange(10))
    ys = torch.cat([b[1] for b in make_loader(td, 4, shuffle=True, seed=0)])
    assert sorted(ys.tolist()) == list(range(10))
    with pytest.raises(ConfigError):
        make_loader(td, 0)


def test_dataset_info():
    info = dataset_info("MNIST")
    assert info.num_classes == 10 and info.input_shape == (1, 28, 28) and info.default_model == "lenet5"
    assert info.mean == (0.1307,) and info.std == (0.3081,)
    assert dataset_info("fashion_mnist").mean == (0.2860,)
    c = dataset_info("cifar-10")
    assert c.std == (0.2470, 0.2435, 0.2616) and c.augmentation and c.default_model == "resnet20"
    im = dataset_info("imagenet")
    assert im.input_shape == (3, 224, 224) and im.normalization.mean == (127.0,) * 3 and im.num_classes == 1000
    assert im.as_dict()["default_model"] == "efficientnet_lite0"
    with pytest.raises(ConfigError, match="valid names: mnist"):
        dataset_info("svhn")
