"""ImageFolder-layout readers: ``<root>/<class>/.../<image>`` in a folder or a ``.zip``.

Classes are the sorted names of the first-level subfolders of the root (as torchvision's ``ImageFolder``);
every image file below a class folder (any depth, sorted by path) belongs to that class. In a ``.zip`` whose
members all sit below one top folder (``cifar10-jpeg/...``, ``imagenet-sample/...``), that folder is the
root. Images are decoded with PIL and converted to RGB (or the transform's mode).
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from bitalloc.data.cache import cached_arrays
from bitalloc.data.memory import InMemoryImageDataset
from bitalloc.data.transforms import Preprocess, get_transform
from bitalloc.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "ImageSource", "ImageFolder", "load_image_folder_arrays", "image_folder_in_memory"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
_READER_VERSION = 1


def _is_image(name: str) -> bool:
    base = PurePosixPath(name).name
    return not base.startswith(".") and base.lower().endswith(IMAGE_EXTENSIONS)


class ImageSource:
    """Read-only access to the files of a folder or a zip archive, by relative POSIX path.

    ``prefix`` is the root inside the archive (the single top folder, when there is one). Zip handles are
    opened lazily per process, so the object can be used from DataLoader workers.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).expanduser()
        if not self.path.exists():
            raise DataError(f"{self.path} does not exist; expected an ImageFolder-layout folder or .zip "
                            f"(<root>/<class>/<image>). Pass --data PATH or set BITALLOC_DATA.")
        self.is_zip = self.path.is_file()
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid: int | None = None
        if self.is_zip:
            if not zipfile.is_zipfile(self.path):
                raise DataError(f"{self.path} is a file but not a zip archive (or a corrupt one); give an "
                                f"ImageFolder-layout folder or .zip.")
            names = [n for n in self._zipfile().namelist() if not n.endswith("/") and "__MACOSX" not in n]
            self.files = sorted(names)
            tops = {n.split("/", 1)[0] for n in names}
            # One top folder above class folders: it is the root (a lone class folder is not stripped).
            if len(tops) == 1 and names and all(n.count("/") >= 2 for n in names):
                self.prefix = tops.pop() + "/"
            else:
                self.prefix = ""
        else:
            self.prefix = ""
            self.files = sorted(p.relative_to(self.path).as_posix()
                                for p in self.path.rglob("*") if p.is_file())

    def _zipfile(self) -> zipfile.ZipFile:
        if self._zip is None or self._zip_pid != os.getpid():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
                # NotImplementedError: a zip version / feature Python's zipfile cannot read (or a corrupt header)
                raise DataError(f"{self.path}: cannot open the zip archive ({type(exc).__name__}: {exc}); it is "
                                f"corrupt or uses a zip feature Python cannot read: re-copy it, or re-create it "
                                f"with plain DEFLATE compression (e.g. `zip -r`).") from None
            self._zip_pid = os.getpid()
        return self._zip

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_zip"] = None
        state["_zip_pid"] = None
        return state

    def listdir(self, subdir: str = "") -> list[str]:
        """Sorted names of the folders directly below ``subdir`` (relative to the root)."""
        base = self.prefix + (subdir.strip("/") + "/" if subdir.strip("/") else "")
        out = set()
        for f in self.files:
            if f.startswith(base):
                rest = f[len(base):]
                if "/" in rest:
                    out.add(rest.split("/", 1)[0])
        return sorted(d for d in out if not d.startswith("."))

    def images_below(self, subdir: str) -> list[str]:
        """Sorted relative paths (from the root) of the image files below ``subdir``."""
        base = self.prefix + subdir.strip("/") + "/"
        return [f[len(self.prefix):] for f in self.files if f.startswith(base) and _is_image(f)]

    def read(self, rel: str) -> bytes:
        """The bytes of the file at ``rel`` (relative to the root)."""
        if self.is_zip:
            try:
                return self._zipfile().read(self.prefix + rel)
            except NotImplementedError as exc:  # compression method or zip version zipfile cannot read
                raise DataError(f"{self.path}: cannot read {self.prefix + rel} ({exc}); the archive is corrupt or "
                                f"uses a feature Python's zipfile lacks: re-copy it, or re-create it with plain "
                                f"DEFLATE compression (e.g. `zip -r`).") from None
            except (zipfile.BadZipFile, KeyError, OSError, EOFError, zlib.error, RuntimeError, ValueError) as exc:
                # zlib.error: a corrupt DEFLATE stream; RuntimeError: an encrypted member
                raise DataError(f"{self.path}: cannot read {self.prefix + rel} ({exc}); the archive is "
                                f"truncated or corrupt; re-copy it.") from None
        return (self.path / rel).read_bytes()

    def open_image(self, rel: str) -> Image.Image:
        """Decode the image at ``rel`` with PIL (fully loaded)."""
        try:
            img = Image.open(io.BytesIO(self.read(rel)))
            img.load()
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise DataError(f"{self.path}: cannot decode image {rel} ({exc}); the file is corrupt.") from None
        except Image.DecompressionBombError as exc:  # far more pixels than any real photo: refuse to decode it
            raise DataError(f"{self.path}: image {rel} is too large to decode safely ({exc}); remove it from the "
                            "data set or shrink it.") from None
        return img

    def describe(self, rel: str = "") -> str:
        where = f"{self.path}" + (f" (inside: {self.prefix}{rel})" if self.is_zip else (f"/{rel}" if rel else ""))
        return where


