"""Stochastic binary gates for Bayesian Bits: hard-concrete (the paper) and Gumbel-softmax (the rebuttal).

**Hard-concrete** (Louizos, Welling, Kingma, "Learning Sparse Neural Networks through L0 Regularization",
ICLR 2018, eq. 10-12; used by van Baalen et al. 2020, Bayesian Bits, section 3), with learnable ``log_alpha``
and constants ``beta = 2/3``, ``zeta = 1.1``, ``gamma = -0.1``::

    u ~ U(0, 1)
    s = sigmoid((log u - log(1 - u) + log_alpha) / beta)
    z = clamp(s * (zeta - gamma) + gamma, 0, 1)

``z`` is exactly 0 with probability ``P(z = 0) = sigmoid(beta * log(-gamma / zeta) - log_alpha)`` and
``P(z > 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))`` (Louizos et al. eq. 12; the Bayesian Bits
reference code's ``hc_prob_pos``). Derivation: ``z = 0`` iff ``s <= -gamma / (zeta - gamma)``, and
``logit(-gamma / (zeta - gamma)) = log(-gamma / zeta)``.

Test time (Bayesian Bits, section 3 and the reference code ``get_gates`` in eval mode): the gate is a
deterministic function of ``log_alpha``: on (1) iff ``P(z = 0) < threshold``, threshold 0.34.

**Gumbel-softmax / binary concrete** (Jang et al. 2017, Maddison et al. 2017): ``z = sigmoid((log u - log(1-u) +
logit) / tau)``, ``P(on) = sigmoid(logit)``; with ``hard=True`` the forward value is ``1[z > 1/2]`` and the
gradient that of the relaxed ``z`` (straight-through). Test time: on iff ``P(off) = 1 - sigmoid(logit)`` is
below the threshold (0.5 in the reference code for non-hard-concrete gates).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: hard-concrete constants of Louizos et al. 2018 and Bayesian Bits
HC_BETA = 2.0 / 3.0
HC_ZETA = 1.1
HC_GAMMA = -0.1
#: test-time threshold on P(z = 0) of the Bayesian Bits reference code
HC_THRESHOLD = 0.34
#: default temperature of the Gumbel-softmax gates
GUMBEL_TAU = 2.0 / 3.0
GUMBEL_THRESHOLD = 0.5
#: keeps log(u) and log(1 - u) finite
U_EPS = 1e-6


def uniform_noise(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``u ~ U(eps, 1 - eps)`` (drawn on the CPU from ``generator``, then moved to ``device``)."""
    u = torch.rand(tuple(shape), generator=generator, dtype=torch.float64)
    return (U_EPS + (1.0 - 2.0 * U_EPS) * u).to(device=device, dtype=dtype)


def logistic(u: Tensor) -> Tensor:
    """``log u - log(1 - u)``: a standard logistic sample from ``u ~ U(0, 1)``."""
    return torch.log(u) - torch.log1p(-u)


def hard_concrete_sample(log_alpha: Tensor, u: Tensor, beta: float = HC_BETA, zeta: float = HC_ZETA,
                         gamma: float = HC_GAMMA) -> Tensor:
    """A hard-concrete sample ``z`` in [0, 1] for uniform noise ``u`` (differentiable in ``log_alpha``)."""
    s = torch.sigmoid((logistic(u) + log_alpha) / beta)
    return torch.clamp(s * (zeta - gamma) + gamma, 0.0, 1.0)


def hard_concrete_log_offset(beta: float = HC_BETA, zeta: float = HC_ZETA, gamma: float = HC_GAMMA) -> float:
    """``beta * log(-gamma / zeta)`` (about -1.599 for the default constants)."""
    return beta * math.log(-gamma / zeta)


def hard_concrete_prob_nonzero(log_alpha: Tensor, beta: float = HC_BETA, zeta: float = HC_ZETA,
                               gamma: float = HC_GAMMA) -> Tensor:
    """``P(z > 0) = sigmoid(log_alpha - beta * log(-gamma / zeta))``."""
    return torch.sigmoid(log_alpha - hard_concrete_log_offset(beta, zeta, gamma))


def hard_concrete_prob_zero(log_alpha: Tensor, beta: float = HC_BETA, zeta: float = HC_ZETA,
                            gamma: float = HC_GAMMA) -> Tensor:
    """``P(z = 0) = sigmoid(beta * log(-gamma / zeta) - log_alpha)``."""
    return torch.sigmoid(hard_concrete_log_offset(beta, zeta, gamma) - log_alpha)


def hard_concrete_test_gate(log_alpha: Tensor, threshold: float = HC_THRESHOLD, beta: float = HC_BETA,
                            zeta: float = HC_ZETA, gamma: float = HC_GAMMA) -> Tensor:
    """Deterministic test-time gate: 1.0 where ``P(z = 0) < threshold``, else 0.0."""
    return (hard_concrete_prob_zero(log_alpha.detach(), beta, zeta, gamma) < threshold).to(torch.float32)


