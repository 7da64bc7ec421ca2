"""Tests of bitalloc.train: schedules, the loop, objective hooks, checkpoints/resume, overwrite protection, CLI.

Only tiny synthetic datasets and models are used (no bitalloc.data / bitalloc.models dependency).
"""

from __future__ import annotations

import argparse
import io
import json
import math

import pytest
import torch
from torch import nn

from bitalloc.errors import CheckpointError, ConfigError
from bitalloc.train import (Objective, StopAfter, TrainConfig, evaluate, fit, load_checkpoint, load_model_checkpoint)
from bitalloc.train import schedules as S
from bitalloc.train.progress import Progress
from tests.synthetic import blobs

pytestmark = pytest.mark.usefixtures("one_thread")

# ---- helpers -----------------------------------------------------------------------------------------------


def mlp(seed: int = 0, dim: int = 16, classes: int = 4, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(dim, 32), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(32, classes))
    return nn.Sequential(*layers)


class AugmentedBatches(torch.utils.data.Dataset):
    """An in-memory dataset with a vectorised ``get_batch(indices, generator=)`` and random 'augmentation'."""

    augment = True

    def __init__(self, base: torch.utils.data.TensorDataset):
        self.x, self.y = base.tensors

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i] + 0.1 * torch.randn(self.x.shape[1]), self.y[i]

    def get_batch(self, indices, generator=None):
        idx = torch.as_tensor(indices)
        return self.x[idx] + 0.1 * torch.randn(len(idx), self.x.shape[1], generator=generator), self.y[idx]


def quiet(**kw) -> TrainConfig:
    base = dict(epochs=2, batch_size=32, optimizer="sgd", lr=0.05, momentum=0.9, schedule="cosine", progress="off")
    base.update(kw)
    return TrainConfig(**base)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- schedules ---------------------------------------------------------------------------------------------

def test_schedules_closed_forms():
    T = 120
    for step in (0, 1, 30, 59, 60, 79, 80, 100, 119, 120):
        t = step / T
        assert S.constant(step, T) == 1.0
        assert S.cosine(step, T) == pytest.approx(0.5 * (1 + math.cos(math.pi * t)), abs=1e-12)
        assert S.cosine(step, T, final=0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)), abs=1e-12)
        assert S.linear(step, T) == pytest.approx(1 - t, abs=1e-12)
        expected = 1.0 if t < 2 / 3 else (1 - t) / (1 - 2 / 3)
        assert S.constant_then_linear(step, T) == pytest.approx(expected, abs=1e-12)
        assert S.constant_then_linear(step, T, fraction=0.5) == pytest.approx(1.0 if t < 0.5 else 2 * (1 - t), abs=1e-12)
        assert S.multistep(step, T) == pytest.approx(0.1 ** ((t >= 0.5) + (t >= 0.75)), abs=1e-15)
    # the Bayesian Bits weight schedule: constant for 2/3, halfway down at 5/6, zero at the end
    assert S.constant_then_linear(99, 120) == pytest.approx(1 - (99 / 120 - 2 / 3) * 3)
    assert S.constant_then_linear(100, 120) == pytest.approx(0.5)
    assert S.constant_then_linear(120, 120) == 0.0
    assert S.one_cycle(0, 100) == pytest.approx(1 / 25)
    assert S.one_cycle(30, 100) == pytest.approx(1.0)
    assert S.one_cycle(100, 100) == pytest.approx(1e-4)


def test_schedule_spec_warmup_aliases_errors():
    spec = S.ScheduleSpec("linear-decay", warmup_steps=10)
    fn = spec.build(100)
    after = 1 - 10 / 100
    for step in range(10):
        assert fn(step) == pytest.approx((step + 1) / 10 * after)
    assert fn(10) == pytest.approx(after) and fn(50) == pytest.approx(0.5)
    assert S.ScheduleSpec("cosine", warmup_fraction=0.1).warmup_for(200) == 20
    assert S.canonical_name("Bayesian_Bits") == "constant_then_linear"
    assert S.as_spec({"name": "cosine", "args": {"final": 0.5}})(100, 100) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="unknown learning-rate schedule"):
        S.ScheduleSpec("exponential")
    with pytest.raises(ConfigError, match="bad arguments"):
        S.ScheduleSpec("cosine", {"gamma": 2})
    with pytest.raises(ConfigError):
        S.constant_then_linear(1, 10, fraction=1.5)


# ---- the loop ------------------------------------------------------------------------------------------------

