"""Entropy and real Huffman-coded size of the activation codes of a quantized model, per layer and in total.

The ACIQ rebuttal argues that Huffman coding the integer codes of activations brings memory traffic down
to an "average of 2.2-4.4 bits per activation" on ImageNet CNNs; its reference code measures the Shannon
entropy of the code histogram, not a real code. Here, for every quantized layer, the input activation is
quantized exactly as the layer's input quantizer does (``QuantParams.quantize``, integer codes before any
dequantization) on real data, and we report:

* ``bits_before``: the grid's bits per value (per-channel widths weighted by the values of each channel);
* ``entropy``: H of the layer's code histogram (pooled over channels and samples: one code per layer);
* ``huffman_bits``: the real size per value of one canonical Huffman stream of all these codes
  (:func:`bitalloc.coding.huffman.encode` with ``coder="canonical"``: header, table of code lengths, sync
  index and payload), computed exactly from the histogram (:func:`huffman.canonical_stream_size`) so that
  millions of activations need not be held in memory;
* ``zlib_bits``: the real size per value of a zlib Huffman-only stream (DEFLATE, per-block tables) fed the
  codes batch by batch (alphabets of <= 256 symbols only);
* ``stored_bits``: the smaller of the two real streams, the number to compare with the rebuttal's.

Totals are weighted by the number of values of each layer ("average bits per activation").
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
from torch import Tensor, nn

from bitalloc.batches import batch_size, call_model, take_inputs
from bitalloc.coding import huffman
from bitalloc.errors import ConfigError, DataError
from bitalloc.quant.grid import quantize


@dataclass
class ActivationLayerStats:
    name: str
    values: int
    alphabet: int
    bits_before: float
    entropy: float
    huffman_bits: float | None
    zlib_bits: float | None
    stored_bits: float | None
    online: bool = False


@dataclass
class ActivationReport:
    """Per-layer activation coding statistics and totals weighted by values (bits per activation)."""

    samples: int
    layers: list[ActivationLayerStats] = field(default_factory=list)

    def totals(self) -> dict[str, Any]:
        ls = self.layers
        n = sum(l.values for l in ls)
        coded = [l for l in ls if l.stored_bits is not None]
        nc = sum(l.values for l in coded)

        def avg(attr: str, rows: list[ActivationLayerStats], count: int) -> float | None:
            return (sum(getattr(l, attr) * l.values for l in rows) / count) if count else None

        return {"values": n, "samples": self.samples, "bits_before": avg("bits_before", ls, n),
                "entropy": avg("entropy", ls, n), "huffman_bits": avg("huffman_bits", coded, nc),
                "zlib_bits": avg("zlib_bits", [l for l in ls if l.zlib_bits is not None],
                                 sum(l.values for l in ls if l.zlib_bits is not None)),
                "stored_bits": avg("stored_bits", coded, nc), "coded_values": nc}

    def as_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "totals": self.totals(), "layers": [asdict(l) for l in self.layers]}


class _LayerAccumulator:
    """Histogram, bits and a streaming zlib Huffman-only encoder of one layer's input codes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.hist: np.ndarray | None = None
        self.lo: int | None = None
        self.values = 0
        self.bit_sum = 0.0
        self.online = False
        self.zlib: Any = zlib.compressobj(9, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
        self.zlib_bytes = 0
        self.zlib_ok = True
        self.zlib_lo: int | None = None
        self.wide = False

    def add(self, codes: Tensor, bits_rows: Tensor, lo: int, hi: int) -> None:
        """``codes``: [R, M] int64 codes within [lo, hi] (the quantizer's whole code range); row r has
        ``bits_rows[r]`` bits."""
        m = codes.shape[1]
        self.values += codes.numel()
        self.bit_sum += float(bits_rows.to(torch.float64).sum()) * m
        if self.wide or hi - lo + 1 > huffman.MAX_ALPHABET:  # codes wider than 16 bits: bits only
            self.wide, self.hist, self.zlib_ok = True, None, False
            return
        if self.lo is None:
            self.lo, self.hist = lo, np.zeros(hi - lo + 1, dtype=np.int64)
        if lo < self.lo or hi - self.lo + 1 > self.hist.size:  # code range changed (online): grow the histogram
            new_lo = min(lo, self.lo)
            size = max(hi, self.lo + self.hist.size - 1) - new_lo + 1
            grown = np.zeros(size, dtype=np.int64)
            grown[self.lo - new_lo:self.lo - new_lo + self.hist.size] = self.hist
            self.lo, self.hist = new_lo, grown
        flat = (codes.reshape(-1) - self.lo).numpy()
        self.hist += np.bincount(flat, minlength=self.hist.size)
        if self.zlib_ok:
            if self.zlib_lo is None:
                self.zlib_lo = self.lo
            if self.lo != self.zlib_lo or self.hist.size > 256:
                self.zlib_ok = False
            else:
                self.zlib_bytes += len(self.zlib.compress(flat.astype(np.uint8).tobytes()))

    def stats(self) -> ActivationLayerStats:
        n = self.values
        bits_before = self.bit_sum / n if n else 0.0
        if self.hist is None:
            return ActivationLayerStats(self.name, n, 0, bits_before, float("nan"), None, None, None, self.online)
        nz = np.flatnonzero(self.hist)
        alphabet = int(nz[-1] - nz[0] + 1) if nz.size else 0
        canon = huffman.canonical_stream_size(self.hist) if n else 0
        huff = 8.0 * canon / n if n else None
        z = None
        if self.zlib_ok and n:
            self.zlib_bytes += len(self.zlib.flush())
            # the same header as huffman.encode's zlib streams (kind, count, offset)
            z = 8.0 * (self.zlib_bytes + huffman._HEAD.size) / n
        stored = huff if z is None else min(huff, z) if huff is not None else z
        return ActivationLayerStats(self.name, n, alphabet, bits_before, huffman.entropy(self.hist), huff, z,
                                    stored, self.online)


def _code_rows(x: Tensor, quantizer: nn.Module) -> tuple[Tensor, Tensor, int, int] | None:
    """Codes of ``x`` under the quantizer's current parameters as rows [R, M], bits per row and the code range."""
    p = quantizer.qparams()
    x = x.detach().float()
    r = p.scale.numel() if p.scale.ndim else 1
    if p.scale.ndim == 0:
        rows = x.reshape(1, -1)
    elif p.online:  # per sample (and per channel) parameters of this very input, as the quantizer computed them
        n = x.shape[0]
        if r == n:
            rows = x.reshape(n, -1)
        else:
            a = p.axis % x.ndim
            rows = x.movedim(a, 1).reshape(r, -1)
    else:
        a = p.axis % x.ndim
        rows = x.movedim(a, 0).reshape(r, -1)
    if rows.shape[0] != r:
        return None
    axis = 0 if p.scale.ndim else None
    codes = quantize(rows, p.scale, p.zero_point, p.qmin, p.qmax, axis)
    bits = p.bits.reshape(-1).expand(r) if p.bits.numel() == 1 else p.bits.reshape(-1)
    return codes, bits, int(p.qmin.min()), int(p.qmax.max())


@torch.no_grad()
def activation_code_stats(qmodel: nn.Module, data: Iterable, num_samples: int | None = 32) -> ActivationReport:
    """Capture the integer codes of every quantized layer's input on ``data`` and report their coding stats.

    ``data``: batches of ``(x, ...)`` or tensors; at most ``num_samples`` samples are used (None: all).
    Layers whose input stays in float are skipped. The model runs in eval mode; its state is unchanged.
    """
    from bitalloc.model.layers import quant_layers

    layers = [(n, l) for n, l in quant_layers(qmodel) if l.input_quantizer is not None]
    if not layers:
        raise ConfigError("no quantized layer has a quantized input: nothing to measure")
    acc = {n: _LayerAccumulator(n) for n, _ in layers}
    handles = []

    def hook_for(name: str):
        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            if not module.enabled or not inputs or not isinstance(inputs[0], Tensor):
                return
            got = _code_rows(inputs[0], module)
            if got is None:
                return
            codes, bits, lo, hi = got
            acc[name].online = bool(module.qparams().online)
            acc[name].add(codes, bits, lo, hi)
        return hook

    for name, layer in layers:
        handles.append(layer.input_quantizer.register_forward_hook(hook_for(name)))
    was_training = qmodel.training
    qmodel.eval()
    seen = 0
    try:
        for x in take_inputs(data, num_samples):
            call_model(qmodel, x)
            seen += batch_size(x)
    finally:
        for h in handles:
            h.remove()
        qmodel.train(was_training)
    if seen == 0:
        raise DataError("activation_code_stats got no data: give at least one sample")
    return ActivationReport(seen, [acc[n].stats() for n, _ in layers if acc[n].values])


__all__ = ["ActivationLayerStats", "ActivationReport", "activation_code_stats"]
