"""Quantization-aware training: the lsq / pact / bb methods, their objective hooks, CLI (train, sweep), resume,
and data-parallel equivalence (2 CPU processes under torchrun == 1 process with the same global batch).

Tiny synthetic data and models only (the whole file runs in well under a minute on 2 busy cores).
"""

from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from bitalloc.model.freeze import freeze
from bitalloc.model.layers import quant_layers
from bitalloc.quantizers import BayesianBitsQuantizer, LSQQuantizer, PACTQuantizer
from bitalloc.train import METHODS, StopAfter, TrainConfig, fit, load_model_checkpoint
from bitalloc.train.methods import QATObjective, prepare_qat, resolve_options
from bitalloc.report.stats import decode_mask
from tests.synthetic import blobs
from tests.torchrun import load_worker, run_torchrun


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))


CFG = dict(optimizer="adam", lr=0.01, batch_size=32, epochs=2, progress="off", schedule="constant_then_linear")


def train(method: str, opts: dict, **cfg):
    model = prepare_qat(mlp(), method, dict({"input_shape": [16]}, **opts))
    obj = QATObjective(model, method, dict({"input_shape": [16]}, **opts))
    result = fit(model, blobs(160), blobs(64, noise_seed=5), TrainConfig(**dict(CFG, **cfg)), objective=obj)
    return model, result


# ---- registry, options, objective --------------------------------------------------------------------------

def test_methods_registered_with_cli_options():
    from bitalloc.cli import build_parser

    assert {"fp32", "lsq", "pact", "bb"} <= set(METHODS)
    p = build_parser()
    args = p.parse_args(["train", "--model", "lenet5", "--method", "bb", "--gate-init", "1,2,3,4", "--no-prune"])
    opts = METHODS["bb"].options(args)
    assert opts["gate_init"] == [1.0, 2.0, 3.0, 4.0] and opts["prune"] is False and opts["mu"] == 0.1
    assert opts["input_shape"] == [1, 28, 28] and opts["dataset"] == "mnist"
    args = p.parse_args(["train", "--model", "resnet20", "--method", "bb"])
    opts = METHODS["bb"].options(args)
    assert opts["gate_init"] == [6.0] * 4 and opts["mu"] == 0.01  # the reference CIFAR-10 command
    args = p.parse_args(["train", "--model", "lenet5", "--method", "pact", "--w-bits", "2", "--pact-init", "10"])
    opts = METHODS["pact"].options(args)
    assert opts["w_bits"] == 2 and opts["pact_init"] == 10.0
    overrides = METHODS["lsq"].overrides(None, opts)
    assert overrides["schedule"] == "constant_then_linear" and overrides["optimizer"] == "adam"
    assert overrides["lr"] == 1e-3
    with pytest.raises(Exception):
        resolve_options("bb", {"nonsense": 1})


def test_first_and_last_layers_and_param_groups():
    model = prepare_qat(mlp(), "lsq", {"input_shape": [16]})
    layers = quant_layers(model)
    assert [l.weight_quantizer.bits for _, l in layers] == [8, 4, 8]
    assert all(isinstance(l.input_quantizer, LSQQuantizer) for _, l in layers)
    obj = QATObjective(model, "lsq", {"input_shape": [16]})
    groups = obj.param_groups(model)
    assert [g["name"] for g in groups] == ["quant"] and len(groups[0]["params"]) == 6
    assert groups[0]["weight_decay"] == 0.0

    model = prepare_qat(mlp(), "bb", {"input_shape": [16], "mu": 0.5})
    obj = QATObjective(model, "bb", {"input_shape": [16], "mu": 0.5})
    layers = dict(quant_layers(model))
    assert layers["0"].input_quantizer.fixed and layers["0"].input_quantizer.test_bits() == 8
    assert layers["4"].weight_quantizer.log_alpha_prune is None  # the logits are not pruned
    assert layers["0"].weight_quantizer.log_alpha_prune.numel() == 32
    groups = {g["name"]: g for g in obj.param_groups(model)}
    assert set(groups) == {"gates", "ranges"} and groups["gates"]["schedule"] == "constant"
    n_gates = sum(p.numel() for p in groups["gates"]["params"])
    assert n_gates == 5 * 4 + 32 + 24  # 3 weights + 2 inputs with 4 bit gates; z2 for 2 layers
    # MAC weights r = MACs / largest layer's MACs
    assert obj.r == {"0": 1.0, "2": 768 / 512, "4": 96 / 512} or obj.r == pytest.approx(
        {"0": 512 / 768, "2": 1.0, "4": 96 / 768})
    loss, logs = obj.extra_loss(model)
    regs = sum(float(q.regularizer().detach()) for _, l in quant_layers(model) for q in l.quantizers())
    assert float(loss.detach()) == pytest.approx(0.5 * regs, rel=1e-6) and logs["bb_reg"] == pytest.approx(regs, rel=1e-6)
    pact = prepare_qat(mlp(), "pact", {"input_shape": [16]})
    assert all(isinstance(q, PACTQuantizer) for _, l in quant_layers(pact) for q in l.quantizers())


