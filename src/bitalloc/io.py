"""File output and checked input: nothing a user had is overwritten half-way, lost, or read back corrupt.

**Atomic writes** (:func:`atomic_path`, and :func:`write_bytes`, :func:`write_text`, :func:`write_json`,
:func:`torch_save` built on it). The content goes to a temporary file ``.NAME.PID.XXXXXXXX.tmp`` in the
target's folder; it is verified (read back and compared, or the caller's check), ``fsync``-ed, given its final
mode and renamed over ``NAME`` in one ``os.replace`` (atomic on POSIX and Windows), and the folder is
``fsync``-ed where the platform allows it. A crash or an error at any point leaves the previous ``NAME``
untouched.

**Permissions.** A new file gets the mode every ordinary program gives it, ``0o666 & ~umask``; a file that
is replaced keeps its mode (``mkstemp``'s 0600 is never left behind).

**Stale temporary files.** An interrupted write (SIGKILL, power loss) can leave its temporary file behind.
Each successful write of ``NAME`` removes the temporary files of the same ``NAME`` that are more than
:data:`STALE_SECONDS` old and whose writing process is no longer running on this machine (or, where that cannot
be checked, and for the names of earlier bitalloc versions without a process id, that are more than a day /
:data:`STALE_SECONDS` old respectively).

**Checksums** (:func:`torch_save` / :func:`torch_load`). Every ``torch.save`` file bitalloc writes (training
checkpoints, ``quantized.pt``) is the ``torch.save`` zip archive followed by a 48-byte trailer: the 16 bytes
:data:`CHECKSUM_MAGIC` and the SHA-256 digest (FIPS 180-4) of every byte before the trailer. :func:`torch_load`
verifies the digest before unpickling anything (``weights_only=True``), so one flipped bit anywhere in the
file is a :class:`~bitalloc.errors.CheckpointError` naming the file and the fix. PyTorch's zip reader ignores
bytes after the archive, so ``torch.load`` still opens these files directly (without the check). Files
without the trailer (written by plain ``torch.save`` or by bitalloc before checksums) are refused with a
message saying so; :func:`add_checksum` adds one to a file the user trusts.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import secrets
import stat
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from bitalloc.errors import CheckpointError

#: first 16 bytes of the trailer of a checksummed ``torch.save`` file (followed by the 32-byte SHA-256)
CHECKSUM_MAGIC = b"\x89BITALLOC-SHA256"
TRAILER_BYTES = len(CHECKSUM_MAGIC) + 32
#: temporary files of an interrupted write are removed by the next write of the same target after this age
STALE_SECONDS = 60.0
_STALE_UNCHECKED_SECONDS = 86400.0  # where the writing process cannot be checked


# ---- atomic writes ---------------------------------------------------------------------------------------

def _temp_prefix(target: Path) -> str:
    return f".{target.name}."


def _create_temp(target: Path) -> Path:
    """Create ``.NAME.PID.XXXXXXXX.tmp`` next to ``target`` with mode ``0o666 & ~umask`` (O_EXCL: never reused)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = target.parent / f"{_temp_prefix(target)}{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, flags, 0o666))
            return tmp
        except FileExistsError:  # pragma: no cover - 2^-32 per try
            continue


def _fsync(path: Path, *, directory: bool = False) -> None:
    """``fsync`` a file (it must reach the disk before the rename makes it visible) or a folder (the rename
    itself; skipped where folders cannot be opened, e.g. Windows)."""
    if directory:
        if not hasattr(os, "O_DIRECTORY"):
            return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return
        try:
            os.fsync(fd)
        except OSError:  # some file systems cannot sync folders: the rename is still atomic
            pass
        finally:
            os.close(fd)
        return
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pid_running(pid: int) -> bool | None:
    """Whether process ``pid`` runs on this machine (None where that cannot be checked safely)."""
    if os.name != "posix":
        return None  # os.kill(pid, 0) would signal the process on Windows
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # OverflowError: not a pid at all
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def stale_temp_files(path: str | os.PathLike, *, now: float | None = None) -> list[Path]:
    """The temporary files of interrupted writes of ``path`` that :func:`atomic_path` removes (see the module
    docstring): ``.NAME.PID.XXXXXXXX.tmp`` older than :data:`STALE_SECONDS` whose process is gone (or older
    than a day where that cannot be checked), and ``.NAME.XXXXXXXX.tmp`` (earlier versions) older than
    :data:`STALE_SECONDS`. Never a temporary file of this process."""
    target = Path(path)
    prefix = _temp_prefix(target)
    now = time.time() if now is None else now
    out = []
    try:
        candidates = [p for p in target.parent.iterdir() if p.name.startswith(prefix) and p.name.endswith(".tmp")]
    except OSError:
        return []
    for p in candidates:
        middle = p.name[len(prefix):-len(".tmp")]
        try:
            age = now - p.lstat().st_mtime
        except OSError:
            continue
        if age < STALE_SECONDS:
            continue
        m = re.fullmatch(r"(\d+)\.[0-9a-f]{8}", middle)
        if m:
            pid = int(m.group(1))
            if pid == os.getpid():
                continue
            running = _pid_running(pid)
            if running is False or (running is None and age > _STALE_UNCHECKED_SECONDS):
                out.append(p)
        elif re.fullmatch(r"[A-Za-z0-9_]{8}", middle):  # tempfile.mkstemp names of earlier versions
            out.append(p)
    return sorted(out)


