"""Dataset registry: ``load_dataset(name, root, split)`` and ``dataset_info(name)``.

Where the data is (``root``):

1. the ``root`` argument (the CLI's ``--data PATH``), else
2. the environment variable ``BITALLOC_DATA``, else
3. for Fashion-MNIST only, Debian's ``dataset-fashion-mnist`` location ``/usr/share/datasets/fashion-mnist``.

``root`` may be the dataset itself (an MNIST folder, a ``cifar-10-batches-py`` folder, ``cifar10-jpeg.zip``,
``imagenet-sample.zip``, ...) or a folder holding it under its usual name (``mnist/``, ``fashion-mnist/``,
``cifar-10-batches-py/``, ``cifar10-jpeg.zip``, ``imagenet-sample.zip``, ...), so one ``BITALLOC_DATA`` can
serve every dataset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from PIL import Image
from torch.utils.data import Dataset

from bitalloc.data.cifar import find_cifar_python_dir, load_cifar10
from bitalloc.data.idx import MNIST_FILES, find_idx_file, load_mnist_like
from bitalloc.data.imagefolder import ImageFolder, ImageSource, image_folder_in_memory
from bitalloc.data.transforms import (CIFAR10_NORM, FASHION_MNIST_NORM, IMAGENET_LITE_NORM, MNIST_NORM,
                                      Normalization, Preprocess, get_transform)
from bitalloc.errors import ConfigError, DataError

__all__ = ["DATA_ENV", "DatasetInfo", "DATASETS", "dataset_info", "dataset_names", "resolve_data_root",
           "load_dataset"]

DATA_ENV = "BITALLOC_DATA"
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]


@dataclass(frozen=True)
class DatasetInfo:
    """What a dataset is: classes, item shape, preprocessing, default model, layout and splits."""

    name: str
    num_classes: int | None
    input_shape: tuple[int, int, int] | None  # (C, H, W) of one item, None when it depends on a transform
    normalization: Normalization | None  # (x / scale - mean) / std on 0..255 pixels
    default_model: str | None
    splits: tuple[str, ...]
    default_split: str
    layout: str
    augmentation: str | None = None
    subfolders: tuple[str, ...] = field(default=(), repr=False)  # usual names below a parent data folder
    aliases: tuple[str, ...] = field(default=(), repr=False)

    @property
    def mean(self) -> tuple[float, ...] | None:
        return self.normalization.mean if self.normalization else None

    @property
    def std(self) -> tuple[float, ...] | None:
        return self.normalization.std if self.normalization else None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "num_classes": self.num_classes,
                "input_shape": list(self.input_shape) if self.input_shape else None,
                "normalization": self.normalization.as_dict() if self.normalization else None,
                "default_model": self.default_model, "splits": list(self.splits),
                "default_split": self.default_split, "layout": self.layout, "augmentation": self.augmentation}


_MNIST_LAYOUT = ("a folder with train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
                 "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]")

DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo("mnist", 10, (1, 28, 28), MNIST_NORM, "lenet5", ("train", "test"), "train",
                         _MNIST_LAYOUT, subfolders=("mnist", "MNIST/raw", "MNIST")),
    "fashion-mnist": DatasetInfo("fashion-mnist", 10, (1, 28, 28), FASHION_MNIST_NORM, "lenet5", ("train", "test"),
                                 "train", _MNIST_LAYOUT + f" (Debian dataset-fashion-mnist: {FASHION_MNIST_SYSTEM_DIR})",
                                 subfolders=("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST"),
                                 aliases=("fashion_mnist", "fashionmnist", "fmnist")),
    "cifar10": DatasetInfo("cifar10", 10, (3, 32, 32), CIFAR10_NORM, "resnet20", ("train", "test"), "train",
                           "cifar-10-batches-py/ (python batches; it or its parent), or an ImageFolder "
                           "folder/.zip <root>/{train,test}/<class>/*.jpg",
                           augmentation="random crop 32 from 4-pixel zero padding + random horizontal flip",
                           subfolders=("cifar-10-batches-py", "cifar10-jpeg.zip", "cifar10-jpeg", "cifar10",
                                       "cifar-10"),
                           aliases=("cifar-10", "cifar_10")),
    "imagenet": DatasetInfo("imagenet", 1000, (3, 224, 224), IMAGENET_LITE_NORM, "efficientnet_lite0", ("all",),
                            "all", "ImageFolder folder/.zip <root>/<wnid>/<image> (sorted wnid = class index); "
                            "resize short side 256, center crop 224, (x - 127) / 128",
                            subfolders=("imagenet-sample.zip", "imagenet-sample", "imagenet"),
                            aliases=("imagenet-sample",)),
    "imagefolder": DatasetInfo("imagefolder", None, None, None, None, ("all",), "all",
                               "ImageFolder folder/.zip <root>/<class>/<image> (split: a first-level folder, "
                               "or 'all' for the root)", aliases=("image-folder", "image_folder")),
}


def dataset_names() -> list[str]:
    """The canonical dataset names."""
    return list(DATASETS)


def _canonical(name: str) -> str:
    key = name.strip().lower()
    for canon, info in DATASETS.items():
        if key == canon or key in info.aliases:
            return canon
    raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}.")


def dataset_info(name: str) -> DatasetInfo:
    """:class:`DatasetInfo` of ``name`` ("mnist", "fashion-mnist", "cifar10", "imagenet", "imagefolder")."""
    return DATASETS[_canonical(name)]


def _looks_like(name: str, path: Path) -> bool:
    if name in ("mnist", "fashion-mnist"):
        return path.is_dir() and any(find_idx_file(path, base) is not None for pair in MNIST_FILES.values() for base in pair)
    if name == "cifar10":
        if find_cifar_python_dir(path) is not None:
            return True
        return path.is_file() or (path / "train").is_dir() or (path / "test").is_dir()
    return path.is_file()


def resolve_data_root(name: str, root: str | os.PathLike | None = None) -> Path:
    """The data path for dataset ``name``: ``root``, else ``$BITALLOC_DATA`` (else Debian's Fashion-MNIST).

    A parent folder holding the dataset under its usual name is accepted (see the module docstring).
    Raises :class:`DataError` with the fix when no path is given, it does not exist or it is empty.
    """
    canon = _canonical(name)
    info = DATASETS[canon]
    given = str(root) if root is not None and str(root) != "" else os.environ.get(DATA_ENV, "")
    if not given and canon == "fashion-mnist" and Path(FASHION_MNIST_SYSTEM_DIR).is_dir():
        given = FASHION_MNIST_SYSTEM_DIR
    if not given:
        raise DataError(f"no data path for {canon}: pass --data PATH or set {DATA_ENV}. Expected: {info.layout}.")
    path = Path(given).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist (data path for {canon}); pass --data PATH or set {DATA_ENV} "
                        f"to {info.layout}.")
    if path.is_dir() and not any(path.iterdir()):
        raise DataError(f"{path} is empty (data path for {canon}); pass --data PATH or set {DATA_ENV} "
                        f"to {info.layout}.")
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path} is an empty file (data path for {canon}); re-copy it.")
    if path.is_dir() and not _looks_like(canon, path):
        for sub in info.subfolders:
            cand = path / sub
            if cand.exists() and _looks_like(canon, cand):
                return cand
    return path


def _as_preprocess(transform: str | Preprocess | None, default: str) -> Preprocess:
    if transform is None:
        return get_transform(default)
    if isinstance(transform, Preprocess):
        return transform
    if isinstance(transform, str):
        return get_transform(transform)
    raise ConfigError(f"transform={transform!r}: give a transform name or a bitalloc.data.Preprocess "
                      f"(a fixed-size pipeline, so the result can be cached).")


def load_dataset(name: str, root: str | os.PathLike | None = None, split: str | None = None, *,
                 augment: bool = False, cache_dir: str | os.PathLike | None = None,
                 transform: str | Preprocess | Callable[[Image.Image], Any] | None = None) -> Dataset:
    """Load dataset ``name`` from ``root`` (or ``$BITALLOC_DATA``) as a torch ``Dataset``.

    - ``"mnist"`` / ``"fashion-mnist"``: splits "train" / "test"; items ``(float32 [1, 28, 28], int)``.
    - ``"cifar10"``: splits "train" / "test"; items ``(float32 [3, 32, 32], int)``; ``augment=True`` adds the
      random crop (4-pixel zero padding) + horizontal flip.
    - ``"imagenet"``: an ImageFolder (folder or .zip) preprocessed with ``transform`` (default
      ``"imagenet-lite"``: resize 256, center crop 224, ``(x - 127) / 128``) and cached; items
      ``(float32 [3, 224, 224], int)``. ``split`` is ignored unless the root has a folder of that name.
    - ``"imagefolder"``: a lazy generic ImageFolder; ``split`` a first-level folder or "all" (default);
      ``transform`` any callable on a PIL image or a transform name (default ``"to-tensor"``).

    The in-memory datasets (all but "imagefolder") are :class:`InMemoryImageDataset`; batch them with
    :func:`bitalloc.data.make_loader`. Decoded ImageFolder arrays are cached in ``cache_dir`` (else
    ``$BITALLOC_CACHE``, else ``~/.cache/bitalloc``).
    """
    canon = _canonical(name)
    info = DATASETS[canon]
    split = info.default_split if split is None else split
    if augment and info.augmentation is None:
        raise ConfigError(f"augment=True is not defined for {canon} (only for: "
                          f"{', '.join(n for n, i in DATASETS.items() if i.augmentation)}).")
    path = resolve_data_root(canon, root)
    if canon in ("mnist", "fashion-mnist"):
        if split not in info.splits:
            raise ConfigError(f"split={split!r} is not a {canon} split; use one of: {', '.join(info.splits)}.")
        classes = FASHION_MNIST_CLASSES if canon == "fashion-mnist" else None
        norm = info.normalization
        assert norm is not None
        return load_mnist_like(path, split, mean=norm.mean[0], std=norm.std[0], classes=classes)
    if canon == "cifar10":
        if split not in info.splits:
            raise ConfigError(f"split={split!r} is not a cifar10 split; use one of: {', '.join(info.splits)}.")
        return load_cifar10(path, split, augment=augment, cache_dir=cache_dir)
    if canon == "imagenet":
        pre = _as_preprocess(transform, "imagenet-lite")
        sub = split if split not in (None, "", "all") and split in ImageSource(path).listdir("") else "all"
        return image_folder_in_memory(path, sub, pre, cache_dir=cache_dir, cache_name="imagenet")
    return ImageFolder(path, split, transform=transform)
