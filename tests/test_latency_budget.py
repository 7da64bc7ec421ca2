"""Latency budgets: per-layer onnxruntime latencies (int8 against float) as the search's cost table, the exact
search under them, the whole chosen configuration timed against the prediction, and their parsing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import bitalloc
from bitalloc.errors import ConfigError
from bitalloc.search import Candidate, check_choice, layer_sensitivity, parse_budget, search
from bitalloc.search.latency import LATENCY_KEY, add_latency, kernel_of, parse_time
from bitalloc.search.sensitivity import Sensitivity
from tests.nets import make_net
from tests.test_budget_search import _data, brute_force

pytest.importorskip("onnxruntime")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def timed():
    torch.set_num_threads(1)
    cfg = bitalloc.preset("aciq", 8, 8, first_last_bits=None)
    model = make_net()
    sens = layer_sensitivity(model, cfg, _data(n=2), bits="8x8,4x8,f", reference_bits=["4x4", "16x16"])
    return model, add_latency(model, sens, _data()[0][0][:2], threads=1, runs=5, min_seconds=0.02)


def test_parse_time_and_latency_budgets():
    assert parse_time("5ms") == 5.0 and parse_time("800us") == pytest.approx(0.8) and parse_time("0.01s") == 10.0
    assert parse_time("2") == 2.0  # milliseconds
    b = parse_budget("latency=60%")
    assert (b.kind, b.mode, b.value, b.cost_key) == ("latency", "relative", 0.6, LATENCY_KEY)
    assert parse_budget("latency=W8A8").uniform == Candidate(8, 8)
    assert parse_budget("latency=1.5ms").value == 1.5
    for bad in ("latency=5parsecs", "latency=-1ms", "latency=0ms"):
        with pytest.raises(ConfigError, match="latency"):
            parse_budget(bad)


def test_kernel_of_candidates():
    assert kernel_of(Candidate(8, 8)) == kernel_of(Candidate(4, 8)) == kernel_of(Candidate(2, 4)) == "int8"
    assert kernel_of(Candidate(32, 32)) == kernel_of(Candidate(16, 16)) == kernel_of(Candidate(32, 8)) == "float"


def test_latency_table_is_each_candidates_kernel(timed):
    _, sens = timed
    info = sens.latency
    assert [r["name"] for r in info["layers"]] == sens.layers
    assert info["batch"] == 2 and info["threads"] == 1 and info["fp32_model_ms"] > 0
    for i, row in enumerate(info["layers"]):
        assert row["input_shape"][0] == 2 and row["float_ms"] >= 0 and row["int8_ms"] >= 0
        assert min(row["convert_in_ms"], row["convert_out_ms"]) >= 0
        assert row["convert_in_ms"] + row["convert_out_ms"] == pytest.approx(
            max(row["int8_alone_ms"] - row["int8_ms"], 0.0), abs=1e-12)
        assert row["int8_kernel"]  # convolutions and linear layers fuse into onnxruntime's integer kernels
        for j, cand in enumerate(sens.cost_candidates):
            want = row["int8_ms"] if kernel_of(cand) == "int8" else row["float_ms"]
            assert sens.costs[LATENCY_KEY][i, j] == want
    # the rest of the network: negative where the layers timed alone add up to more than the model (documented),
    # so that every layer in float predicts exactly the measured FP32 model
    assert sens.fixed[LATENCY_KEY] == pytest.approx(info["fp32_model_ms"] - sum(r["float_ms"] for r in info["layers"]))
    # survives the sensitivity file
    again = Sensitivity.from_state(sens.state())
    assert again.latency == sens.latency and np.array_equal(again.costs[LATENCY_KEY], sens.costs[LATENCY_KEY])
    assert "latency_ms" in sens.to_dict()["layers"][0]


def _controlled(sens):
    """``sens`` with a controlled latency table (the measured one is timing noise on layers this small, where
    int8 is often slower than float): layer i takes i + 1 ms in float and half that in int8, the rest 1 ms."""
    table = np.zeros_like(sens.costs[LATENCY_KEY])
    for i in range(len(sens.layers)):
        for j, cand in enumerate(sens.cost_candidates):
            table[i, j] = (1.0 + i) * (0.5 if kernel_of(cand) == "int8" else 1.0)
    rows = [{**r, "convert_in_ms": 0.0, "convert_out_ms": 0.0} for r in sens.latency["layers"]]  # no borders
    info = {**sens.latency, "layers": rows,
            "fp32_model_ms": float(table[:, sens.cost_index(Candidate(32, 32))].sum()) + 1.0}
    return dataclasses.replace(sens, costs={**sens.costs, LATENCY_KEY: table},
                               fixed={**sens.fixed, LATENCY_KEY: 1.0}, latency=info), table


def test_search_under_latency_is_the_brute_force_optimum(timed):
    s, table = _controlled(timed[1])
    info = s.latency
    cols = [s.cost_index(c) for c in s.candidates]
    for budget in ("latency=70%", "latency=85%", "latency=W8A8", f"latency={info['fp32_model_ms'] * 0.8}ms"):
        found = search(s, budget)
        best = brute_force(s.values.tolist(), table[:, cols].tolist(), found.limit - 1.0)
        assert found.predicted == pytest.approx(best[0], rel=1e-9, abs=1e-15)
        assert found.cost[LATENCY_KEY] <= found.limit + 1e-12
        assert found.cost[LATENCY_KEY] == pytest.approx(1.0 + sum(table[i, s.cost_index(c)]
                                                                  for i, c in enumerate(found.choice.values())))
    assert all(c.is_float for c in search(s, "latency=100%").choice.values())  # the least damage: all float
    assert all(kernel_of(c) == "int8" for c in search(s, "latency=W8A8").choice.values())
    with pytest.raises(ConfigError, match="nothing runs faster"):
        search(s, "latency=10%")


def test_search_with_border_conversions_is_the_brute_force_optimum(timed):
    """int8 runs pay a conversion where they begin and end: the chain search against every choice."""
    import itertools

    s, table = _controlled(timed[1])
    rng = np.random.default_rng(0)
    rows = [{**r, "convert_in_ms": float(rng.uniform(0.2, 1.0)), "convert_out_ms": float(rng.uniform(0.2, 1.0))}
            for r in s.latency["layers"]]
    s = dataclasses.replace(s, latency={**s.latency, "layers": rows})
    every_int8 = {n: Candidate(8, 8) for n in s.layers}
    assert s.total_cost(LATENCY_KEY, every_int8) == pytest.approx(
        1.0 + table[:, s.cost_index(Candidate(8, 8))].sum() + rows[0]["convert_in_ms"] + rows[-1]["convert_out_ms"])
    one = dict(every_int8, **{s.layers[2]: Candidate(32, 32)})  # a float layer splits the run: two more borders
    assert s.total_cost(LATENCY_KEY, one) == pytest.approx(
        s.total_cost(LATENCY_KEY, every_int8) - table[2, s.cost_index(Candidate(8, 8))] + table[2, s.cost_index(
            Candidate(32, 32))] + rows[1]["convert_out_ms"] + rows[3]["convert_in_ms"])
    for budget in ("latency=75%", "latency=85%", "latency=95%"):
        found = search(s, budget)
        best = min(sum(s.values[i, s.column(c)] for i, c in enumerate(ch))
                   for ch in itertools.product(s.candidates, repeat=len(s.layers))
                   if s.total_cost(LATENCY_KEY, dict(zip(s.layers, ch))) <= found.limit)
        assert found.predicted == pytest.approx(best, rel=1e-9, abs=1e-15)
        assert found.cost[LATENCY_KEY] == pytest.approx(s.total_cost(LATENCY_KEY, found.choice))
        assert found.cost[LATENCY_KEY] <= found.limit * (1 + 1e-12)


def test_latency_budget_needs_the_table(timed):
    _, sens = timed
    with pytest.raises(ConfigError, match="per-layer onnxruntime latencies"):
        search(dataclasses.replace(sens, latency=None), "latency=50%")


def test_check_choice_times_the_whole_configuration(timed):
    model, sens = timed[0], _controlled(timed[1])[0]
    found = search(sens, "latency=W8A8")  # every searched layer on an int8 kernel
    assert all(kernel_of(c) == "int8" for c in found.choice.values())
    report = check_choice(model, found, sens, _data(n=2), layer_effects=False)
    lat = report["latency"]
    assert lat["fp32_ms"] > 0 and lat["quantized_ms"] > 0 and lat["batch"] == 2
    assert lat["int8_ops"] == len(sens.layers)  # every searched layer on an integer kernel
    cost = report["cost"]
    assert cost["counted"][LATENCY_KEY] == lat["quantized_ms"] and cost["predicted"][LATENCY_KEY] > 0
    assert isinstance(cost["budget_met"], bool) and isinstance(cost["cost_matches"], bool)


def test_int8_chain_model_is_the_quantized_layer_without_its_conversions(tmp_path):
    """The uint8-in, uint8-out model computes exactly what the QDQ model computes, up to its two conversions."""
    import onnx
    from onnx import numpy_helper

    from bitalloc.runtime.onnx_export import export_float
    from bitalloc.runtime.ort import int8_compute_ops, make_session, optimized_op_counts, ort_static_quantize
    from bitalloc.search.latency import _int8_chain

    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 12)
    fp = tmp_path / "f.onnx"
    layer = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, padding=1)).eval()
    fp.write_bytes(export_float(layer, x).SerializeToString())
    qp = ort_static_quantize(fp, tmp_path / "q.onnx", [x], method="minmax")
    scale, zero = _int8_chain(qp, tmp_path / "c.onnx")
    chain = onnx.load(str(tmp_path / "c.onnx"))
    assert chain.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert chain.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert int8_compute_ops(optimized_op_counts(tmp_path / "c.onnx", threads=1)) == 1
    xq = np.clip(np.round(x.numpy() / scale) + zero, 0, 255).astype(np.uint8)
    codes = make_session(tmp_path / "c.onnx", threads=1).run(None, {chain.graph.input[0].name: xq})[0]
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(qp)).graph.initializer}
    out_scale, out_zero = float(inits["output_scale"]), int(inits["output_zero_point"])
    full = make_session(qp, threads=1).run(None, {"input": x.numpy()})[0]
    assert np.array_equal((codes.astype(np.float32) - out_zero) * np.float32(out_scale), full)