def scan_classes(source: ImageSource, subdir: str = "") -> tuple[list[str], list[tuple[str, int]]]:
    """``(classes, samples)`` below ``subdir``: sorted class folder names and ``(path, label)`` pairs.

    One pass over the file list; ``path`` is relative to the root, samples are sorted by class then path.
    """
    base = source.prefix + (subdir.strip("/") + "/" if subdir.strip("/") else "")
    by_class: dict[str, list[str]] = {}
    for f in source.files:
        if not f.startswith(base):
            continue
        rest = f[len(base):]
        if "/" not in rest:
            continue  # a file directly in the root belongs to no class
        cls = rest.split("/", 1)[0]
        if cls.startswith("."):
            continue
        files = by_class.setdefault(cls, [])
        if _is_image(f):
            files.append(f[len(source.prefix):])
    classes = sorted(by_class)
    samples = [(p, label) for label, cls in enumerate(classes) for p in sorted(by_class[cls])]
    if not samples:
        where = source.describe(subdir)
        raise DataError(f"{where}: no images in an ImageFolder layout (<root>/<class>/<image> with extensions "
                        f"{', '.join(IMAGE_EXTENSIONS)}); found class folders: {classes or 'none'}.")
    return classes, samples


def _listing_signature(source: ImageSource, samples: list[tuple[str, int]]) -> str | None:
    """For a folder source, a hash of every image's path, size and mtime (a folder's own mtime misses edits)."""
    if source.is_zip:
        return None
    h = hashlib.sha256()
    for rel, _ in samples:
        st = (source.path / rel).stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _resolve_subdir(source: ImageSource, split: str | None) -> str:
    if split in (None, "", "all"):
        return ""
    if split in source.listdir(""):
        return split
    raise DataError(f"{source.path} has no '{split}' folder (found: {', '.join(source.listdir('')) or 'none'}); a "
                    f"data set with train and test splits needs <root>/{split}/<class>/<image>; for one folder of "
                    "class folders use --dataset imagefolder (Python: ImageFolder(root, split='all')).")


class ImageFolder(Dataset):
    """Lazy ImageFolder dataset over a folder or ``.zip``: items are ``(transform(PIL image), label)``.

    ``split``: a first-level folder to read (``"train"``, ``"test"``, ...), or ``"all"``/None for the root.
    ``transform``: a callable on the PIL image, or a name for :func:`get_transform`; default ``"to-tensor"``
    (RGB float32 ``[3, H, W]`` in 0..1).
    """

    def __init__(self, root: str | os.PathLike, split: str | None = "all", *,
                 transform: Callable[[Image.Image], object] | str | None = None) -> None:
        self.source = ImageSource(root)
        self.split = split
        self.subdir = _resolve_subdir(self.source, split)
        self.classes, self.samples = scan_classes(self.source, self.subdir)
        self.transform = get_transform(transform or "to-tensor") if isinstance(transform, (str, type(None))) \
            else transform
        self.targets = [label for _, label in self.samples]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Image.Image, int]:
        """The undecorated ``(PIL image, label)`` of item ``index``."""
        rel, label = self.samples[index]
        return self.source.open_image(rel), label

    def __getitem__(self, index: int) -> tuple[object, int]:
        img, label = self.load(index)
        return self.transform(img), label

    def __repr__(self) -> str:
        return f"ImageFolder({str(self.source.path)!r}, split={self.split!r}, n={len(self)}, classes={self.num_classes})"


def load_image_folder_arrays(root: str | os.PathLike, split: str | None, preprocess: Preprocess, *,
                             cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                             cache_name: str = "imagefolder") -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode and preprocess every image of an ImageFolder into ``(uint8 [N, H, W, C], int64 [N], classes)``.

    ``preprocess.to_array`` must give images of one size (e.g. resize + center crop, or 32x32 CIFAR images).
    The arrays are cached (see :mod:`bitalloc.data.cache`) keyed by the source, split and
    ``preprocess.params()``; class names are stored alongside.
    """
    folder = ImageFolder(root, split, transform=preprocess)

    def build() -> dict[str, np.ndarray]:
        first = preprocess.to_array(folder.load(0)[0])
        images = np.empty((len(folder),) + first.shape, dtype=np.uint8)
        for i in range(len(folder)):
            arr = first if i == 0 else preprocess.to_array(folder.load(i)[0])
            if arr.shape != first.shape:
                rel = folder.samples[i][0]
                raise DataError(f"{folder.source.describe(rel)} preprocesses to {arr.shape}, not {first.shape} "
                                f"like the first image; give a transform with a fixed output size (resize + crop).")
            images[i] = arr
        labels = np.asarray(folder.targets, dtype=np.int64)
        names = np.asarray(folder.classes, dtype=np.str_)
        return {"images": images, "labels": labels, "classes": names}

    params = {"reader": _READER_VERSION, "split": folder.subdir, "preprocess": preprocess.params(),
              "listing": _listing_signature(folder.source, folder.samples)}
    arrays = cached_arrays(f"{cache_name}-{folder.subdir or 'all'}", folder.source.path, params, build,
                           cache_dir=cache_dir, use_cache=use_cache)
    return arrays["images"], arrays["labels"], [str(c) for c in arrays["classes"]]


def image_folder_in_memory(root: str | os.PathLike, split: str | None, preprocess: Preprocess | str, *,
                           augment: bool = False, cache_dir: str | os.PathLike | None = None,
                           use_cache: bool = True, cache_name: str = "imagefolder",
                           classes: Sequence[str] | None = None) -> InMemoryImageDataset:
    """An :class:`InMemoryImageDataset` of a preprocessed (cached) ImageFolder."""
    pre = get_transform(preprocess) if isinstance(preprocess, str) else preprocess
    images, labels, found = load_image_folder_arrays(root, split, pre, cache_dir=cache_dir, use_cache=use_cache,
                                                     cache_name=cache_name)
    return InMemoryImageDataset(torch.from_numpy(images), torch.from_numpy(labels), pre.normalization,
                                augment=augment, classes=list(classes) if classes is not None else found,
                                source=str(root))