def test_fit_learns_separable_data():
    train, val = blobs(512, noise_seed=1, sep=4.0), blobs(256, noise_seed=2, sep=4.0)
    model = mlp()
    before = evaluate(model, val, progress="off")
    result = fit(model, train, val, quiet(epochs=6, optimizer="adam", lr=1e-2))
    after = evaluate(model, val, progress="off")
    assert before.accuracy < 0.6  # untrained: near chance (4 classes)
    assert after.accuracy > 0.95 and result.final_accuracy == pytest.approx(after.accuracy)
    assert after.count == 256 and after.loss < before.loss
    assert result.best_accuracy >= result.final_accuracy - 1e-12
    assert len(result.history) == 6 and result.steps == 6 * 16
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.time_per_step > 0 and result.samples_per_s > 0
    # evaluate on a DataLoader gives the same numbers as on the Dataset
    loader = torch.utils.data.DataLoader(val, batch_size=50)
    assert evaluate(model, loader, progress="off").accuracy == pytest.approx(after.accuracy)
    # per-sample outcomes (for paired comparisons): the model's argmax against the labels, in data order
    x, y = val.tensors
    with torch.no_grad():
        ref = model(x).argmax(1) == y
    for data in (val, loader):
        ev = evaluate(model, data, batch_size=64, progress="off", per_sample=True)
        assert ev.per_sample.dtype == torch.bool and torch.equal(ev.per_sample, ref)
        assert int(ev.per_sample.sum()) == ev.correct and "per_sample" not in ev.to_dict()
    assert after.per_sample is None


def test_steps_mode_partial_epoch_and_eval_every():
    train, val = blobs(100), blobs(40, noise_seed=3)
    r = fit(mlp(), train, val, quiet(steps=10, batch_size=32, eval_every=5))  # 4 steps/epoch -> 3 epochs
    assert r.steps == 10 and r.epochs == 3
    assert [h["step"] for h in r.history] == [4, 8, 10]
    assert "val_accuracy" not in r.history[0] and "val_accuracy" in r.history[-1]


def test_resume_is_bitwise_identical(tmp_path):
    """2 epochs == 1 epoch, checkpoint, resume with a fresh model object, 1 more epoch (dropout included)."""
    train, val = blobs(200), blobs(64, noise_seed=3)
    for data, opt in ((train, "sgd"), (AugmentedBatches(train), "adam")):
        full = mlp(seed=0, dropout=0.2)
        r_full = fit(full, data, val, quiet(optimizer=opt, lr=0.01 if opt == "adam" else 0.05))
        ck = tmp_path / f"run_{opt}.pt"
        first = mlp(seed=0, dropout=0.2)
        r1 = fit(first, data, val, quiet(optimizer=opt, lr=0.01 if opt == "adam" else 0.05, checkpoint=str(ck)),
                 callbacks=[StopAfter(1)])
        assert r1.stopped_early and r1.epochs == 1 and ck.exists()
        torch.manual_seed(1234)  # whatever the caller's RNG holds, the checkpoint restores it
        second = mlp(seed=99, dropout=0.2)  # different init: the weights come from the checkpoint
        r2 = fit(second, data, val, quiet(optimizer=opt, lr=0.01 if opt == "adam" else 0.05, checkpoint=str(ck),
                                          resume=True))
        assert r2.resumed_from_epoch == 1 and r2.epochs == 2
        wf, w2 = weights(full), weights(second)
        for k in wf:
            assert torch.equal(wf[k], w2[k]), f"{opt}: {k} differs after resume"
        assert [h["train_loss"] for h in r2.history] == [h["train_loss"] for h in r_full.history]
        assert [h["val_accuracy"] for h in r2.history] == [h["val_accuracy"] for h in r_full.history]
        assert load_checkpoint(ck)["complete"] is True


def test_loader_workers_do_not_change_results():
    """Augmentation is seeded per sample (items) or per step (batches): worker processes change nothing."""
    train = blobs(96)
    for data in (AugmentedBatches(train), _ItemsAug(train)):
        runs = []
        for workers in (0, 2):
            model = mlp()
            fit(model, data, None, quiet(epochs=2, workers=workers))
            runs.append(weights(model))
        for k in runs[0]:
            assert torch.equal(runs[0][k], runs[1][k]), (type(data).__name__, k)


class _ItemsAug(AugmentedBatches):
    get_batch = None  # per-item path: __getitem__ draws from the (per-sample reseeded) global torch RNG


