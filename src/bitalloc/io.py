"""Atomic file output: nothing a user had is overwritten half-way or lost silently."""

from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch


@contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces ``path`` in one rename.

    If the body raises, the temporary file is removed and ``path`` is untouched. With ``overwrite=False``
    an existing ``path`` is an error (FileExistsError naming it) instead of being replaced.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and target.exists():
        raise FileExistsError(f"{target} already exists; remove it or choose another output path.")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True) -> Path:
    """Write ``data`` to ``path`` atomically."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def write_json(path: str | os.PathLike, obj: Any, *, overwrite: bool = True) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (tensors and numpy values become lists/numbers)."""
    return write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n", overwrite=overwrite)


def torch_save(obj: Any, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """``torch.save`` to ``path`` atomically."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        torch.save(obj, tmp)
    return Path(path)


def load_failure(exc: BaseException) -> str:
    """One line saying why ``torch.load`` failed: the first sentence of torch's message (at most 200 characters),
    or for a file the ``weights_only`` unpickler rejects, the unpickler's own complaint. Torch's advice in that
    case (load with ``weights_only=False``) is wrong for a file that should be bitalloc's: that is not what it is."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    paragraphs = [q.strip() for q in re.split(r"\n\s*\n", text) if q.strip()]
    if paragraphs[0].startswith("Weights only load failed"):  # then advice, the unpickler's words, a doc link
        detail = " ".join(q for q in paragraphs[1:] if not q.startswith(("Please file an issue", "Check the doc")))
        detail = " ".join(detail.split()) or "no detail given"
        return f"not a file bitalloc wrote: unpickling failed, {detail[:200]}"
    first = text.splitlines()[0]
    return re.split(r"(?<=\.)\s", first, maxsplit=1)[0][:200]  # its first sentence


def to_jsonable(obj: Any) -> Any:
    """Convert tensors, numpy arrays/scalars, paths and dataclass-like objects into JSON-serialisable values."""
    import dataclasses

    import numpy as np

    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist()) if obj.ndim else obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, float) and obj != obj:  # NaN is not JSON
        return None
    return obj