def gumbel_sample(logit: Tensor, u: Tensor, tau: float = GUMBEL_TAU, hard: bool = False) -> Tensor:
    """A binary-concrete (Gumbel-softmax with two classes) sample; ``hard``: straight-through 0/1."""
    z = torch.sigmoid((logit + logistic(u)) / tau)
    if hard:
        return (z > 0.5).to(z.dtype) + (z - z.detach())  # exactly 0/1 forward, relaxed gradient
    return z


def gumbel_prob_on(logit: Tensor) -> Tensor:
    """``P(on) = sigmoid(logit)``."""
    return torch.sigmoid(logit)


def gumbel_test_gate(logit: Tensor, threshold: float = GUMBEL_THRESHOLD) -> Tensor:
    """Deterministic test-time gate: 1.0 where ``P(off) = 1 - sigmoid(logit) < threshold``."""
    return ((1.0 - torch.sigmoid(logit.detach())) < threshold).to(torch.float32)


def gumbel_softmax_sample(logits: Tensor, u: Tensor, tau: float = GUMBEL_TAU, hard: bool = False) -> Tensor:
    """A Gumbel-softmax sample over the last axis (Jang, Gu, Poole, ICLR 2017, eq. 1; Maddison et al. 2017):
    ``y = softmax((logits + g) / tau)`` with Gumbel noise ``g = -log(-log u)`` from ``u ~ U(0, 1)`` (same shape as
    ``logits``). ``hard``: the forward value is the one-hot of ``argmax y`` (= ``argmax (logits + g)``, which is
    distributed as ``softmax(logits)``: the Gumbel-max trick), the gradient that of ``y`` (straight-through)."""
    y = torch.softmax((logits - torch.log(-torch.log(u))) / tau, dim=-1)
    if hard:
        one_hot = torch.zeros_like(y).scatter_(-1, y.argmax(-1, keepdim=True), 1.0)
        return one_hot + (y - y.detach())
    return y


def categorical_test_choice(logits: Tensor) -> Tensor:
    """The deterministic test-time choice of a categorical gate: the one-hot of ``argmax logits`` (no gradient)."""
    logits = logits.detach()
    return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)


GATE_TYPES = ("hard_concrete", "gumbel")


def canonical_gate_type(name: str) -> str:
    from bitalloc.errors import ConfigError

    key = str(name).strip().lower().replace("-", "_")
    key = {"hc": "hard_concrete", "l0": "hard_concrete", "hardconcrete": "hard_concrete",
           "gumbel_softmax": "gumbel", "concrete": "gumbel"}.get(key, key)
    if key not in GATE_TYPES:
        raise ConfigError(f"unknown gate type {name!r}; choose one of {GATE_TYPES}")
    return key


def prob_on(logit: Tensor, kind: str) -> Tensor:
    """P(gate on) for either gate type: P(z > 0) (hard-concrete) or sigmoid(logit) (Gumbel)."""
    return hard_concrete_prob_nonzero(logit) if kind == "hard_concrete" else gumbel_prob_on(logit)


def sample_gate(logit: Tensor, u: Tensor, kind: str, *, tau: float = GUMBEL_TAU, hard: bool = True) -> Tensor:
    """A training-time gate sample of either type."""
    return hard_concrete_sample(logit, u) if kind == "hard_concrete" else gumbel_sample(logit, u, tau, hard)


def test_gate(logit: Tensor, kind: str, threshold: float | None = None) -> Tensor:
    """The deterministic test-time gate of either type (default thresholds 0.34 / 0.5)."""
    if kind == "hard_concrete":
        return hard_concrete_test_gate(logit, HC_THRESHOLD if threshold is None else threshold)
    return gumbel_test_gate(logit, GUMBEL_THRESHOLD if threshold is None else threshold)


test_gate.__test__ = False  # type: ignore[attr-defined]  # not a pytest test when imported into a test module

__all__ = [
    "HC_BETA", "HC_ZETA", "HC_GAMMA", "HC_THRESHOLD", "GUMBEL_TAU", "GUMBEL_THRESHOLD", "GATE_TYPES",
    "uniform_noise", "logistic", "hard_concrete_sample", "hard_concrete_log_offset", "hard_concrete_prob_nonzero",
    "hard_concrete_prob_zero", "hard_concrete_test_gate", "gumbel_sample", "gumbel_prob_on", "gumbel_test_gate",
    "gumbel_softmax_sample", "categorical_test_choice",
    "canonical_gate_type", "prob_on", "sample_gate", "test_gate",
]
