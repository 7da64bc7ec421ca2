"""``--holdout N``: runs validated on training samples kept out of training, and sweeps that evaluate every point
on the test split *and* on those samples (to choose runs, e.g. short trials, without looking at the test images).
Checked against index sets built by hand and against evaluating the frozen models by hand."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from bitalloc.cli import main
from bitalloc.cli import train as T
from bitalloc.errors import ConfigError
from bitalloc.report.stats import decode_mask


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def quiet(monkeypatch):
    monkeypatch.setenv("BITALLOC_PROGRESS", "off")
    monkeypatch.setenv("BITALLOC_SYNTHETIC_N", "96")


def _indexed(n, offset=0.0):
    """Samples whose input is their own index (+ offset, standing in for augmentation)."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1) + offset
    return torch.utils.data.TensorDataset(x, torch.zeros(n, dtype=torch.long))


def _values(ds):
    return [float(ds[i][0]) for i in range(len(ds))]


def test_holdout_split_is_disjoint_fixed_and_takes_held_samples_unaugmented():
    train, plain = _indexed(50, offset=0.5), _indexed(50)
    rest, held = T.holdout_split(train, plain, 7)
    assert len(rest) == 43 and len(held) == 7
    held_idx = sorted(int(v) for v in _values(held))
    rest_idx = sorted(int(v - 0.5) for v in _values(rest))
    assert all(v == int(v) for v in _values(held))              # from the unaugmented copy
    assert all(v - int(v) == 0.5 for v in _values(rest))        # from the training copy
    assert sorted(held_idx + rest_idx) == list(range(50))       # disjoint, and together everything
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(T.HOLDOUT_SEED)).tolist()
    assert held_idx == sorted(perm[:7])                         # the documented choice, whatever the run's seed
    assert sorted(int(v) for v in _values(T.holdout_split(train, plain, 7)[1])) == held_idx
    for bad in (0, 50, -3, True, 2.5):
        with pytest.raises(ConfigError, match="--holdout"):
            T.holdout_split(train, plain, bad)


def _args(**kw):
    ns = argparse.Namespace(dataset="synthetic", data=None, cache_dir=None, transform=None, val_fraction=0.1,
                            seed=3, holdout=None)
    for k, v in kw.items():
        setattr(ns, k, v)
    return ns


def test_load_data_with_holdout_replaces_the_validation_set():
    train, val, n = T.load_data(_args(), augment=False)
    assert (len(train), len(val), n) == (96, 256, 4)
    rest, held, n = T.load_data(_args(holdout=10), augment=False)
    assert (len(rest), len(held), n) == (86, 10, 4)
    xs = {tuple(train[i][0].flatten()[:4].tolist()) for i in range(len(train))}
    assert all(tuple(held[i][0].flatten()[:4].tolist()) in xs for i in range(len(held)))  # training samples
    assert not T.has_test_split("imagenet") and T.has_test_split("cifar10") and T.has_test_split("synthetic")


def test_holdout_with_val_fraction_is_refused(capsys):
    code = main(["train", "--model", "synthetic-mlp", "--dataset", "synthetic", "--steps", "1", "--holdout", "8",
                 "--val-fraction", "0.2", "--out", "unused.pt"])
    err = capsys.readouterr().err
    assert code == 2 and "--holdout 8 and --val-fraction 0.2" in err


def test_sweep_evaluates_points_on_the_test_split_and_the_holdout(tmp_path, capsys):
    from bitalloc.model.freeze import freeze
    from bitalloc.train import load_model_checkpoint

    code = main(["sweep", "--method", "lsq", "--bits", "4", "--model", "synthetic-mlp", "--dataset", "synthetic",
                 "--steps", "3", "--out-dir", str(tmp_path), "--", "--batch-size", "32", "--holdout", "16"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "held-out %" in out.out and "held-out" in out.err
    point = json.loads((tmp_path / "sweep.json").read_text())["points"][0]
    assert len(decode_mask(point["correct"])) == 256                     # the test split
    held = point["holdout"]
    mask = decode_mask(held["correct"])
    assert held["samples"] == 16 and len(mask) == 16
    # by hand: the frozen model on the held-out samples
    _, held_set = T.holdout_split(*(T.synthetic_dataset(96, seed=0, noise_seed=1),) * 2, 16)
    model = freeze(load_model_checkpoint(point["checkpoint"])).eval()
    x = torch.stack([held_set[i][0] for i in range(16)])
    y = torch.tensor([int(held_set[i][1]) for i in range(16)])
    with torch.no_grad():
        right = model(x).argmax(1) == y
    assert mask.tolist() == right.tolist()
    assert held["top1"] == pytest.approx(float(right.float().mean()))