def test_checkpoint_errors(tmp_path):
    train = blobs(64)
    ck = tmp_path / "m.pt"
    with pytest.raises(CheckpointError, match=r"does not exist.*train first"):
        load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="cannot resume.*does not exist"):
        fit(mlp(), train, None, quiet(checkpoint=str(tmp_path / "nope.pt"), resume=True))
    from bitalloc.cli.train import synthetic_mlp

    torch.manual_seed(0)
    fit(synthetic_mlp(num_classes=4, in_features=16), train, None,
        quiet(epochs=1, checkpoint=str(ck), model_factory="bitalloc.cli.train:synthetic_mlp",
              model_kwargs={"num_classes": 4, "in_features": 16}))
    data = ck.read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{bad.name} is corrupt or truncated") as e:
        load_checkpoint(bad)
    assert len(str(e.value)) < 400 and "\n" not in str(e.value)  # one line, not torch's whole essay
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint at all" * 10)
    with pytest.raises(CheckpointError, match="corrupt or truncated") as e:
        load_model_checkpoint(garbage)
    pickled = tmp_path / "pickled.pt"  # a pickle the weights-only loader refuses: torch advises weights_only=False
    pickled.write_bytes(b"\x80\x02cos\nsystem\nq\x00.")
    with pytest.raises(CheckpointError, match="not a file bitalloc wrote: unpickling failed") as e:
        load_checkpoint(pickled)
    assert "weights_only" not in str(e.value) and "\n" not in str(e.value)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(empty)
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="plain.pt carries no bitalloc checksum.*add_checksum"):
        load_checkpoint(plain)  # no checksum: refused before anything else is looked at
    from bitalloc.io import add_checksum

    add_checksum(plain)
    with pytest.raises(CheckpointError, match="not a bitalloc checkpoint"):
        load_checkpoint(plain)
    # a checkpoint for a different model
    other = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    with pytest.raises(CheckpointError, match=r"m\.pt does not fit model Sequential: .*shape mismatches"):
        load_model_checkpoint(ck, model=other)
    ck2 = tmp_path / "named.pt"
    fit(mlp(), train, None, quiet(epochs=1, checkpoint=str(ck2), model_name="lenet5"))
    with pytest.raises(CheckpointError, match="is for model 'lenet5', not 'resnet20'"):
        fit(mlp(), train, None, quiet(checkpoint=str(ck2), resume=True, model_name="resnet20"))
    with pytest.raises(CheckpointError, match="batch_size=32 but this run has batch_size=16"):
        fit(mlp(), train, None, quiet(checkpoint=str(ck), resume=True, batch_size=16))
    # rebuild from the recorded factory (no model object given)
    rebuilt = load_model_checkpoint(ck)
    assert not rebuilt.training and rebuilt.bitalloc_checkpoint["epoch"] == 1
    assert rebuilt(train.tensors[0][:5]).shape == (5, 4)


def test_overwrite_protection(tmp_path):
    train = blobs(64)
    ck, log = tmp_path / "run.pt", tmp_path / "run.jsonl"
    fit(mlp(), train, None, quiet(epochs=1, checkpoint=str(ck), log=str(log)))
    before = ck.read_bytes()
    with pytest.raises(CheckpointError, match=r"run\.pt already exists.*--resume.*--overwrite"):
        fit(mlp(), train, None, quiet(epochs=1, checkpoint=str(ck), log=str(log)))
    assert ck.read_bytes() == before
    with pytest.raises(CheckpointError, match=r"run\.jsonl already exists"):
        fit(mlp(), train, None, quiet(epochs=1, log=str(log)))
    r = fit(mlp(seed=5), train, None, quiet(epochs=1, checkpoint=str(ck), log=str(log), overwrite=True))
    assert ck.read_bytes() != before and r.checkpoint == str(ck)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [line["event"] for line in lines] == ["start", "epoch", "end"]
    # resume="auto" continues an existing run, or starts a fresh one
    r = fit(mlp(), train, None, quiet(epochs=2, checkpoint=str(ck), resume="auto"))
    assert r.resumed_from_epoch == 1 and r.epochs == 2
    r = fit(mlp(), train, None, quiet(epochs=1, checkpoint=str(tmp_path / "new.pt"), resume="auto"))
    assert r.resumed_from_epoch is None


# ---- objective hooks ----------------------------------------------------------------------------------------

