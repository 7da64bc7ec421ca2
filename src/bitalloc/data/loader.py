"""Fast DataLoaders for in-memory datasets, and the seeded calibration / evaluation split."""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, Subset

from bitalloc.data.memory import InMemoryImageDataset
from bitalloc.errors import ConfigError

__all__ = ["make_loader", "calibration_split", "strided_split", "unwrap_in_memory"]


def unwrap_in_memory(dataset: Dataset) -> tuple[InMemoryImageDataset, torch.Tensor] | None:
    """``(base, indices)`` if ``dataset`` is an :class:`InMemoryImageDataset` or (nested) ``Subset`` of one."""
    index: torch.Tensor | None = None
    while isinstance(dataset, Subset):
        sub = torch.as_tensor(list(dataset.indices), dtype=torch.int64)
        index = sub if index is None else sub[index]
        dataset = dataset.dataset
    if not isinstance(dataset, InMemoryImageDataset):
        return None
    return dataset, (torch.arange(len(dataset)) if index is None else index)


class _BatchView(Dataset):
    """Maps a list of positions to one ready batch of an in-memory dataset (used with ``batch_size=None``)."""

    def __init__(self, base: InMemoryImageDataset, index: torch.Tensor, seed: int) -> None:
        self.base = base
        self.index = index
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return int(self.index.numel())

    def __getitem__(self, positions: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.index[torch.as_tensor(positions, dtype=torch.int64)]
        return self.base.get_batch(idx, generator=self.generator)


def _reseed_worker(worker_id: int) -> None:
    """Give each worker's copy of the batch view its own augmentation RNG, derived from the loader's seed."""
    info = torch.utils.data.get_worker_info()
    if info is not None and isinstance(info.dataset, _BatchView):
        info.dataset.generator = torch.Generator().manual_seed(info.seed)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, workers: int = 0, seed: int = 0, *,
                drop_last: bool = False, pin_memory: bool = False) -> DataLoader:
    """A DataLoader yielding ``(x float32 [B, ...], y int64 [B])`` batches.

    For an :class:`InMemoryImageDataset` (or a ``Subset`` of one, e.g. from :func:`calibration_split`) each
    batch is gathered, augmented and normalized with a few tensor ops instead of ``B`` item calls and a
    collate. Order and augmentation are reproducible from ``seed`` (shuffling uses a ``torch.Generator``
    seeded with ``seed``; augmentation a generator seeded from it, per worker when ``workers > 0``). Other
    datasets get a standard DataLoader with the same seeded shuffling.
    """
    if batch_size <= 0:
        raise ConfigError(f"batch_size={batch_size} must be a positive integer.")
    if workers < 0:
        raise ConfigError(f"workers={workers} must be >= 0.")
    gen = torch.Generator().manual_seed(seed)
    common = dict(num_workers=workers, generator=gen, pin_memory=pin_memory, persistent_workers=workers > 0,
                  worker_init_fn=_reseed_worker if workers > 0 else None)
    found = unwrap_in_memory(dataset)
    if found is None:
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, **common)
    base, index = found
    view = _BatchView(base, index, seed + 1)
    n = range(len(view))
    inner = RandomSampler(n, generator=gen) if shuffle else SequentialSampler(n)
    sampler = BatchSampler(inner, batch_size=batch_size, drop_last=drop_last)
    return DataLoader(view, batch_size=None, sampler=sampler, **common)


def calibration_split(dataset: Dataset, n_calib: int, seed: int = 0) -> tuple[Subset, Subset]:
    """Split ``dataset`` into ``n_calib`` calibration items and the rest, reproducibly.

    ``perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))``; the calibration
    subset is ``perm[:n_calib]`` and the rest ``perm[n_calib:]``, both in that permuted order. The two are
    disjoint and together cover the dataset. E.g. ``calibration_split(imagenet_sample, 32)`` gives 32
    calibration images and 968 evaluation images.
    """
    n = len(dataset)  # type: ignore[arg-type]
    if not isinstance(n_calib, int) or isinstance(n_calib, bool):
        raise ConfigError(f"n_calib={n_calib!r} must be an integer.")
    if n_calib <= 0 or n_calib >= n:
        raise ConfigError(f"n_calib={n_calib} must be between 1 and {n - 1} for a dataset of {n} items "
                          f"(some items must remain for evaluation).")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return Subset(dataset, perm[:n_calib]), Subset(dataset, perm[n_calib:])


def strided_split(dataset: Dataset, n_calib: int, stride: int = 31) -> tuple[Subset, Subset]:
    """The fixed split of the peer anchors: calibration = the first ``n_calib`` indices i with ``i % stride == 0``
    (0, 31, 62, ...), evaluation = every other item, both in the data set's order (class folders sorted, then
    paths: for the ImageNet sample, the sorted member names). With the 1,000-image ImageNet sample and
    ``n_calib=32`` this is the reference split its anchors were measured on: calibration 0, 31, ..., 961,
    evaluation the other 968 (``../shared/data/README.md``)."""
    n = len(dataset)  # type: ignore[arg-type]
    if not isinstance(n_calib, int) or isinstance(n_calib, bool) or n_calib <= 0:
        raise ConfigError(f"n_calib={n_calib!r} must be a positive integer.")
    picks = list(range(0, n, stride))[:n_calib]
    if len(picks) < n_calib or n_calib >= n:
        raise ConfigError(f"the anchors' split takes every {stride}th of {n} items, at most {min(len(range(0, n, stride)), n - 1)} "
                          f"calibration items, not {n_calib}; give fewer (--calib) or the random split (--split random)")
    chosen = set(picks)
    return Subset(dataset, picks), Subset(dataset, [i for i in range(n) if i not in chosen])

