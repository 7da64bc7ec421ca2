"""The command-line path from quantization-aware training to the tools that read quantized models, and the
sweep's outputs: train (tiny synthetic data, a few steps) -> frozen model -> cost --quantized; bitalloc freeze;
sweep.json Pareto flags, plots (and their absence without matplotlib), --retrain, plot-bits.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from bitalloc.cli import main
from bitalloc.cli import train as T


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("BITALLOC_PROGRESS", "off")
    monkeypatch.setenv("BITALLOC_SYNTHETIC_N", "96")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _synthetic28(args):
    """MNIST-shaped blobs (1x28x28, 10 classes) so that the zoo LeNet-5 trains on them."""
    train = T.synthetic_dataset(96, seed=0, num_classes=10, shape=(1, 28, 28), noise_seed=1)
    val = T.synthetic_dataset(48, seed=0, num_classes=10, shape=(1, 28, 28), noise_seed=2)
    return train, val, 10


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_train_freeze_cost_quantized(tmp_path, capsys, monkeypatch):
    """bitalloc train --method bb writes run-frozen.pt next to the checkpoint; bitalloc freeze writes the same
    model; bitalloc cost --quantized reads it and reports the frozen model's cost; the QAT checkpoint is refused
    by the PTQ path with a pointer to freeze."""
    from bitalloc.cost import cost_report
    from bitalloc.model.layers import quant_layers
    from bitalloc.model.serialize import load_quantized
    from bitalloc.quantizers import FrozenQuantizer
    from bitalloc.train import load_model_checkpoint

    monkeypatch.setitem(T.DATASET_HOOKS, "synthetic28", _synthetic28)
    ck = tmp_path / "bb.pt"
    code, out, err = run(["train", "--model", "lenet5", "--dataset", "synthetic28", "--method", "bb", "--steps", "2",
                          "--batch-size", "32", "--gate-init", "6,-6,6,6", "--out", str(ck)], capsys)
    assert code == 0, err
    auto = tmp_path / "bb-frozen.pt"
    assert auto.exists() and "frozen model" in out
    frozen = load_quantized(auto)
    assert all(isinstance(q, FrozenQuantizer) for _, l in quant_layers(frozen) for q in l.quantizers())
    assert [int(l.weight_quantizer.bits.max()) for _, l in quant_layers(frozen)] == [4, 4, 4, 4]  # z8 off: 4 bits
    trained = load_model_checkpoint(ck)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(frozen(x), trained(x))  # the file computes what the trained model computes in eval

    manual = tmp_path / "manual-frozen.pt"
    code, out, err = run(["freeze", "--checkpoint", str(ck), "--out", str(manual), "--json", str(tmp_path / "f.json")],
                         capsys)
    assert code == 0, err
    assert "features.0" in out and "relative BOPs" in out
    with torch.no_grad():
        assert torch.equal(load_quantized(manual)(x), frozen(x))
    code, _, err = run(["freeze", "--checkpoint", str(ck), "--out", str(manual)], capsys)
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1

    code, out, err = run(["cost", "--quantized", str(auto), "--json", str(tmp_path / "cost.json")], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "cost.json").read_text())
    expected = cost_report(frozen, torch.zeros(1, 1, 28, 28))
    assert report["relative_bops"] == pytest.approx(expected.relative_bops)
    # 4-bit weights x 4-bit inputs everywhere but the 8-bit network input, nothing pruned yet (prune init 6)
    by = {l.name: l for l in expected.layers}
    assert (by["features.0"].w_bits, by["features.0"].a_bits) == (4, 8)
    assert (by["features.3"].w_bits, by["features.3"].a_bits) == (4, 4)
    summary = json.loads((tmp_path / "f.json").read_text())
    assert summary["relative_bops"] == pytest.approx(expected.relative_bops)

    code, _, err = run(["cost", "--checkpoint", str(ck)], capsys)  # PTQ of a QAT checkpoint: one clear line
    assert code == 2 and "bitalloc freeze" in err and str(auto) in err and len(err.strip().splitlines()) == 1
    fp32 = tmp_path / "fp32.pt"
    assert main(["train", "--model", "synthetic-mlp", "--dataset", "synthetic", "--steps", "1", "--out",
                 str(fp32)]) == 0
    assert not (tmp_path / "fp32-frozen.pt").exists()  # FP32 training writes no frozen model
    capsys.readouterr()
    code, _, err = run(["freeze", "--checkpoint", str(fp32)], capsys)
    assert code == 2 and "bitalloc ptq" in err


def _sweep_argv(out_dir, *extra):
    return ["sweep", "--method", "bb", "--mu", "0.5", "--model", "synthetic-mlp", "--dataset", "synthetic",
            "--steps", "2", "--out-dir", str(out_dir), *extra, "--", "--batch-size", "32"]


def test_sweep_without_matplotlib_retrain_and_frozen_models(tmp_path, capsys, monkeypatch):
    from bitalloc.report import plots
    from bitalloc.train import load_checkpoint, save_checkpoint

    def missing():
        raise plots.PlotsUnavailable("matplotlib is not installed: plots need it")

    monkeypatch.setattr(plots, "_pyplot", missing)
    monkeypatch.setattr(plots, "plots_available", lambda: False)
    code, _, err = run(_sweep_argv(tmp_path), capsys)
    assert code == 0, err
    assert "plots skipped" in err and not list(tmp_path.glob("*.png"))
    data = json.loads((tmp_path / "sweep.json").read_text())
    point = data["points"][0]
    assert point["pareto"] is True and point["pareto_method"] is True
    assert point["frozen"] == str(tmp_path / "bb-mu0.5-frozen.pt") and (tmp_path / "bb-mu0.5-frozen.pt").exists()

    # make the run look interrupted: --retrain must train it again from scratch, not resume it
    ck = tmp_path / "bb-mu0.5.pt"
    state = load_checkpoint(ck)
    state["complete"] = False
    save_checkpoint(ck, state)
    code, _, err = run(_sweep_argv(tmp_path, "--retrain"), capsys)
    assert code == 0, err
    assert "retraining" in err and "--overwrite" in err and "--resume" not in err
    start = json.loads((tmp_path / "bb-mu0.5.jsonl").read_text().splitlines()[0])
    assert start["event"] == "start" and start["resumed_from_epoch"] is None
    # without --retrain a partial run resumes
    from bitalloc.cli.sweep import train_argv
    import argparse

    ns = argparse.Namespace(model="m", dataset=None, data=None, epochs=None, steps=None, init=None, progress=None,
                            train_args=[], retrain=False)
    point = {"method": "bb", "args": []}
    assert train_argv(ns, point, ck, "partial")[-1] == "--resume"
    assert train_argv(ns, point, ck, "fresh")[-1] == "--overwrite"
    ns.retrain = True
    assert train_argv(ns, point, ck, "partial")[-1] == "--overwrite" and "--resume" not in train_argv(ns, point, ck, "partial")


def test_pareto_flags_and_plot_draws_points_and_front(tmp_path, monkeypatch):
    from bitalloc.cli.sweep import mark_pareto, write_outputs
    from bitalloc.report import plots

    pts = {n: {"name": n, "method": m, "relative_bops": c, "top1": a} for n, m, c, a in [
        ("a", "bb", 0.01, 0.90), ("b", "bb", 0.02, 0.95), ("c", "bb", 0.03, 0.94), ("d", "lsq", 0.015, 0.96),
        ("e", "lsq", 0.05, 0.955)]}
    mark_pareto(pts)
    assert {n for n, p in pts.items() if p["pareto"]} == {"a", "d"}  # d dominates b and c; e is dominated by d
    assert {n for n, p in pts.items() if p["pareto_method"]} == {"a", "b", "d"}
    assert plots.pareto_front_points([(1, 5), (2, 7), (3, 6), (4, 9), (2, 7)]) == [(1, 5), (2, 7), (4, 9)]
    if not importlib.util.find_spec("matplotlib"):
        pytest.skip("matplotlib is not installed")
    figs = []
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figs.append(fig), real_save(fig, path))[1])
    paths, _ = write_outputs(tmp_path, pts)
    assert paths["pareto"].exists() and json.loads(paths["json"].read_text())["points"][0]["pareto"] is True
    ax = figs[0].axes[0]
    lines = {l.get_label(): list(zip(l.get_xdata(), l.get_ydata())) for l in ax.lines}
    assert lines["bb (Pareto front)"] == [(1.0, 90.0), (2.0, 95.0)]  # the front only, sorted by cost
    assert lines["lsq (Pareto front)"] == [(1.5, 96.0)]
    hollow = {c.get_label(): c.get_offsets().tolist() for c in ax.collections}
    assert hollow == {"bb (dominated)": [[3.0, 94.0]], "lsq (dominated)": [[5.0, 95.5]]}
    assert {t.get_text(): tuple(t.xy) for t in ax.texts} == {  # each point named where it is drawn
        n: (100.0 * p["relative_bops"], 100.0 * p["top1"]) for n, p in pts.items()}
    with pytest.raises(ValueError, match="2 names for 3 points"):
        plots.pareto_plot({"bb": [(1, 2), (2, 3), (3, 4)]}, tmp_path / "x.png", labels={"bb": ["a", "b"]})
    # labels of points within 2.5% of the axes' spans of each other are merged (they would print over each other)
    groups = plots._label_groups([((1.0, 90.0), "a"), ((1.01, 90.05), "a-s1"), ((2.0, 90.05), "b"),
                                  ((1.0, 95.0), "c")], logx=False)
    assert groups == [((1.0, 90.0), "a, a-s1"), ((2.0, 90.05), "b"), ((1.0, 95.0), "c")]


def test_plot_bits_command(tmp_path, capsys):
    from bitalloc.cli.sweep import bits_history

    ck = tmp_path / "bb.pt"
    assert main(["train", "--model", "synthetic-mlp", "--dataset", "synthetic", "--method", "bb", "--epochs", "2",
                 "--batch-size", "48", "--gate-init", "6,6,-6,-6", "--out", str(ck)]) == 0
    capsys.readouterr()
    log = tmp_path / "bb.jsonl"
    expected = bits_history(log)
    test_bits = bits_history(log, kind="test", roles="w")
    assert set(expected) == {"1 w", "1 a", "3 w", "3 a"} and set(test_bits) == {"1 w", "3 w"}
    assert [e for e, _ in expected["1 w"]] == [1.0, 2.0]
    assert all(b == 8.0 for _, b in test_bits["1 w"])  # gates 6,6,-6,-6: 8 bits at test time
    assert all(8.0 < b < 9.0 for _, b in expected["3 w"])  # E[bits] a little above 8 (P(z16 on) > 0)
    code, _, err = run(["plot-bits", str(tmp_path / "missing.jsonl")], capsys)
    assert code == 2 and "no such log" in err
    if not importlib.util.find_spec("matplotlib"):
        code, _, err = run(["plot-bits", str(log)], capsys)
        assert code == 2 and "matplotlib" in err
        return
    code, out, err = run(["plot-bits", str(log), "--out", str(tmp_path / "bits.png")], capsys)
    assert code == 0, err
    assert (tmp_path / "bits.png").stat().st_size > 1000 and "4 tensors over 2 epochs" in out
