"""Error-compensating rounding of weights onto a fixed grid (GPTQ).

Frantar et al. 2023, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers",
Algorithm 1 (building on Optimal Brain Quantization, Frantar & Alistarh 2022). For one layer with weight rows
w (one per output channel) and the Hessian of the layer-wise reconstruction loss H = sum_n x_n x_n^T over
its calibration inputs x_n, the columns (input features) are quantized one at a time and the rounding error
of column i is spread over the not-yet-quantized columns F:

    q_i = Q(w_i),    delta = (w_i - q_i) / [H_F^-1]_ii,    w_F <- w_F - delta * [H_F^-1]_{i, F}

where H_F^-1 is the inverse Hessian restricted to the remaining columns. GPTQ obtains every [H_F^-1] row
at once from the upper Cholesky factor of H^-1 and processes columns in blocks (lazy batch updates); the
result equals the column-by-column recursion above. The grid (scale, zero point, code range per row) is
fixed beforehand, here by bitalloc's range estimators and bit allocation: only the rounding changes.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bitalloc.errors import ShapeError


def _quant_dequant(w: Tensor, scale: Tensor, zp: Tensor, qmin: Tensor, qmax: Tensor) -> tuple[Tensor, Tensor]:
    """Codes and grid values of one column per row (all [G, R]), with grid.quantize's float32 rounding."""
    inv = torch.reciprocal(scale.float())
    q = torch.clamp(torch.round(w.float() * inv).to(torch.int64) + zp, qmin, qmax)
    return q, ((q - zp).to(torch.float32) * scale.float()).to(w.dtype)


def gptq_round(weight: Tensor, hessian: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor,
               *, damp: float = 0.01, block: int = 128) -> Tensor:
    """Codes of ``weight`` on its grid, chosen by GPTQ.

    Args:
        weight: [G, R, K]: G independent groups (e.g. groups of a grouped convolution), R rows (output
            channels) per group, K columns (inputs x kernel positions).
        hessian: [G, K, K], sum of x x^T of each group's inputs (symmetric positive semi-definite).
        scale, zero_point, qmin, qmax: the grid of every row, [G, R]; scale and zero point may also be
            [G, R, K], one per weight (group-wise grids: a range per block of columns), column i of which
            quantizes column i.
        damp: relative damping lambda * mean(diag H) added to the diagonal (GPTQ uses 1%).
        block: columns per lazy batch update.
    Returns: int64 codes [G, R, K].
    """
    if weight.ndim != 3 or hessian.ndim != 3 or hessian.shape[0] != weight.shape[0] or \
            hessian.shape[1:] != (weight.shape[2], weight.shape[2]):
        raise ShapeError(f"gptq_round needs weight [G, R, K] and hessian [G, K, K], got {tuple(weight.shape)} "
                         f"and {tuple(hessian.shape)}")
    G, R, K = weight.shape
    W = weight.detach().to(torch.float64).clone()
    H = hessian.detach().to(torch.float64).clone()
    diag = torch.diagonal(H, dim1=1, dim2=2)
    dead = diag == 0  # inputs that are always zero: their weights do not matter
    diag[dead] = 1.0
    W.masked_fill_(dead[:, None, :], 0.0)
    mean_diag = diag.mean(dim=1, keepdim=True)
    diag += damp * mean_diag
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    U = torch.linalg.cholesky(Hinv, upper=True)  # rows of U give [H_F^-1]_{i, F} / sqrt([H_F^-1]_ii)
    codes = torch.empty(G, R, K, dtype=torch.int64)
    for i1 in range(0, K, block):
        i2 = min(i1 + block, K)
        W1 = W[:, :, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[:, i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, :, i]
            d = U1[:, i, i][:, None]
            j = i1 + i
            q, deq = _quant_dequant(w, scale[..., j] if scale.ndim == 3 else scale,
                                    zero_point[..., j] if zero_point.ndim == 3 else zero_point, qmin, qmax)
            codes[:, :, i1 + i] = q
            err = (w - deq) / d
            W1[:, :, i:] -= err[:, :, None] * U1[:, i, i:][:, None, :]
            E1[:, :, i] = err
        W[:, :, i2:] -= E1 @ U[:, i1:i2, i2:]
    return codes


def reconstruction_error(weight: Tensor, approx: Tensor, hessian: Tensor) -> Tensor:
    """Layer-wise loss sum_n ||(W - W_hat) x_n||^2 = tr((W - W_hat) H (W - W_hat)^T) per group ([G])."""
    d = (weight - approx).to(torch.float64)
    return torch.einsum("grk,gkl,grl->g", d, hessian.to(torch.float64), d)