def test_bb_training_lowers_bits_with_mu_and_logs_state():
    fast = {"gate_lr": 0.2, "gate_init": [1.0, 1.0, 1.0, 1.0]}
    model0, r0 = train("bb", dict(fast, mu=0.0), epochs=3)
    model1, r1 = train("bb", dict(fast, mu=2.0), epochs=3)
    s0, s1 = r0.history[-1]["state"], r1.history[-1]["state"]
    assert s1["relative_bops"] < s0["relative_bops"]
    assert s1["relative_bops_expected"] < s0["relative_bops_expected"]
    assert r1.history[-1]["extra"]["bb_reg"] < r1.history[0]["extra"]["bb_reg"]
    assert set(s1["layers"]) == {"0", "2", "4"} and "p_on" in s1["layers"]["2"]["w"]
    assert "kept" in s1["layers"]["0"]["w"] and "expected_bits" in s1["layers"]["2"]["a"]
    assert r1.final_accuracy > 0.5
    # freezing gives the test-time cost the log reported
    import bitalloc

    frozen = freeze(model1)
    assert bitalloc.cost_report(frozen, torch.zeros(1, 16)).relative_bops == pytest.approx(s1["relative_bops"])


def test_bb_range_lr_follows_the_weights_unless_set():
    """The ranges' Adam lr is the weights' lr by default (1e-3 in the papers' recipe, as the reference code's
    --learning-rate-s), --range-lr sets it; gates keep their own lr; both groups are constant."""
    from bitalloc.train.loop import build_param_groups

    for range_lr, expect in ((None, 2e-4), (5e-3, 5e-3)):
        opts = {"input_shape": [16], "gate_lr": 0.05, "range_lr": range_lr}
        model = prepare_qat(mlp(), "bb", opts)
        groups, specs = build_param_groups(model, TrainConfig(**dict(CFG, lr=2e-4)), QATObjective(model, "bb", opts))
        by_name = {g["name"]: (g, s) for g, s in zip(groups, specs)}
        assert by_name["ranges"][0]["lr"] == pytest.approx(expect)
        assert by_name["gates"][0]["lr"] == pytest.approx(0.05)
        assert by_name["default"][0]["lr"] == pytest.approx(2e-4)
        assert by_name["ranges"][1].to_dict()["name"] == by_name["gates"][1].to_dict()["name"] == "constant"


def test_bb_resume_is_bitwise_identical(tmp_path):
    opts = {"gate_lr": 0.05, "mu": 0.5, "input_shape": [16]}
    full, _ = train("bb", opts, epochs=2)
    ck = str(tmp_path / "bb.pt")
    model = prepare_qat(mlp(), "bb", opts)
    fit(model, blobs(160), None, TrainConfig(**dict(CFG, checkpoint=ck)), objective=QATObjective(model, "bb", opts),
        callbacks=[StopAfter(1)])
    resumed = prepare_qat(mlp(), "bb", opts)
    fit(resumed, blobs(160), None, TrainConfig(**dict(CFG, checkpoint=ck, resume=True)),
        objective=QATObjective(resumed, "bb", opts))
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    # the checkpoint rebuilds the quantized model (method prepare) and loads every learned parameter
    loaded = load_model_checkpoint(ck, model=prepare_qat(mlp(), "bb", opts))
    x = torch.randn(8, 16)
    resumed.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), resumed(x))


