"""In-memory image datasets: the whole split as one ``uint8`` tensor, normalized (and augmented) on access."""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import Dataset

from bitalloc.data.transforms import Normalization, random_crop_flip
from bitalloc.errors import ShapeError

__all__ = ["InMemoryImageDataset"]


class InMemoryImageDataset(Dataset):
    """Images held as one ``uint8`` tensor ``[N, H, W, C]`` with ``int64`` labels ``[N]``.

    ``dataset[i]`` is ``(float32 tensor [C, H, W], int label)``: pixels normalized by ``normalization`` and,
    when ``augment`` is on, randomly cropped from the ``crop_padding``-padded image and flipped horizontally
    (global torch RNG). :meth:`get_batch` does the same for many indices at once with tensor ops, which is
    what :func:`bitalloc.data.make_loader` uses to avoid per-item Python overhead.

    Attributes: ``images``, ``labels``, ``normalization``, ``augment``, ``classes`` (class names by label),
    ``source`` (where the data came from, for messages).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, normalization: Normalization, *,
                 augment: bool = False, crop_padding: int = 4, flip: bool = True,
                 classes: Sequence[str] | None = None, source: str = "") -> None:
        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels).to(torch.int64)
        if images.ndim != 4 or images.dtype != torch.uint8:
            raise ShapeError(f"images must be uint8 [N, H, W, C], got {images.dtype} {list(images.shape)}.")
        if labels.shape != (images.shape[0],):
            raise ShapeError(f"labels must be [N] = [{images.shape[0]}], got {list(labels.shape)}.")
        if images.shape[-1] != len(normalization.mean):
            raise ShapeError(f"images have {images.shape[-1]} channels but the normalization has "
                             f"{len(normalization.mean)}.")
        self.images = images
        self.labels = labels
        self.normalization = normalization
        self.augment = augment
        self.crop_padding = crop_padding
        self.flip = flip
        self.classes = list(classes) if classes is not None else [str(i) for i in range(int(labels.max()) + 1)]
        self.source = source

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one item."""
        _, h, w, c = self.images.shape
        return (int(c), int(h), int(w))

    def _prepare(self, raw: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        x = raw.movedim(-1, -3)  # [..., C, H, W]
        if self.augment:
            x = random_crop_flip(x, padding=self.crop_padding, flip=self.flip, generator=generator)
        return self.normalization(x)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        return self._prepare(self.images[index], None), int(self.labels[index])

    def get_batch(self, indices: Sequence[int] | torch.Tensor, *,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(float32 [B, C, H, W], int64 [B])`` for ``indices``, augmented with ``generator`` when on."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self._prepare(self.images[idx], generator), self.labels[idx]

    def with_augment(self, augment: bool) -> "InMemoryImageDataset":
        """A view sharing the same tensors with augmentation switched on or off."""
        return InMemoryImageDataset(self.images, self.labels, self.normalization, augment=augment,
                                    crop_padding=self.crop_padding, flip=self.flip, classes=self.classes,
                                    source=self.source)

    def __repr__(self) -> str:
        return (f"InMemoryImageDataset(n={len(self)}, shape={self.sample_shape}, classes={self.num_classes}, "
                f"augment={self.augment}, source={self.source!r})")
