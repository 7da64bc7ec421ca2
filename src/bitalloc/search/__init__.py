"""Per-layer mixed precision without training: sensitivity, an exact search under a budget, Pareto fronts.

::

    import bitalloc
    from bitalloc.search import layer_sensitivity, search, parse_budget

    cfg = bitalloc.preset("aciq-gptq", w_bits=4, a_bits=4)
    sens = layer_sensitivity(model, cfg, calibration_batches, bits="8x8,8x4,4x8,4x4,2x8,2x4")
    found = search(sens, parse_budget("bops=W4A8"))      # or "bops=2.5%", "size=1.2MB"
    # latency budgets need measured per-layer onnxruntime latencies (int8 against float) first:
    #   sens = add_latency(model, sens, example_batch); search(sens, "latency=5ms")
    qmodel = bitalloc.quantize(model, found.config, calibration_batches)

:mod:`~bitalloc.search.sensitivity` measures the damage of each layer alone at each width,
:mod:`~bitalloc.search.knapsack` solves the multiple-choice knapsack exactly, :mod:`~bitalloc.search.budget`
states budgets and turns a choice into an ordinary :class:`~bitalloc.config.QuantConfig`,
:mod:`~bitalloc.search.space` defines candidates and which layers are searched, :mod:`~bitalloc.search.latency`
measures the latency table of latency budgets.
"""

from bitalloc.search.budget import Budget, SearchResult, check_choice, parse_budget, parse_budgets, search
from bitalloc.search.knapsack import Solution, pareto_front, solve
from bitalloc.search.latency import add_latency, model_latency
from bitalloc.search.sensitivity import METRICS, Sensitivity, add_hessian, layer_sensitivity
from bitalloc.search.space import DEFAULT_CANDIDATES, Candidate, parse_candidates

__all__ = ["Budget", "Candidate", "DEFAULT_CANDIDATES", "METRICS", "SearchResult", "Sensitivity", "Solution", "add_hessian",
           "add_latency", "model_latency", "check_choice", "layer_sensitivity", "parse_budget", "parse_budgets", "parse_candidates", "pareto_front",
           "search", "solve"]