def test_bb_fixed_gate_fine_tuning_phase():
    """--bb-fix-gates-epochs 1 of 3: epochs 1-2 learn the gates; in epoch 3 the gates are the test-time gates
    and do not move (bitwise), no noise is drawn, the regulariser is off, weights and ranges keep learning."""
    from bitalloc.train import Callback

    class Snap(Callback):
        def __init__(self):
            self.states = []

        def on_epoch_end(self, epoch, record, model):
            self.states.append({k: v.detach().clone() for k, v in model.state_dict().items()})

    opts = {"input_shape": [16], "gate_lr": 0.2, "mu": 1.0, "gate_init": [1.0, 1.0, 1.0, 1.0], "fix_gates_epochs": 1}
    model = prepare_qat(mlp(), "bb", opts)
    obj = QATObjective(model, "bb", opts)
    snap = Snap()
    r = fit(model, blobs(160), blobs(64, noise_seed=5), TrainConfig(**dict(CFG, epochs=3)), objective=obj,
            callbacks=[snap])
    assert [h["state"]["gates_fixed"] for h in r.history] == [False, False, True]
    s1, s2, s3 = snap.states
    gates = [k for k in s3 if "log_alpha" in k]
    assert gates and any(not torch.equal(s1[k], s2[k]) for k in gates)  # learned while stochastic
    assert all(torch.equal(s2[k], s3[k]) for k in gates)  # frozen exactly in the fixed phase
    assert all(torch.equal(s2[k], s3[k]) for k in s3 if k.endswith("noise_step"))  # no noise drawn
    assert not torch.equal(s2["2.layer.weight"], s3["2.layer.weight"])  # weights keep learning
    assert any(not torch.equal(s2[k], s3[k]) for k in s3 if k.endswith("clip_max"))  # and ranges
    last = r.history[-1]
    assert last["extra"]["extra_loss"] == 0.0 and last["extra"]["bb_reg"] > 0  # no regulariser in the loss
    assert r.history[0]["extra"]["extra_loss"] == pytest.approx(r.history[0]["extra"]["bb_reg"], rel=1e-6)
    # with fixed gates the expected cost is the test-time cost; the model in train mode == eval mode
    assert last["state"]["relative_bops_expected"] == pytest.approx(last["state"]["relative_bops"])
    x = torch.randn(8, 16)
    model.train()
    obj.set_gates_fixed(model, True)
    with torch.no_grad():
        y_train = model(x)
        model.eval()
        y_eval = model(x)
    assert torch.allclose(y_train, y_eval, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(freeze(model)(x), y_eval)


def test_fixed_gate_epochs_option():
    from bitalloc.cli import build_parser
    from bitalloc.errors import ConfigError
    from bitalloc.train.methods import fixed_gate_epochs

    assert fixed_gate_epochs(0.0, 10) == 0 and fixed_gate_epochs(2, 10) == 2 and fixed_gate_epochs(0.25, 8) == 2
    assert fixed_gate_epochs(0.01, 8) == 1  # a positive fraction fixes at least one epoch
    with pytest.raises(ConfigError, match="leave at least one epoch"):
        fixed_gate_epochs(3, 3)
    with pytest.raises(ConfigError):
        resolve_options("bb", {"fix_gates_epochs": 1.5})
    with pytest.raises(ConfigError, match="bb"):
        resolve_options("lsq", {"fix_gates_epochs": 2})
    args = build_parser().parse_args(["train", "--model", "lenet5", "--method", "bb", "--bb-fix-gates-epochs", "2"])
    assert METHODS["bb"].options(args)["fix_gates_epochs"] == 2.0
    # the loop reports the error before training
    opts = {"input_shape": [16], "fix_gates_epochs": 2}
    model = prepare_qat(mlp(), "bb", opts)
    with pytest.raises(ConfigError, match="leave at least one epoch"):
        fit(model, blobs(64), None, TrainConfig(**dict(CFG, epochs=2)), objective=QATObjective(model, "bb", opts))


def test_qat_recipes_from_the_bayesian_bits_reference():
    """`bitalloc train --method bb --model lenet5 --dataset mnist`: mu 0.1, gate init 6,6,-6,-6, Adam 1e-3 for
    weights, gates and ranges, weights constant for 2/3 then linear to 0; epochs from the QAT recipe."""
    from bitalloc.cli import build_parser
    from bitalloc.cli.train import config_overrides
    from bitalloc.models import create
    from bitalloc.train import get_preset
    from bitalloc.train.loop import build_param_groups

    p = build_parser()

    def resolve(argv):
        args = p.parse_args(["train", *argv])
        method = METHODS[args.method]
        opts = method.options(args)
        preset = get_preset(args.model, args.dataset)
        return opts, preset.train_config(**config_overrides(args, method, opts, preset))

    opts, cfg = resolve(["--method", "bb", "--model", "lenet5", "--dataset", "mnist"])
    assert opts["mu"] == 0.1 and opts["gate_init"] == [6.0, 6.0, -6.0, -6.0] and opts["fold_bn"]
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.schedule) == ("adam", 1e-3, 0.0, "constant_then_linear")
    assert (cfg.epochs, cfg.batch_size) == (10, 128)  # the CPU recipe (the FP32 preset has 8)
    total = 3000
    fn = cfg.schedule_spec(469).build(total)
    assert [fn(s) for s in (0, 1000, 1999)] == [1.0, 1.0, 1.0]
    assert fn(2500) == pytest.approx((1 - 2500 / total) / (1 / 3)) and fn(total) == pytest.approx(0.0)
    model = prepare_qat(create("lenet5"), "bb", opts)
    groups, specs = build_param_groups(model, cfg, QATObjective(model, "bb", opts), steps_per_epoch=469)
    by = {g["name"]: (g["lr"], s.name) for g, s in zip(groups, specs)}
    assert by == {"default": (1e-3, "constant_then_linear"), "gates": (1e-3, "constant"), "ranges": (1e-3, "constant")}
    _, paper = resolve(["--method", "bb", "--model", "lenet5", "--dataset", "mnist", "--qat-recipe", "paper"])
    assert (paper.epochs, paper.batch_size) == (100, 128)
    opts, cifar = resolve(["--method", "lsq", "--model", "vgg7", "--qat-recipe", "paper"])
    assert cifar.epochs == 300 and cifar.optimizer == "adam"
    _, cifar_cpu = resolve(["--method", "bb", "--model", "resnet20"])
    assert cifar_cpu.epochs == 30
    _, explicit = resolve(["--method", "bb", "--model", "lenet5", "--qat-recipe", "paper", "--epochs", "3"])
    assert explicit.epochs == 3  # the command line wins
    _, fp32 = resolve(["--model", "lenet5"])
    assert fp32.epochs == 8 and fp32.schedule == "cosine"  # FP32 training keeps its preset
    args = p.parse_args(["train", "--model", "lenet5", "--method", "pact", "--no-fold-bn"])
    assert METHODS["pact"].options(args)["fold_bn"] is False


