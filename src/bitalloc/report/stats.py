"""Is one model really more accurate than another on the same test set? Paired statistics of top-1.

Two models evaluated on the same n samples give per-sample outcomes ``a_i, b_i`` in {0, 1}. Their accuracy
difference is the mean of ``d_i = a_i - b_i``; because both models get most samples right (or wrong) together,
its standard error is far smaller than that of two independent binomial accuracies:

    diff = (n10 - n01) / n,   SE(diff) = sqrt(((n10 + n01) / n - diff^2) / n)

with ``n10`` the samples only ``a`` gets right and ``n01`` those only ``b`` gets right (the sample standard
deviation of ``d_i`` over sqrt(n), population form). McNemar's exact test (McNemar 1947; Dietterich 1998,
"Approximate statistical tests for comparing supervised classification learning algorithms", test 2) asks
whether ``n10`` and ``n01`` differ more than chance: under the null each disagreement is a fair coin, so the
two-sided p-value is ``min(1, 2 P[X <= min(n10, n01)])`` with ``X ~ Binomial(n10 + n01, 1/2)``.

The per-sample outcomes travel in JSON as :func:`encode_mask` strings (bit-packed, base64).
"""

from __future__ import annotations

import base64
import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import numpy as np


@dataclass(frozen=True)
class PairedComparison:
    """Top-1 of ``a`` and ``b`` on the same ``n`` samples, their difference ``a - b`` with its paired standard
    error, the disagreement counts and McNemar's exact two-sided p-value. Accuracies are fractions."""

    n: int
    accuracy_a: float
    accuracy_b: float
    diff: float
    se: float
    only_a: int
    only_b: int
    p_value: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def mcnemar_exact_p(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value, ``min(1, 2 * P[X <= min(only_a, only_b)])``, X ~ Bin(only_a + only_b, 1/2),
    computed in exact rational arithmetic (no loss of precision for tens of thousands of disagreements)."""
    if only_a < 0 or only_b < 0:
        raise ValueError(f"disagreement counts must be >= 0, got {only_a} and {only_b}")
    m, k = only_a + only_b, min(only_a, only_b)
    if m == 0:
        return 1.0
    term = tail = 1  # C(m, 0); C(m, i) = C(m, i - 1) (m - i + 1) / i, exact in integers
    for i in range(1, k + 1):
        term = term * (m - i + 1) // i
        tail += term
    return float(min(Fraction(1), Fraction(2 * tail, 2 ** m)))


def paired_comparison(correct_a: Any, correct_b: Any) -> PairedComparison:
    """Compare two models from their per-sample correctness on the same samples (bool arrays of one length)."""
    a = np.asarray(correct_a, dtype=bool).ravel()
    b = np.asarray(correct_b, dtype=bool).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired comparison needs both models on the same samples: got {a.size} and {b.size} "
                         "outcomes (evaluate both on the same test split)")
    n = a.size
    if n == 0:
        raise ValueError("paired comparison of zero samples")
    only_a = int(np.count_nonzero(a & ~b))
    only_b = int(np.count_nonzero(b & ~a))
    diff = (only_a - only_b) / n
    var = max((only_a + only_b) / n - diff * diff, 0.0) / n
    return PairedComparison(n=n, accuracy_a=float(a.mean()), accuracy_b=float(b.mean()), diff=diff,
                            se=math.sqrt(var), only_a=only_a, only_b=only_b, p_value=mcnemar_exact_p(only_a, only_b))


def encode_mask(mask: Any) -> str:
    """A bool vector as a compact JSON-safe string: ``"<n>:<base64 of numpy.packbits>"``."""
    m = np.asarray(mask, dtype=bool).ravel()
    return f"{m.size}:" + base64.b64encode(np.packbits(m).tobytes()).decode("ascii")


def decode_mask(text: str) -> np.ndarray:
    """Inverse of :func:`encode_mask`; a clear error for strings that are not such masks or are truncated."""
    try:
        n_txt, payload = text.split(":", 1)
        n = int(n_txt)
        raw = np.frombuffer(base64.b64decode(payload, validate=True), dtype=np.uint8)
    except (ValueError, AttributeError) as e:
        raise ValueError(f"not an encoded per-sample mask ('<n>:<base64>'): {str(text)[:40]!r}") from e
    if n < 0 or raw.size != (n + 7) // 8:
        raise ValueError(f"encoded per-sample mask is truncated or corrupt: {raw.size} bytes for {n} samples "
                         f"(expected {(n + 7) // 8}); re-evaluate the model to regenerate it")
    return np.unpackbits(raw, count=n).astype(bool)


@dataclass(frozen=True)
class OutputAgreement:
    """How closely a model's outputs follow a reference model's on the same n samples (no labels needed).

    ``top1_agreement``: % of samples whose arg-max over the last output dimension is the same;
    ``cosine`` / ``cosine_min``: mean / smallest per-sample cosine similarity of the flattened outputs;
    ``sqnr_db``: signal-to-quantization-noise ratio 10 log10(sum r^2 / sum (r - o)^2) over all values (inf when
    equal); ``nn_agreement``: % of samples whose nearest other sample (cosine) is the same under both models
    (None for fewer than 3 samples), the retrieval view of sentence embeddings."""

    samples: int
    top1_agreement: float
    cosine: float
    cosine_min: float
    sqnr_db: float
    nn_agreement: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _nearest(x: np.ndarray) -> np.ndarray:
    u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-300)
    sim = u @ u.T
    np.fill_diagonal(sim, -np.inf)
    return sim.argmax(axis=1)


def output_agreement(reference: Any, outputs: Any) -> OutputAgreement:
    """:class:`OutputAgreement` of ``outputs`` with ``reference`` (arrays or tensors [n, ...], same shape), in
    float64."""
    r = np.asarray(reference, dtype=np.float64)
    o = np.asarray(outputs, dtype=np.float64)
    if r.shape != o.shape or r.ndim < 1 or r.shape[0] == 0:
        raise ValueError(f"outputs of shape {o.shape} cannot be compared with reference outputs of shape {r.shape}")
    n = r.shape[0]
    rf, of = r.reshape(n, -1), o.reshape(n, -1)
    norms = np.linalg.norm(rf, axis=1) * np.linalg.norm(of, axis=1)
    cos = np.where(norms > 0, (rf * of).sum(axis=1) / np.maximum(norms, 1e-300), (rf == of).all(axis=1) * 1.0)
    noise = float(((rf - of) ** 2).sum())
    signal = float((rf ** 2).sum())
    sqnr = math.inf if noise == 0 else (10.0 * math.log10(signal / noise) if signal > 0 else -math.inf)
    top1 = 100.0 * float((r.reshape(n, -1, r.shape[-1]).argmax(-1) == o.reshape(n, -1, o.shape[-1]).argmax(-1))
                         .all(axis=1).mean()) if r.ndim > 1 else 100.0 * float((r == o).mean())
    nn = 100.0 * float((_nearest(rf) == _nearest(of)).mean()) if n >= 3 else None
    return OutputAgreement(n, top1, float(cos.mean()), float(cos.min()), sqnr, nn)
