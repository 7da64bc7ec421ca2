"""Seeded fuzzing of every file kind bitalloc writes or reads: each damaged copy must load exactly like the
undamaged file or fail with a bitalloc error (a :class:`~bitalloc.errors.BitallocError`), never with another
exception (a traceback in the CLI) and never as a silently different model.

Mutations: one flipped bit, one byte replaced, truncation, a few random bytes inserted or deleted, a span
zeroed, a span copied over another place. Trial counts are fixed (seeded, a few seconds in all).

What each format can promise differs, and the test checks exactly that:

* checkpoints, ``quantized.pt``, packed ``.bapk`` files and gzip-compressed IDX files carry checksums (SHA-256;
  gzip's CRC-32 and length), so a damaged copy is an exact load or an error;
* image zips protect each member's bytes (CRC-32) and name (local header vs central directory) when it is
  read, but not the central directory's list of members: a damaged copy may load with a member missing or
  renamed, and only then may its result differ;
* python-version CIFAR batches are bare pickles without any checksum: a damaged copy may load different
  pixels; it must never crash (the reader rebuilds arrays itself, so numpy's unpickling never sees them).
"""

from __future__ import annotations

import random
import warnings
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from bitalloc.errors import BitallocError
from tests.filecases import (Case, cifar_batch_case, checkpoint_case, idx_gz_case, image_zip_case, packfile_case,
                             quantized_case, same)

pytestmark = pytest.mark.usefixtures("one_thread")


def mutate(raw: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One random damage of ``raw`` and its description."""
    b = bytearray(raw)
    i = rng.randrange(len(b))
    kind = rng.randrange(7)
    if kind == 0:
        bit = rng.randrange(8)
        b[i] ^= 1 << bit
        return bytes(b), f"bit {bit} of byte {i} flipped"
    if kind == 1:
        b[i] = (b[i] + rng.randrange(1, 256)) % 256
        return bytes(b), f"byte {i} replaced"
    if kind == 2:
        return bytes(b[:i]), f"truncated to {i} bytes"
    n = rng.randrange(1, 9)
    if kind == 3:
        b[i:i] = bytes(rng.randrange(256) for _ in range(n))
        return bytes(b), f"{n} bytes inserted at {i}"
    if kind == 4:
        del b[i:i + n]
        return bytes(b), f"{n} bytes deleted at {i}"
    n = rng.randrange(1, 65)
    if kind == 5:
        b[i:i + n] = bytes(len(b[i:i + n]))
        return bytes(b), f"{n} bytes zeroed at {i}"
    j = rng.randrange(len(b))
    b[j:j + n] = raw[i:i + n][: len(b[j:j + n])]
    return bytes(b), f"{n} bytes at {i} copied to {j}"


def _zip_names(path: Path) -> list[str] | None:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except Exception:  # noqa: BLE001 - any damage that zipfile itself notices
        return None


def fuzz(case: Case, folder: Path, trials: int, seed: int) -> tuple[Counter, list[str]]:
    """Load ``trials`` damaged copies of ``case``; return the outcome counts and the failures."""
    rng = random.Random(seed)
    counts: Counter = Counter()
    failures: list[str] = []
    original_names = _zip_names(folder / "orig.zip") if case.suffix == ".zip" else None
    for t in range(trials):
        data, what = mutate(case.raw, rng)
        if data == case.raw:
            continue
        path = folder / f"fuzz{t}{case.suffix}"  # a new file each time: rewriting one file is slow on some disks
        path.write_bytes(data)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = case.load(path)
        except BitallocError as exc:
            counts["rejected"] += 1
            if "\n" in str(exc):
                failures.append(f"{what}: a multi-line error: {exc!r}")
        except Exception as exc:  # noqa: BLE001 - exactly what the test looks for
            failures.append(f"{what}: {type(exc).__name__}: {str(exc)[:200]}")
        else:
            if same(result, case.expected):
                counts["exact"] += 1
            elif case.name == "CIFAR batch":
                counts["different (no checksum in the format)"] += 1
            elif case.suffix == ".zip" and _zip_names(path) != original_names:
                counts["different member list"] += 1
            else:
                failures.append(f"{what}: loaded silently as something different")
        path.unlink()
    return counts, failures


CASES = [(checkpoint_case, 800), (quantized_case, 800), (packfile_case, 800), (idx_gz_case, 1500),
         (image_zip_case, 800), (cifar_batch_case, 2000)]


@pytest.mark.parametrize("make,trials", CASES, ids=[m.__name__.removesuffix("_case") for m, _ in CASES])
def test_damaged_files_load_exactly_or_fail_with_a_bitalloc_error(tmp_path, make, trials):
    case = make(tmp_path)
    if case.suffix == ".zip":
        (tmp_path / "orig.zip").write_bytes(case.raw)
    counts, failures = fuzz(case, tmp_path, trials, seed=18)
    assert not failures, f"{len(failures)} of {trials} damaged {case.name} files: " + "; ".join(failures[:5])
    assert counts["rejected"] > trials // 4, counts  # the mutations really damage the files


def test_cifar_batches_are_rebuilt_without_numpy_unpickling(tmp_path):
    """The official files' layout decodes (reference: numpy's reading of the same pickle); a damaged dtype
    state (two bytes deleted, as one fuzz case found) used to reach numpy's ``__setstate__`` and crash the
    interpreter (segmentation fault); now it is a DataError, like a wrong byte count or a non-numeric dtype."""
    import pickle

    import numpy as np

    from bitalloc.data import read_cifar_batch
    from bitalloc.errors import DataError
    from tests.filecases import py2_cifar_batch

    data = np.random.default_rng(5).integers(0, 256, (2, 3072), dtype=np.uint8)
    good = py2_cifar_batch(data, [4, 7])
    path = tmp_path / "data_batch_1"
    path.write_bytes(good)
    images, labels = read_cifar_batch(path)
    reference = pickle.loads(good, encoding="bytes")
    assert np.array_equal(reference[b"data"], data) and reference[b"labels"] == [4, 7]
    assert np.array_equal(images, data.reshape(2, 3, 32, 32).transpose(0, 2, 3, 1)) and labels.tolist() == [4, 7]
    for old, new, message in [(b"U\x01|NNNJ", b"U\x01|NJ", "malformed numpy dtype state"),
                              (b"U\x02u1K", b"U\x02O8K", "refusing numpy dtype"),
                              (b"M\x00\x0c\x86", b"M\x01\x0c\x86", "needs 6146 bytes, the file holds 6144")]:
        assert good.count(old) == 1
        path.write_bytes(good.replace(old, new))
        with pytest.raises(DataError, match=message):
            read_cifar_batch(path)
