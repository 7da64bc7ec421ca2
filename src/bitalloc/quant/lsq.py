"""LSQ: Learned Step Size Quantization (Esser, McKinstry, Bablani, Appuswamy, Modha, ICLR 2020).

Pure tensor math; the ``nn.Module`` is :class:`bitalloc.quantizers.lsq.LSQQuantizer`.

Notation of the paper (section 2): a tensor ``v`` is quantized with a learned step ``s`` on ``b`` bits,
codes in ``[-Q_N, Q_P]``: signed (weights, or activations that can be negative) ``Q_N = 2^(b-1)``,
``Q_P = 2^(b-1) - 1``; unsigned (activations after a ReLU) ``Q_N = 0``, ``Q_P = 2^b - 1``.

* Forward (eq. 1-2): ``v_bar = round(clip(v / s, -Q_N, Q_P))``, ``v_hat = v_bar * s``.
  Clipping to integer bounds and then rounding equals rounding and then clamping the code, which is how it is
  computed here (``round(v * (1/s))`` then clamp, in float32, exactly as :func:`bitalloc.quant.grid.fake_quantize`
  and torch's fused kernels do it), so a frozen LSQ quantizer reproduces the trained one bitwise.
* Gradient with respect to ``v`` (eq. 5, straight-through estimator): 1 where ``-Q_N < v/s < Q_P``, else 0.
* Gradient with respect to ``s`` (eq. 3): ``-v/s + round(v/s)`` where ``-Q_N < v/s < Q_P``; ``-Q_N`` where
  ``v/s <= -Q_N``; ``Q_P`` where ``v/s >= Q_P``; summed over the elements sharing the step, then multiplied by
  the gradient scale ``g`` (section 2.2): ``g = 1 / sqrt(N * Q_P)`` with ``N`` the number of weights of the
  layer (``N_W``) or, for activations, the number of features of the layer (``N_F``, elements per sample).
* Initialisation (section 2.1): ``s0 = 2 * mean(|v|) / sqrt(Q_P)``.

Rounding is half to even (``torch.round``), as everywhere in bitalloc.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bitalloc.errors import ConfigError
from bitalloc.quant.grid import reshape_for_axis, sum_to_axis


def lsq_bounds(bits: int, signed: bool) -> tuple[int, int]:
    """(Q_N, Q_P) of LSQ: signed ``(2^(b-1), 2^(b-1) - 1)``, unsigned ``(0, 2^b - 1)``."""
    b = int(bits)
    if signed:
        if b < 2:
            raise ConfigError("a signed LSQ grid needs at least 2 bits")
        return 1 << (b - 1), (1 << (b - 1)) - 1
    if b < 1:
        raise ConfigError("LSQ needs at least 1 bit")
    return 0, (1 << b) - 1


def lsq_grad_scale(n: int, q_p: int) -> float:
    """Gradient scale ``g = 1 / sqrt(N * Q_P)`` (LSQ section 2.2)."""
    return 1.0 / math.sqrt(max(int(n), 1) * max(int(q_p), 1))


def lsq_init_step(v: Tensor, q_p: int, axis: int | None = None) -> Tensor:
    """Initial step ``2 * mean(|v|) / sqrt(Q_P)`` (LSQ section 2.1): 0-d, or [C] along ``axis``."""
    a = v.detach().abs().to(torch.float64)
    if axis is None:
        m = a.mean()
    else:
        m = a.movedim(axis % a.ndim, 0).reshape(a.shape[axis], -1).mean(1)
    return (2.0 * m / math.sqrt(max(q_p, 1))).to(torch.float32)


class LSQFunction(torch.autograd.Function):
    """LSQ fake quantization with the paper's gradients (eq. 3 and 5) and gradient scale ``g``."""

    @staticmethod
    def forward(ctx, v: Tensor, s: Tensor, q_n: int, q_p: int, g: float, axis: int | None) -> Tensor:  # type: ignore[override]
        sv = reshape_for_axis(s, v.ndim, axis).to(v.dtype)
        ratio = v * torch.reciprocal(sv)
        code = torch.clamp(torch.round(ratio), -q_n, q_p)
        ctx.save_for_backward(ratio, s)
        ctx.q = (q_n, q_p, g, axis)
        return code * sv

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        ratio, s = ctx.saved_tensors
        q_n, q_p, g, axis = ctx.q
        below = ratio <= -q_n
        above = ratio >= q_p
        inside = ~(below | above)
        grad_v = grad * inside.to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_s = None
        if ctx.needs_input_grad[1]:
            local = torch.where(inside, torch.round(ratio) - ratio,
                                torch.where(below, torch.full_like(ratio, -float(q_n)), torch.full_like(ratio, float(q_p))))
            grad_s = (sum_to_axis(grad * local, s, axis) * g).to(s.dtype)
        return grad_v, grad_s, None, None, None, None


def lsq_quantize(v: Tensor, s: Tensor, q_n: int, q_p: int, g: float = 1.0, axis: int | None = None) -> Tensor:
    """LSQ fake quantization ``clamp(round(v / s), -Q_N, Q_P) * s`` with the paper's gradients.

    ``s`` is 0-d (per tensor) or [C] along ``axis`` (per channel); ``g`` scales the step's gradient.
    """
    return LSQFunction.apply(v, s, int(q_n), int(q_p), float(g), axis if s.ndim == 1 else None)


__all__ = ["LSQFunction", "lsq_bounds", "lsq_grad_scale", "lsq_init_step", "lsq_quantize"]
