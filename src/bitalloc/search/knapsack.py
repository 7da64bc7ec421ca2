"""Exact multiple-choice knapsack: one option per group, least total damage within a cost budget.

Problem (the mixed-precision search of HAWQ-v3, Yao et al. 2021, eq. 3, with any additive cost): groups g
(layers) each pick exactly one option j (a bit-width pair) with damage v[g][j] and cost c[g][j] >= 0;

    minimise  sum_g v[g][j_g]   subject to   sum_g c[g][j_g] <= budget.

Two exact solvers:

* ``"milp"``: integer linear programming with :func:`scipy.optimize.milp` (HiGHS branch and bound, relative
  gap 0): binary x[g, j], sum_j x[g, j] = 1 per group, sum c x <= budget. Costs and damages are rescaled to
  O(1) for the solver; the returned choice is re-checked in float64 against the unscaled budget and, if the
  solver's feasibility tolerance let it exceed the budget, solved again with the budget lowered by the excess.
* ``"dp"``: dynamic programming over Pareto sets (Nemhauser & Ullmann 1969): after each group, keep only the
  partial choices that no other partial choice beats in both cost and damage. Exact for real-valued costs (no
  discretisation); the number of kept states is what it costs (a ``max_states`` guard stops runaway cases).
  :func:`pareto_front` returns the whole front of optimal (cost, damage) choices, for every budget at once.

``"auto"`` uses milp when scipy is installed, else dp. Both are checked against brute force in the tests.

:func:`solve_chain` adds costs at the borders between two kinds of option along the groups taken as a chain (float
and int8 layers: the conversions where int8 runs begin and end), solved by the same Pareto program with the last
group's kind in the state; also checked against brute force.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from bitalloc.errors import ConfigError

METHODS = ("auto", "milp", "dp")


@dataclass
class Solution:
    """An optimal choice: ``choice[g]`` is the option index of group g; its total ``damage`` and ``cost``."""

    choice: list[int]
    damage: float
    cost: float
    method: str


def _arrays(values: Sequence[Sequence[float]], costs: Sequence[Sequence[float]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    if len(values) != len(costs):
        raise ConfigError(f"knapsack: {len(values)} groups of damages but {len(costs)} groups of costs")
    vs, cs = [], []
    for g, (v, c) in enumerate(zip(values, costs)):
        v, c = np.asarray(v, dtype=np.float64).reshape(-1), np.asarray(c, dtype=np.float64).reshape(-1)
        if v.size == 0 or v.shape != c.shape:
            raise ConfigError(f"knapsack: group {g} has {v.size} damages and {c.size} costs; give one of each per "
                              "option (at least one option)")
        if not (np.isfinite(v).all() and np.isfinite(c).all()):
            raise ConfigError(f"knapsack: group {g} has a damage or cost that is NaN or infinite")
        if (c < 0).any():
            raise ConfigError(f"knapsack: group {g} has a negative cost")
        vs.append(v)
        cs.append(c)
    return vs, cs


def _total(arrs: list[np.ndarray], choice: Sequence[int]) -> float:
    return float(sum(float(a[j]) for a, j in zip(arrs, choice)))


def _infeasible(cs: list[np.ndarray], budget: float) -> None:
    least = float(sum(float(c.min()) for c in cs))
    if least > budget:
        raise ConfigError(f"the budget {budget:.6g} is below the least cost any choice reaches ({least:.6g}, every "
                          "layer at its cheapest candidate); raise the budget or add cheaper candidates (--candidates)")


def solve(values: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], budget: float, *,
          method: str = "auto", max_states: int = 2_000_000) -> Solution:
    """The least-damage choice of one option per group whose total cost is at most ``budget``."""
    if method not in METHODS:
        raise ConfigError(f"knapsack method {method!r}: choose one of {METHODS}")
    vs, cs = _arrays(values, costs)
    budget = float(budget)
    if not np.isfinite(budget):
        raise ConfigError(f"budget {budget} is not a finite number")
    _infeasible(cs, budget)
    if method == "auto":
        method = "milp" if importlib.util.find_spec("scipy") is not None else "dp"
    choice = _solve_milp(vs, cs, budget) if method == "milp" else _solve_dp(vs, cs, budget, max_states)
    return Solution(choice, _total(vs, choice), _total(cs, choice), method)


def _solve_milp(vs: list[np.ndarray], cs: list[np.ndarray], budget: float) -> list[int]:
    try:
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError:
        raise ConfigError("knapsack method 'milp' needs scipy (pip install 'bitalloc[scipy]'); or use method "
                          "'dp'") from None
    sizes = [v.size for v in vs]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    n = int(offsets[-1])
    c = np.concatenate(cs)
    # rescale: damages relative to their spread, costs relative to the budget (the solver's tolerances are
    # absolute); a constant shift per group does not change the optimum but keeps the objective O(1)
    v_shift = np.concatenate([x - x.min() for x in vs])
    v_scale = float(np.abs(v_shift).max()) or 1.0
    c_scale = max(budget, float(c.max()), 1e-300)
    onehot = np.zeros((len(vs), n))
    for g in range(len(vs)):
        onehot[g, offsets[g]:offsets[g + 1]] = 1.0
    limit = budget
    for _ in range(8):
        res = milp(v_shift / v_scale, integrality=np.ones(n), bounds=Bounds(0, 1),
                   constraints=[LinearConstraint(onehot, 1, 1), LinearConstraint((c / c_scale)[None, :], -np.inf,
                                                                                 limit / c_scale)],
                   options={"mip_rel_gap": 0.0, "presolve": True})
        if res.x is None:
            raise ConfigError(f"the integer program found no choice within the budget ({res.message}); raise the "
                              "budget")
        x = np.round(res.x)
        choice = [int(np.argmax(x[offsets[g]:offsets[g + 1]])) for g in range(len(vs))]
        total = _total(cs, choice)
        if total <= budget:
            return choice
        limit -= (total - budget) * 1.5 + 1e-12 * budget  # the solver's tolerance let it through: tighten
    raise ConfigError("the integer program kept exceeding the budget by rounding; use knapsack method 'dp'")


def _pareto_prune(cost: np.ndarray, value: np.ndarray) -> np.ndarray:
    """Indices of the states no other state dominates (cost <= and value <=, one strictly); ties kept once."""
    order = np.lexsort((value, cost))  # by cost, then value
    v_sorted = value[order]
    best_before = np.minimum.accumulate(np.concatenate([[np.inf], v_sorted[:-1]]))
    keep = v_sorted < best_before
    return order[keep]


def _pareto_states(vs: list[np.ndarray], cs: list[np.ndarray], budget: float | None,
                   max_states: int) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """Forward pass of the Pareto DP: final (cost, value) states and, per group, (parent index, option) of each
    state; states over ``budget`` (with the cheapest completion of the remaining groups) are dropped."""
    rest = np.concatenate([np.cumsum([float(c.min()) for c in cs][::-1])[::-1][1:], [0.0]])
    cost, value = np.zeros(1), np.zeros(1)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    for g, (v, c) in enumerate(zip(vs, cs)):
        nc = (cost[:, None] + c[None, :]).reshape(-1)
        nv = (value[:, None] + v[None, :]).reshape(-1)
        parent = np.repeat(np.arange(cost.size), c.size)
        option = np.tile(np.arange(c.size), cost.size)
        if budget is not None:
            ok = nc + rest[g] <= budget
            nc, nv, parent, option = nc[ok], nv[ok], parent[ok], option[ok]
        keep = _pareto_prune(nc, nv)
        if keep.size > max_states:
            raise ConfigError(f"the Pareto dynamic program grew past {max_states} states at group {g}; install scipy "
                              "for the integer-programming solver (pip install 'bitalloc[scipy]')")
        cost, value = nc[keep], nv[keep]
        back.append((parent[keep], option[keep]))
    return cost, value, back


def _backtrack(back: list[tuple[np.ndarray, np.ndarray]], state: int) -> list[int]:
    choice = []
    for parent, option in reversed(back):
        choice.append(int(option[state]))
        state = int(parent[state])
    return choice[::-1]


def _solve_dp(vs: list[np.ndarray], cs: list[np.ndarray], budget: float, max_states: int) -> list[int]:
    cost, value, back = _pareto_states(vs, cs, budget, max_states)
    best = int(np.argmin(np.where(cost <= budget, value, np.inf)))
    return _backtrack(back, best)


def chain_cost(costs: Sequence[Sequence[float]], kinds: Sequence[Sequence[int]], enter: Sequence[float],
               leave: Sequence[float], choice: Sequence[int]) -> float:
    """The cost of ``choice`` in the chain model of :func:`solve_chain`: its options' costs plus the border
    costs (``enter[g]`` where group g has kind 1 after kind 0 or the start, ``leave[g]`` where it has kind 1
    before kind 0 or the end)."""
    k = [int(kinds[g][j]) for g, j in enumerate(choice)]
    total = float(sum(float(costs[g][j]) for g, j in enumerate(choice)))
    for g, kg in enumerate(k):
        if kg == 1 and (g == 0 or k[g - 1] == 0):
            total += float(enter[g])
        if kg == 1 and (g == len(k) - 1 or k[g + 1] == 0):
            total += float(leave[g])
    return total


def solve_chain(values: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], kinds: Sequence[Sequence[int]],
                enter: Sequence[float], leave: Sequence[float], budget: float, *,
                max_states: int = 2_000_000) -> Solution:
    """The least-damage choice when groups form a chain and options are of two kinds (0, 1) with a cost at each
    border between them: a group whose option has kind 1 pays ``enter[g]`` when the group before it (or the
    start, before group 0) has kind 0, and ``leave[g]`` when the group after it (or the end) has kind 0 (e.g.
    float and int8 layers: quantizing a layer's input where an int8 run begins, dequantizing its output where
    it ends). Minimise sum v subject to :func:`chain_cost` <= ``budget``. Exact: the Pareto dynamic program
    of the module docstring with the last group's kind in the state."""
    vs, cs = _arrays(values, costs)
    ks = [np.asarray(k, dtype=np.int64).reshape(-1) for k in kinds]
    en, lv = np.asarray(enter, dtype=np.float64), np.asarray(leave, dtype=np.float64)
    if len(ks) != len(vs) or any(k.shape != v.shape or not np.isin(k, (0, 1)).all() for k, v in zip(ks, vs)):
        raise ConfigError("chain knapsack: give one kind (0 or 1) per option of every group")
    if en.shape != (len(vs),) or lv.shape != (len(vs),) or not (np.isfinite(en).all() and np.isfinite(lv).all()) \
            or (en < 0).any() or (lv < 0).any():
        raise ConfigError("chain knapsack: give one finite, non-negative enter and leave cost per group")
    _infeasible(cs, float(budget))
    budget = float(budget) * (1 + 1e-12)  # sums in another order than chain_cost's may differ in the last bit
    rest = np.concatenate([np.cumsum([float(c.min()) for c in cs][::-1])[::-1][1:], [0.0]])
    cost, value, kind = np.zeros(1), np.zeros(1), np.zeros(1, dtype=np.int64)  # the start counts as kind 0
    back: list[tuple[np.ndarray, np.ndarray]] = []
    for g, (v, c, k) in enumerate(zip(vs, cs, ks)):
        border = (en[g] * ((k[None, :] == 1) & (kind[:, None] == 0))
                  + (lv[g - 1] if g else 0.0) * ((kind[:, None] == 1) & (k[None, :] == 0)))
        nc = (cost[:, None] + c[None, :] + border).reshape(-1)
        nv = (value[:, None] + v[None, :]).reshape(-1)
        nk = np.tile(k, cost.size)
        parent = np.repeat(np.arange(cost.size), c.size)
        option = np.tile(np.arange(c.size), cost.size)
        ok = nc + rest[g] <= budget
        nc, nv, nk, parent, option = nc[ok], nv[ok], nk[ok], parent[ok], option[ok]
        keep = np.concatenate([np.flatnonzero(nk == q)[_pareto_prune(nc[nk == q], nv[nk == q])] for q in (0, 1)])
        if keep.size > max_states:
            raise ConfigError(f"the chain dynamic program grew past {max_states} states at group {g}")
        cost, value, kind = nc[keep], nv[keep], nk[keep]
        back.append((parent[keep], option[keep]))
    cost = cost + lv[-1] * (kind == 1)
    feasible = cost <= budget
    if not feasible.any():
        raise ConfigError(f"the budget {budget:.6g} is below every choice's cost once the costs at the borders between "
                          "kinds are counted (e.g. quantizing and dequantizing where int8 runs begin and end); raise "
                          "the budget")
    best = int(np.argmin(np.where(feasible, value, np.inf)))
    choice = _backtrack(back, best)
    return Solution(choice, _total(vs, choice), chain_cost(cs, ks, en, lv, choice), "chain-dp")


def pareto_front(values: Sequence[Sequence[float]], costs: Sequence[Sequence[float]], *,
                 max_states: int = 2_000_000) -> list[Solution]:
    """Every Pareto-optimal choice, by increasing cost (each is the exact optimum for budgets from its cost up
    to the next one's)."""
    vs, cs = _arrays(values, costs)
    cost, value, back = _pareto_states(vs, cs, None, max_states)
    order = np.argsort(cost, kind="stable")
    return [Solution(_backtrack(back, int(i)), float(value[i]), float(cost[i]), "dp") for i in order]


__all__ = ["METHODS", "Solution", "solve", "solve_chain", "chain_cost", "pareto_front"]
