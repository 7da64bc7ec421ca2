"""PACT: Parameterized Clipping Activation (Choi, Wang, Venkataramani, Chuang, Srinivasan, Gopalakrishnan, 2018).

Pure tensor math; the ``nn.Module`` is :class:`bitalloc.quantizers.pact.PACTQuantizer`.

Unsigned (the paper, activations after a ReLU), ``k`` bits, learned clip level ``alpha``:

* Forward (eq. 1-2): ``y = clip(x, 0, alpha)``, ``y_q = round(y * (2^k - 1) / alpha) * alpha / (2^k - 1)``:
  the grid of step ``s = alpha / (2^k - 1)`` with codes ``0 .. 2^k - 1``.
* Gradients (eq. 3, straight-through through the rounding): ``d y_q / d alpha = 1`` where ``x >= alpha``, else
  0; ``d y_q / d x = 1`` where ``0 <= x < alpha``, else 0.
* ``alpha`` is regularised with an L2 penalty (the paper: the same regulariser as the weights); see
  :func:`pact_l2`.

Signed extension (weights, or activations that can be negative; not in the paper, see below):
``y = clip(x, -alpha, alpha)`` on the symmetric grid of step ``s = alpha / (2^(k-1) - 1)`` with codes
``-(2^(k-1) - 1) .. 2^(k-1) - 1`` (one code of the k-bit two's-complement range, -2^(k-1), is unused), so the
grid's extreme values are exactly ``+-alpha``: ``y_q = alpha`` for ``x >= alpha`` and ``-alpha`` for
``x <= -alpha``. Hence the gradients are the exact signed analogue of eq. 3: ``d y_q / d alpha = sign(x)``
where ``|x| >= alpha``, else 0 (straight-through inside); ``d y_q / d x = 1`` where ``|x| < alpha``, else 0.
(The asymmetric two's-complement grid ``-2^(k-1) .. 2^(k-1) - 1`` with step ``2 alpha / (2^k - 1)`` would
clip at ``-alpha (1 + 1/(2^k - 1))`` and ``alpha (1 - 1/(2^k - 1))``: outputs outside ``[-alpha, alpha]`` and
alpha-gradients of ``-2^k/(2^k - 1)`` and ``(2^k - 2)/(2^k - 1)`` instead of -1 and +1.) Needs k >= 2.

Weights in the PACT paper are quantized with DoReFa (Zhou et al. 2016: ``w_q = 2 quantize_k(tanh(w) / (2
max|tanh(w)|) + 1/2) - 1``, 2^k levels on [-1, 1], zero not representable), not with PACT. bitalloc uses the
signed PACT grid above for weights instead, so that every method shares one grid description
(:class:`~bitalloc.quantizers.base.QuantParams`: scale, zero point 0, symmetric integer codes) for cost,
freezing, export and integer kernels; zero is exactly representable (pruned channels, padding), and the
clip level is learned for weights as for activations (as in the Bayesian Bits reference code, whose
``PACTQuantizer`` with a learned symmetric range quantizes weights too, e.g. in its fixed-gate fine-tuning).

The forward is computed as ``clamp(round(x * (1/s)), qmin, qmax) * s`` (round, then clamp the code), which
equals rounding the clipped value and is bitwise what :func:`bitalloc.quant.grid.fake_quantize` computes, so
a frozen PACT quantizer reproduces the trained one exactly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bitalloc.errors import ConfigError
from bitalloc.quant.grid import reshape_for_axis, sum_to_axis


def pact_range(bits: int, signed: bool) -> tuple[int, int]:
    """Code range of the PACT grid: ``(0, 2^k - 1)`` unsigned, ``(-(2^(k-1) - 1), 2^(k-1) - 1)`` signed."""
    k = int(bits)
    if signed:
        if k < 2:
            raise ConfigError(f"a signed PACT grid needs at least 2 bits, got {k}")
        return -((1 << (k - 1)) - 1), (1 << (k - 1)) - 1
    if k < 1:
        raise ConfigError(f"PACT needs at least 1 bit, got {k}")
    return 0, (1 << k) - 1


def pact_step(alpha: Tensor, bits: int, signed: bool) -> Tensor:
    """Step of the PACT grid: ``alpha / (2^k - 1)`` (unsigned) or ``alpha / (2^(k-1) - 1)`` (signed), i.e.
    ``alpha / qmax``: the top code is exactly ``alpha``."""
    return alpha / float(pact_range(bits, signed)[1])


class PACTFunction(torch.autograd.Function):
    """PACT fake quantization with the paper's gradients (eq. 3), signed or unsigned."""

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, bits: int, signed: bool, axis: int | None) -> Tensor:  # type: ignore[override]
        a = reshape_for_axis(alpha, x.ndim, axis).to(x.dtype)
        s = pact_step(a, bits, signed)
        qmin, qmax = pact_range(bits, signed)
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
        grad_a = sum_to_axis(grad * d_alpha, alpha, axis).to(alpha.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_a, None, None, None


def pact_quantize(x: Tensor, alpha: Tensor, bits: int, *, signed: bool = False, axis: int | None = None) -> Tensor:
    """PACT fake quantization of ``x`` with clip level ``alpha`` (0-d, or [C] along ``axis``) on ``bits`` bits."""
    return PACTFunction.apply(x, alpha, int(bits), bool(signed), axis if alpha.ndim == 1 else None)


def pact_l2(alphas: list[Tensor], decay: float) -> Tensor:
    """PACT's L2 penalty on the clip levels: ``decay / 2 * sum(alpha^2)`` (gradient ``decay * alpha``)."""
    if not alphas:
        return torch.zeros(())
    return 0.5 * float(decay) * sum((a.float() ** 2).sum() for a in alphas)


__all__ = ["PACTFunction", "pact_l2", "pact_quantize", "pact_range", "pact_step"]