# ---- command line ------------------------------------------------------------------------------------------

def _cli(argv):
    from bitalloc.cli import main

    return main(argv)


def test_cli_train_and_sweep(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BITALLOC_PROGRESS", "off")
    monkeypatch.setenv("BITALLOC_SYNTHETIC_N", "128")
    out = tmp_path / "bb.pt"
    assert _cli(["train", "--model", "synthetic-mlp", "--dataset", "synthetic", "--method", "bb", "--epochs", "1",
                 "--batch-size", "32", "--out", str(out), "--mu", "0.2"]) == 0
    state = torch.load(out, weights_only=False)
    assert state["method"] == "bb" and state["method_options"]["mu"] == 0.2
    assert [g["name"] for g in state["param_groups"]] == ["default", "gates", "ranges"]
    model = load_model_checkpoint(out)  # rebuilt through the method's prepare
    assert any(isinstance(q, BayesianBitsQuantizer) for _, l in quant_layers(model) for q in l.quantizers())
    capsys.readouterr()

    sweep_dir = tmp_path / "sweep"
    argv = ["sweep", "--method", "bb,lsq", "--mu", "0.05,1.0", "--bits", "3", "--model", "synthetic-mlp",
            "--dataset", "synthetic", "--epochs", "1", "--out-dir", str(sweep_dir), "--", "--batch-size", "32",
            "--gate-lr", "0.1"]
    assert _cli(argv) == 0
    err = capsys.readouterr().err
    data = json.loads((sweep_dir / "sweep.json").read_text())
    names = {p["name"] for p in data["points"]}
    assert names == {"bb-mu0.05", "bb-mu1", "lsq-w3a3"}
    for p in data["points"]:
        assert 0 < p["relative_bops"] < 1 and 0 <= p["top1"] <= 1 and p["layers"]
        assert Path(p["frozen"]).exists() and isinstance(p["pareto"], bool) and isinstance(p["pareto_method"], bool)
        # per-sample outcomes for paired comparisons: as many as the validation split, their mean is the top-1
        correct = decode_mask(p["correct"])
        assert correct.size > 0 and correct.mean() == pytest.approx(p["top1"])
    assert any(p["pareto"] for p in data["points"])
    lsq = next(p for p in data["points"] if p["method"] == "lsq")
    # the synthetic MLP has 2 layers, both first / last: 8 bits; the run recorded its 3-bit setting
    assert [l["w_bits"] for l in lsq["layers"]] == [8.0, 8.0] and lsq["options"]["w_bits"] == 3
    if importlib.util.find_spec("matplotlib"):
        assert (sweep_dir / "pareto.png").exists() and (sweep_dir / "bb-mu1-bits.png").exists()
    assert "training" in err
    # a second call trains nothing: every run is finished
    assert _cli(argv) == 0
    err = capsys.readouterr().err
    assert err.count("finished earlier") == 3


# ---- data-parallel equivalence -------------------------------------------------------------------------------

WORKER = textwrap.dedent('''
    import sys
    from pathlib import Path

    import torch
    from torch import nn

    from bitalloc.train import TrainConfig, fit
    from bitalloc.train import distributed as D
    from tests.synthetic import blobs
    from bitalloc.train.methods import QATObjective, prepare_qat


    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 4))


    CASES = {
        "lsq": ("lsq", {"input_shape": [16], "w_bits": 4, "a_bits": 4}),
        "pact": ("pact", {"input_shape": [16], "w_bits": 3, "a_bits": 3, "pact_decay": 1e-2}),
        # 2 epochs of stochastic gates, then 1 of fixed-gate fine-tuning (zero-gradient gates under DDP)
        "bb": ("bb", {"input_shape": [16], "mu": 0.3, "gate_lr": 2.0, "gate_init": [1.0, 1.0, 1.0, 1.0],
                      "fix_gates_epochs": 1}),
    }


    def run_case(name):
        method, opts = CASES[name]
        model = prepare_qat(mlp(), method, opts)
        # SGD: float-order differences between DDP's averaged half-batch gradients and the one-process gradient
        # stay ~1e-7 (Adam's normalisation amplifies them in near-zero gradients of the first steps)
        cfg = TrainConfig(optimizer="sgd", lr=0.1, batch_size=32, epochs=3 if method == "bb" else 2, progress="off",
                          schedule="constant_then_linear")
        r = fit(model, blobs(160), blobs(70, noise_seed=5), cfg, objective=QATObjective(model, method, opts))
        return {"weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "history": [{k: h.get(k) for k in ("train_loss", "val_loss", "val_accuracy", "extra")}
                            for h in r.history],
                "state": r.history[-1]["state"]}


    def main(out):
        with D.distributed("cpu"):
            results = {name: run_case(name) for name in CASES}
            if D.rank() == 0:
                torch.save(results, Path(out) / "qat_ddp.pt")


    if __name__ == "__main__":
        main(sys.argv[1])
''')


@pytest.mark.xdist_group("torchrun")
def test_torchrun_two_processes_match_one_quantized(tmp_path):
    """LSQ (activation steps initialised from the first global batch, reduced across ranks), PACT (clip levels
    initialised the same way, L2 decay on alpha counted once) and Bayesian Bits (gates with rank-invariant noise,
    regulariser counted once) under DDP == one process."""
    mod = load_worker(WORKER, tmp_path / "qat_worker.py")
    run_torchrun(tmp_path / "qat_worker.py", str(tmp_path))
    multi = torch.load(tmp_path / "qat_ddp.pt", weights_only=False)
    for name in mod.CASES:
        single = mod.run_case(name)
        for k, v in single["weights"].items():
            m = multi[name]["weights"][k]
            if v.dtype.is_floating_point:
                scale = max(float(v.abs().max()), 1e-12)
                # Missing reductions (an activation step initialised from one rank's half batch, rank-dependent
                # gate noise, a regulariser counted per rank) change parameters by 1e-2 or more.
                assert float((m - v).abs().max()) <= 1e-4 * scale, f"{name}: {k}: {(m - v).abs().max()}"
            else:
                assert torch.equal(m, v), f"{name}: {k}"
        for hs, hm in zip(single["history"], multi[name]["history"], strict=True):
            for key in ("train_loss", "val_loss"):
                assert hm[key] == pytest.approx(hs[key], rel=1e-4), (name, key)
            for k, v in (hs.get("extra") or {}).items():  # the regulariser is not double counted
                assert hm["extra"][k] == pytest.approx(v, rel=1e-4), (name, k)
        assert multi[name]["state"]["relative_bops"] == pytest.approx(single["state"]["relative_bops"])
    # the gates really moved (the comparison is not between two untouched initialisations)
    p_on = [p for layer in multi["bb"]["state"]["layers"].values() for q in layer.values() for p in q["p_on"]]
    assert min(p_on) < 0.9
    assert [h["extra"]["extra_loss"] == 0.0 for h in multi["bb"]["history"]] == [False, False, True]
    # PACT's clip levels really moved, and the decay term was logged (and not doubled) on both sides
    assert "pact_l2" in multi["pact"]["history"][-1]["extra"]
    init = mod.prepare_qat(mod.mlp(), "pact", mod.CASES["pact"][1])
    init(torch.randn(2, 16))  # weights' alphas are set at prepare; activations' from data
    moved = [k for k, v in multi["pact"]["weights"].items() if k.endswith("weight_quantizer.alpha")
             and not torch.equal(v, init.state_dict()[k])]
    assert moved


def test_sweep_outputs_merge_points_of_concurrent_sweeps(tmp_path):
    """Two sweeps into one folder each write only their own points: every write merges with sweep.json on disk
    (under a lock), so neither loses the other's; a corrupt sweep.json is an error, not silently replaced."""
    from bitalloc.cli.sweep import read_points, write_outputs
    from bitalloc.errors import ConfigError

    def pt(name, bops, top1):
        return {name: {"name": name, "method": name.split("-")[0], "relative_bops": bops, "top1": top1}}

    write_outputs(tmp_path, pt("bb-mu0.1", 0.01, 0.90), plots=False)
    _, merged = write_outputs(tmp_path, pt("lsq-w4a4", 0.02, 0.91), plots=False)  # the other sweep's write
    assert set(merged) == {"bb-mu0.1", "lsq-w4a4"} == set(read_points(tmp_path / "sweep.json"))
    _, merged = write_outputs(tmp_path, pt("bb-mu0.1", 0.01, 0.92), plots=False)  # a re-evaluated point replaces
    assert merged["bb-mu0.1"]["top1"] == 0.92 and merged["bb-mu0.1"]["pareto"] and len(merged) == 2
    assert not merged["lsq-w4a4"]["pareto"]  # dominated by the re-evaluated point
    (tmp_path / "sweep.json").write_text('{"points": [')
    with pytest.raises(ConfigError, match="not a sweep result"):
        write_outputs(tmp_path, pt("bb-mu1", 0.005, 0.8), plots=False)
    assert (tmp_path / "sweep.json").read_text() == '{"points": ['


def test_sweep_points_and_pareto_front(tmp_path):
    from bitalloc.cli.sweep import pareto_front, sweep_points
    from bitalloc.errors import ConfigError

    pts = sweep_points(["bb", "lsq"], [0.01, 0.1], "4,2x8")
    assert [p["name"] for p in pts] == ["bb-mu0.01", "bb-mu0.1", "lsq-w4a4", "lsq-w2a8"]
    assert pts[3]["args"] == ["--w-bits", "2", "--a-bits", "8"]
    with pytest.raises(Exception):
        sweep_points(["bb"], None, None)
    # --tag keeps runs of other train options apart in one folder
    assert [p["name"] for p in sweep_points(["bb", "pact"], [0.03], "4", "-init4")] == ["bb-mu0.03-init4",
                                                                                      "pact-w4a4-init4"]
    with pytest.raises(ConfigError, match="--tag"):
        sweep_points(["bb"], [0.03], None, "a/b")
    # --configs: one lsq / pact run per QuantConfig file, named after it, beside the --bits runs
    (tmp_path / "mixed-W4A4.json").write_text("{}")
    pts = sweep_points(["lsq"], None, "4", "-s1", str(tmp_path / "mixed-W4A4.json"))
    assert [p["name"] for p in pts] == ["lsq-mixed-W4A4-s1", "lsq-w4a4-s1"]
    assert pts[0]["args"] == ["--config", str(tmp_path / "mixed-W4A4.json")]
    assert pts[0]["setting"] == {"config": str(tmp_path / "mixed-W4A4.json")}
    with pytest.raises(ConfigError, match="does not exist"):
        sweep_points(["lsq"], None, None, "", str(tmp_path / "nope.json"))
    with pytest.raises(ConfigError, match="--method lsq"):
        sweep_points(["bb"], [0.03], None, "", str(tmp_path / "mixed-W4A4.json"))
    cands = [{"name": "a", "relative_bops": 0.01, "top1": 0.90}, {"name": "b", "relative_bops": 0.02, "top1": 0.95},
             {"name": "c", "relative_bops": 0.03, "top1": 0.94}, {"name": "d", "relative_bops": 0.01, "top1": 0.89},
             {"name": "e", "relative_bops": 0.05, "top1": 0.96}]
    assert [p["name"] for p in pareto_front(cands)] == ["a", "b", "e"]
