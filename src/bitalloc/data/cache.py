"""On-disk cache of decoded / preprocessed image arrays.

Decoding 60,000 CIFAR-10 JPEGs or resizing 1,000 ImageNet photos takes seconds to minutes; the decoded
``uint8`` arrays are kept as ``.npy`` files so the next load is a plain ``np.load``.

Where: the ``cache_dir`` argument, else the environment variable ``BITALLOC_CACHE``, else
``~/.cache/bitalloc``.

Keys: every entry is named ``<name>-<key>`` where ``key`` is a hash of the source file's absolute path, its
size and modification time (nanoseconds), and the parameters of the transform that produced the arrays. Any
change to the source or the parameters therefore gives a new entry (old ones are left for the user to delete).

Files of one entry: ``<name>-<key>.<array>.npy`` for each array, plus ``<name>-<key>.json`` with each array's
shape, dtype and CRC-32, written last. Every file is written atomically (:func:`bitalloc.io.atomic_path`). An
entry whose JSON is missing, unreadable or does not match its arrays (truncated, corrupt, wrong shape) is
ignored with a warning and rebuilt; a cache folder that cannot be written only costs a warning.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from bitalloc.io import atomic_path, write_json

__all__ = ["CACHE_ENV", "CacheWarning", "resolve_cache_dir", "cache_key", "cached_arrays"]

CACHE_ENV = "BITALLOC_CACHE"
_FORMAT_VERSION = 1


class CacheWarning(UserWarning):
    """A cache entry was unusable (corrupt, truncated) or could not be written; the data is rebuilt."""


def resolve_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``cache_dir`` if given, else ``$BITALLOC_CACHE``, else ``~/.cache/bitalloc``."""
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV, "")
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/bitalloc").expanduser()


def cache_key(source: str | os.PathLike, params: Mapping[str, Any] | None = None) -> str:
    """A 20-hex-digit key from the source's absolute path, size, mtime (ns) and the JSON-able ``params``."""
    path = Path(source).expanduser().resolve()
    st = path.stat()
    blob = json.dumps({"v": _FORMAT_VERSION, "path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                       "params": dict(params or {})}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]


def _crc(arr: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(arr)).cast("B")) & 0xFFFFFFFF


def _load_entry(stem: Path, names: list[str] | None) -> dict[str, np.ndarray] | None:
    """Load one cache entry; None if absent; raises on any inconsistency (the caller warns and rebuilds)."""
    meta_path = stem.with_name(stem.name + ".json")
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text("utf-8"))
    if meta.get("version") != _FORMAT_VERSION or not isinstance(meta.get("arrays"), dict):
        raise ValueError(f"{meta_path} has an unknown format")
    if names is not None and sorted(meta["arrays"]) != sorted(names):
        raise ValueError(f"{meta_path} lists arrays {sorted(meta['arrays'])}, expected {sorted(names)}")
    out: dict[str, np.ndarray] = {}
    for name, info in meta["arrays"].items():
        arr_path = stem.with_name(f"{stem.name}.{name}.npy")
        arr = np.load(arr_path, allow_pickle=False)
        if list(arr.shape) != list(info["shape"]) or str(arr.dtype) != info["dtype"]:
            raise ValueError(f"{arr_path} has shape {arr.shape} {arr.dtype}, expected {info['shape']} {info['dtype']}")
        if _crc(arr) != int(info["crc32"]):
            raise ValueError(f"{arr_path} fails its CRC-32 check")
        out[name] = arr
    return out


def _save_entry(stem: Path, arrays: Mapping[str, np.ndarray], params: Mapping[str, Any], source: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {"version": _FORMAT_VERSION, "source": str(source), "params": dict(params), "arrays": {}}
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        with atomic_path(stem.with_name(f"{stem.name}.{name}.npy")) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, arr, allow_pickle=False)
        meta["arrays"][name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "crc32": _crc(arr)}
    write_json(stem.with_name(stem.name + ".json"), meta)  # written last: its presence marks a complete entry


def cached_arrays(name: str, source: str | os.PathLike, params: Mapping[str, Any],
                  build: Callable[[], Mapping[str, np.ndarray]], *,
                  cache_dir: str | os.PathLike | None = None, use_cache: bool = True) -> dict[str, np.ndarray]:
    """Return the arrays ``build()`` makes from ``source``, from the cache when a valid entry exists.

    ``name`` is a readable prefix for the files (e.g. ``"cifar10-train"``), ``params`` everything besides the
    source that changes the result (transform sizes, split, reader version). ``use_cache=False`` always builds
    and writes nothing.
    """
    if not use_cache:
        return {k: np.asarray(v) for k, v in build().items()}
    source = Path(source).expanduser()
    folder = resolve_cache_dir(cache_dir)
    stem = folder / f"{name}-{cache_key(source, params)}"
    try:
        hit = _load_entry(stem, None)
    except Exception as exc:  # noqa: BLE001 - any unreadable entry is rebuilt, never fatal
        warnings.warn(f"ignoring corrupt cache entry {stem}.* ({type(exc).__name__}: {exc}); rebuilding it",
                      CacheWarning, stacklevel=2)
        hit = None
    if hit is not None:
        return hit
    arrays = {k: np.ascontiguousarray(v) for k, v in build().items()}
    try:
        _save_entry(stem, arrays, params, source.resolve())
    except OSError as exc:
        warnings.warn(f"could not write the cache entry {stem}.* ({exc}); set {CACHE_ENV} or pass a writable "
                      f"cache folder to keep decoded data between runs", CacheWarning, stacklevel=2)
    return arrays
