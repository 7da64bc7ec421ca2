"""Budgets, the search under a budget, and the check of what it chose.

Budgets (``parse_budget``), as ``KIND=VALUE``:

* ``bops=2.5%``: relative BOPs (BOPs / (1024 x MACs), as the cost report counts them, float layers 32 x 32);
  ``bops=3.2G``: BOPs per sample (suffixes K, M, G, T); ``bops=W4A8``: the BOPs of the same configuration with
  every searched layer at that uniform width (first / last and fixed layers as configured).
* ``size=1.2MB``: model memory as the cost report counts it: weights at their widths, biases, float layers and
  other parameters at 32 bits, quantization metadata (scales, zero points, corrections) included; units B, KB,
  MB, GB (powers of 1000), KiB, MiB, GiB, bits; ``size=15%`` of the FP32 model; ``size=W4A8`` as above.
* ``latency=5ms`` (also ``us``, ``s``): the network's latency per batch in onnxruntime on this machine, from
  per-layer measurements of int8 against float kernels (:mod:`bitalloc.search.latency`; the sensitivity must
  carry that table: :func:`~bitalloc.search.latency.add_latency`); ``latency=60%`` of the FP32 model's measured
  latency; ``latency=W8A8``. With candidates such as ``8x8,f`` this chooses which layers stay float.

:func:`search` solves the multiple-choice knapsack exactly (:mod:`bitalloc.search.knapsack`) over the
sensitivity's damages and costs and returns an ordinary :class:`~bitalloc.config.QuantConfig`
(:func:`bitalloc.search.space.searched_config`). Damages are assumed additive across layers; :func:`check_choice`
measures how far that holds for the configuration chosen: the damage of the whole configuration on the
calibration samples against the sum of the layers' damages, the outputs against the float outputs plus the sum
of each layer's output change (from which a predicted top-1 and top-1 agreement with FP32 on the calibration
samples follow), each layer's measured share (the damage that disappears when that layer alone returns to float,
against its predicted damage), and the cost as the cost report counts it against the budget (for a latency
budget: the chosen configuration exported whole and timed in onnxruntime against the summed per-layer prediction;
met within LATENCY_TOLERANCE of the budget, additive within LATENCY_ADDITIVITY).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from bitalloc.batches import cut_inputs
from bitalloc.config import QuantConfig
from bitalloc.cost import cost_report
from bitalloc.errors import ConfigError
from bitalloc.model.layers import quant_layers
from bitalloc.model.prepare import prepare
from bitalloc.search.knapsack import solve, solve_chain
from bitalloc.search.latency import LATENCY_KEY, chain_terms, parse_time
from bitalloc.search.sensitivity import Sensitivity, calibration_batches, damage
from bitalloc.search.space import Candidate, searched_config
from bitalloc.model.suffix import SuffixRunner

KINDS = ("bops", "size", "latency")
_COST_KEY = {"bops": "bops", "size": "memory_bits", "latency": LATENCY_KEY}
_UNIT = {"bops": "BOPs", "size": "bits", "latency": "ms"}
_SIZE_UNITS = {"b": 8.0, "kb": 8e3, "mb": 8e6, "gb": 8e9, "kib": 8 * 1024.0, "mib": 8 * 1024.0 ** 2,
               "gib": 8 * 1024.0 ** 3, "bits": 1.0, "bit": 1.0}
_COUNT = {"": 1.0, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}
#: a latency budget counts as met when the whole exported configuration measures within this share of it (timing
#: noise), and the per-layer sum as matching the whole within LATENCY_ADDITIVITY
LATENCY_TOLERANCE, LATENCY_ADDITIVITY = 0.05, 0.15
NO_LATENCY = ("a latency budget needs per-layer onnxruntime latencies, and this sensitivity has none; measure them "
              "with bitalloc.search.latency.add_latency (the CLI does this for --budget latency=...), or use a "
              "bops= or size= budget")


@dataclass(frozen=True)
class Budget:
    """A budget: ``kind`` ("bops", "size" or "latency"), ``mode`` ("relative": ``value`` is a fraction;
    "absolute": BOPs, bits or milliseconds; "uniform": the cost of ``uniform`` at every searched layer) and the
    text it came from."""

    kind: str
    mode: str
    value: float = 0.0
    uniform: Candidate | None = None
    text: str = ""

    @property
    def cost_key(self) -> str:
        return _COST_KEY[self.kind]

    def limit(self, sens: Sensitivity) -> float:
        """The budget in BOPs, bits or milliseconds for the network of ``sens``."""
        if self.kind == "latency" and (sens.latency is None or LATENCY_KEY not in sens.costs):
            raise ConfigError(NO_LATENCY)
        if self.mode == "uniform":
            assert self.uniform is not None
            sens.cost_index(self.uniform)  # has a cost table (else a ConfigError naming the fix)
            return sens.total_cost(self.cost_key, {n: self.uniform for n in sens.layers})
        if self.mode == "relative":
            base = {"bops": 1024.0 * sens.total_macs, "size": sens.fp32_memory_bits,
                    "latency": float((sens.latency or {}).get("fp32_model_ms", 0.0))}[self.kind]
            return self.value * base
        return self.value


def parse_budget(text: str) -> Budget:
    """A :class:`Budget` from ``"bops=2.5%"``, ``"bops=W4A8"``, ``"size=1.2MB"`` ... (module docstring)."""
    kind, sep, value = str(text).partition("=")
    kind, value = kind.strip().lower(), value.strip()
    if not sep or kind not in KINDS or not value:
        raise ConfigError(f"budget {text!r}: give KIND=VALUE with KIND bops, size or latency, e.g. bops=2.5%, "
                          "bops=W4A8, size=1.2MB, latency=5ms")
    if re.fullmatch(r"[wW](\d+|f)[aA](\d+|f)", value):
        return Budget(kind, "uniform", uniform=Candidate.parse(value), text=text)
    m = re.fullmatch(r"([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*([A-Za-z%]*)", value)
    if not m:
        raise ConfigError(f"budget {text!r}: {value!r} is not a number with a unit, a percentage or a width (W4A8)")
    number, unit = float(m.group(1)), m.group(2).lower()
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"budget {text!r}: give a positive amount")
    if unit == "%":
        if number > 100:
            raise ConfigError(f"budget {text!r}: a percentage of the FP32 model above 100% bounds nothing; give at "
                              "most 100%")
        return Budget(kind, "relative", number / 100.0, text=text)
    if kind == "latency":
        return Budget(kind, "absolute", parse_time(value), text=text)
    if kind == "bops":
        if unit not in _COUNT:
            raise ConfigError(f"budget {text!r}: BOPs take the suffixes K, M, G, T (or % for relative BOPs)")
        if unit == "" and number < 1:
            raise ConfigError(f"budget {text!r}: {number:g} BOPs is less than one; for relative BOPs write a "
                              f"percentage ({100 * number:g}%)")
        return Budget(kind, "absolute", number * _COUNT[unit], text=text)
    if unit not in _SIZE_UNITS:
        raise ConfigError(f"budget {text!r}: sizes take the units {', '.join(k for k in _SIZE_UNITS)} (or %)")
    return Budget(kind, "absolute", number * _SIZE_UNITS[unit], text=text)


def parse_budgets(text: str) -> list[Budget]:
    """Several budgets: ``"bops=2%,3%,W4A8"`` (a kind applies to the values after it until the next kind, so
    ``"bops=W4A8,W4A4,size=W4A4"`` works too)."""
    out, kind = [], None
    for item in (v.strip() for v in str(text).split(",")):
        if not item:
            continue
        if "=" in item:
            kind, _, item = item.partition("=")
        if kind is None:
            raise ConfigError(f"budgets {text!r}: give KIND=V1,V2,..., e.g. bops=W8A8,W4A8,W4A4 or size=1MB,2MB")
        out.append(parse_budget(f"{kind}={item}"))
    if not out:
        raise ConfigError(f"budgets {text!r}: give at least one value")
    return out


@dataclass
class SearchResult:
    """The configuration chosen under one budget; ``choice``: searched layer -> candidate; ``predicted``: the
    summed damage; ``cost``: BOPs, relative BOPs and memory of the choice as the cost report counts them;
    ``layers``: per searched layer its widths, predicted damage and costs."""

    budget: Budget
    limit: float
    choice: dict[str, Candidate]
    config: QuantConfig
    predicted: float
    cost: dict[str, float]
    solver: str
    seconds: float
    metric: str
    layers: list[dict[str, Any]] = field(default_factory=list)
    #: the sensitivity searched (not in :meth:`to_dict`)
    sensitivity: Sensitivity | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget.text, "kind": self.budget.kind, "limit": self.limit,
                "limit_unit": _UNIT[self.budget.kind], "metric": self.metric,
                "predicted_damage": self.predicted, "cost": self.cost, "solver": self.solver,
                "solve_seconds": self.seconds, "layers": self.layers,
                "widths": {c.label: sum(1 for v in self.choice.values() if v == c)
                           for c in sorted(set(self.choice.values()), reverse=True)}}


def search(sens: Sensitivity, budget: Budget | str, *, method: str = "auto") -> SearchResult:
    """The least-damage choice of one candidate per searched layer within ``budget`` (exact; module docstring)."""
    if isinstance(budget, str):
        budget = parse_budget(budget)
    start = time.perf_counter()
    key = budget.cost_key
    limit = budget.limit(sens)
    cols = [sens.cost_index(c) for c in sens.candidates]
    costs = sens.costs[key][:, cols]
    capacity = limit - sens.fixed[key]
    what = _UNIT[budget.kind]
    least = float(costs.min(axis=1).sum())
    if capacity < least:
        cheapest = sens.fixed[key] + least
        shown = {"bops": f"{100 * cheapest / (1024 * sens.total_macs):.4g}% relative BOPs",
                 "size": f"{cheapest / 8e6:.4g} MB", "latency": f"{cheapest:.4g} ms"}[budget.kind]
        raise ConfigError(f"budget {budget.text}: below the cheapest configuration of these candidates ({shown}: "
                          f"every searched layer at its cheapest width, the others as configured); raise the budget"
                          + (" (measured: nothing runs faster on this machine)" if budget.kind == "latency"
                             else " or add narrower candidates (--candidates)"))
    if key == LATENCY_KEY:  # int8 runs pay conversions at their borders: the chain model, solved exactly
        kinds, enter, leave = chain_terms(sens, sens.candidates)
        sol = solve_chain(sens.values.tolist(), costs.tolist(), kinds, enter, leave, capacity)
    else:
        sol = solve(sens.values.tolist(), costs.tolist(), capacity, method=method)
    choice = {n: sens.candidates[j] for n, j in zip(sens.layers, sol.choice)}
    patches = {n: sens.patches[i][cols[j]] for i, (n, j) in enumerate(zip(sens.layers, sol.choice))}
    config = searched_config(QuantConfig.from_dict(sens.config), patches)
    cost = {k: sens.total_cost(k, choice) for k in ("bops", "memory_bits", LATENCY_KEY) if k in sens.costs}
    cost["relative_bops"] = cost["bops"] / (1024.0 * sens.total_macs)
    rows = [{"name": n, "type": sens.types[i], "w_bits": choice[n].w_bits, "a_bits": choice[n].a_bits,
             "candidate": choice[n].label, "predicted_damage": float(sens.values[i, j]),
             **{k: float(sens.costs[k][i, cols[j]]) for k in ("bops", "memory_bits", LATENCY_KEY) if k in sens.costs}}
            for i, (n, j) in enumerate(zip(sens.layers, sol.choice))]
    if cost[key] > limit * (1 + 1e-12):
        raise ConfigError(f"internal error: the chosen configuration costs {cost[key]:.6g} {what}, over the budget "
                          f"{limit:.6g}; please report this")
    return SearchResult(budget, limit, choice, config, float(sol.damage), cost, sol.method,
                        time.perf_counter() - start, sens.metric, rows, sens)


# ---- measured against predicted ---------------------------------------------------------------------------

def _top1(out: torch.Tensor, labels: torch.Tensor | None) -> float | None:
    if labels is None or out.ndim != 2:
        return None
    return 100.0 * float((out.argmax(1) == labels).double().mean())


def _agreement(out: torch.Tensor, ref: torch.Tensor) -> float | None:
    return 100.0 * float((out.argmax(1) == ref.argmax(1)).double().mean()) if out.ndim == 2 else None


@torch.no_grad()
def check_choice(model: nn.Module, result: SearchResult, sens: Sensitivity, data: Iterable, *,
                 qmodel: nn.Module | None = None, layer_effects: bool = True) -> dict[str, Any]:
    """Measured against predicted, for the configuration ``result`` chose (module docstring).

    ``qmodel``: the model quantized with ``result.config`` on the same calibration data (quantized here when
    None). ``layer_effects``: also each layer's measured share (one partial pass per searched layer)."""
    from bitalloc.ptq import quantize

    inputs, labels = calibration_batches(data, sens.samples)
    label_all = torch.cat(labels) if all(y is not None for y in labels) else None
    if qmodel is None:
        qmodel = quantize(model, result.config, inputs)
    ref = sens.reference
    runner = SuffixRunner(qmodel, list(result.choice), inputs)
    runner.check(cut_inputs(inputs[0], 2))
    outs = runner.base()
    out = torch.cat(outs)
    measured = float(damage(sens.metric, out, ref, label_all).mean())
    report: dict[str, Any] = {
        "samples": sens.samples, "metric": sens.metric, "predicted_damage": result.predicted,
        "measured_damage": measured, "ratio": measured / result.predicted if result.predicted else None,
        "measured_top1": _top1(out, label_all), "measured_agreement": _agreement(out, ref),
        "fp32_top1": _top1(ref, label_all)}
    if sens.deltas is not None:
        cols = [sens.column(result.choice[n]) for n in sens.layers]
        pred_out = ref + sum(sens.deltas[i, j] for i, j in enumerate(cols))
        report.update(predicted_output_damage=float(damage(sens.metric, pred_out, ref, label_all).mean()),
                      predicted_top1=_top1(pred_out, label_all), predicted_agreement=_agreement(pred_out, ref))
    rows = [dict(r) for r in result.layers]
    if layer_effects:
        floats = prepare(model, result.config, cut_inputs(inputs[0], 2))
        for row in rows:
            module = floats.get_submodule(row["name"])
            module = getattr(module, "layer", module)
            without = torch.cat([runner.variant(row["name"], module, b) for b in range(len(inputs))])
            row["measured_damage"] = measured - float(damage(sens.metric, without, ref, label_all).mean())
    report["layers"] = rows
    rep = cost_report(qmodel, cut_inputs(inputs[0], 1))
    key = result.budget.cost_key
    counted = {"bops": rep.bops, "memory_bits": rep.memory_bits, "relative_bops": rep.relative_bops}
    met, matches = counted.get(key, 0.0) <= result.limit * (1 + 1e-12), None
    if key == LATENCY_KEY:  # measured: the chosen configuration exported whole, timed against the float model
        from bitalloc.search.latency import model_latency

        assert sens.latency is not None
        whole = model_latency(model, qmodel, inputs, cut_inputs(inputs[0], int(sens.latency["batch"])),
                              threads=int(sens.latency["threads"]))
        counted[key] = whole["quantized_ms"]
        report["latency"] = whole
        met = counted[key] <= result.limit * (1 + LATENCY_TOLERANCE)
        matches = abs(counted[key] - result.cost[key]) <= LATENCY_ADDITIVITY * result.cost[key]
    else:
        matches = bool(np.isclose(counted[key], result.cost[key], rtol=1e-9, atol=0))
    report["cost"] = {"predicted": result.cost, "counted": counted, "limit": result.limit, "budget_met": bool(met),
                      "cost_matches": bool(matches)}
    report["quantized_layers"] = len(quant_layers(qmodel))
    report["engine"] = runner.engine
    runner.release()
    return report


__all__ = ["KINDS", "Budget", "SearchResult", "parse_budget", "parse_budgets", "search", "check_choice",
           "LATENCY_TOLERANCE", "LATENCY_ADDITIVITY"]
