"""The command line as a user runs it: train -> ptq -> cost on Fashion-MNIST, and clear one-line errors.

Fashion-MNIST comes from Debian's dataset-fashion-mnist (``make test`` installs it); the end-to-end test
is skipped with a reason when it is absent."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import bitalloc
from bitalloc.cli import main

FASHION = Path(os.environ.get("BITALLOC_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
needs_fashion = pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                                   reason="Debian's dataset-fashion-mnist is not installed (make test installs it)")


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def lenet_checkpoint(tmp_path_factory):
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    out = tmp_path_factory.mktemp("ckpt") / "lenet5.pt"
    code = main(["train", "--model", "lenet5", "--dataset", "fashion-mnist", "--data", str(FASHION), "--steps", "60",
                 "--batch-size", "128", "--out", str(out), "--progress", "off"])
    assert code == 0 and out.exists()
    return out


@needs_fashion
def test_train_ptq_cost_end_to_end(lenet_checkpoint, tmp_path, capsys):
    out = tmp_path / "ptq"
    code, stdout, stderr = run(["ptq", "--checkpoint", str(lenet_checkpoint), "--data", str(FASHION), "--preset",
                                "aciq", "--w-bits", "3.5", "--a-bits", "4", "--limit", "500", "--out", str(out),
                                "--save-model"], capsys)
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    for key in ("fp32_top1", "top1", "bops", "relative_bops", "memory_bits", "layers"):
        assert key in report
    assert report["fp32_top1"] > 50 and report["top1"] > 50  # a trained model, really quantized
    names = [l["name"] for l in report["layers"]]
    assert names == ["features.0", "features.3", "classifier.1", "classifier.3"]
    for l in report["layers"]:
        assert {"name", "w_bits", "a_bits", "macs", "relative_bops", "bireal_ops"} <= set(l)
        assert l["relative_bops"] == l["bops"] / (1024 * l["macs"]) and l["bireal_ops"] == l["bops"] / 64
    mid = report["layers"][1]
    assert abs(sum(mid["w_bits_per_channel"]) / len(mid["w_bits_per_channel"]) - 3.5) < 0.02
    assert report["layers"][0]["w_bits"] == 8 and report["layers"][-1]["w_bits"] == 8  # first/last at 8 bits
    assert (out / "bitmap.png").stat().st_size > 1000
    assert "Layers" in stdout and "features.3" in stdout
    # the saved quantized model reloads and computes exactly the same
    from bitalloc.model.serialize import load_quantized

    q = load_quantized(out / "quantized.pt")
    assert [l["name"] for l in report["layers"]] == [n for n, _ in bitalloc.quant_layers(q)]
    code, stdout, _ = run(["cost", "--quantized", str(out / "quantized.pt"), "--json", str(tmp_path / "cost.json")], capsys)
    assert code == 0
    cost = json.loads((tmp_path / "cost.json").read_text())
    assert abs(cost["relative_bops"] - report["relative_bops"]) < 1e-12
    assert cost["memory_bits"] == report["memory_bits"]


@needs_fashion
def test_ptq_errors_are_one_clear_line(lenet_checkpoint, tmp_path, capsys):
    code, _, err = run(["ptq", "--checkpoint", str(lenet_checkpoint), "--data", str(tmp_path / "missing"),
                        "--dataset", "fashion-mnist", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "missing" in err and "Traceback" not in err
    code, _, err = run(["ptq", "--checkpoint", str(lenet_checkpoint), "--data", str(FASHION), "--w-bits", "40",
                        "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "bits" in err
    code, _, err = run(["ptq", "--checkpoint", str(lenet_checkpoint), "--data", str(FASHION), "--calib", "0",
                        "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "calib" in err
    code, _, err = run(["ptq", "--checkpoint", str(lenet_checkpoint), "--data", str(FASHION),
                        "--override", "features.1={\"weight.bits\": 4}", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "features.1" in err  # a ReLU: an override that selects no layer is an error, not ignored


def test_missing_and_corrupt_checkpoints(tmp_path, capsys):
    code, _, err = run(["ptq", "--checkpoint", str(tmp_path / "nope.pt"), "--data", str(tmp_path)], capsys)
    assert code == 2 and "nope.pt" in err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    code, _, err = run(["ptq", "--checkpoint", str(bad), "--data", str(tmp_path)], capsys)
    assert code == 2 and "bad.pt" in err
    code, _, err = run(["cost", "--quantized", str(bad)], capsys)
    assert code == 2 and "bad.pt" in err


def test_cost_command_on_a_zoo_model(tmp_path, capsys):
    code, stdout, _ = run(["cost", "--model", "resnet20", "--preset", "minmax", "--w-bits", "4", "--a-bits", "4",
                           "--json", str(tmp_path / "c.json")], capsys)
    assert code == 0
    rep = json.loads((tmp_path / "c.json").read_text())
    assert rep["macs"] > 40e6  # ResNet-20: about 41 MMACs per 32x32 image
    assert 0 < rep["relative_bops"] < 0.05
    code, _, err = run(["cost", "--model", "resnet21"], capsys)
    assert code == 2 and "resnet20" in err  # lists the valid names


@needs_fashion
@pytest.mark.parametrize("rule", ["default", "optimal"])
def test_ptq_allocation_rule_reaches_the_weights(lenet_checkpoint, tmp_path, capsys, rule):
    """The allocation rule reaches the weights: per-channel bits are ACIQ eq. 10-11 (the default) or the exact
    optimum (--allocation optimal) on the channels' standard deviations (reference: numpy std of the
    checkpoint's weights, and the allocation function)."""
    import numpy as np

    from bitalloc.quant.allocation import allocate_channel_bits
    from bitalloc.train.checkpoint import load_model_checkpoint

    out = tmp_path / "ptq"
    code, _, err = run(["ptq", "--checkpoint", str(lenet_checkpoint), "--data", str(FASHION), "--preset", "aciq",
                        "--w-bits", "3.5", "--a-bits", "4", "--limit", "200", "--no-plot", "--out", str(out)]
                       + ([] if rule == "default" else ["--allocation", rule]), capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    method = "aciq" if rule == "default" else rule
    assert report["config"]["default"]["weight"]["allocation"] == method
    mid = report["layers"][1]
    w = load_model_checkpoint(lenet_checkpoint).get_submodule(mid["name"]).weight.detach().double().numpy()
    std = w.reshape(w.shape[0], -1).std(axis=1)
    ref = allocate_channel_bits(torch.from_numpy(std), 3.5, method=method, min_bits=2, max_bits=8)
    assert mid["w_bits_per_channel"] == ref.tolist()
    assert abs(np.mean(mid["w_bits_per_channel"]) - 3.5) <= 0.0625  # within one channel's bit of the budget


def _config(argv):
    from bitalloc.cli import build_parser
    from bitalloc.cli.common import build_config

    return build_config(build_parser().parse_args(["cost", "--model", "lenet5", *argv]))


@pytest.mark.parametrize("argv,words", [
    (["--first-last-bits", "eight"], ["--first-last-bits 'eight' is not a number", "integer from 2 to 32", "'none'"]),
    (["--first-last-bits", "40"], ["--first-last-bits '40' is out of range"]),
    (["--first-last-bits", "4.5"], ["--first-last-bits '4.5' is not an integer"]),
    (["--a-bits", "3.5"], ["activations are quantized per tensor", "--act-granularity channel"]),
    (["--preset", "minmax", "--a-bits", "3.5"], ["--act-granularity channel", "'aciq'"]),
    (["--k-sigma", "3"], ["--k-sigma", "ksigma range method", "--preset ksigma"]),
    (["--preset", "ksigma", "--k-sigma", "-1"], ["--k-sigma '-1' is out of range", "> 0"]),
    (["--preset", "ksigma", "--k-sigma", "two"], ["--k-sigma 'two' is not a number"]),
    (["--preset", "percentile", "--percentile", "101"], ["--percentile '101' is out of range", "<= 100"]),
    (["--preset", "minmax", "--prior", "gauss"], ["--prior", "--preset aciq"]),
    (["--preset", "minmax", "--max-bits", "6"], ["--max-bits", "allocates no bits", "'aciq'"]),
    (["--w-bits", "8", "--max-bits", "6"], ["[2, 6]", "--max-bits"]),
    (["--preset", "minmax", "--allocation", "aciq"], ["--allocation", "allocates no bits"]),
])
def test_quantization_option_errors_are_one_line(argv, words, capsys):
    code, _, err = run(["cost", "--model", "lenet5", *argv], capsys)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert err.startswith("bitalloc cost: error: ") and all(w in err for w in words), err


def test_quantization_options_reach_the_config(capsys):
    cfg = _config(["--preset", "ksigma", "--k-sigma", "3"])
    assert cfg.default.act.options == {"k": 3.0} and cfg.default.weight.method == "minmax"
    assert _config(["--preset", "percentile", "--percentile", "99.9"]).default.act.options == {"percentile": 99.9}
    assert _config(["--prior", "gauss"]).default.act.options == {"prior": "gauss"}
    cfg = _config(["--allocation", "optimal", "--act-granularity", "channel", "--a-bits", "3.5"])
    assert cfg.default.weight.allocation == cfg.default.act.allocation == "optimal"
    assert cfg.default.act.allocate and cfg.default.act.bits == 3.5
    cfg = _config(["--w-bits", "16", "--a-bits", "16"])
    assert (cfg.default.weight.min_bits, cfg.default.weight.max_bits) == (2, 16)
    cfg = _config(["--min-bits", "3", "--max-bits", "6"])
    assert (cfg.default.weight.min_bits, cfg.default.weight.max_bits) == (3, 6)
    assert _config(["--first-last-bits", "none"]).first_last_bits is None
    assert _config(["--first-last-bits", "6"]).first_last_bits == 6
    # the GPTQ preset: allocation, MSE-searched weight grids, GPTQ rounding; each can be set on any preset
    w = _config(["--preset", "aciq-gptq"]).default.weight
    assert (w.allocate, w.method, w.rounding) == (True, "mse", "gptq")
    w = _config(["--preset", "minmax", "--rounding", "gptq", "--weight-method", "mse"]).default.weight
    assert (w.allocate, w.method, w.rounding) == (False, "mse", "gptq")
    assert _config(["--preset", "aciq-gptq", "--rounding", "nearest"]).default.weight.rounding == "nearest"
    # the full ACIQ pipeline runs at 16 bits from the command line
    code, out, err = run(["cost", "--model", "lenet5", "--w-bits", "16", "--a-bits", "16"], capsys)
    assert code == 0, err
    # and the options are documented
    with pytest.raises(SystemExit) as exc:
        main(["ptq", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--k-sigma", "--percentile", "--min-bits", "--max-bits", "--allocation", "--first-last-bits",
                 "--rounding", "--weight-method", "aciq-gptq"):
        assert flag in text, flag
