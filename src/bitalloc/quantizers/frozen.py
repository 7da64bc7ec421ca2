"""The frozen quantizer: a fixed :class:`~bitalloc.quantizers.base.QuantParams` held as buffers.

:func:`bitalloc.model.freeze.freeze` replaces every trained quantizer (LSQ, PACT, Bayesian Bits, and
calibrated PTQ quantizers) by a :class:`FrozenQuantizer` holding its test-time description: bits (per tensor
or per channel), scale, zero point, code range ``[qmin, qmax]``, bias-correction terms and, for weights, the
mask of kept output channels. Its forward is ``fake_quantize`` on that grid (then bias correction, then
pruned channels zeroed), i.e. exactly :meth:`QuantParams.dequantize` of :meth:`QuantParams.quantize`; cost,
serialization, export, packing and integer execution read the same description.

Buffer shapes follow the TensorConfig (``granularity`` "channel": ``[C]``; "tensor": 0-d; "group": ``bits``,
``qmin``, ``qmax`` ``[C]``, ``scale`` and ``zero_point`` ``[C, K / group_size]``; weights always
carry ``corr_scale``, ``corr_shift`` and ``kept`` of ``[C]``), so ``bitalloc.prepare`` with a frozen config
(``TensorConfig(quantizer="frozen", ...)``) rebuilds a model that ``load_state_dict`` fills:
:func:`bitalloc.model.serialize.load_quantized` works unchanged.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bitalloc.config import TensorConfig
from bitalloc.errors import ConfigError
from bitalloc.quant.grid import fake_quantize, integer_range, reshape_for_axis
from bitalloc.quantizers.base import QuantParams, Quantizer
from bitalloc.quantizers.fixed import grid_shapes


class FrozenQuantizer(Quantizer):
    """Quantizer with fixed parameters (buffers ``bits``, ``scale``, ``zero_point``, ``qmin``, ``qmax``; weights
    also ``corr_scale``, ``corr_shift``, ``kept``)."""

    kind = "frozen"

    def __init__(self, cfg: TensorConfig, role: str, axis: int | None, channels: int | None,
                 shape: tuple[int, ...] | None = None):
        super().__init__(role, axis, channels)
        self.cfg = cfg
        self.per_channel = cfg.granularity == "channel"
        self.per_group = cfg.granularity == "group"
        bits_shape, grid_shape = grid_shapes(cfg, role, channels, shape)
        signed = bool(cfg.symmetric)
        bits = torch.full(bits_shape, cfg.int_bits, dtype=torch.int64)
        qmin, qmax = integer_range(bits, signed=signed)
        self.register_buffer("bits", bits)
        self.register_buffer("scale", torch.ones(grid_shape))
        self.register_buffer("zero_point", torch.zeros(grid_shape, dtype=torch.int64))
        self.register_buffer("qmin", qmin.clone())
        self.register_buffer("qmax", qmax.clone())
        if role == "weight":
            self.register_buffer("corr_scale", torch.ones(channels))
            self.register_buffer("corr_shift", torch.zeros(channels))
            self.register_buffer("kept", torch.ones(channels, dtype=torch.bool))
        else:
            self.corr_scale = self.corr_shift = self.kept = None
        self._cache: tuple | None = None

    @classmethod
    def from_qparams(cls, qp: QuantParams, role: str, axis: int | None, channels: int | None,
                     group_size: int | None = None) -> "FrozenQuantizer":
        """A frozen quantizer computing exactly what ``qp`` describes (tensors are copied); ``group_size`` for
        group-wise grids."""
        tensors = [qp.bits, qp.scale, qp.zero_point, qp.qmin, qp.qmax]
        per_channel = any(t.ndim == 1 and t.numel() > 1 for t in tensors) or (
            qp.per_channel and channels is not None)
        bits_max = int(qp.bits.max())
        granularity = "group" if qp.grouped else ("channel" if per_channel else "tensor")
        cfg = TensorConfig(bits=bits_max, granularity=granularity, symmetric=bool(qp.signed), quantizer="frozen",
                           min_bits=1, max_bits=32)
        shape = None
        if qp.grouped:  # a [C, G] grid of a [C, K] weight: K is not in the description, only blocks of it
            if group_size is None:
                raise ConfigError("freezing a group-wise grid needs its group_size (input features per range)")
            cfg.group_size = group_size
            shape = (int(qp.scale.shape[0]), int(qp.scale.shape[1]) * group_size)
        q = cls(cfg, role, axis, channels, shape=shape)
        with torch.no_grad():
            for name, t in (("bits", qp.bits), ("scale", qp.scale), ("zero_point", qp.zero_point), ("qmin", qp.qmin),
                            ("qmax", qp.qmax)):
                buf = getattr(q, name)
                src = t.detach().to(buf.dtype).cpu()
                if src.numel() == 1:
                    buf.fill_(src.reshape(()).item())
                else:
                    buf.copy_(src.reshape(buf.shape))
            if role == "weight":
                if qp.corr_scale is not None:
                    q.corr_scale.copy_(qp.corr_scale.detach().float().cpu().reshape(-1))
                if qp.corr_shift is not None:
                    q.corr_shift.copy_(qp.corr_shift.detach().float().cpu().reshape(-1))
                if qp.kept is not None:
                    q.kept.copy_(qp.kept.detach().bool().cpu().reshape(-1))
        return q.to(qp.scale.device)

    # -- interface ------------------------------------------------------------------------------------
    def _signed(self) -> bool:
        return bool(self.cfg.symmetric)

    def qparams(self) -> QuantParams:
        return QuantParams(bits=self.bits, scale=self.scale, zero_point=self.zero_point, qmin=self.qmin, qmax=self.qmax,
                           axis=self.axis, signed=self._signed(), corr_scale=self.corr_scale,
                           corr_shift=self.corr_shift, kept=self.kept)

    def bits_per_channel(self) -> Tensor:
        return self.bits.to(torch.float64).reshape(-1)

    def kept_mask(self) -> Tensor | None:
        return None if self.kept is None else self.kept.clone()

    def output_gate(self) -> Tensor | None:
        """The kept mask as a 0/1 multiplier of the output channels (None when nothing is pruned or the quantizer
        is disabled); :class:`~bitalloc.model.layers.QuantLayer` gates the bias with it. ``freeze`` also zeroes
        the pruned channels' bias, so this only matters for masks set or saved without that."""
        if not self.enabled or self.kept is None or bool(self.kept.all()):
            return None
        return self.kept.to(self.scale.dtype)

    def _identity_corr(self) -> bool:
        return self.corr_scale is None or (bool((self.corr_scale == 1).all()) and bool((self.corr_shift == 0).all()))

    def quantize_forward(self, x: Tensor) -> Tensor:
        cacheable = self.role == "weight" and not (torch.is_grad_enabled() and x.requires_grad)
        if cacheable:
            key = (id(x), x._version, x.dtype, x.device, *(b._version for b in self.buffers()))
            if self._cache is not None and self._cache[0] == key:
                return self._cache[1]
        y = fake_quantize(x, self.scale, self.zero_point, self.qmin, self.qmax,
                          self.axis if self.per_channel or self.per_group else None)
        if self.role == "weight":
            if not self._identity_corr():
                y = (y * reshape_for_axis(self.corr_scale, y.ndim, self.axis)
                     + reshape_for_axis(self.corr_shift, y.ndim, self.axis))
            if not bool(self.kept.all()):
                y = y * reshape_for_axis(self.kept.to(y.dtype), y.ndim, self.axis)
        if cacheable:
            self._cache = (key, y)
        return y

    def extra_repr(self) -> str:
        b = self.bits.reshape(-1)
        bits = str(int(b[0])) if bool((b == b[0]).all()) else f"{float(b.float().mean()):.2f} avg"
        pruned = f", kept {int(self.kept.sum())}/{self.kept.numel()}" if self.kept is not None else ""
        return f"{self.role}, frozen, bits={bits}, {self.cfg.granularity}, {'signed' if self._signed() else 'unsigned'}{pruned}"


__all__ = ["FrozenQuantizer"]
