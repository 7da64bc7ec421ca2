"""Streaming statistics of a tensor over calibration batches.

An :class:`Observer` sees every calibration batch once and keeps, per row (channel, or one row per tensor):
exact count, min, max, sum and sum of squares (float64 accumulation), exact statistics of the positive part
(for one-sided tensors), and a uniform random subsample of the values (for estimators that need the
distribution: percentile, MSE search, KLD, ACIQ "auto", and the Laplace scale b = E|x - E x|).

Subsampling costs O(capacity) per batch, not O(batch): each batch contributes up to ``capacity`` columns
(one column = one position of the tensor, all channels) drawn uniformly with replacement, and when the
sample is read (or grows past twice the capacity) every batch keeps a share proportional to its number of
columns. The result is a uniform sample of everything seen.
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
        self._rows: int | None = None
        self._min = self._max = self._sum = self._csum = self._sumsq = self._pos_n = self._pos_sum = self._pos_sumsq = None
        self._shift: Tensor | None = None
        self._samples: list[tuple[Tensor, int]] = []  # (random columns of a batch, columns it stood for)
        self._n_samples = 0

    def _init(self, rows: int) -> None:
        self._rows = rows
        if self.capacity is None:
            self.capacity = PER_TENSOR_SAMPLES if self.axis is None else max(
                MIN_SAMPLES_PER_CHANNEL, PER_CHANNEL_TOTAL_SAMPLES // rows)
        z = torch.zeros(rows, dtype=torch.float64)
        self._min = torch.full((rows,), float("inf"), dtype=torch.float64)
        self._max = torch.full((rows,), float("-inf"), dtype=torch.float64)
        self._sum, self._csum, self._sumsq, self._pos_n, self._pos_sum, self._pos_sumsq = (z.clone() for _ in range(6))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add one batch (any shape with the channel along ``axis``)."""
        rows = to_rows(x.detach(), self.axis)
        if rows.shape[1] == 0:
            return
        if self._rows is None:
            self._init(rows.shape[0])
        elif rows.shape[0] != self._rows:
            raise DataError(f"{self.name or 'observer'}: got {rows.shape[0]} channels, expected {self._rows}")
        r = rows if rows.dtype == torch.float32 else rows.float()
        total = r.sum(1, dtype=torch.float64)
        if not bool(torch.isfinite(total).all()):  # a NaN or inf anywhere makes the float64 sum non-finite
            raise DataError(f"non-finite values (NaN/inf) reached {self.name or 'a quantizer'} during calibration; "
                            "check the model and the input data")
        if self._shift is None:  # moments are accumulated around the first batch's mean (no cancellation)
            self._shift = (total / r.shape[1]).float()
        lo, hi = torch.aminmax(r, dim=1)
        self._min = torch.minimum(self._min, lo.double())
        self._max = torch.maximum(self._max, hi.double())
        centred = r - self._shift[:, None]
        self._sum += total
        self._csum += centred.sum(1, dtype=torch.float64)
        self._sumsq += centred.square_().sum(1, dtype=torch.float64)
        del centred
        pos = r.clamp(min=0)
        self._pos_n += (r > 0).sum(1)
        self._pos_sum += pos.sum(1, dtype=torch.float64)
        self._pos_sumsq += pos.square().sum(1, dtype=torch.float64)
        self.count += rows.shape[1]
        self._add_samples(r)

    def _add_samples(self, rows: Tensor) -> None:
        n = rows.shape[1]
        if n <= self.capacity:
            sample = rows.clone()
        else:
            idx = torch.randint(0, n, (self.capacity,), generator=self.generator)
            sample = rows[:, idx]
        self._samples.append((sample, n))
        self._n_samples += sample.shape[1]
        if self._n_samples > 2 * self.capacity:
            self._compact()

    def _compact(self) -> None:
        """Keep from every stored batch a share of ``capacity`` proportional to the columns it stood for."""
        total = sum(n for _, n in self._samples)
        if self._n_samples <= self.capacity:
            return
        kept = []
        for sample, n in self._samples:
            k = min(sample.shape[1], max(1, round(self.capacity * n / total)))
            kept.append((sample[:, :k], n))  # the stored columns are already in random order
        self._samples = kept
        self._n_samples = sum(s.shape[1] for s, _ in kept)

    def merge_distributed(self) -> None:
        """Combine the statistics of all ranks (torch.distributed): exact moments, concatenated subsamples."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or self._rows is None:
            return
        common = self._shift.double().clone()
        dist.broadcast(common, src=0)  # re-centre every rank's moments on rank 0's shift before summing
        d = self._shift.double() - common
        n = float(self.count)
        self._sumsq += 2 * d * self._csum + n * d.square()
        self._csum += n * d
        self._shift = common.float()
        for t, op in ((self._min, dist.ReduceOp.MIN), (self._max, dist.ReduceOp.MAX), (self._sum, dist.ReduceOp.SUM), (self._csum, dist.ReduceOp.SUM),
                      (self._sumsq, dist.ReduceOp.SUM), (self._pos_n, dist.ReduceOp.SUM),
                      (self._pos_sum, dist.ReduceOp.SUM), (self._pos_sumsq, dist.ReduceOp.SUM)):
            dist.all_reduce(t, op=op)
        count = torch.tensor([self.count], dtype=torch.float64)
        dist.all_reduce(count)
        self.count = int(count.item())
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, self._samples)
        self._samples = [item for part in gathered for item in part]
        self._n_samples = sum(s.shape[1] for s, _ in self._samples)
        self._compact()

    def stats(self) -> ChannelStats:
        """The statistics so far. Raises DataError if nothing was observed."""
        if self._rows is None or self.count == 0:
            raise DataError(f"no calibration data reached {self.name or 'this quantizer'}: feed at least one batch "
                            "through the model inside `with bitalloc.calibration(model):` (is the data set empty?)")
        n = float(self.count)
        mean = self._sum / n
        centred_mean = self._csum / n
        var = (self._sumsq / n - centred_mean.square()).clamp(min=0)
        self._compact()
        samples = torch.cat([s for s, _ in self._samples], dim=1)
        mad = (samples.to(torch.float64) - mean[:, None]).abs().mean(1)
        denom = self._pos_n.clamp(min=1)
        return ChannelStats(
            count=torch.full((self._rows,), self.count, dtype=torch.int64), min=self._min.clone(),
            max=self._max.clone(), mean=mean, std=var.sqrt(), mad=mad,
            pos_mean=self._pos_sum / denom, pos_rms=(self._pos_sumsq / denom).sqrt(), samples=samples)
