"""`bitalloc bench cpu` and `bitalloc export onnx --integer-check` through the command line (cli.main), on a
tiny LeNet-5 checkpoint and a synthetic MNIST-format data set written into a temporary folder (no downloads).

References: the files the commands write (bench.json, the export report) and their exit codes / one-line
errors; the numbers themselves are checked only for being present and sane (the runner's accuracy and
latency logic is tested in tests/test_onnx_export.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bitalloc.cli import main

pytest.importorskip("onnx", reason="the bench / export commands need the onnx package")
pytest.importorskip("onnxruntime", reason="the bench / export commands need onnxruntime")


def run(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A synthetic MNIST folder (64 train / 40 test images, digits drawn as class-dependent bars) and a LeNet-5
    checkpoint trained on it for a few steps by `bitalloc train`."""
    from bitalloc.data.idx import write_idx

    root = tmp_path_factory.mktemp("tiny")
    data = root / "mnist"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n, prefix in (("train", 64, "train"), ("test", 40, "t10k")):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 40, (n, 28, 28)).astype(np.uint8)
        for i, y in enumerate(labels):
            images[i, 2 + 2 * int(y):4 + 2 * int(y), 4:24] = 255
        write_idx(data / f"{prefix}-images-idx3-ubyte", images)
        write_idx(data / f"{prefix}-labels-idx1-ubyte", labels)
    ckpt = root / "lenet5.pt"
    code = main(["train", "--model", "lenet5", "--dataset", "mnist", "--data", str(data), "--steps", "4",
                 "--batch-size", "16", "--out", str(ckpt), "--progress", "off"])
    assert code == 0 and ckpt.exists()
    return data, ckpt


def test_bench_cpu_command(tiny, tmp_path, capsys):
    data, ckpt = tiny
    out = tmp_path / "bench"
    args = ["bench", "cpu", "--checkpoint", str(ckpt), "--data", str(data), "--calib", "16", "--limit", "24",
            "--batch-size", "8", "--configs", "minmax/8x8/ort,minmax/4x4/none", "--batch-sizes", "1,8",
            "--runs", "2", "--min-seconds", "0", "--warmup", "1", "--out", str(out)]
    code, stdout, err = run(args + ["--no-anchors"], capsys)
    assert code == 0, err
    res = json.loads((out / "bench.json").read_text())
    assert res["model"] == "lenet5" and res["dataset"] == "mnist" and res["evaluation_samples"] == 24
    assert res["calibration_samples"] == 16 and res["batch_sizes"] == [1, 8]
    kinds = [r["kind"] for r in res["rows"]]
    assert kinds == ["fp32", "bitalloc", "bitalloc"]
    for r in res["rows"]:
        assert set(r["latency"]) == {"1", "8"} and r["latency"]["1"]["median_ms"] > 0 and r["top1"] is not None
    w8 = res["rows"][1]
    assert w8["int8_ops"] == 4 and w8["float_ops"] == 0  # every conv / linear of LeNet-5 in int8
    assert w8["agreement"] is not None and w8["export"]["int8_layers"] == 4
    assert "lenet5" in stdout and str(out / "bench.json") in err
    # an existing bench.json is not replaced without --overwrite
    code, _, err = run(args + ["--no-anchors"], capsys)
    assert code == 2 and "exists" in err and "--overwrite" in err
    code, stdout, err = run(args + ["--overwrite", "--configs", "minmax/8x8/ort", "--batch-sizes", "8"], capsys)
    assert code == 0, err
    assert "Checks of the claim row" in stdout and "latency at batch 8" in stdout
    res = json.loads((out / "bench.json").read_text())
    kinds = [r["kind"] for r in res["rows"]]
    assert kinds == ["fp32", "ort", "ort", "bitalloc"] and res["batch_sizes"] == [8]  # anchors: MinMax, Entropy
    # one verdict per check of the claim row (the first W8A8 bitalloc row): agreement, top-1 >= each anchor,
    # latency at each batch size
    names = [v["name"] for v in res["verdicts"]]
    assert names[0] == "agreement" and sum(n.startswith("top1 >=") for n in names) == 2 and names[-1] == "latency batch 8"
    assert all(isinstance(v["check"], bool) and v["verdict"].startswith(("PASS", "FAIL")) for v in res["verdicts"])


@pytest.mark.parametrize("sizes,message", [("1,x", "comma list of integers"), ("0", "positive"), ("", "positive"),
                                           ("1,64", "needs at least 64 evaluation samples")])