class L2ToZero(Objective):
    """extra_loss = strength * sum of squared weights; the last bias in its own group with a constant lr."""

    def __init__(self, strength: float, own_group: bool = False):
        self.strength, self.own_group, self.steps, self.epochs = strength, own_group, 0, []

    def param_groups(self, model):
        if not self.own_group:
            return []
        return [{"params": [model[-1].bias], "name": "gates", "lr": 0.02, "weight_decay": 0.0,
                 "schedule": "constant"}]

    def extra_loss(self, model):
        reg = sum((p ** 2).sum() for n, p in model.named_parameters() if n.endswith("weight"))
        return self.strength * reg, {"l2": float(reg.detach())}

    def on_step_end(self, model, step):
        self.steps = step

    def on_epoch_start(self, model, epoch):
        self.epochs.append(epoch)

    def log_state(self, model):
        return {"weight_norm": float(sum(p.norm() ** 2 for p in model.parameters()) ** 0.5)}

    def state_dict(self):
        return {"steps": self.steps}

    def load_state_dict(self, d):
        self.steps = d["steps"]


@torch.no_grad()
def _weight_norm(model):
    return float(sum((p ** 2).sum() for n, p in model.named_parameters() if n.endswith("weight")) ** 0.5)


def test_objective_extra_loss_is_added():
    train = blobs(256)
    plain, reg = mlp(), mlp()
    fit(plain, train, None, quiet(epochs=3))
    obj = L2ToZero(0.05)
    r = fit(reg, train, None, quiet(epochs=3), objective=obj)
    assert _weight_norm(reg) < 0.8 * _weight_norm(plain)
    assert obj.steps == r.steps == 24 and obj.epochs == [0, 1, 2]
    assert "l2" in r.history[0]["extra"] and "extra_loss" in r.history[0]["extra"]
    assert r.history[-1]["extra"]["l2"] < r.history[0]["extra"]["l2"]
    assert r.history[-1]["state"]["weight_norm"] > 0


def test_param_groups_follow_their_own_schedules(tmp_path):
    train = blobs(128)  # 4 steps per epoch, 3 epochs = 12 steps
    seen: list[dict] = []

    class Spy:
        def __init__(self):
            self.opt = None

        def on_step_end(self, step, logs):
            seen.append(step)

    obj = L2ToZero(0.0, own_group=True)
    cfg = quiet(epochs=3, lr=0.1, schedule="constant_then_linear", checkpoint=str(tmp_path / "g.pt"))
    r = fit(mlp(), train, None, cfg, objective=obj, callbacks=[Spy()])
    assert seen == list(range(1, 13))
    for rec in r.history:
        last = rec["step"] - 1  # lr logged is the one used by the epoch's last step
        assert rec["lr"]["default"] == pytest.approx(0.1 * S.constant_then_linear(last, 12))
        assert rec["lr"]["gates"] == pytest.approx(0.02)
    ck = load_checkpoint(tmp_path / "g.pt")
    assert [g["name"] for g in ck["param_groups"]] == ["default", "gates"]
    assert ck["param_groups"][0]["schedule"]["name"] == "constant_then_linear"
    assert ck["objective_state"] == {"steps": 12}
    # group_overrides patch a group by name; unknown names are an error
    r = fit(mlp(), train, None, quiet(epochs=1, group_overrides={"gates": {"lr": 0.5}}), objective=L2ToZero(0, True))
    assert r.history[0]["lr"]["gates"] == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="unknown parameter groups"):
        fit(mlp(), train, None, quiet(epochs=1, group_overrides={"nope": {"lr": 1}}))


def test_config_validation_and_divergence():
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="lbfgs").validate()
    with pytest.raises(ConfigError, match="schedule"):
        TrainConfig(schedule="warp").validate()
    with pytest.raises(ConfigError, match="lr"):
        TrainConfig(lr=0).validate()
    from bitalloc.train import DivergenceError

    with pytest.raises(DivergenceError, match="diverged"):
        fit(mlp(), blobs(64), None, quiet(epochs=1, lr=1e30, optimizer="sgd", momentum=0.0))


def test_progress_modes():
    buf = io.StringIO()
    with Progress(3, "work", mode="log", stream=buf, every_s=0.0) as bar:
        for _ in range(3):
            bar.update(1, loss=0.5)
    assert "work: 3/3" in buf.getvalue() and "loss=0.5" in buf.getvalue()
    buf = io.StringIO()
    with Progress(3, "work", mode="off", stream=buf) as bar:
        bar.update(3)
    assert buf.getvalue() == ""
    buf = io.StringIO()  # "auto" on a non-TTY stream: plain lines, no bar escape codes
    with Progress(2, "auto", mode="auto", stream=buf, every_s=0.0) as bar:
        bar.update(2)
    assert "\r" not in buf.getvalue() and "auto: 2/2" in buf.getvalue()


