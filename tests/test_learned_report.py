"""The CIFAR-10 goal check of ``benchmarks/learned_precision.py report``: paired verdicts of Bayesian Bits points
against LSQ 4/4 (as accurate / level / less accurate; uniform-precision networks not counted)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from bitalloc.report.stats import encode_mask


@pytest.fixture(scope="module")
def report():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "learned_precision.py"
    spec = importlib.util.spec_from_file_location("learned_precision_bench", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def _point(name, method, bops, correct, layers, seed=0):
    correct = np.asarray(correct, dtype=bool)
    return {"name": name, "method": method, "relative_bops": bops, "top1": float(correct.mean()),
            "correct": encode_mask(correct), "options": {"seed": seed},
            "layers": [{"w_bits": w, "a_bits": a, "kept_fraction": k} for w, a, k in layers]}


MIXED = [(8, 8, 1.0), (4, 4, 1.0), (2, 4, 1.0), (8, 8, 1.0)]
UNIFORM = [(4, 8, 1.0), (4, 4, 1.0), (4, 4, 1.0), (4, 4, 1.0)]


def test_goal_check_verdicts(report):
    rng = np.random.default_rng(0)
    n = 4000
    ref = rng.random(n) < 0.86
    flip = lambda mask, k, to: np.where(np.arange(n) < k, to, mask)  # noqa: E731
    better = flip(ref, 300, True)           # gains on up to 300 samples
    level = ref.copy()  # loses 30 samples, gains 28: -2 / n, within one paired SE (sqrt(58) / n)
    level[np.flatnonzero(ref)[:30]] = False
    level[np.flatnonzero(~ref)[:28]] = True
    worse = ref.copy()  # loses 200 samples: far below
    worse[np.flatnonzero(ref)[:200]] = False
    points = [_point("lsq-w4a4", "lsq", 0.016, ref, [(8, 8, 1.0)] + [(4, 4, 1.0)] * 3),
              _point("bb-better", "bb", 0.014, better, MIXED), _point("bb-level", "bb", 0.013, level, MIXED),
              _point("bb-worse", "bb", 0.010, worse, MIXED), _point("bb-uniform", "bb", 0.015, better, UNIFORM),
              _point("bb-costly", "bb", 0.02, better, MIXED), {"name": "fp32", "method": "fp32", "top1": 0.87,
                                                               "relative_bops": 1.0}]
    text, res = report.goal_check(points)
    by = {r["name"]: r for r in res["points"]}
    assert set(by) == {"bb-better", "bb-level", "bb-worse", "bb-uniform"}  # only fewer BOPs than LSQ 4/4
    assert by["bb-better"]["verdict"] == "as accurate" and by["bb-level"]["verdict"] == "level"
    assert by["bb-worse"]["verdict"] == "less accurate" and by["bb-worse"]["p_value"] < 1e-6
    assert by["bb-level"]["diff"] == pytest.approx(-2 / n) and by["bb-level"]["only_reference"] == 30
    assert by["bb-level"]["se"] == pytest.approx(np.sqrt(58 / n - (2 / n) ** 2) / np.sqrt(n))
    assert not by["bb-uniform"]["mixed"] and by["bb-better"]["mixed"]
    assert res["met"] and "**Met** by bb-level, bb-better (best: bb-better" in text  # listed by BOPs
    # without the mixed-precision points that are as accurate or level: not met
    text, res = report.goal_check([p for p in points if p["name"] not in ("bb-better", "bb-level")])
    assert not res["met"] and "**Not met.**" in text
    # points without per-sample outcomes get no verdict and say how to get one
    old = dict(points[1]); old.pop("correct")
    text, res = report.goal_check([points[0], old])
    assert not res["met"] and res["points"] == [] and "re-run its sweep command" in text
    assert report.goal_check(points[1:]) is None  # no LSQ 4/4 point: nothing to check


def test_goal_check_pairs_each_seed_with_its_lsq_run(report):
    rng = np.random.default_rng(1)
    n = 2000
    ref0, ref1 = rng.random(n) < 0.86, rng.random(n) < 0.80
    lsq = [(8, 8, 1.0)] + [(4, 4, 1.0)] * 3
    points = [_point("lsq-w4a4", "lsq", 0.016, ref0, lsq), _point("lsq-w4a4-s1", "lsq", 0.016, ref1, lsq, seed=1),
              _point("lsq-w4a4-other", "lsq", 0.016, ~ref0, lsq, seed=1),  # another option, not a seed replicate
              _point("bb-a", "bb", 0.014, ref0, MIXED), _point("bb-a-s1", "bb", 0.014, ref1, MIXED, seed=1),
              _point("bb-a-s2", "bb", 0.014, ref0, MIXED, seed=2)]
    text, res = report.goal_check(points)
    by = {r["name"]: r for r in res["points"]}
    assert res["references"] == {"0": "lsq-w4a4", "1": "lsq-w4a4-s1"}
    assert by["bb-a"]["reference"] == "lsq-w4a4" and by["bb-a-s1"]["reference"] == "lsq-w4a4-s1"
    assert by["bb-a-s2"]["reference"] == "lsq-w4a4"  # no LSQ run of seed 2: the seed-0 reference
    assert all(r["diff"] == 0 and r["se"] == 0 and r["verdict"] == "as accurate" for r in by.values())
    assert "over seeds 0, 1" in text
    assert res["met_by"] == ["bb-a", "bb-a-s1", "bb-a-s2"]
    # a seed replicate that does not reach fewer BOPs (or is less accurate) fails the whole setting
    text, res = report.goal_check(points + [_point("bb-a-s3", "bb", 0.016, ref0, MIXED, seed=3)])
    assert not res["met"] and res["failed_replicates"]["bb-a"] == ["bb-a-s3"]
    assert "bb-a passes, but not its seed replicate bb-a-s3" in text and "**Not met.**" in text


def test_uniform_check_compares_with_the_best_uniform_run_it_can_afford(report):
    rng = np.random.default_rng(3)
    n = 2000
    w3, w4, w4s1 = (rng.random(n) < q for q in (0.80, 0.86, 0.85))
    better = w3.copy()
    better[np.flatnonzero(~w3)[:100]] = True  # +100 / n over LSQ 3/4
    lsq = [(8, 8, 1.0)] + [(3, 4, 1.0)] * 3
    points = [_point("lsq-w3a4", "lsq", 0.012, w3, lsq), _point("lsq-w4a4", "lsq", 0.016, w4, lsq),
              _point("lsq-w4a4-s1", "lsq", 0.016, w4s1, lsq, seed=1),
              _point("bb-a", "bb", 0.014, better, MIXED),          # between 3/4 and 4/4: against 3/4
              _point("bb-b", "bb", 0.011, better, MIXED),          # cheaper than every LSQ run: not compared
              _point("bb-c-s1", "bb", 0.016, w3, MIXED, seed=1),   # seed 1: its own LSQ run at equal BOPs
              _point("bb-d", "bb", 0.013, w3, MIXED),              # identical outcomes: within one SE
              {"name": "fp32", "method": "fp32", "top1": 0.87, "relative_bops": 1.0}]
    text, res = report.uniform_check(points)
    by = {r["name"]: r for r in res["points"]}
    assert set(by) == {"bb-a", "bb-c-s1", "bb-d"}
    assert by["bb-a"]["reference"] == "lsq-w3a4" and by["bb-a"]["diff"] == pytest.approx(100 / n)
    assert by["bb-a"]["verdict"] == "more accurate" and by["bb-d"]["verdict"] == "within one standard error"
    assert by["bb-c-s1"]["reference"] == "lsq-w4a4-s1"
    expected = (w3.sum() - w4s1.sum()) / n
    assert by["bb-c-s1"]["diff"] == pytest.approx(expected)
    assert by["bb-c-s1"]["verdict"] == ("less accurate" if -expected > by["bb-c-s1"]["se"] else "within one standard error")
    assert f"| bb-a | lsq-w3a4 ({100 * w3.mean():.2f}% at 1.200%) |" in text and "| bb-b |" not in text
    assert report.uniform_check([p for p in points if p["method"] != "lsq"]) is None


def test_mixed_check_pairs_searched_runs_with_the_fronts_at_each_level(report):
    rng = np.random.default_rng(4)
    n = 3000
    w2, w4, w4s1 = (rng.random(n) < q for q in (0.80, 0.86, 0.85))
    lsq = [(8, 8, 1.0)] + [(4, 4, 1.0)] * 3

    def searched(name, bops, correct, seed=0):
        return {**_point(name, "lsq", bops, correct, MIXED, seed), "setting": {"config": f"{name}.json"}}

    up = w4.copy()
    up[np.flatnonzero(~w4)[:150]] = True        # +150 / n over LSQ 4/4
    down = w2.copy()
    down[np.flatnonzero(w2)[:150]] = False      # -150 / n under LSQ 2/4
    points = [_point("lsq-w2a4", "lsq", 0.008, w2, lsq), _point("lsq-w4a4", "lsq", 0.016, w4, lsq),
              _point("lsq-w4a4-s1", "lsq", 0.016, w4s1, lsq, seed=1), _point("bb-a", "bb", 0.012, w4, MIXED),
              _point("bb-cheap", "bb", 0.005, w2, MIXED),  # below every searched run's BOPs: no shared level
              searched("lsq-mixed-W4A4", 0.016, up), searched("lsq-mixed-W2A4", 0.008, down),
              {"name": "fp32", "method": "fp32", "top1": 0.87, "relative_bops": 1.0}]
    text, res = report.mixed_check(points)
    by = {r["reference"]: r for r in res["points"]}
    assert set(by) == {"lsq-w2a4", "lsq-w4a4", "lsq-w4a4-s1", "bb-a"}  # searched runs are not their own front
    assert by["lsq-w4a4"]["name"] == "lsq-mixed-W4A4" and by["lsq-w4a4"]["diff"] == pytest.approx(150 / n)
    assert by["lsq-w4a4"]["verdict"] == "above"
    assert by["lsq-w4a4-s1"]["name"] == "lsq-mixed-W4A4"  # no seed-1 searched run: seed 0's
    assert by["lsq-w4a4-s1"]["diff"] == pytest.approx((up.sum() - w4s1.sum()) / n)
    assert by["bb-a"]["name"] == "lsq-mixed-W2A4"  # the searched front at 1.2%: only the 0.8% run fits
    assert by["lsq-w2a4"]["diff"] == pytest.approx(-150 / n) and by["lsq-w2a4"]["verdict"] == "below"
    assert not res["met"] and res["below"] == [r for r, v in by.items() if v["verdict"] == "below"]
    assert "lsq-w2a4" in res["below"]
    assert "**Not met**: below at" in text and "| lsq-w4a4 |" in text
    # the uniform check leaves searched runs out of the LSQ front
    _, uni = report.uniform_check(points)
    assert {r["reference"] for r in uni["points"]} <= {"lsq-w2a4", "lsq-w4a4", "lsq-w4a4-s1"}
    assert report.mixed_check([p for p in points if "mixed" not in p["name"]]) is None


def test_carry_points_keeps_stored_points_whose_runs_are_gone(report):
    stored = [{"name": "a", "top1": 0.1}, {"name": "b", "top1": 0.2, "revision": "r1"}]
    fresh = [{"name": "b", "top1": 0.3, "revision": "r3"}, {"name": "c", "top1": 0.4, "revision": "r3"}]
    points, carried = report.carry_points(stored, fresh, "r0")
    assert [p["name"] for p in points] == ["a", "b", "c"] and carried == ["a"]
    assert points[0]["revision"] == "r0" and points[1] == fresh[0]  # a re-run point replaces its stored one
    assert report.carry_points([], fresh, "r0") == (fresh, [])


def test_report_keeps_results_when_run_folders_are_gone(report, tmp_path):
    import argparse
    import json
    import shutil

    rng = np.random.default_rng(2)
    n = 3000
    ref = rng.random(n) < 0.86
    worse = ref.copy()
    worse[np.flatnonzero(ref)[:150]] = False
    lsq = [(8, 8, 1.0)] + [(4, 4, 1.0)] * 3
    pts = [_point("lsq-w4a4", "lsq", 0.016, ref, lsq), _point("bb-mu1", "bb", 0.012, worse, MIXED)]
    for p, layers in zip(pts, (lsq, MIXED)):
        p["options"]["dataset"] = "cifar10"
        p["layers"] = [{"name": f"l{i}", "w_bits": w, "a_bits": a, "kept_fraction": k}
                       for i, (w, a, k) in enumerate(layers)]
    runs = tmp_path / "runs"
    (runs / "exp").mkdir(parents=True)
    (runs / "exp" / "sweep.json").write_text(json.dumps({"points": pts}))
    (runs / "exp" / "bb-mu1-bits.png").write_bytes(b"bits over training")
    results = tmp_path / "results.json"
    args = argparse.Namespace(runs=str(runs), results=str(results), drop_missing=False, no_md=True, notes="")

    def run() -> dict:
        assert report.cmd_report(args, []) == 0
        return json.loads(results.read_text())

    first = run()
    assert [g["dist"] for g in first["two_bit_grids"]] == list(report.DISTRIBUTIONS)
    assert [p["name"] for p in first["experiments"]["exp"]] == ["lsq-w4a4", "bb-mu1"]
    assert first["experiments"]["exp"][1]["correct"] == pts[1]["correct"]  # per-sample outcomes are kept
    check = first["goal_checks"]["exp"]["points"][0]
    assert check["verdict"] == "less accurate" and check["diff"] == pytest.approx(-150 / n)
    plots = tmp_path / "results" / "exp"  # next to the results file, so that they outlive the run folders
    shutil.rmtree(runs / "exp")  # the run folders are lost (a new machine): nothing is dropped
    second = run()
    assert (plots / "bb-mu1-bits.png").read_bytes() == b"bits over training"
    if importlib.util.find_spec("matplotlib"):
        assert (plots / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert second["carried"] == {"exp": ["lsq-w4a4", "bb-mu1"]}
    assert second["experiments"]["exp"] == first["experiments"]["exp"]
    assert second["goal_checks"]["exp"] == first["goal_checks"]["exp"]
    # results recorded before the outcomes were kept: the earlier comparison is reused, not recomputed
    for p in second["experiments"]["exp"]:
        p.pop("correct")
    results.write_text(json.dumps(second))
    third = run()
    assert third["goal_checks"]["exp"]["points"] == first["goal_checks"]["exp"]["points"]
    args.drop_missing = True
    assert run()["experiments"] == {}


@pytest.mark.parametrize("dist", ["gauss", "laplace", "relu-gauss"])
@pytest.mark.parametrize("codes,step", [((2, 1), 1.0), ((1, 1), 1.3), ((0, 3), 0.6), ((7, 7), 0.35)])
def test_grid_mse_matches_monte_carlo(report, dist, codes, step):
    """Reference: the squared error of 4 million samples quantized on the grid (numpy float64); tolerance 5
    standard errors of the sample mean."""
    rng = np.random.default_rng(0)
    n = 4_000_000
    x = rng.laplace(scale=2 ** -0.5, size=n) if dist == "laplace" else rng.standard_normal(n)
    if dist == "relu-gauss":
        x = np.maximum(x, 0.0)
    q_n, q_p = codes
    err = (x - step * np.clip(np.round(x / step), -q_n, q_p)) ** 2
    got = report.grid_mse(q_n, q_p, step, dist)
    assert got == pytest.approx(err.mean(), abs=5 * err.std() / np.sqrt(n))


def test_best_step_is_the_minimum_of_a_fine_scan(report):
    """Brute force: a scan of 3,000 steps; and the best 2-bit errors of a unit Gaussian agree with the known
    optimum of a symmetric 3-level quantizer (about 0.1902 at step 1.224; Max 1960, uniform case)."""
    pytest.importorskip("scipy")
    scan = np.linspace(0.001, 3.0, 3000)
    for codes in [(2, 1), (1, 1)]:
        errs = [report.grid_mse(*codes, float(s)) for s in scan]
        step, mse = report.best_step(*codes)
        assert mse <= min(errs) + 1e-9 and step == pytest.approx(scan[int(np.argmin(errs))], abs=2e-3)
    step, mse = report.best_step(1, 1)
    assert step == pytest.approx(1.224, abs=2e-3) and mse == pytest.approx(0.1902, abs=2e-4)
