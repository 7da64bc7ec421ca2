"""IDX files (MNIST, Fashion-MNIST) and the MNIST-like datasets built from them.

Format (LeCun et al., http://yann.lecun.com/exdb/mnist/): a 4-byte magic number ``0x00 0x00 <dtype code>
<number of dimensions>``, then each dimension as a big-endian unsigned 32-bit integer, then the data in
C order, big-endian. Dtype codes: 0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from bitalloc.data.memory import InMemoryImageDataset
from bitalloc.data.transforms import Normalization
from bitalloc.errors import ConfigError, DataError

__all__ = ["read_idx", "write_idx", "find_mnist_files", "load_mnist_like", "MNIST_FILES"]

_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

#: split -> (images base name, labels base name); each may also end in ``.gz``.
MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_EXPECTED = ", ".join(f"{n}[.gz]" for pair in MNIST_FILES.values() for n in pair)


def _read_bytes(path: Path) -> bytes:
    if not path.exists():
        raise DataError(f"{path} does not exist; expected an IDX file such as train-images-idx3-ubyte[.gz] "
                        f"(an MNIST-like folder holds {_EXPECTED}).")
    if path.is_dir():
        raise DataError(f"{path} is a folder, not an IDX file; expected one of {_EXPECTED} inside it.")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file name says
        try:
            return gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip data ({exc}); re-copy the file.") from None
    if path.suffix == ".gz":
        raise DataError(f"{path}: named .gz but is not gzip data (first bytes {raw[:4].hex()}); "
                        f"re-copy the file or remove the .gz suffix if it is a raw IDX file.")
    return raw


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw, or gzip-compressed) into a native-endian numpy array.

    Validates the magic number, the dtype code, the number of dimensions and the exact payload size. A
    missing, truncated or corrupt file raises :class:`~bitalloc.errors.DataError` naming the file and the
    problem.
    """
    path = Path(path).expanduser()
    data = _read_bytes(path)
    if len(data) < 4:
        raise DataError(f"{path}: {len(data)} bytes, too short for an IDX header; file truncated; re-copy it.")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise DataError(f"{path}: bad magic number 0x{data[:4].hex()} (an IDX file starts with two zero bytes); "
                        f"not an IDX file, or corrupt.")
    if code not in _DTYPES:
        raise DataError(f"{path}: unknown IDX dtype code 0x{code:02x} (valid: "
                        f"{', '.join(f'0x{c:02x}' for c in _DTYPES)}); not an IDX file, or corrupt.")
    if ndim == 0:
        raise DataError(f"{path}: IDX header declares 0 dimensions; corrupt file.")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: expected a {header}-byte header, got {len(data)} bytes: file truncated; re-copy it.")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    dtype = _DTYPES[code]
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) != expected:
        problem = "file truncated; re-copy it" if len(data) < expected else "trailing bytes; the file is corrupt"
        raise DataError(f"{path}: header says {'x'.join(map(str, dims))} {dtype.name} values, so expected "
                        f"{expected} bytes, got {len(data)}: {problem}.")
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=True)


def write_idx(path: str | os.PathLike, array: np.ndarray, *, compress: bool | None = None) -> Path:
    """Write ``array`` as an IDX file (gzip-compressed if ``compress``, default: when the name ends in .gz).

    Used by tests and to export data; the inverse of :func:`read_idx`.
    """
    from bitalloc.io import write_bytes

    path = Path(path)
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _DTYPES.items()}
    dt = array.dtype.newbyteorder("=")
    if dt not in codes:
        raise ConfigError(f"IDX cannot store dtype {array.dtype}; use uint8, int8, int16, int32, float32 or float64.")
    code = codes[dt]
    payload = struct.pack(">HBB", 0, code, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += np.ascontiguousarray(array, dtype=_DTYPES[code]).tobytes()
    if compress if compress is not None else path.suffix == ".gz":
        payload = gzip.compress(payload, mtime=0)
    return write_bytes(path, payload)


def find_idx_file(folder: Path, base: str) -> Path | None:
    variants = [base, base.replace("-idx", ".idx")]
    for v in variants:
        for name in (v, v + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def find_mnist_files(folder: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """Paths of the (images, labels) IDX files of ``split`` ("train" or "test") in ``folder``."""
    folder = Path(folder).expanduser()
    if split not in MNIST_FILES:
        raise ConfigError(f"split={split!r} is not an MNIST split; use one of: {', '.join(MNIST_FILES)}.")
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder; an MNIST-like dataset is a folder with {_EXPECTED}. "
                        f"Pass --data PATH or set BITALLOC_DATA.")
    found = [find_idx_file(folder, base) for base in MNIST_FILES[split]]
    missing = [base for base, p in zip(MNIST_FILES[split], found) if p is None]
    if missing:
        raise DataError(f"{folder} lacks {', '.join(m + '[.gz]' for m in missing)}; an MNIST-like folder holds "
                        f"{_EXPECTED}. Pass --data PATH or set BITALLOC_DATA.")
    return found[0], found[1]  # type: ignore[return-value]


def load_mnist_like(folder: str | os.PathLike, split: str, *, mean: float, std: float,
                    num_classes: int = 10, classes: list[str] | None = None) -> InMemoryImageDataset:
    """Load an MNIST-like split fully into memory.

    Items are ``(float32 tensor [1, 28, 28], int label)`` with ``x = (pixel / 255 - mean) / std``.
    """
    img_path, lbl_path = find_mnist_files(folder, split)
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(f"{img_path}: expected uint8 images [N, H, W], got {images.dtype} {list(images.shape)}.")
    if labels.ndim != 1:
        raise DataError(f"{lbl_path}: expected a 1-D label vector, got shape {list(labels.shape)}.")
    if len(images) != len(labels):
        raise DataError(f"{img_path} holds {len(images)} images but {lbl_path} holds {len(labels)} labels; "
                        f"the files do not belong together.")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{lbl_path}: labels range {labels.min()}..{labels.max()}, expected 0..{num_classes - 1}.")
    return InMemoryImageDataset(
        torch.from_numpy(images[..., None]),  # [N, H, W, 1]
        torch.from_numpy(labels.astype(np.int64)),
        Normalization((mean,), (std,), scale=255.0),
        classes=classes if classes is not None else [str(i) for i in range(num_classes)],
        source=str(img_path.parent),
    )
