"""PACT: Parameterized Clipping Activation (Choi, Wang, Venkataramani, Chuang, Srinivasan, Gopalakrishnan, 2018).

Pure tensor math; the ``nn.Module`` is :class:`bitalloc.quantizers.pact.PACTQuantizer`.

Unsigned (the paper, activations after a ReLU), ``k`` bits, learned clip level ``alpha``:

* Forward (eq. 1-2): ``y = clip(x, 0, alpha)``, ``y_q = round(y * (2^k - 1) / alpha) * alpha / (2^k - 1)``:
  the grid of step ``s = alpha / (2^k - 1)`` with codes ``0 .. 2^k - 1``.
* Gradients (eq. 3, straight-through through the rounding): ``d y_q / d alpha = 1`` where ``x >= alpha``, else
  0; ``d y_q / d x = 1`` where ``0 <= x < alpha``, else 0.
* ``alpha`` is regularised with an L2 penalty (the paper: the same regulariser as the weights); see
  :func:`pact_l2`.

Signed extension (weights, or activations that can be negative; not in the paper, which quantizes weights
with DoReFa): ``y = clip(x, -alpha, alpha)`` on bitalloc's symmetric grid (step ``s = 2 alpha / (2^k - 1)``,
codes ``-2^(k-1) .. 2^(k-1) - 1``, see :mod:`bitalloc.quant.grid`); ``d y_q / d alpha = sign(x)`` where
``|x| >= alpha``, else 0; ``d y_q / d x = 1`` where ``|x| < alpha``.

The forward is computed as ``clamp(round(x * (1/s)), qmin, qmax) * s`` (round, then clamp the code), which
equals rounding the clipped value and is bitwise what :func:`bitalloc.quant.grid.fake_quantize` computes, so
a frozen PACT quantizer reproduces the trained one exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bitalloc.quant.grid import integer_range, reshape_for_axis


def pact_step(alpha: Tensor, bits: int, signed: bool) -> Tensor:
    """Step of the PACT grid: ``alpha / (2^k - 1)`` (unsigned) or ``2 alpha / (2^k - 1)`` (signed)."""
    levels = float((1 << int(bits)) - 1)
    return (2.0 * alpha if signed else alpha) / levels


def _reduce_to(t: Tensor, like: Tensor, axis: int | None) -> Tensor:
    if like.ndim == 0 or axis is None:
        return t.sum().reshape(like.shape)
    ax = axis % t.ndim
    return t.movedim(ax, 0).reshape(t.shape[ax], -1).sum(1)


class PACTFunction(torch.autograd.Function):
    """PACT fake quantization with the paper's gradients (eq. 3), signed or unsigned."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, bits: int, signed: bool, axis: int | None) -> Tensor:  # type: ignore[override]
        a = reshape_for_axis(alpha, x.ndim, axis).to(x.dtype)
        s = pact_step(a, bits, signed)
        qmin, qmax = (int(v) for v in integer_range(int(bits), signed))
        code = torch.clamp(torch.round(x * torch.reciprocal(s)), qmin, qmax)
        ctx.save_for_backward(x, alpha)
        ctx.meta = (signed, axis)
        return code * s

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, alpha = ctx.saved_tensors
        signed, axis = ctx.meta
        a = reshape_for_axis(alpha, x.ndim, axis).to(x.dtype)
        if signed:
            inside = x.abs() < a
            d_alpha = torch.where(x >= a, 1.0, 0.0) - torch.where(x <= -a, 1.0, 0.0)
        else:
            inside = (x >= 0) & (x < a)
            d_alpha = (x >= a).to(x.dtype)
        grad_x = grad * inside.to(grad.dtype) if ctx.needs_input_grad[0] else None
        grad_a = _reduce_to(grad * d_alpha, alpha, axis).to(alpha.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_a, None, None, None


def pact_quantize(x: Tensor, alpha: Tensor, bits: int, *, signed: bool = False, axis: int | None = None) -> Tensor:
    """PACT fake quantization of ``x`` with clip level ``alpha`` (0-d, or [C] along ``axis``) on ``bits`` bits."""
    return PACTFunction.apply(x, alpha, int(bits), bool(signed), axis if alpha.ndim == 1 else None)


def pact_l2(alphas: list[Tensor], decay: float) -> Tensor:
    """PACT's L2 penalty on the clip levels: ``decay / 2 * sum(alpha^2)`` (gradient ``decay * alpha``)."""
    if not alphas:
        return torch.zeros(())
    return 0.5 * float(decay) * sum((a.float() ** 2).sum() for a in alphas)


__all__ = ["PACTFunction", "pact_l2", "pact_quantize", "pact_step"]
