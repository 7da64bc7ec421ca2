"""Small real files of every kind bitalloc writes or reads, for the integrity and fuzz tests.

Each ``*_case`` function writes one file into a folder and returns a :class:`Case`: the file's bytes and a
``load(path)`` that reads a (possibly damaged) copy and returns something :func:`same` can compare with the
result of loading the undamaged file (``case.expected``).
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

import bitalloc
from tests.nets import make_net

NET_SHAPE = (3, 16, 16)


@dataclass
class Case:
    name: str
    raw: bytes
    load: Callable[[Path], Any]
    expected: Any
    suffix: str = ""


def same(a: Any, b: Any) -> bool:
    """Exact equality of nested loads: tensors / arrays bit for bit (dtype and shape too), containers item by
    item, everything else with ``==`` and the same type."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and np.array_equal(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def checkpoint_case(folder: Path) -> Case:
    """A training checkpoint as :func:`bitalloc.train.save_checkpoint` writes it: weights, SGD momentum,
    RNG states, history."""
    from bitalloc.train.checkpoint import capture_rng_state, load_checkpoint, model_spec, save_checkpoint

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    path = save_checkpoint(folder / "ck.pt", {
        "model": model_spec(model, name="mlp"), "model_state": model.state_dict(),
        "optimizer_state": opt.state_dict(), "epoch": 1, "step": 3, "total_steps": 9, "complete": False,
        "rng": [capture_rng_state()], "config": {"lr": 0.1, "batch_size": 4}, "history": [{"loss": 0.5}],
        "best": {"accuracy": 0.25, "epoch": 1}})
    return Case("checkpoint", path.read_bytes(), load_checkpoint, load_checkpoint(path), ".pt")


def _quantized_net() -> tuple[nn.Module, nn.Module, torch.Tensor]:
    net = make_net()
    x = torch.randn(8, *NET_SHAPE, generator=torch.Generator().manual_seed(0))
    q = bitalloc.quantize(net, bitalloc.preset("aciq", w_bits=3.5, a_bits=4), [(x,)], num_samples=8)
    return net, q, x


def _model_result(q: nn.Module, x: torch.Tensor) -> tuple[dict, torch.Tensor]:
    with torch.no_grad():
        return q.state_dict(), q(x)


def quantized_case(folder: Path) -> Case:
    """``quantized.pt`` of a small convolutional net at mixed per-channel widths (ACIQ W3.5A4)."""
    from bitalloc.model.serialize import load_quantized, save_quantized

    net, q, x = _quantized_net()
    path = save_quantized(q, folder / "quantized.pt", example_shape=NET_SHAPE)

    def load(p: Path) -> Any:
        return _model_result(load_quantized(p, net), x)

    return Case("quantized.pt", path.read_bytes(), load, _model_result(q, x), ".pt")


def packfile_case(folder: Path) -> Case:
    """A packed model file (``.bapk``) of the same net; the reference is the unpacked undamaged file."""
    from bitalloc.coding.packfile import pack_model, unpack_model

    net, q, x = _quantized_net()
    path = folder / "m.bapk"
    pack_model(q, path, example_shape=NET_SHAPE, compare_bitpack=False)

    def load(p: Path) -> Any:
        return _model_result(unpack_model(p, model=net), x)

    return Case("packed .bapk", path.read_bytes(), load, load(path), ".bapk")


def idx_gz_case(folder: Path) -> Case:
    """A gzip-compressed IDX image file (MNIST layout: uint8 [N, 28, 28])."""
    from bitalloc.data import read_idx, write_idx

    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    path = write_idx(folder / "train-images-idx3-ubyte.gz", images)
    return Case("IDX .gz", path.read_bytes(), read_idx, images, ".gz")


def image_zip_case(folder: Path) -> Case:
    """An ImageFolder zip (top folder, two classes) of 32x32 PNG and JPEG images, DEFLATE-compressed and
    stored members; loaded and decoded by :func:`bitalloc.data.imagefolder.load_image_folder_arrays`."""
    from bitalloc.data.cifar import CIFAR_PREPROCESS
    from bitalloc.data.imagefolder import load_image_folder_arrays

    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(4):
            img = io.BytesIO()
            fmt, ext = ("PNG", "png") if i % 2 else ("JPEG", "jpg")
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(img, format=fmt)
            z.writestr(f"set/c{i % 2}/im{i}.{ext}", img.getvalue(),
                       compress_type=zipfile.ZIP_DEFLATED if i < 2 else zipfile.ZIP_STORED)
    path = folder / "images.zip"
    path.write_bytes(buf.getvalue())

    def load(p: Path) -> Any:
        return load_image_folder_arrays(p, None, CIFAR_PREPROCESS, use_cache=False)

    return Case("image .zip", path.read_bytes(), load, load(path), ".zip")


def py2_cifar_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A CIFAR-10 batch pickled as the official (Python 2) files are: protocol 2, byte strings for keys, the
    dtype code and the array bytes, ``numpy.core.multiarray._reconstruct``."""
    raw = np.ascontiguousarray(data, dtype=np.uint8).tobytes()
    n, width = data.shape
    return (b"\x80\x02}q\x00(U\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\nq\x03"
            b"K\x00\x85U\x01b\x87Rq\x04(K\x01" + b"M" + struct.pack("<H", n) + b"M" + struct.pack("<H", width)
            + b"\x86cnumpy\ndtype\nq\x05U\x02u1K\x00K\x01\x87Rq\x06(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xff"
            b"K\x00tb\x89T" + struct.pack("<I", len(raw)) + raw + b"tbU\x06labels]q\x07("
            + b"".join(b"K" + bytes([v]) for v in labels) + b"eu.")


def cifar_batch_case(folder: Path) -> Case:
    """A python-version CIFAR-10 batch of 3 images in the official files' Python 2 pickle layout."""
    from bitalloc.data import read_cifar_batch

    data = np.random.default_rng(2).integers(0, 256, (3, 3072), dtype=np.uint8)
    path = folder / "data_batch_1"
    path.write_bytes(py2_cifar_batch(data, [3, 9, 0]))
    assert pickle.loads(path.read_bytes(), encoding="bytes")[b"labels"] == [3, 9, 0]  # numpy's own reading agrees
    return Case("CIFAR batch", path.read_bytes(), read_cifar_batch, read_cifar_batch(path))