def _remove_stale_temps(target: Path) -> None:
    for p in stale_temp_files(target):
        try:
            p.unlink()
        except OSError:  # gone already, or not ours to remove: harmless
            pass


@contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True,
                verify: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success it replaces ``path`` in one rename.

    After the body, ``verify(tmp)`` (if given) checks the written file; it raises to refuse it. Then the
    file is ``fsync``-ed, given the replaced file's mode (a new file keeps ``0o666 & ~umask``), renamed over
    ``path``, and the folder is ``fsync``-ed; stale temporary files of ``path`` are removed (module docstring).
    If the body or ``verify`` raises, the temporary file is removed and ``path`` is untouched. With
    ``overwrite=False`` an existing ``path`` is an error (FileExistsError naming it) instead of being replaced.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not overwrite and target.exists():
        raise FileExistsError(f"{target} already exists; remove it or choose another output path.")
    try:
        keep_mode: int | None = stat.S_IMODE(os.stat(target).st_mode)
    except OSError:
        keep_mode = None
    tmp_path = _create_temp(target)
    try:
        yield tmp_path
        if verify is not None:
            verify(tmp_path)
        _fsync(tmp_path)
        if keep_mode is not None:
            os.chmod(tmp_path, keep_mode)
        os.replace(tmp_path, target)
        _fsync(target.parent, directory=True)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    _remove_stale_temps(target)


def _same_bytes(data: bytes) -> Callable[[Path], None]:
    def verify(tmp: Path) -> None:
        if tmp.read_bytes() != data:
            raise OSError(f"{tmp}: the bytes read back differ from those written (disk or file system error); "
                          "the previous file is unchanged")
    return verify


def write_bytes(path: str | os.PathLike, data: bytes, *, overwrite: bool = True,
                verify: Callable[[Path], None] | None = None) -> Path:
    """Write ``data`` to ``path`` atomically; the file is read back and compared (and ``verify(tmp)`` called)
    before it replaces anything."""
    check = _same_bytes(data)

    def both(tmp: Path) -> None:
        check(tmp)
        if verify is not None:
            verify(tmp)

    with atomic_path(path, overwrite=overwrite, verify=both) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str, *, overwrite: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return write_bytes(path, text.encode("utf-8"), overwrite=overwrite)


