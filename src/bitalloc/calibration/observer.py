"""Streaming statistics of a tensor over calibration batches.

An :class:`Observer` sees every calibration batch once and keeps, per row (channel, or one row per tensor):
exact count, min, max, sum and sum of squares (float64), exact statistics of the positive part (for
one-sided tensors), and a uniform random subsample of the values (for estimators that need the distribution:
percentile, MSE search, KLD, ACIQ "auto", and the Laplace scale b = E|x - E x|).

Subsampling: every incoming column (one position of the tensor, all channels) is kept with probability p;
when the buffer exceeds its capacity, a random half of it is dropped and p halves. Every value seen so far
is therefore in the buffer with the same probability: the buffer is a uniform subsample.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bitalloc.errors import DataError
from bitalloc.quant.stats import ChannelStats, to_rows

#: default capacity (values per row) of the subsample buffer, per tensor and per channel
PER_TENSOR_SAMPLES = 1 << 20
PER_CHANNEL_TOTAL_SAMPLES = 1 << 21
MIN_SAMPLES_PER_CHANNEL = 512


class Observer:
    """Accumulates :class:`ChannelStats` of a stream of tensors along ``axis`` (None: whole tensor)."""

    def __init__(self, axis: int | None, *, capacity: int | None = None, seed: int = 0, name: str = ""):
        self.axis = axis
        self.name = name
        self.capacity = capacity
        self.generator = torch.Generator().manual_seed(seed)
        self.count = 0
        self.keep_prob = 1.0
        self._rows: int | None = None
        self._min = self._max = self._sum = self._sumsq = self._pos_n = self._pos_sum = self._pos_sumsq = None
        self._samples: list[Tensor] = []
        self._n_samples = 0

    def _init(self, rows: int) -> None:
        self._rows = rows
        if self.capacity is None:
            self.capacity = PER_TENSOR_SAMPLES if self.axis is None else max(
                MIN_SAMPLES_PER_CHANNEL, PER_CHANNEL_TOTAL_SAMPLES // rows)
        z = torch.zeros(rows, dtype=torch.float64)
        self._min = torch.full((rows,), float("inf"), dtype=torch.float64)
        self._max = torch.full((rows,), float("-inf"), dtype=torch.float64)
        self._sum, self._sumsq, self._pos_n, self._pos_sum, self._pos_sumsq = (z.clone() for _ in range(5))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add one batch (any shape with the channel along ``axis``)."""
        rows = to_rows(x.detach(), self.axis)
        if rows.shape[1] == 0:
            return
        if not torch.isfinite(rows).all():
            raise DataError(f"non-finite values (NaN/inf) reached {self.name or 'a quantizer'} during calibration; "
                            "check the model and the input data")
        if self._rows is None:
            self._init(rows.shape[0])
        elif rows.shape[0] != self._rows:
            raise DataError(f"{self.name or 'observer'}: got {rows.shape[0]} channels, expected {self._rows}")
        r = rows.to(torch.float64)
        self._min = torch.minimum(self._min, r.amin(1))
        self._max = torch.maximum(self._max, r.amax(1))
        self._sum += r.sum(1)
        self._sumsq += r.square().sum(1)
        pos = r.clamp(min=0)
        self._pos_n += (r > 0).sum(1)
        self._pos_sum += pos.sum(1)
        self._pos_sumsq += pos.square().sum(1)
        self.count += rows.shape[1]
        self._add_samples(rows.float())

    def _add_samples(self, rows: Tensor) -> None:
        n = rows.shape[1]
        if self.keep_prob < 1.0:
            keep = torch.rand(n, generator=self.generator) < self.keep_prob
            rows = rows[:, keep]
        self._samples.append(rows.clone())
        self._n_samples += rows.shape[1]
        self._thin()

    def _thin(self) -> None:
        while self._n_samples > self.capacity:
            allrows = torch.cat(self._samples, dim=1)
            keep = torch.rand(allrows.shape[1], generator=self.generator) < 0.5
            self._samples = [allrows[:, keep]]
            self._n_samples = self._samples[0].shape[1]
            self.keep_prob *= 0.5

    def merge_distributed(self) -> None:
        """Combine the statistics of all ranks (torch.distributed): exact moments, concatenated subsamples."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or self._rows is None:
            return
        for t, op in ((self._min, dist.ReduceOp.MIN), (self._max, dist.ReduceOp.MAX), (self._sum, dist.ReduceOp.SUM),
                      (self._sumsq, dist.ReduceOp.SUM), (self._pos_n, dist.ReduceOp.SUM),
                      (self._pos_sum, dist.ReduceOp.SUM), (self._pos_sumsq, dist.ReduceOp.SUM)):
            dist.all_reduce(t, op=op)
        count = torch.tensor([self.count], dtype=torch.float64)
        dist.all_reduce(count)
        self.count = int(count.item())
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, torch.cat(self._samples, dim=1) if self._samples else None)
        self._samples = [g for g in gathered if g is not None]
        self._n_samples = sum(g.shape[1] for g in self._samples)
        self._thin()

    def stats(self) -> ChannelStats:
        """The statistics so far. Raises DataError if nothing was observed."""
        if self._rows is None or self.count == 0:
            raise DataError(f"no calibration data reached {self.name or 'this quantizer'}: feed at least one batch "
                            "through the model inside `with bitalloc.calibration(model):` (is the data set empty?)")
        n = float(self.count)
        mean = self._sum / n
        var = (self._sumsq / n - mean.square()).clamp(min=0)
        samples = torch.cat(self._samples, dim=1)
        mad = (samples.to(torch.float64) - mean[:, None]).abs().mean(1)
        denom = self._pos_n.clamp(min=1)
        return ChannelStats(
            count=torch.full((self._rows,), self.count, dtype=torch.int64), min=self._min.clone(),
            max=self._max.clone(), mean=mean, std=var.sqrt(), mad=mad,
            pos_mean=self._pos_sum / denom, pos_rms=(self._pos_sumsq / denom).sqrt(), samples=samples)
