"""CIFAR-10 (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html) readers.

Two layouts:

- the official "python version": ``cifar-10-batches-py/`` with ``data_batch_1`` .. ``data_batch_5``,
  ``test_batch`` and ``batches.meta``, each a pickled dict; ``b"data"`` is ``uint8 [N, 3072]`` with the red,
  green and blue 32x32 planes one after the other (channel-first), ``b"labels"`` a list of ints.
  Either that folder or its parent may be given. The pickles are read with a restricted unpickler that only
  rebuilds numpy arrays and plain Python values (no arbitrary code runs); arrays are rebuilt from their checked
  shape, numeric dtype and byte count with ``np.frombuffer``, never by numpy's own unpickling code, which a
  damaged file can crash.
- ImageFolder: ``<root>/{train,test}/<class>/*.jpg|png`` as a folder or ``.zip`` (e.g. ``cifar10-jpeg.zip``
  with top folder ``cifar10-jpeg/``); decoded once and cached as ``.npy``.

Both give an :class:`~bitalloc.data.memory.InMemoryImageDataset` of ``uint8 [N, 32, 32, 3]`` normalized with
the standard mean ``(0.4914, 0.4822, 0.4465)`` and std ``(0.2470, 0.2435, 0.2616)``.
"""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Any

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


def _text(value: Any) -> Any:
    return value.decode("latin-1") if isinstance(value, bytes) else value


class _Dtype:
    """Stands for ``numpy.dtype(code, align, copy)`` while unpickling: only plain numeric codes, checked state."""

    def __init__(self, code: Any, align: Any = False, copy: Any = True) -> None:
        code = _text(code)  # Python 2 pickles (the official files) give byte strings
        if not isinstance(code, str) or code.lstrip("<>|=") not in _NUMERIC_CODES:
            raise pickle.UnpicklingError(f"refusing numpy dtype {str(code)[:20]!r} in a CIFAR batch file")
        self.dtype = np.dtype(code)

    def __setstate__(self, state: Any) -> None:
        # numpy's dtype state: (version, byte order, subarray, names, fields, item size, alignment, flags)
        if not isinstance(state, tuple) or len(state) < 2 or any(v is not None for v in state[2:5]):
            raise pickle.UnpicklingError("malformed numpy dtype state")
        order = _text(state[1])
        if order not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError(f"malformed numpy byte order {str(order)[:8]!r}")
        if order in ("<", ">") and self.dtype.itemsize > 1:
            self.dtype = self.dtype.newbyteorder(order)


class _Array:
    """Stands for ``numpy.core.multiarray._reconstruct(ndarray, ...)``; its state is checked (shape, dtype,
    byte count) and the array built with ``np.frombuffer``, so numpy's own ``__setstate__`` never sees bytes
    from the file (a damaged state can crash it)."""

    def __init__(self, cls: Any = None, shape: Any = None, typecode: Any = None) -> None:
        if cls is not _NDARRAY:
            raise pickle.UnpicklingError("malformed numpy array reconstruction")
        self.value: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        # numpy's ndarray state: (version, shape, dtype, Fortran order, raw bytes)
        if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[1], tuple)
                and all(isinstance(n, int) and n >= 0 for n in state[1]) and isinstance(state[2], _Dtype)
                and isinstance(state[4], bytes)):
            raise pickle.UnpicklingError("malformed numpy array state")
        shape, dtype, raw = state[1], state[2].dtype, state[4]
        if math.prod(shape) * dtype.itemsize != len(raw):
            raise pickle.UnpicklingError(f"numpy array of shape {shape} and dtype {dtype} needs "
                                         f"{math.prod(shape) * dtype.itemsize} bytes, the file holds {len(raw)}")
        self.value = np.frombuffer(raw, dtype).reshape(shape, order="F" if state[3] else "C").copy()


class _NDARRAY:  # what ``numpy.ndarray`` stands for while unpickling
    pass


def _scalar(dtype: Any, raw: Any = None) -> Any:
    if not isinstance(dtype, _Dtype) or not isinstance(raw, bytes) or len(raw) != dtype.dtype.itemsize:
        raise pickle.UnpicklingError("malformed numpy scalar")
    return np.frombuffer(raw, dtype.dtype)[0]


def _latin1(text: Any, encoding: Any = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 pickles of byte strings use it (``encode(str, "latin1")``)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("malformed byte string")
    return text.encode("latin-1")


def _resolve(obj: Any) -> Any:
    """Replace the stand-ins in the unpickled object by numpy arrays and dtypes."""
    if isinstance(obj, _Array):
        if obj.value is None:
            raise pickle.UnpicklingError("a numpy array without its data")
        return obj.value
    if isinstance(obj, _Dtype):
        return obj.dtype
    if isinstance(obj, dict):
        return {_resolve(k): _resolve(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v) for v in obj)
    return obj


_NUMERIC_CODES = {"b1", "u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f2", "f4", "f8"}


class _SafeUnpickler(pickle.Unpickler):
    """Unpickler that only allows what the CIFAR batches contain: numpy arrays (rebuilt by checked stand-ins,
    never by numpy's own unpickling code) and builtin containers."""

    _STANDINS: dict[tuple[str, str], Any] = {
        ("numpy.core.multiarray", "_reconstruct"): _Array, ("numpy._core.multiarray", "_reconstruct"): _Array,
        ("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _Dtype, ("numpy.core.multiarray", "scalar"): _scalar,
        ("numpy._core.multiarray", "scalar"): _scalar, ("_codecs", "encode"): _latin1,
        ("builtins", "list"): list, ("builtins", "dict"): dict, ("builtins", "tuple"): tuple,
        ("builtins", "bytes"): bytes,
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self._STANDINS:
            return self._STANDINS[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch file")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _resolve(_SafeUnpickler(f, encoding="bytes").load())
    except FileNotFoundError:
        raise DataError(f"{path} is missing; a cifar-10-batches-py folder holds "
                        f"{', '.join(_BATCHES['train'] + _BATCHES['test'])} and batches.meta.") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the CIFAR batch file ({exc.strerror or exc}); check its "
                        f"permissions, or re-copy it.") from None
    except Exception as exc:  # noqa: BLE001 - corrupt pickles fail in open-ended ways (UnpicklingError, EOFError,
        # LookupError from a damaged codec name, MemoryError from a damaged length, ValueError, ...)
        raise DataError(f"{path}: not a readable CIFAR batch pickle ({type(exc).__name__}: {str(exc)[:200]}); "
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
