"""Synthetic classification data shared by the training tests and their torchrun workers."""

from __future__ import annotations

import torch


def blobs(n: int, *, seed: int = 0, noise_seed: int = 1, classes: int = 4, dim: int = 16,
          sep: float = 3.0) -> torch.utils.data.TensorDataset:
    """``n`` points of ``classes`` Gaussian blobs (unit noise) around means at distance ``sep`` from the origin in
    ``dim`` dimensions: the means come from ``seed``, the labels and noise from ``noise_seed``, so that training
    and validation sets (different ``noise_seed``) share their classes."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(classes, dim, generator=g)
    means = means / means.norm(dim=1, keepdim=True)
    g2 = torch.Generator().manual_seed(noise_seed)
    y = torch.randint(0, classes, (n,), generator=g2)
    return torch.utils.data.TensorDataset(sep * means[y] + torch.randn(n, dim, generator=g2), y)
