"""The mixed-precision commands end to end on a tiny model file, tensor inputs and a generated image folder:
``bitalloc sensitivity``, ``ptq --budget`` (and its searched.json read back by ``ptq --config`` and
``train --method lsq --config``), ``sweep --budget``, and their one-line errors."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

from tests.test_user_models import run

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL_FILE = textwrap.dedent('''
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
            self.pw = nn.Conv2d(8, 12, 1)
            self.fc = nn.Linear(12, 3)

        def forward(self, x):
            x = torch.relu(self.conv(x))
            x = torch.relu(self.pw(torch.relu(self.dw(x))))
            return self.fc(x.mean((2, 3)))

    def build():
        torch.manual_seed(0)
        return Net()
''')


@pytest.fixture
def user(tmp_path):
    from PIL import Image

    (tmp_path / "net.py").write_text(MODEL_FILE)
    ns: dict = {}
    exec(MODEL_FILE, ns)
    torch.save(ns["build"]().state_dict(), tmp_path / "net.pt")
    g = torch.Generator().manual_seed(0)
    torch.save({"inputs": torch.randn(40, 3, 10, 10, generator=g), "labels": torch.randint(0, 3, (40,), generator=g)},
               tmp_path / "data.pt")
    rng = np.random.default_rng(0)
    for c in range(3):
        (tmp_path / "img" / f"c{c}").mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / "img" / f"c{c}" / f"{i}.png")
    return tmp_path


def _net(user):
    return ["--model", f"{user}/net.py:build", "--trust-code", "--weights", str(user / "net.pt")]


def test_sensitivity_then_ptq_budget_then_config_and_lsq(user, capsys, tmp_path):
    common = [*_net(user), "--inputs", str(user / "data.pt"), "--calib", "16", "--first-last-bits", "none"]
    code, out, err = run(["sensitivity", *common, "--candidates", "8x8,4x4,2x4,fxf", "--out", str(tmp_path / "s")],
                         capsys)
    assert code == 0, err
    sens = json.loads((tmp_path / "s" / "sensitivity.json").read_text())
    assert [l["name"] for l in sens["layers"]] == ["conv", "dw", "pw", "fc"]
    assert all(l["damage"]["WfAf"] == 0 for l in sens["layers"])
    assert all(l["damage"]["W2A4"] > l["damage"]["W8A8"] for l in sens["layers"])
    assert "W4A8" in sens["layers"][0]["bops"]  # reference widths for budgets such as bops=W4A8
    assert (tmp_path / "s" / "sensitivity.png").stat().st_size > 0 and "Sensitivity" in out

    ptq = ["ptq", *common, "--budget", "bops=W4A8", "--sensitivity", str(tmp_path / "s"), "--out", str(tmp_path / "p"),
           "--no-plot"]
    code, out, err = run(ptq, capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    search = report["search"]
    assert search["check"]["cost"]["budget_met"] and search["check"]["cost"]["cost_matches"]
    assert report["bops"] <= search["limit"] and "Searched widths" in out
    chosen = {l["name"]: (l["w_bits"], l["a_bits"]) for l in search["layers"]}
    assert all("measured_damage" in l for l in search["check"]["layers"])
    # searched.json is an ordinary QuantConfig: ptq --config reproduces the widths
    code, _, err = run(["ptq", *common, "--config", str(tmp_path / "p" / "searched.json"), "--out",
                        str(tmp_path / "c"), "--no-plot"], capsys)
    assert code == 0, err
    again = json.loads((tmp_path / "c" / "report.json").read_text())
    assert {l["name"]: (l["w_bits"], l["a_bits"]) for l in again["layers"] if l["name"] in chosen} == chosen
    assert again["bops"] == report["bops"]
    # and starts LSQ fine-tuning with those widths
    code, _, err = run(["train", *_net(user)[:3], "--init", str(user / "net.pt"), "--dataset", "imagefolder",
                        "--data", str(user / "img"), "--method", "lsq", "--config", str(tmp_path / "p" / "searched.json"),
                        "--steps", "1", "--batch-size", "4", "--input-shape", "3,10,12", "--out", str(tmp_path / "l.pt"),
                        "--progress", "off"], capsys)
    assert code == 0, err
    from bitalloc.cost import cost_report
    from bitalloc.model.serialize import load_quantized

    ns: dict = {}
    exec(MODEL_FILE, ns)
    frozen = load_quantized(tmp_path / "l-frozen.pt", model=ns["build"]())  # the searched widths, learned steps
    widths = {l.name: (l.w_bits, l.a_bits) for l in cost_report(frozen, torch.randn(1, 3, 10, 12)).layers}
    assert {n: widths[n] for n in chosen} == {n: (float(w), float(a)) for n, (w, a) in chosen.items()}
    # a trained sweep runs one LSQ fine-tune per searched configuration (named after the file) beside uniform ones
    code, _, err = run(["sweep", "--method", "lsq", "--configs", str(tmp_path / "p" / "searched.json"), "--bits", "8",
                        *_net(user)[:3], "--init", str(user / "net.pt"), "--dataset", "imagefolder", "--data",
                        str(user / "img"), "--steps", "1", "--eval-batch-size", "4", "--out-dir", str(tmp_path / "sw"), "--progress", "off", "--",
                        "--batch-size", "4", "--input-shape", "3,10,12"], capsys)
    assert code == 0, err
    points = {p["name"]: p for p in json.loads((tmp_path / "sw" / "sweep.json").read_text())["points"]}
    assert set(points) == {"lsq-searched", "lsq-w8a8"}
    assert points["lsq-searched"]["setting"] == {"config": str(tmp_path / "p" / "searched.json")}
    swept = {l["name"]: (l["w_bits"], l["a_bits"]) for l in points["lsq-searched"]["layers"]}
    assert {n: swept[n] for n in chosen} == {n: (float(w), float(a)) for n, (w, a) in chosen.items()}
    assert {l["w_bits"] for l in points["lsq-w8a8"]["layers"]} == {8.0}
    code, _, err = run(["sweep", "--method", "lsq", "--configs", str(tmp_path / "p" / "searched.json"), *_net(user)[:3],
                        "--out-dir", str(tmp_path / "sw2"), "--", "--config", str(tmp_path / "p" / "searched.json")],
                       capsys)
    assert code == 2 and "--configs FILE" in err and err.count("\n") == 1


def test_ptq_budget_errors(user, capsys, tmp_path):
    common = [*_net(user), "--inputs", str(user / "data.pt"), "--calib", "16", "--out", str(tmp_path / "o")]
    for extra, message in ((["--budget", "bops=W4A8", "--latency-batch", "2"], "latency budgets"),
                           (["--budget", "latency=3 parsecs"], "latency"),
                           (["--candidates", "4x4"], "--budget"),
                           (["--budget", "bops=0.01%", "--candidates", "8x8,4x4"], "cheapest"),
                           (["--budget", "flops=3"], "KIND=VALUE")):
        code, _, err = run(["ptq", *common, *extra], capsys)
        assert code == 2, (extra, err)
        assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
    # a sensitivity measured with other options is refused
    code, _, err = run(["sensitivity", *common[:-2], "--candidates", "4x4", "--out", str(tmp_path / "s")], capsys)
    assert code == 0, err
    code, _, err = run(["ptq", *common, "--w-bits", "8", "--budget", "bops=W4A8", "--sensitivity",
                        str(tmp_path / "s" / "sensitivity.pt")], capsys)
    assert code == 2 and "another quantization configuration" in err
    # and a damaged one is a one-line error
    raw = bytearray((tmp_path / "s" / "sensitivity.pt").read_bytes())
    raw[100] ^= 1
    (tmp_path / "s" / "sensitivity.pt").write_bytes(bytes(raw))
    code, _, err = run(["ptq", *common, "--budget", "bops=W4A4", "--sensitivity", str(tmp_path / "s")], capsys)
    assert code == 2 and "corrupt" in err


def test_sweep_budget_fronts(user, capsys, tmp_path):
    out = tmp_path / "sw"
    code, stdout, err = run(["sweep", "--budget", "bops=W4A8,W4A4,size=W4A4", *_net(user), "--dataset", "imagefolder",
                             "--data", str(user / "img"), "--calib", "6", "--candidates", "8x8,4x8,4x4,2x4",
                             "--first-last-bits", "none", "--out-dir", str(out)], capsys)
    assert code == 0, err
    points = {p["name"]: p for p in json.loads((out / "sweep.json").read_text())["points"]}
    assert set(points) == {"mixed-bops-W4A8", "mixed-bops-W4A4", "mixed-size-W4A4", "uniform-W4A8", "uniform-W4A4"}
    for w in ("W4A8", "W4A4"):  # the same BOPs budget as the uniform width: never more
        assert points[f"mixed-bops-{w}"]["bops"] <= points[f"uniform-{w}"]["bops"]
    assert points["mixed-size-W4A4"]["memory_bits"] <= points["uniform-W4A4"]["memory_bits"]
    assert all("pareto" in p and p["correct"] for p in points.values())
    assert (out / "pareto.png").exists() and (out / "pareto-size.png").exists()
    assert json.loads((out / "mixed-bops-W4A4.json").read_text())["overrides"]
    # the two kinds of sweep do not mix
    code, _, err = run(["sweep", "--budget", "bops=W4A8", "--method", "lsq", "--model", "x", "--out-dir", str(out)],
                       capsys)
    assert code == 2 and "--method" in err
    code, _, err = run(["sweep", "--method", "lsq", "--bits", "4", "--candidates", "4x4", "--model", "lenet5",
                        "--out-dir", str(out)], capsys)
    assert code == 2 and "--budget" in err
    # a sensitivity file fixes its candidates: giving others beside it is an error, as for ptq --budget
    code, _, err = run(["sweep", "--budget", "bops=W4A8", *_net(user), "--dataset", "imagefolder", "--data",
                        str(user / "img"), "--calib", "6", "--sensitivity", str(tmp_path / "none.pt"), "--candidates",
                        "4x4", "--out-dir", str(out)], capsys)
    assert code == 2 and "--candidates" in err and "--sensitivity" in err and err.count("\n") == 1


def test_latency_budget_from_the_command_line(user, capsys, tmp_path):
    pytest.importorskip("onnxruntime")
    common = [*_net(user), "--inputs", str(user / "data.pt"), "--calib", "16", "--first-last-bits", "none"]
    code, out, err = run(["sensitivity", *common, "--candidates", "8x8,f", "--latency", "--latency-threads", "1",
                          "--latency-batch", "2", "--out", str(tmp_path / "s")], capsys)
    assert code == 0, err
    lat = json.loads((tmp_path / "s" / "sensitivity.json").read_text())["latency"]
    assert (lat["threads"], lat["batch"], [r["name"] for r in lat["layers"]]) == (1, 2, ["conv", "dw", "pw", "fc"])
    assert "onnxruntime latency per layer" in out
    code, out, err = run(["ptq", *common, "--budget", "latency=100%", "--sensitivity", str(tmp_path / "s"),
                          "--out", str(tmp_path / "o")], capsys)
    assert code == 0, err
    check = json.loads((tmp_path / "o" / "report.json").read_text())["search"]["check"]
    assert check["latency"]["fp32_ms"] > 0 and check["latency"]["batch"] == 2
    assert check["cost"]["predicted"]["latency_ms"] <= check["cost"]["limit"] * (1 + 1e-12)
    assert "onnxruntime latency (ms" in out
    code, out, err = run(["sweep", "--budget", "latency=100%,W8A8", *_net(user), "--dataset", "imagefolder",
                          "--data", str(user / "img"), "--calib", "6", "--candidates", "8x8,f", "--first-last-bits",
                          "none", "--latency-threads", "1", "--out-dir", str(tmp_path / "sw")], capsys)
    assert code == 0, err
    points = {p["name"]: p for p in json.loads((tmp_path / "sw" / "sweep.json").read_text())["points"]}
    assert set(points) == {"mixed-latency-100pct", "mixed-latency-W8A8", "uniform-W8A8"}
    assert points["mixed-latency-W8A8"]["predicted_latency_ms"] <= points["uniform-W8A8"]["predicted_latency_ms"] + 1e-12
    # latency options without a latency measurement are errors
    code, _, err = run(["sensitivity", *common, "--latency-batch", "2", "--out", str(tmp_path / "s2")], capsys)
    assert code == 2 and "--latency" in err


def test_sensitivity_command_errors(user, capsys, tmp_path):
    common = [*_net(user), "--inputs", str(user / "data.pt"), "--out", str(tmp_path / "s")]
    for extra, message in ((["--limit", "3"], "--limit"), (["--hutchinson", "4"], "--hessian"),
                           (["--candidates", "4x99"], "out of range"), (["--metric", "mse", "--candidates", "1x4"],
                                                                       "weight bits")):
        code, _, err = run(["sensitivity", *common, *extra], capsys)
        assert code == 2 and message in err, (extra, err)


def test_anchors_split_is_the_reference_split():
    from bitalloc.data import strided_split
    from bitalloc.errors import ConfigError

    items = list(range(1000))  # the ImageNet sample: 1,000 images in sorted order
    calib, evaluation = strided_split(items, 32)
    assert list(calib.indices) == [31 * k for k in range(32)] and calib.indices[-1] == 961
    assert len(evaluation) == 968 and 992 in evaluation.indices and not set(calib.indices) & set(evaluation.indices)
    with pytest.raises(ConfigError, match="--split random"):
        strided_split(items, 40)
