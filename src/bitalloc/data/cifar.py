"""CIFAR-10 (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html) readers.

Two layouts:

- the official "python version": ``cifar-10-batches-py/`` with ``data_batch_1`` .. ``data_batch_5``,
  ``test_batch`` and ``batches.meta``, each a pickled dict; ``b"data"`` is ``uint8 [N, 3072]`` with the red,
  green and blue 32x32 planes one after the other (channel-first), ``b"labels"`` a list of ints.
  Either that folder or its parent may be given. The pickles are read with a restricted unpickler that only
  rebuilds numpy arrays and plain Python values (no arbitrary code runs).
- ImageFolder: ``<root>/{train,test}/<class>/*.jpg|png`` as a folder or ``.zip`` (e.g. ``cifar10-jpeg.zip``
  with top folder ``cifar10-jpeg/``); decoded once and cached as ``.npy``.

Both give an :class:`~bitalloc.data.memory.InMemoryImageDataset` of ``uint8 [N, 32, 32, 3]`` normalized with
the standard mean ``(0.4914, 0.4822, 0.4465)`` and std ``(0.2470, 0.2435, 0.2616)``.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from bitalloc.data.imagefolder import image_folder_in_memory
from bitalloc.data.memory import InMemoryImageDataset
from bitalloc.data.transforms import CIFAR10_NORM, Preprocess
from bitalloc.errors import ConfigError, DataError

__all__ = ["CIFAR10_CLASSES", "read_cifar_batch", "load_cifar10_python", "load_cifar10_imagefolder", "load_cifar10",
           "find_cifar_python_dir"]

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
_BATCHES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_PY_DIR = "cifar-10-batches-py"
CIFAR_PREPROCESS = Preprocess("cifar10-rgb", None, None, CIFAR10_NORM)


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that only allows what the CIFAR batches contain: numpy arrays and builtin containers."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"), ("_codecs", "encode"),
        ("builtins", "list"), ("builtins", "dict"), ("builtins", "tuple"), ("builtins", "bytes"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self._ALLOWED:
            if module.startswith("numpy.core.") and hasattr(np, "_core"):  # numpy 2 renamed numpy.core
                module = "numpy._core." + module[len("numpy.core."):]
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _SafeUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path} is missing; a cifar-10-batches-py folder holds "
                        f"{', '.join(_BATCHES['train'] + _BATCHES['test'])} and batches.meta.") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"{path}: not a readable CIFAR batch pickle ({type(exc).__name__}: {exc}); "
                        f"the file is truncated or corrupt; re-copy it.") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: expected a pickled dict, got {type(obj).__name__}.")
    return obj


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(uint8 [N, 32, 32, 3], int64 [N])`` from one python-version CIFAR-10 batch file.

    Row ``i`` of ``b"data"`` is 1024 red, then 1024 green, then 1024 blue values, each plane row-major.
    """
    path = Path(path)
    d = _unpickle(path)
    data = d.get(b"data", d.get("data"))
    labels = d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        raise DataError(f"{path}: the pickled dict has no b'data'/b'labels' entries (keys: {list(d)}).")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise DataError(f"{path}: b'data' should be uint8 [N, 3072], got {data.dtype} {list(data.shape)}.")
    labels = np.asarray(labels, dtype=np.int64)
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {data.shape[0]} images but {labels.size} labels.")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels range {labels.min()}..{labels.max()}, expected 0..9.")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def find_cifar_python_dir(root: str | os.PathLike) -> Path | None:
    """``root`` or ``root/cifar-10-batches-py`` if it holds the python-version batches, else None."""
    root = Path(root).expanduser()
    for cand in (root, root / _PY_DIR):
        if cand.is_dir() and (cand / "test_batch").is_file():
            return cand
    return None


def _check_split(split: str) -> None:
    if split not in _BATCHES:
        raise ConfigError(f"split={split!r} is not a CIFAR-10 split; use 'train' or 'test'.")


def load_cifar10_python(root: str | os.PathLike, split: str, *, augment: bool = False) -> InMemoryImageDataset:
    """CIFAR-10 ``split`` from the official ``cifar-10-batches-py`` folder (or its parent)."""
    _check_split(split)
    folder = find_cifar_python_dir(root)
    if folder is None:
        raise DataError(f"{root}: no CIFAR-10 python batches (expected {_PY_DIR}/ with data_batch_1..5, "
                        f"test_batch, batches.meta, in it or below it).")
    parts = [read_cifar_batch(folder / name) for name in _BATCHES[split]]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    classes = CIFAR10_CLASSES
    meta = folder / "batches.meta"
    if meta.is_file():
        names = _unpickle(meta).get(b"label_names")
        if names:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
    return InMemoryImageDataset(torch.from_numpy(images), torch.from_numpy(labels), CIFAR10_NORM, augment=augment,
                                classes=classes, source=str(folder))


def load_cifar10_imagefolder(root: str | os.PathLike, split: str, *, augment: bool = False,
                             cache_dir: str | os.PathLike | None = None,
                             use_cache: bool = True) -> InMemoryImageDataset:
    """CIFAR-10 ``split`` from ``<root>/{train,test}/<class>/*`` (folder or .zip), decoded once and cached."""
    _check_split(split)
    ds = image_folder_in_memory(root, split, CIFAR_PREPROCESS, augment=augment, cache_dir=cache_dir,
                                use_cache=use_cache, cache_name="cifar10")
    if ds.sample_shape != (3, 32, 32):
        raise DataError(f"{root}: CIFAR-10 images must be 32x32 RGB, got {ds.sample_shape} (C, H, W).")
    if ds.num_classes != 10:
        raise DataError(f"{root}/{split}: expected 10 class folders, found {ds.num_classes}: {ds.classes}.")
    return ds


def load_cifar10(root: str | os.PathLike, split: str, *, augment: bool = False,
                 cache_dir: str | os.PathLike | None = None) -> InMemoryImageDataset:
    """CIFAR-10 from either layout: python batches (``root`` or ``root/cifar-10-batches-py``), else ImageFolder."""
    _check_split(split)
    root = Path(root).expanduser()
    if find_cifar_python_dir(root) is not None:
        return load_cifar10_python(root, split, augment=augment)
    if not root.exists():
        raise DataError(f"{root} does not exist; CIFAR-10 is a cifar-10-batches-py folder or an ImageFolder "
                        f"folder/.zip with train/ and test/. Pass --data PATH or set BITALLOC_DATA.")
    return load_cifar10_imagefolder(root, split, augment=augment, cache_dir=cache_dir)
