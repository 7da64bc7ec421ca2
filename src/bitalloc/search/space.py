"""The search space of per-layer mixed precision: bit-width candidates, the layers searched, and the
QuantConfig a choice becomes.

A candidate is a pair (weight bits, input-activation bits); 32 means float (the tensor is not quantized, as the
cost model counts a float layer: 32 x 32 bits), so W32A32 leaves the layer in float. A choice of one candidate
per searched layer becomes an ordinary :class:`~bitalloc.config.QuantConfig`: the user's configuration with one
override per searched layer (``re:<exact name>`` -> the bit widths), placed *before* the user's own overrides
so that those still win for every layer they name. Within each layer everything else of the configuration
applies unchanged (per-channel allocation around the layer's width, clipping, bias correction, GPTQ).

Layers searched: every layer the configuration quantizes, except the first and last layer when
``first_last_bits`` is set (they keep it), layers a user override gives bit widths or leaves in float
(``weight.bits``, ``act.bits``, ``weight`` / ``act`` set to null or to settings with ``bits``, ``quantize``),
and layers the configuration leaves in float.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any, Iterable

from bitalloc.config import LayerConfig, QuantConfig, match_pattern
from bitalloc.errors import ConfigError

FLOAT = 32
#: the default candidates: {8, 4, 2} weight bits x {8, 4} activation bits
DEFAULT_CANDIDATES = ("8x8", "8x4", "4x8", "4x4", "2x8", "2x4")
_BIT_KEYS = ("weight.bits", "act.bits", "quantize")


@dataclass(frozen=True, order=True)
class Candidate:
    """Bit widths of one layer: ``w_bits`` of the weight, ``a_bits`` of its input; 32 = float."""

    w_bits: int
    a_bits: int

    @property
    def label(self) -> str:
        def b(v: int) -> str:
            return "f" if v == FLOAT else str(v)
        return f"W{b(self.w_bits)}A{b(self.a_bits)}"

    @property
    def is_float(self) -> bool:
        return self.w_bits == FLOAT and self.a_bits == FLOAT

    @classmethod
    def parse(cls, text: Any) -> "Candidate":
        """``"4x8"``, ``"W4A8"``, ``"fx8"`` / ``"32x8"`` (float weight), ``"float"``, or a pair (4, 8)."""
        if isinstance(text, Candidate):
            return text
        if isinstance(text, (tuple, list)) and len(text) == 2:
            w, a = text
        else:
            s = str(text).strip().lower()
            if s in ("float", "fp32", "f"):
                return cls(FLOAT, FLOAT)
            m = re.fullmatch(r"w?(\d+|f)\s*[xa]\s*(\d+|f)", s)
            if not m:
                raise ConfigError(f"bit-width candidate {text!r}: give WxA such as 4x8 (or W4A8; f or 32 = float)")
            w, a = m.groups()
        try:
            w_bits, a_bits = (FLOAT if str(v).lower() == "f" else int(v) for v in (w, a))
        except ValueError:
            raise ConfigError(f"bit-width candidate {text!r}: bits must be integers (or f for float)") from None
        if not 2 <= w_bits <= 32:
            raise ConfigError(f"bit-width candidate {text!r}: weight bits {w_bits} out of range 2..32 (32 = float)")
        if not 1 <= a_bits <= 32:
            raise ConfigError(f"bit-width candidate {text!r}: activation bits {a_bits} out of range 1..32 (32 = float)")
        return cls(w_bits, a_bits)


def parse_candidates(items: Iterable[Any] | str | None) -> list[Candidate]:
    """Candidates from ``"8x8,4x8,..."`` or an iterable (None: :data:`DEFAULT_CANDIDATES`), sorted, unique."""
    if items is None:
        items = DEFAULT_CANDIDATES
    if isinstance(items, str):
        items = [s for s in items.split(",") if s.strip()]
    out = sorted({Candidate.parse(i) for i in items}, reverse=True)
    if not out:
        raise ConfigError("give at least one bit-width candidate, e.g. 8x8,4x8,4x4")
    return out


def _sets_bits(patch: dict[str, Any]) -> bool:
    for key, value in patch.items():
        if key in _BIT_KEYS:
            return True
        if key in ("weight", "act") and (value is None or (isinstance(value, dict) and "bits" in value)):
            return True
    return False


def user_fixed(config: QuantConfig, name: str, type_names: list[str]) -> str | None:
    """The first user override that sets this layer's bit widths (or float status), or None."""
    for pattern, patch in config.overrides:
        if match_pattern(pattern, name, type_names) and _sets_bits(patch):
            return pattern
    return None


def exact_pattern(name: str) -> str:
    """An override pattern that selects exactly the layer ``name``."""
    return "re:" + re.escape(name)


def bits_patch(lcfg: LayerConfig, cand: Candidate, name: str = "") -> dict[str, Any]:
    """The override of one layer (resolved configuration ``lcfg``) that gives it the candidate's widths.

    Allocated tensors keep their per-channel bounds when the width lies inside them, and are widened just
    enough otherwise (as :func:`bitalloc.config.allocation_bounds` widens a preset's)."""
    if cand.is_float:
        return {"quantize": False}
    patch: dict[str, Any] = {}
    for key, bits in (("weight", cand.w_bits), ("act", cand.a_bits)):
        t = getattr(lcfg, key)
        if bits == FLOAT:
            patch[key] = None
            continue
        if t is None:
            what = "weights" if key == "weight" else "input activations"
            raise ConfigError(f"layer {name!r}: the configuration leaves its {what} in float, but candidate "
                              f"{cand.label} quantizes them; give that tensor's settings in the configuration, or "
                              f"use candidates with f for it (e.g. {'fx8' if key == 'weight' else '4xf'})")
        patch[f"{key}.bits"] = bits
        if t.allocate:
            patch[f"{key}.min_bits"] = min(int(t.min_bits), bits)
            patch[f"{key}.max_bits"] = max(int(t.max_bits), bits)
    return patch


def searched_config(config: QuantConfig, patches: dict[str, dict[str, Any]]) -> QuantConfig:
    """``config`` with one override per searched layer (``patches``: layer name -> patch), placed before the
    user's overrides (which therefore still win for the layers they name)."""
    cfg = copy.deepcopy(config)
    cfg.overrides = [(exact_pattern(n), dict(p)) for n, p in patches.items()] + list(cfg.overrides)
    return cfg.validate()


__all__ = ["FLOAT", "DEFAULT_CANDIDATES", "Candidate", "parse_candidates", "user_fixed", "exact_pattern", "bits_patch",
           "searched_config"]
