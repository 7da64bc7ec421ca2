"""Search under a budget: the exact multiple-choice knapsack against brute force, budget parsing, and the
configuration it produces (the budget met exactly as the cost report counts it, user overrides winning)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

import bitalloc
from bitalloc.errors import ConfigError
from bitalloc.search import Candidate, layer_sensitivity, parse_budget, parse_budgets, search
from bitalloc.search.knapsack import pareto_front, solve
from bitalloc.search.space import bits_patch, parse_candidates, searched_config
from tests.nets import make_net

pytestmark = pytest.mark.usefixtures("one_thread")


def brute_force(values, costs, budget):
    best = None
    for choice in itertools.product(*[range(len(v)) for v in values]):
        c = sum(costs[g][j] for g, j in enumerate(choice))
        if c <= budget:
            v = sum(values[g][j] for g, j in enumerate(choice))
            if best is None or v < best[0]:
                best = (v, c, choice)
    return best


def random_case(rng, groups, options, integer_costs=False):
    values = [rng.random(options) * rng.choice([1e-4, 1.0, 30.0]) - (0.1 if rng.random() < 0.3 else 0.0)
              for _ in range(groups)]
    costs = [(rng.integers(1, 50, options) if integer_costs else rng.random(options) * 1e9).astype(float)
             for _ in range(groups)]
    lo = sum(c.min() for c in costs)
    hi = sum(c.max() for c in costs)
    return values, costs, lo + rng.random() * (hi - lo)


@pytest.mark.parametrize("method", ["milp", "dp"])
@pytest.mark.parametrize("seed", range(12))
def test_solver_is_optimal_against_brute_force(method, seed):
    rng = np.random.default_rng(seed)
    values, costs, budget = random_case(rng, groups=int(rng.integers(2, 6)), options=int(rng.integers(2, 5)),
                                        integer_costs=seed % 2 == 0)
    best = brute_force(values, costs, budget)
    sol = solve(values, costs, budget, method=method)
    assert sol.cost <= budget
    assert sol.damage == pytest.approx(best[0], rel=1e-9, abs=1e-12)
    assert sol.cost == pytest.approx(sum(costs[g][j] for g, j in enumerate(sol.choice)))


def test_tight_budget_equal_to_a_choice_cost_is_met_exactly():
    values = [[0.0, 1.0, 5.0], [0.0, 2.0, 3.0], [0.0, 0.5, 9.0]]
    costs = [[64e6, 16e6, 4e6], [40e6, 10e6, 2.5e6], [8e6, 2e6, 0.5e6]]
    budget = 16e6 + 10e6 + 0.5e6  # exactly one choice's cost: (1, 1, 2) damage 12; others cost more or lose more
    for method in ("milp", "dp"):
        sol = solve(values, costs, budget, method=method)
        assert sol.cost <= budget
        assert sol.damage == brute_force(values, costs, budget)[0]


def test_pareto_front_gives_the_optimum_of_every_budget():
    rng = np.random.default_rng(7)
    values, costs, _ = random_case(rng, groups=5, options=3)
    front = pareto_front(values, costs)
    assert all(a.cost < b.cost and a.damage > b.damage for a, b in zip(front, front[1:]))
    for f in front:
        assert f.damage == pytest.approx(brute_force(values, costs, f.cost)[0])


def test_infeasible_budget_and_bad_input_are_errors():
    with pytest.raises(ConfigError, match="below the least cost"):
        solve([[0, 1]], [[5, 3]], 2)
    with pytest.raises(ConfigError, match="negative cost"):
        solve([[0, 1]], [[-1, 3]], 2)
    with pytest.raises(ConfigError, match="method"):
        solve([[0, 1]], [[1, 3]], 2, method="greedy")


def test_budget_parsing():
    b = parse_budget("bops=2.5%")
    assert (b.kind, b.mode, b.value) == ("bops", "relative", 0.025)
    assert parse_budget("size=1.2MB").value == 1.2e6 * 8
    assert parse_budget("size=1MiB").value == 8 * 2 ** 20
    assert parse_budget("bops=3G").value == 3e9
    assert parse_budget("bops=W4A8").uniform == Candidate(4, 8)
    assert [x.value for x in parse_budgets("bops=1%,2%")] == [0.01, 0.02]
    for bad, msg in (("bops", "KIND=VALUE"), ("flops=2%", "KIND=VALUE"), ("size=3parsecs", "units"),
                     ("bops=0.025", "percentage"), ("bops=150%", "100%"), ("latency=5 parsecs", "latency"),
                     ("size=-1MB", "number")):
        with pytest.raises(ConfigError, match=msg):
            parse_budget(bad)


def test_candidates_parse():
    assert parse_candidates("4x8,W8A4, fx8,float") == [Candidate(32, 32), Candidate(32, 8), Candidate(8, 4),
                                                        Candidate(4, 8)]
    assert Candidate(32, 8).label == "WfA8"
    for bad in ("4", "1x8", "4x33", "axb"):
        with pytest.raises(ConfigError):
            Candidate.parse(bad)


def test_bits_patch_widens_allocation_bounds_only_as_needed():
    cfg = bitalloc.preset("aciq", 4, 4)
    lcfg, _ = cfg.for_layer("x", ["Conv2d"])
    assert bits_patch(lcfg, Candidate(8, 4)) == {"weight.bits": 8, "weight.min_bits": 2, "weight.max_bits": 8,
                                                 "act.bits": 4}
    assert bits_patch(lcfg, Candidate(16, 4))["weight.max_bits"] == 16
    assert bits_patch(lcfg, Candidate(32, 32)) == {"quantize": False}
    assert bits_patch(lcfg, Candidate(4, 32))["act"] is None


# ---- on a network ------------------------------------------------------------------------------------

def _data(n=4, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n)]


@pytest.fixture(scope="module")
def sens():
    torch.set_num_threads(1)
    cfg = bitalloc.preset("aciq", 4, 4, first_last_bits=None)
    return layer_sensitivity(make_net(), cfg, _data(), bits="8x8,8x4,4x8,4x4,2x8,2x4",
                             reference_bits=["4x8"])


@pytest.mark.parametrize("budget", ["bops=W4A8", "bops=W4A4", "size=W4A8", "bops=38.5%", "size=3.1KB", "size=3KiB"])
def test_budget_met_exactly_as_the_cost_report_counts(sens, budget):
    found = search(sens, budget)
    q = bitalloc.quantize(make_net(), found.config, _data())
    rep = bitalloc.cost_report(q, _data()[0][0][:1])
    counted = {"bops": rep.bops, "size": rep.memory_bits}[found.budget.kind]
    assert counted <= found.limit
    assert counted == pytest.approx(found.cost[found.budget.cost_key], rel=1e-12)
    assert rep.relative_bops == pytest.approx(found.cost["relative_bops"], rel=1e-12)
    # the layer widths are the chosen ones
    by_name = {l.name: l for l in rep.layers}
    for name, cand in found.choice.items():
        assert by_name[name].w_bits == pytest.approx(cand.w_bits)
        assert by_name[name].a_bits == pytest.approx(cand.a_bits)


def test_search_is_the_brute_force_optimum_on_the_network(sens):
    found = search(sens, "bops=W4A8")
    cols = [sens.cost_index(c) for c in sens.candidates]
    best = brute_force(sens.values.tolist(), sens.costs["bops"][:, cols].tolist(), found.limit - sens.fixed["bops"])
    assert found.predicted == pytest.approx(best[0], rel=1e-9)


def test_uniform_budget_equals_uniform_preset(sens):
    cfg = bitalloc.preset("aciq", 4, 8, first_last_bits=None)
    q = bitalloc.quantize(make_net(), cfg, _data())
    rep = bitalloc.cost_report(q, _data()[0][0][:1])
    assert parse_budget("bops=W4A8").limit(sens) == pytest.approx(rep.bops, rel=1e-12)
    assert parse_budget("size=W4A8").limit(sens) == pytest.approx(rep.memory_bits, rel=1e-12)


def test_searched_config_is_plain_json_and_user_overrides_win(tmp_path):
    cfg = bitalloc.preset("aciq", 4, 4, first_last_bits=None)
    cfg.overrides.append(("pw", {"weight.bits": 6}))
    s = layer_sensitivity(make_net(), cfg, _data(n=2), bits="8x8,4x4,2x4")
    assert "pw" not in s.layers and any(e["name"] == "pw" for e in s.excluded)
    found = search(s, "bops=W4A4")
    path = tmp_path / "searched.json"
    path.write_text(json.dumps(found.config.to_dict()))
    again = bitalloc.QuantConfig.from_dict(json.loads(path.read_text()))
    q = bitalloc.quantize(make_net(), again, _data(n=2))
    bits = {l.name: l for l in bitalloc.cost_report(q, _data()[0][0][:1]).layers}
    assert bits["pw"].w_bits == 6  # the user's override, not the search
    for name, cand in found.choice.items():
        assert bits[name].w_bits == cand.w_bits
    # a search patch placed after a user override would lose: the searched config puts them first
    assert again.overrides[-1] == ("pw", {"weight.bits": 6})


def test_budget_below_the_cheapest_choice_names_the_fix(sens):
    with pytest.raises(ConfigError, match="cheapest"):
        search(sens, "bops=0.01%")


def test_searched_config_orders_search_before_user():
    cfg = bitalloc.preset("aciq", 4, 4)
    cfg.overrides.append(("*", {"act.method": "minmax"}))
    out = searched_config(cfg, {"a": {"weight.bits": 8}})
    assert out.overrides[0][0] == "re:a" and out.overrides[1][0] == "*"


def test_check_choice_with_one_quantized_layer_measures_its_sensitivity():
    """With every searched layer in float but one, the configuration's damage is that layer's sensitivity, and
    so is its measured share: the additivity check is exact there (an independent path: quantize + rerun)."""
    import dataclasses

    from bitalloc.search import check_choice

    cfg = bitalloc.preset("aciq", 4, 4, first_last_bits=None)
    cfg.default.act.method, cfg.default.act.options = "minmax", {}  # exact statistics: grids as in the pass
    data = _data(n=2)
    s = layer_sensitivity(make_net(), cfg, data, "32x32,4x4")
    k, j4, jf = s.layers.index("pw"), s.column(Candidate(4, 4)), s.column(Candidate(32, 32))
    steer = s.values.copy()
    steer[:, jf], steer[:, j4] = 0.0, 1.0
    steer[k, j4], steer[k, jf] = 0.0, 1.0  # only pw at 4x4 is free of damage
    found = search(dataclasses.replace(s, values=steer), "bops=100%")
    assert {n: c.label for n, c in found.choice.items()} == {n: ("W4A4" if n == "pw" else "WfAf") for n in s.layers}
    report = check_choice(make_net(), found, s, data)
    assert report["measured_damage"] == pytest.approx(s.values[k, j4], rel=1e-5)
    share = {r["name"]: r["measured_damage"] for r in report["layers"]}
    assert share["pw"] == pytest.approx(s.values[k, j4], rel=1e-5)
    assert all(abs(v) < 1e-12 for n, v in share.items() if n != "pw")
    assert report["cost"]["budget_met"] and report["cost"]["cost_matches"]
    assert report["predicted_output_damage"] == pytest.approx(s.values[k, j4], rel=1e-5)


@pytest.mark.parametrize("seed", range(40))
def test_chain_solver_is_optimal_against_brute_force(seed):
    from bitalloc.search.knapsack import chain_cost, solve_chain

    rng = np.random.default_rng(seed)
    groups, options = int(rng.integers(1, 6)), int(rng.integers(1, 4))
    v, c = rng.random((groups, options)), rng.random((groups, options))
    kinds = rng.integers(0, 2, (groups, options))
    enter, leave = rng.random(groups) * 0.5, rng.random(groups) * 0.5
    choices = list(itertools.product(range(options), repeat=groups))
    costs = [chain_cost(c, kinds, enter, leave, ch) for ch in choices]
    budget = min(costs) if seed % 4 == 0 else rng.uniform(min(costs), max(costs))
    best = min(sum(v[g][j] for g, j in enumerate(ch)) for ch, cc in zip(choices, costs) if cc <= budget)
    sol = solve_chain(v, c, kinds, enter, leave, budget)
    assert sol.damage == pytest.approx(best, rel=1e-12, abs=1e-12)
    assert sol.cost == pytest.approx(chain_cost(c, kinds, enter, leave, sol.choice)) and sol.cost <= budget * (1 + 1e-12)
    with pytest.raises(ConfigError):
        solve_chain(v, c, kinds, enter, leave, min(costs) * 0.5 - 1.0)
