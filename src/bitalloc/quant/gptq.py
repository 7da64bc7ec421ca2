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

Two settings of the reference implementation matter when calibration data are few (GPTQ's README and code):

* the order of the columns: "act-order" quantizes the columns with the largest Hessian diagonal (the inputs with
  the most energy) first, while most columns are still free to absorb their error; the codes are then put back
  in the weight's own order (:func:`gptq_round` ``act_order``);
* the damping lambda of H + lambda mean(diag H) I, which regularises the Hessian of a few samples (1% by
  default). With 32 images, a late layer of a CNN sees as many input rows (32 x 7 x 7) as it has columns, and the
  1% Hessian over-fits them. :func:`heldout_damping` chooses lambda per layer by K-fold cross-validation of the
  layer-wise loss: the weights rounded with the Hessian of all folds but k are scored on fold k's Hessian,
  tr(dW H_k dW^T), summed over k; it needs no labels and no data beyond the calibration samples.

Asymmetric calibration (Li et al. 2025, "GPTQv2 / GPTAQ: Efficient Finetuning-Free Quantization with Asymmetric
Calibration", ICML): GPTQ fits the quantized layer to its own float weights on the inputs x_q that the quantized
network gives it, sum ||(W - Q) x_q||^2, so the error that earlier layers (and its own input quantizer) put into x_q
is left in place. Matching instead the float network's output on its float inputs x_f,

    min_Q  sum_n ||W x_f - Q x_q||^2 + lambda ||Q - W||^2
         = const + tr((Q - T)(H + lambda I)(Q - T)^T),   T = W (C + lambda I)(H + lambda I)^-1,

with H = sum x_q x_q^T and C = sum x_f x_q^T (expand the square; T solves the normal equations), so the
asymmetric problem is exactly GPTQ's on the target T instead of W, with the damped Hessian GPTQ already uses: the
damping lambda doubles as a ridge that pulls T towards W (lambda -> inf: plain GPTQ; x_f = x_q: T = W).
:func:`gptq_round` ``cross=C`` rounds T; GPTAQ derives the same objective inside the column recursion, this
module reaches it by that exact decomposition.
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


def damping(hessian: Tensor, damp: float) -> Tensor:
    """lambda = damp * mean(diag H) per group ([G], float64), the inputs that are never active (diag 0) counted
    as 1 (GPTQ's reference code sets their diagonal to 1 before damping)."""
    diag = torch.diagonal(hessian, dim1=-2, dim2=-1).to(torch.float64)
    return damp * torch.where(diag == 0, torch.ones_like(diag), diag).mean(dim=-1)


def asymmetric_target(weight: Tensor, hessian: Tensor, cross: Tensor, damp: float) -> Tensor:
    """T = W (C + lambda I)(H + lambda I)^-1 per group (module docstring, asymmetric calibration), float64.

    ``weight`` [G, R, K]; ``hessian`` H = sum x_q x_q^T and ``cross`` C = sum x_f x_q^T, both [G, K, K];
    lambda = :func:`damping` (H, damp). T minimises sum ||W x_f - T x_q||^2 + lambda ||T - W||^2."""
    if cross.shape != hessian.shape:
        raise ShapeError(f"the cross moments sum x_f x_q^T must have the Hessian's shape {tuple(hessian.shape)}, "
                         f"got {tuple(cross.shape)}")
    K = hessian.shape[-1]
    lam = damping(hessian, damp)[:, None, None] * torch.eye(K, dtype=torch.float64)
    H, C = hessian.to(torch.float64) + lam, cross.to(torch.float64) + lam
    diag = torch.diagonal(H, dim1=1, dim2=2)
    diag[diag == 0] = 1.0  # damp == 0 and an input never active: its column keeps W's (T solves H T^T = C^T W^T)
    return torch.linalg.solve(H, C.transpose(1, 2) @ weight.to(torch.float64).transpose(1, 2)).transpose(1, 2)


def gptq_round(weight: Tensor, hessian: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor, qmax: Tensor,
               *, damp: float = 0.01, block: int = 128, act_order: bool = False, cross: Tensor | None = None
               ) -> Tensor:
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
        act_order: quantize the columns in decreasing order of diag(H) (per group; module docstring).
        cross: [G, K, K], sum of x_f x_q^T (float inputs times the quantized inputs of ``hessian``): asymmetric
            calibration, the codes of :func:`asymmetric_target` instead of ``weight`` (module docstring).
    Returns: int64 codes [G, R, K], in the weight's own column order.
    """
    if weight.ndim != 3 or hessian.ndim != 3 or hessian.shape[0] != weight.shape[0] or \
            hessian.shape[1:] != (weight.shape[2], weight.shape[2]):
        raise ShapeError(f"gptq_round needs weight [G, R, K] and hessian [G, K, K], got {tuple(weight.shape)} "
                         f"and {tuple(hessian.shape)}")
    if cross is not None:
        weight = asymmetric_target(weight, hessian, cross, damp)
    G, R, K = weight.shape
    if act_order:
        perm = torch.argsort(torch.diagonal(hessian, dim1=1, dim2=2), dim=1, descending=True, stable=True)  # [G, K]
        cols = perm[:, None, :].expand(G, R, K)
        permuted = [t.gather(2, cols) if t.ndim == 3 else t for t in (scale, zero_point)]
        h = hessian.gather(1, perm[:, :, None].expand(G, K, K)).gather(2, perm[:, None, :].expand(G, K, K))
        codes = gptq_round(weight.gather(2, cols), h, *permuted, qmin, qmax, damp=damp, block=block)
        return codes.gather(2, torch.argsort(perm, dim=1)[:, None, :].expand(G, R, K))
    W = weight.detach().to(torch.float64).clone()
    H = hessian.detach().to(torch.float64).clone()
    diag = torch.diagonal(H, dim1=1, dim2=2)
    dead = diag == 0  # inputs that are always zero: their weights do not matter
    lam = damping(H, damp)
    diag[dead] = 1.0
    W.masked_fill_(dead[:, None, :], 0.0)
    diag += lam[:, None]
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


def heldout_damping(weight: Tensor, fold_hessians: Tensor, scale: Tensor, zero_point: Tensor, qmin: Tensor,
                    qmax: Tensor, damps: tuple[float, ...], *, act_order: bool = False, block: int = 128,
                    fold_cross: Tensor | None = None, fold_reference: Tensor | None = None
                    ) -> tuple[float, list[float]]:
    """The damping of ``damps`` with the least cross-validated layer-wise loss (module docstring), and the loss of
    each: sum over folds k of tr(dW_k H_k dW_k^T), dW_k = W - Q_gptq(W; H - H_k, damp).

    ``fold_hessians``: [F, G, K, K], the Hessians of F disjoint folds of the calibration inputs (F >= 2); the
    other arguments as :func:`gptq_round`. Asymmetric calibration: ``fold_cross`` (sum x_f x_q^T) and
    ``fold_reference`` (sum x_f x_f^T) of the same folds; each fold's codes are those of its target, and the loss is
    sum_k ||W x_f - Q_k x_q||^2 over fold k (:func:`reconstruction_error`). Ties go to the first (smallest, if
    sorted) damping."""
    if fold_hessians.ndim != 4 or fold_hessians.shape[0] < 2:
        raise ShapeError(f"heldout_damping needs the Hessians of at least 2 folds, [F, G, K, K], got "
                         f"{tuple(fold_hessians.shape)}")
    if (fold_cross is None) != (fold_reference is None):
        raise ShapeError("asymmetric heldout_damping needs both fold_cross (sum x_f x_q^T) and fold_reference "
                         "(sum x_f x_f^T) of the folds")
    F = fold_hessians.shape[0]
    G, R, K = weight.shape

    def as_groups(t: Tensor) -> tuple[Tensor, Tensor]:  # (fit on the other folds, held-out fold), folds as groups
        return (t.sum(dim=0)[None] - t).reshape(F * G, K, K), t.reshape(F * G, K, K)

    fit, held = as_groups(fold_hessians)
    fit_cross, held_cross = as_groups(fold_cross) if fold_cross is not None else (None, None)
    held_ref = fold_reference.reshape(F * G, K, K) if fold_reference is not None else None
    w, sc, zp, lo, hi = (t.repeat(F, *([1] * (t.ndim - 1))) for t in (weight, scale, zero_point, qmin, qmax))
    sc3, zp3 = (t if t.ndim == 3 else t[..., None] for t in (sc, zp))
    losses = []
    for d in damps:
        codes = gptq_round(w, fit, sc, zp, lo, hi, damp=d, block=block, act_order=act_order, cross=fit_cross)
        approx = (codes - zp3).to(torch.float64) * sc3.to(torch.float64)
        losses.append(float(reconstruction_error(w, approx, held, cross=held_cross, reference=held_ref).sum()))
    best = min(range(len(damps)), key=losses.__getitem__)
    return float(damps[best]), losses


def reconstruction_error(weight: Tensor, approx: Tensor, hessian: Tensor, *, cross: Tensor | None = None,
                         reference: Tensor | None = None) -> Tensor:
    """Layer-wise loss sum_n ||(W - W_hat) x_n||^2 = tr((W - W_hat) H (W - W_hat)^T) per group ([G]).

    Asymmetric (``cross`` C = sum x_f x_q^T and ``reference`` R = sum x_f x_f^T, with H = sum x_q x_q^T):
    sum_n ||W x_f - W_hat x_q||^2 = tr(W R W^T) - 2 tr(W C W_hat^T) + tr(W_hat H W_hat^T)."""
    if cross is None:
        d = (weight - approx).to(torch.float64)
        return torch.einsum("grk,gkl,grl->g", d, hessian.to(torch.float64), d)
    if reference is None:
        raise ShapeError("the asymmetric reconstruction error needs reference = sum x_f x_f^T beside cross")
    w, q = weight.to(torch.float64), approx.to(torch.float64)
    return (torch.einsum("grk,gkl,grl->g", w, reference.to(torch.float64), w)
            - 2 * torch.einsum("grk,gkl,grl->g", w, cross.to(torch.float64), q)
            + torch.einsum("grk,gkl,grl->g", q, hessian.to(torch.float64), q))