def write_json(path: str | os.PathLike, obj: Any, *, overwrite: bool = True) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (tensors and numpy values become lists/numbers)."""
    return write_text(path, json.dumps(to_jsonable(obj), indent=2, sort_keys=False) + "\n", overwrite=overwrite)


# ---- checksummed torch.save files --------------------------------------------------------------------------

def seal(payload: bytes) -> bytes:
    """``payload`` followed by the checksum trailer: :data:`CHECKSUM_MAGIC` + SHA-256(payload)."""
    return payload + CHECKSUM_MAGIC + hashlib.sha256(payload).digest()


def unseal(raw: bytes) -> tuple[bytes | None, str]:
    """Split a checksummed file into its payload: ``(payload, "ok")``; ``(None, "mismatch")`` when the trailer is
    there but the digest differs; ``(None, "damaged")`` when the trailer's magic is near the end but not where
    it belongs (a file cut short or extended); ``(None, "none")`` when there is no trailer (also: most truncated
    files)."""
    if len(raw) < TRAILER_BYTES or raw[-TRAILER_BYTES:-32] != CHECKSUM_MAGIC:
        return None, "damaged" if CHECKSUM_MAGIC in raw[-4 * TRAILER_BYTES:] else "none"
    payload = raw[:-TRAILER_BYTES]
    if hashlib.sha256(payload).digest() != raw[-32:]:
        return None, "mismatch"
    return payload, "ok"


def _torch_loads(payload: bytes, map_location: Any = "cpu") -> Any:
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)


def torch_save(obj: Any, path: str | os.PathLike, *, overwrite: bool = True) -> Path:
    """``torch.save`` to ``path`` atomically, with the SHA-256 trailer (module docstring).

    Before the file replaces anything it is read back and compared, and its payload is loaded once with
    ``torch.load(weights_only=True)`` (what :func:`torch_load` does), so a file bitalloc cannot read back is
    never written: that is a :class:`CheckpointError`.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    try:
        _torch_loads(payload)
    except Exception as exc:  # noqa: BLE001 - whatever torch refuses, the file would be unreadable
        raise CheckpointError(f"cannot write {path}: the object would not load back with torch.load(weights_only="
                              f"True) ({load_failure(exc)}); save plain tensors, numbers, strings, lists and dicts"
                              ) from None
    return write_bytes(path, seal(payload), overwrite=overwrite)


def _add_checksum_hint(p: Path) -> str:
    return f"python -c \"import bitalloc.io; bitalloc.io.add_checksum('{p}')\""


def torch_load(path: str | os.PathLike, *, what: str = "file", fix: str,
               map_location: str | torch.device = "cpu") -> Any:
    """Verify the SHA-256 trailer of a file written by :func:`torch_save`, then ``torch.load`` it
    (``weights_only=True``: nothing in the file can run code).

    ``what`` names the kind of file in messages ("checkpoint", "quantized model"); ``fix`` is the advice that
    ends them. Every failure is one :class:`CheckpointError` line naming the file: missing, unreadable,
    corrupt (checksum mismatch), truncated, without a checksum, or not loadable.
    """
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{what} {p} does not exist; check the path ({fix})") from None
    except IsADirectoryError:
        raise CheckpointError(f"{what} {p} is a directory; give the file inside it") from None
    except OSError as exc:
        raise CheckpointError(f"{what} {p} cannot be read ({exc.strerror or exc}); check its permissions") from None
    payload, status = unseal(raw)
    if status == "mismatch":
        raise CheckpointError(f"{what} {p} is corrupt: its SHA-256 checksum does not match its contents (the file "
                              f"changed after bitalloc wrote it); {fix}")
    if status == "damaged":
        raise CheckpointError(f"{what} {p} is truncated or extended: its checksum trailer is not at the end of the "
                              f"file; {fix}")
    if status == "none":
        try:
            _torch_loads(raw)
        except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError / UnpicklingError / EOFError / zip errors
            raise CheckpointError(f"{what} {p} is corrupt or truncated and cannot be read ({load_failure(exc)}); "
                                  f"{fix}") from None
        raise CheckpointError(f"{what} {p} carries no bitalloc checksum (written by plain torch.save, or by a "
                              f"bitalloc without checksums), so it cannot be verified; if you trust the file, add "
                              f"one with {_add_checksum_hint(p)}; otherwise {fix}")
    try:
        return _torch_loads(payload, map_location)
    except Exception as exc:  # noqa: BLE001 - a verified file torch cannot read: another torch version?
        raise CheckpointError(f"{what} {p} passes its checksum but torch {torch.__version__} cannot read it "
                              f"({load_failure(exc)}); {fix}") from None


def add_checksum(path: str | os.PathLike) -> Path:
    """Give a ``torch.save`` file (a checkpoint or ``quantized.pt`` of a bitalloc without checksums) the SHA-256
    trailer, so that :func:`torch_load` accepts it. Only for files you trust: whatever the file holds now is
    what the checksum certifies. The file must load with ``torch.load(weights_only=True)``; a file that
    already has a valid checksum is left as it is, one whose checksum does not match is refused."""
    p = Path(path)
    raw = p.read_bytes()
    _, status = unseal(raw)
    if status == "ok":
        return p
    if status != "none":
        raise CheckpointError(f"{p} already has a bitalloc checksum, and it does not match: the file is corrupt; "
                              "restore it from a backup")
    try:
        _torch_loads(raw)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{p} is not a readable torch.save file ({load_failure(exc)}); restore it from a "
                              "backup") from None
    return write_bytes(p, seal(raw))


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