# ---- CLI -----------------------------------------------------------------------------------------------------

def _cli(argv: list[str]) -> int:
    """bitalloc.cli.main, or only the train command when sibling commands are not written yet."""
    try:
        from bitalloc.cli import build_parser

        build_parser()
    except ImportError:
        from bitalloc.cli import train as train_cmd
        from bitalloc.errors import BitallocError

        parser = argparse.ArgumentParser(prog="bitalloc")
        parser.add_argument("--verbose", action="store_true")
        sub = parser.add_subparsers(dest="command")
        train_cmd.register(sub)
        args = parser.parse_args(argv)
        try:
            return int(args.func(args) or 0)
        except BitallocError as exc:
            print(f"bitalloc {args.command}: error: {exc}", file=__import__("sys").stderr)
            return 2
    from bitalloc.cli import main

    return main(argv)


def test_cli_train_smoke(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BITALLOC_PROGRESS", "off")
    out = tmp_path / "syn.pt"
    argv = ["train", "--model", "synthetic-mlp", "--dataset", "synthetic", "--epochs", "4", "--lr", "0.01",
            "--batch-size", "64", "--out", str(out)]
    assert _cli(argv) == 0
    text = capsys.readouterr().out
    assert "final val accuracy" in text and str(out) in text and "syn.jsonl" in text
    result = json.loads((tmp_path / "syn.json").read_text())
    assert result["result"]["final_accuracy"] > 0.8 and result["config"]["optimizer"] == "adam"
    assert result["outputs"]["checkpoint"] == str(out)
    assert len((tmp_path / "syn.jsonl").read_text().splitlines()) == 6  # start + 4 epochs + end
    model = load_model_checkpoint(out)
    assert sum(p.numel() for p in model.parameters()) > 0
    # a second fresh run refuses to replace the outputs
    assert _cli(argv) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err
    # --resume of a finished run trains nothing more and reports the same result
    assert _cli(argv + ["--resume"]) == 0
    again = json.loads((tmp_path / "syn.json").read_text())
    assert again["result"]["steps"] == result["result"]["steps"]
    assert again["result"]["final_accuracy"] == result["result"]["final_accuracy"]


def test_cli_missing_data_is_a_clear_error(tmp_path, capsys, monkeypatch):
    pytest.importorskip("bitalloc.data")
    from bitalloc.data import load_dataset  # noqa: F401  (skip if the data package is incomplete)

    monkeypatch.delenv("BITALLOC_DATA", raising=False)
    monkeypatch.setenv("BITALLOC_PROGRESS", "off")
    code = _cli(["train", "--model", "resnet20", "--dataset", "cifar10", "--out", str(tmp_path / "x.pt")])
    assert code == 2
    assert "BITALLOC_DATA" in capsys.readouterr().err


def test_default_dataset_and_unknown_model(tmp_path, capsys, monkeypatch):
    """Without --dataset, train and sweep take the model's preset / zoo dataset; an unknown model name is named
    as such, with the valid names (it used to read "no default dataset")."""
    from bitalloc.models import model_info
    from bitalloc.train.presets import default_dataset

    for name in ("lenet5", "resnet20", "vgg7", "efficientnet_lite0"):
        assert default_dataset(name) == model_info(name).default_dataset
    monkeypatch.setenv("BITALLOC_PROGRESS", "off")
    for argv in (["train", "--out", str(tmp_path / "x.pt")],
                 ["sweep", "--method", "lsq", "--out-dir", str(tmp_path / "sw")]):
        assert _cli(argv[:1] + ["--model", "resnet99", "--data", str(tmp_path)] + argv[1:]) == 2
        err = capsys.readouterr().err
        assert "unknown model 'resnet99'" in err and "lenet5" in err, err
    assert not (tmp_path / "sw").exists()


def test_warmup_as_long_as_the_run_is_refused():
    """With W >= T the warm-up multiplier (step + 1) / W * f(W, T) is 0 for a decaying schedule: lr stays 0."""
    from bitalloc.errors import ConfigError
    from bitalloc.train.loop import TrainConfig

    assert S.ScheduleSpec("cosine", warmup_steps=200).build(200)(100) == 0.0  # what the check prevents
    with pytest.raises(ConfigError, match="warmup_steps=200 is not below steps=200.*--warmup-steps"):
        TrainConfig(steps=200, warmup_steps=200, schedule="cosine").validate()
    TrainConfig(steps=200, warmup_steps=20, schedule="cosine").validate()
    TrainConfig(steps=10, warmup_steps=20, schedule="constant").validate()
