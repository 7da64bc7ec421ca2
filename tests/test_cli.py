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
        assert {"name", "w_bits", "a_bits", "macs"} <= set(l)
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
