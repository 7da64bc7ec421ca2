"""Per-channel statistics of a tensor: what range estimators and bit allocation read.

A tensor is viewed as rows: one row per channel (per-channel granularity) or a single row (per tensor).
:class:`ChannelStats` holds exact moments of every value seen plus a uniform random subsample of each row
(for estimators that need the distribution itself: percentile, MSE search, KLD, ACIQ "auto").

Conventions (ACIQ, Banner et al. 2019, section 3 and the reference code):
* ``mad`` is the Laplace scale estimate b = E|x - E x|, ``std`` the Gaussian scale sigma.
* One-sided (post-ReLU) tensors use the statistics of their positive values: for a half-Laplace of scale b,
  E[x | x > 0] = b (``pos_mean``); for a half-normal, sqrt(E[x^2 | x > 0]) = sigma (``pos_rms``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bitalloc.errors import DataError, ShapeError


def to_rows(x: Tensor, axis: int | None) -> Tensor:
    """View ``x`` as [C, n]: rows are the slices along ``axis`` (per channel), or one row (``axis=None``)."""
    if axis is None:
        return x.reshape(1, -1)
    if x.ndim == 0:
        raise ShapeError("cannot take per-channel statistics of a scalar")
    return x.movedim(axis % x.ndim, 0).reshape(x.shape[axis], -1)


@dataclass
class ChannelStats:
    """Statistics of each row of a tensor (all fields [C]; ``samples`` is [C, n] or None)."""

    count: Tensor
    min: Tensor
    max: Tensor
    mean: Tensor
    std: Tensor
    mad: Tensor
    pos_mean: Tensor
    pos_rms: Tensor
    samples: Tensor | None = None

    @property
    def channels(self) -> int:
        return int(self.count.numel())

    @property
    def one_sided(self) -> Tensor:
        """Rows whose values are all >= 0 (e.g. after a ReLU): bool [C]."""
        return self.min >= 0

    @classmethod
    def from_rows(cls, rows: Tensor, keep_samples: bool = True, dtype: torch.dtype = torch.float64) -> "ChannelStats":
        """Exact statistics of ``rows`` [C, n] (accumulated in ``dtype``, float64 by default)."""
        if rows.ndim != 2:
            raise ShapeError(f"expected rows of shape [C, n], got {tuple(rows.shape)}")
        if rows.shape[1] == 0:
            raise DataError("cannot compute statistics of an empty tensor; feed at least one calibration sample")
        r = rows.detach().to(dtype)
        mean = r.mean(dim=1)
        pos = r.clamp(min=0)
        npos = (r > 0).sum(dim=1)
        denom = npos.clamp(min=1).to(dtype)
        return cls(
            count=torch.full((r.shape[0],), r.shape[1], dtype=torch.int64),
            min=r.amin(dim=1),
            max=r.amax(dim=1),
            mean=mean,
            std=r.std(dim=1, unbiased=False),
            mad=(r - mean[:, None]).abs().mean(dim=1),
            pos_mean=pos.sum(dim=1) / denom,
            pos_rms=(pos.square().sum(dim=1) / denom).sqrt(),
            samples=rows.detach().float().clone() if keep_samples else None,
        )

    @classmethod
    def of(cls, x: Tensor, axis: int | None = None, keep_samples: bool = True) -> "ChannelStats":
        """Exact statistics of ``x`` per slice along ``axis`` (or of the whole tensor)."""
        return cls.from_rows(to_rows(x, axis), keep_samples=keep_samples)

    def scale_statistic(self, prior: str, one_sided: bool | Tensor = False) -> Tensor:
        """The ACIQ scale of each row: b (``prior='laplace'``) or sigma (``'gauss'``), one-sided aware."""
        os_mask = torch.as_tensor(one_sided, dtype=torch.bool).expand(self.channels)
        if prior == "laplace":
            return torch.where(os_mask, self.pos_mean, self.mad)
        if prior == "gauss":
            return torch.where(os_mask, self.pos_rms, self.std)
        raise ValueError(f"unknown prior {prior!r}; use 'laplace' or 'gauss'")
