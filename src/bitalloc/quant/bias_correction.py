"""Bias correction of quantized weights (ACIQ, Banner et al. 2019, section 5, eq. 12-13).

Quantization shifts the mean and changes the spread of each output channel c (the slice W_c along ``axis``):

    mu_c = E[W_c] - E[Q(W_c)]                                          (eq. 12)
    xi_c = ||W_c - E W_c||_2 / ||Q(W_c) - E Q(W_c)||_2                  (eq. 13)

Mean only (the reference code's default): corrected = Q(W_c) + mu_c, i.e. xi_c = 1, beta_c = mu_c.

With ``norm=True`` we use corrected = xi_c (Q(W_c) - E Q(W_c)) + E W_c = xi_c Q(W_c) + beta_c with
beta_c = E W_c - xi_c E Q(W_c), which restores both the mean and the centred norm of every channel. The paper
prints xi_c (Q(W_c) + mu_c), which restores the mean only when E W_c = 0 (its mean is xi_c E W_c); we
follow the form that does what eq. 12-13 intend. A channel whose quantized values are constant
(||Q - E Q|| = 0) keeps xi_c = 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bitalloc.errors import ShapeError
from bitalloc.quant.grid import reshape_for_axis
from bitalloc.quant.stats import to_rows


def bias_correct(w: Tensor, w_q: Tensor, axis: int = 0, *, norm: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel affine correction of quantized weights: corrected = xi_c * w_q + beta_c (see module).

    ``w``: float weights; ``w_q``: their quantized (dequantized) values, same shape; ``axis``: the output-channel
    axis (0 for Conv [O, I, kh, kw] and Linear [O, I]). Computed in float64. Returns (corrected, xi [C],
    beta [C]); ``corrected`` has the promoted floating dtype of ``w`` and ``w_q``, ``xi`` and ``beta`` are float64.
    """
    if w.shape != w_q.shape:
        raise ShapeError(f"w and w_q must have the same shape, got {tuple(w.shape)} and {tuple(w_q.shape)}")
    if w.ndim == 0:
        raise ShapeError("bias correction needs at least one channel axis; got a scalar")
    out_dtype = torch.promote_types(w.dtype, w_q.dtype)
    if not out_dtype.is_floating_point:
        out_dtype = torch.float32
    W = to_rows(w.detach().to(torch.float64), axis)
    Q = to_rows(w_q.detach().to(torch.float64), axis)
    mean_w = W.mean(dim=1)
    mean_q = Q.mean(dim=1)
    if norm:
        norm_w = torch.linalg.vector_norm(W - mean_w[:, None], dim=1)
        norm_q = torch.linalg.vector_norm(Q - mean_q[:, None], dim=1)
        xi = torch.where(norm_q > 0, norm_w / torch.where(norm_q > 0, norm_q, 1.0), torch.ones_like(norm_q))
    else:
        xi = torch.ones_like(mean_w)
    beta = mean_w - xi * mean_q
    wq64 = w_q.detach().to(torch.float64)
    corrected = reshape_for_axis(xi, wq64.ndim, axis) * wq64 + reshape_for_axis(beta, wq64.ndim, axis)
    return corrected.to(out_dtype), xi, beta