def test_bench_cpu_rejects_bad_batch_sizes(tiny, tmp_path, capsys, sizes, message):
    data, ckpt = tiny
    code, _, err = run(["bench", "cpu", "--checkpoint", str(ckpt), "--data", str(data), "--calib", "8", "--limit", "16",
                        "--configs", "minmax/8x8/none", "--no-anchors", "--runs", "1", "--min-seconds", "0", "--batch-sizes", sizes,
                        "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "b" / "bench.json").exists()


def test_bench_cpu_rejects_bad_configs(tiny, tmp_path, capsys):
    data, ckpt = tiny
    code, _, err = run(["bench", "cpu", "--checkpoint", str(ckpt), "--data", str(data), "--configs", "minmax/8x8/sideways",
                        "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "align" in err


def test_export_integer_check_and_accumulators(tiny, tmp_path, capsys):
    data, ckpt = tiny
    out = tmp_path / "m.onnx"
    code, stdout, err = run(["export", "onnx", "--checkpoint", str(ckpt), "--data", str(data), "--calib", "16",
                             "--limit", "16", "--preset", "minmax", "--w-bits", "8", "--a-bits", "8",
                             "--integer-check", "4", "--out", str(out)], capsys)
    assert code == 0, err
    rep = json.loads(out.with_suffix(".json").read_text())
    acc = rep["accumulators"]
    assert [a["layer"] for a in acc] == [l["name"] for l in rep["layers"]]
    assert all(a["product"] == "int16" and a["accumulator"] == "int32" for a in acc)
    chk = rep["integer_check"]
    assert chk["samples"] == 4 and chk["within_bound"] and len(chk["layers"]) == 4
    assert all(l["max_abs_diff"] <= 1e-4 * max(1.0, l["max_abs_output"]) for l in chk["layers"])
    assert "Integer execution" in stdout and "int16" in stdout
    # 10-bit activations: products overflow int16 and are widened (reported), or a clear error when asked
    out2 = tmp_path / "m10.onnx"
    code, stdout, err = run(["export", "onnx", "--checkpoint", str(ckpt), "--data", str(data), "--calib", "16",
                             "--preset", "minmax", "--w-bits", "8", "--a-bits", "10", "--first-last-bits", "none",
                             "--integer-check", "2", "--out", str(out2)], capsys)
    assert code == 0, err
    acc = json.loads(out2.with_suffix(".json").read_text())["accumulators"]
    assert all(a["product"] == "int32" and a["product_widened"] for a in acc)
    code, _, err = run(["export", "onnx", "--checkpoint", str(ckpt), "--data", str(data), "--calib", "16",
                        "--preset", "minmax", "--w-bits", "8", "--a-bits", "10", "--first-last-bits", "none",
                        "--on-overflow", "raise", "--out", str(tmp_path / "m10r.onnx")], capsys)
    assert code == 2 and "int16 product stage could overflow" in err and "Traceback" not in err
    assert not (tmp_path / "m10r.onnx").exists()


def test_machine_description_names_cpu_cores_threads_and_versions(monkeypatch):
    """The machine line of bench.json and of every benchmark result, against what os / torch / onnxruntime report;
    a missing /proc (not Linux) falls back to platform and leaves the memory out."""
    import os
    import platform

    import onnxruntime
    import torch

    from bitalloc.report import machine as M

    line = M.machine_description(3, onnxruntime=True)
    assert line.startswith(M.cpu_name() + f", {os.cpu_count()} cores")
    cap = torch.backends.cpu.get_cpu_capability()
    assert f"onnxruntime {onnxruntime.__version__}" in line and f"torch {torch.__version__} (3 threads, {cap} kernels)" in line
    assert "onnxruntime" not in M.machine_description()
    assert f"({torch.get_num_threads()} threads, {cap} kernels)" in M.machine_description()
    if os.path.exists("/proc/meminfo"):
        kb = int(open("/proc/meminfo").read().split("MemTotal:")[1].split()[0])
        assert M.memory_gib() == pytest.approx(kb / 2**20) and "GiB RAM" in line

    def no_proc(self, *a, **k):
        raise OSError("no such file")

    monkeypatch.setattr(M.Path, "read_text", no_proc)
    assert M.memory_gib() is None
    assert M.cpu_name() == (platform.processor() or platform.machine())
    assert "GiB RAM" not in M.machine_description()
