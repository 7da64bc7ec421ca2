"""The KL-divergence (entropy) calibration threshold of TensorRT.

Source: S. Migacz, "8-bit Inference with TensorRT", GTC 2017 (slides 28-33, the calibration pseudo code);
details that the slides leave open follow MXNet's ``_get_optimal_threshold``
(``python/mxnet/contrib/quantization.py``) and NVIDIA's pytorch-quantization ``_compute_amax_entropy``,
as stated below.

Algorithm, on a histogram ``hist`` of |x| over [0, max |x|] with N = ``len(hist)`` bins of width w and
n_q quantized levels (2^(bits-1) for a signed grid, 2^bits for non-negative data on an unsigned grid):

for each candidate i = n_q, ..., N (the first i bins are kept, i.e. the threshold is near i * w):

1. reference P = hist[:i] with the outliers sum(hist[i:]) added to its last bin P[i-1];
2. candidate Q: the kept bins hist[:i] (without the outliers) merged into n_q groups of consecutive bins of
   near-equal size (bin j goes to group floor(j * n_q / i), as pytorch-quantization does; MXNet instead uses
   equal groups of floor(i / n_q) bins and puts the remainder into the last group); each group's total is
   spread uniformly over the group's bins where P is non-zero, and bins where P is zero stay zero in Q;
3. smoothing: every zero bin of P and of Q gets eps = 1e-4 (in the histogram's own units, i.e. counts: the
   value of MXNet's ``_smooth_distribution``); unlike MXNet we do not subtract the added mass from the
   non-zero bins (which can make small bins negative) but renormalise; a Q with no mass at all (all kept
   bins empty) gets KL = inf, as MXNet does;
4. KL(P || Q) = sum_k P_k log(P_k / Q_k) with P and Q normalised.

The winner is the first i (smallest threshold) of minimal KL, and the threshold is T = (i + 0.5) * w, the
formula of the TensorRT slides (the upper edge of the kept bins is i * w; the half bin is TensorRT's choice
and is negligible at 2048 bins). When n_q >= N the histogram cannot resolve the grid and the result is
i = N (no clipping), T = (N + 0.5) * w; callers clip T to the observed range.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from bitalloc.errors import ConfigError, ShapeError

#: smoothing mass given to empty bins (counts), MXNet's ``_smooth_distribution`` default
KLD_EPS = 1e-4


def _as_hist(hist: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(hist, Tensor):
        hist = hist.detach().cpu().numpy()
    h = np.asarray(hist, dtype=np.float64)
    if h.ndim != 1 or h.size == 0:
        raise ShapeError(f"a histogram must be a non-empty 1-d array, got shape {h.shape}")
    if not np.all(np.isfinite(h)) or np.any(h < 0):
        raise ConfigError("histogram counts must be finite and non-negative")
    return h


def kld_divergences(hist: Tensor | np.ndarray, num_quant_bins: int, *,
                    eps: float = KLD_EPS) -> tuple[np.ndarray, np.ndarray]:
    """KL(P_i || Q_i) for every candidate i = num_quant_bins .. len(hist) (module docstring, steps 1-4).

    Returns (candidates i, divergences) as numpy arrays; empty when ``num_quant_bins > len(hist)``.
    One numpy-vectorised step per candidate: O(N^2) work, about 0.1 s for N = 2048 bins.
    """
    h = _as_hist(hist)
    n_q = int(num_quant_bins)
    if n_q < 1:
        raise ConfigError(f"num_quant_bins must be >= 1, got {num_quant_bins}")
    nb = h.size
    if n_q > nb:  # the histogram cannot resolve the grid (e.g. 32-bit codes): no candidate, before any O(n_q) work
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
    cands = np.arange(n_q, nb + 1, dtype=np.int64)
    kls = np.empty(cands.size, dtype=np.float64)
    outliers = np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])  # outliers[i] = sum(h[i:])
    groups = np.arange(n_q, dtype=np.int64)
    for k, i in enumerate(cands.tolist()):
        kept = h[:i]
        p = kept.copy()
        p[-1] += outliers[i]
        nonzero = p != 0
        # group g covers bins [ceil(g i / n_q), ceil((g + 1) i / n_q)); every group is non-empty as i >= n_q
        starts = (groups * i + n_q - 1) // n_q
        sizes = (groups * i + i + n_q - 1) // n_q - starts
        group_sum = np.add.reduceat(kept, starts)
        group_nz = np.add.reduceat(nonzero.astype(np.float64), starts)
        per_bin = np.divide(group_sum, group_nz, out=np.zeros(n_q), where=group_nz > 0)
        q = np.repeat(per_bin, sizes)
        q[~nonzero] = 0.0
        if not q.sum() > 0:
            kls[k] = math.inf
            continue
        p = p + eps * (p == 0)
        q = q + eps * (q == 0)
        p /= p.sum()
        q /= q.sum()
        kls[k] = float(np.dot(p, np.log(p) - np.log(q)))
    return cands, kls


def kld_threshold(hist: Tensor | np.ndarray, bin_width: float, num_quant_bins: int, *,
                  eps: float = KLD_EPS) -> float:
    """TensorRT entropy-calibration threshold T = (i* + 0.5) * bin_width on a histogram of |x| (see module).

    ``hist``: counts of |x| over [0, len(hist) * bin_width); ``num_quant_bins``: quantized levels covering
    [0, T] (128 for signed int8). i* is the first candidate of minimal KL(P || Q).
    """
    if not bin_width >= 0 or not math.isfinite(bin_width):
        raise ConfigError(f"bin_width must be finite and >= 0, got {bin_width}")
    h = _as_hist(hist)
    cands, kls = kld_divergences(h, num_quant_bins, eps=eps)
    if cands.size == 0 or not np.any(np.isfinite(kls)):
        best = h.size
    else:
        best = int(cands[int(np.argmin(kls))])
    return (best + 0.5) * float(bin_width)


def abs_histogram(rows: Tensor, amax: Tensor, num_bins: int) -> Tensor:
    """Histograms of |x| for each row of ``rows`` [C, n] over [0, amax_c] with ``num_bins`` bins ([C, num_bins]).

    Bin of x: floor(|x| * num_bins / amax) clamped to num_bins - 1 (float64 arithmetic; values above amax
    count in the last bin). A row with amax = 0 has all its values in bin 0.
    """
    if rows.ndim != 2:
        raise ShapeError(f"expected rows of shape [C, n], got {tuple(rows.shape)}")
    C = rows.shape[0]
    a = torch.as_tensor(amax, dtype=torch.float64).reshape(-1)
    x = rows.detach().to(torch.float64).abs()
    inv = torch.where(a > 0, num_bins / torch.where(a > 0, a, 1.0), torch.zeros_like(a))
    idx = torch.floor(x * inv[:, None]).clamp_(0, num_bins - 1).to(torch.int64)
    idx += torch.arange(C, dtype=torch.int64)[:, None] * num_bins
    return torch.bincount(idx.reshape(-1), minlength=C * num_bins).reshape(C, num_bins).to(torch.float64)
