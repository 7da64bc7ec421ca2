"""Activation steps chosen by the network's output (``clip_check="network"``), against brute force: every
multiplier applied by hand to the calibrated step, the model run whole with that one quantizer enabled, the
divergence computed in float64 here; and the sensitivity pass against the layer quantized alone by PTQ."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import bitalloc
from bitalloc.calibration.network_clip import STEPS
from bitalloc.errors import ConfigError
from bitalloc.model.layers import float_mode, quant_layers
from bitalloc.search import Candidate, layer_sensitivity
from tests.nets import make_net
from tests.test_mixed_cli import _net, user  # noqa: F401 - the fixture
from tests.test_sensitivity import _alone, _data, _kl
from tests.test_user_models import run

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(preset="aciq", check="network", **kw):
    return bitalloc.preset(preset, 4, 4, first_last_bits=None, clip_check=check, **kw)


def _brute_force(model, cfg, data, measure):
    """Per quantized layer: {multiplier: divergence} with only its input quantizer on, the step set by hand."""
    base = bitalloc.quantize(model, _without_check(cfg), data)
    out = {}
    with float_mode(base), torch.no_grad():
        ref = torch.cat([base(x) for x, _ in data])
        for name, layer in quant_layers(base):
            q = layer.input_quantizer
            if q is None:
                continue
            step = q.scale.clone()
            q.enabled = True
            errs = {}
            for m in STEPS:
                q.scale.copy_(step * m)
                q._cache = None
                errs[m] = measure(ref, torch.cat([base(x) for x, _ in data]))
            q.scale.copy_(step)
            q._cache = None
            q.enabled = False
            out[name] = (step, errs)
    return out


def _without_check(cfg):
    """The same calibration without the check (and without GPTQ, which runs after it and would leave rounded
    weights in float mode): the configured steps."""
    c = copy.deepcopy(cfg)
    c.default.act.clip_check = "none"
    c.default.weight.rounding = "nearest"
    return c.validate()


@pytest.mark.parametrize("preset", ["aciq", "aciq-gptq"])
def test_each_step_is_the_brute_force_choice(preset):
    net, data = make_net(), _data()
    cfg = _config(preset)
    q = bitalloc.quantize(net, cfg, data)
    checks = q.bitalloc_clip_checks
    want = _brute_force(net, cfg, data, _kl)
    assert set(checks) == set(want) and want
    layers = dict(quant_layers(q))
    for name, (step, errs) in want.items():
        got = checks[name]["errors"]
        for m in STEPS:
            assert got[f"step x{m:g}"] == pytest.approx(errs[m], rel=1e-6, abs=1e-12), (name, m)
        best = min(STEPS, key=lambda m: (errs[m], m != 1.0))
        assert checks[name]["chosen"] == f"step x{best:g}"
        torch.testing.assert_close(layers[name].input_quantizer.scale, step * best)
        assert errs[best] <= errs[1.0]
    # the steps of a plain calibration are not all kept: the check changes something on this network
    assert any(c["chosen"] != "step x1" for c in checks.values())
    assert q.bitalloc_calibration["clip_checks"] == checks


class _ConvOut(nn.Module):
    """Outputs that are not class scores: the divergence is the mean squared error."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(6, 2, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_outputs_that_are_not_class_scores_use_the_squared_error():
    net, data = _ConvOut().eval(), _data()
    cfg = _config("aciq")
    q = bitalloc.quantize(net, cfg, data)
    want = _brute_force(net, cfg, data, lambda r, o: float((o.double() - r.double()).pow(2).mean()))
    for name, (_, errs) in want.items():
        for m in STEPS:
            assert q.bitalloc_clip_checks[name]["errors"][f"step x{m:g}"] == pytest.approx(errs[m], rel=1e-6)


def test_sensitivity_uses_the_step_ptq_chooses():
    """Each (layer, candidate) of the sensitivity pass is the layer quantized alone by PTQ, whose calibration
    chooses the step with this check: the same damage."""
    net, data = make_net(), _data()
    cfg = _config("aciq")
    s = layer_sensitivity(net, cfg, data, [Candidate(8, 8), Candidate(4, 4), Candidate(4, 2)])
    with torch.no_grad():
        ref = torch.cat([net(x) for x, _ in data])
    for i, name in enumerate(s.layers):
        for j, cand in enumerate(s.candidates):
            want = _kl(ref, _alone(net, cfg, name, cand, data))
            assert s.values[i, j] == pytest.approx(want, rel=2e-3, abs=1e-9), (name, cand.label)


def test_config_and_errors():
    cfg = _config("aciq-gptq")
    assert cfg.default.act.clip_check == "network"
    back = bitalloc.QuantConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.default.act.clip_check == "network"
    with pytest.raises(ConfigError, match="clip_check"):
        bitalloc.preset("aciq", 4, 4, clip_check="everything")
    with pytest.raises(ConfigError, match="online"):
        bitalloc.preset("minmax", 8, 8, online=True, clip_check="network")
    with pytest.raises(ConfigError, match="no quantized activations"):
        bitalloc.preset("aciq", 4, None, clip_check="network")
    bad = copy.deepcopy(cfg)
    bad.default.act.online = True
    with pytest.raises(ConfigError, match="online"):
        bad.validate()


def test_clip_check_from_the_command_line(user, capsys, tmp_path):  # noqa: F811 - the fixture
    common = [*_net(user), "--inputs", str(user / "data.pt"), "--calib", "16", "--no-plot"]
    code, _, err = run(["ptq", *common, "--preset", "aciq", "--clip-check", "network", "--out", str(tmp_path / "p")],
                       capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "p" / "report.json").read_text())
    checks = report["calibration"]["clip_checks"]
    assert checks and all(set(c["errors"]) == {f"step x{m:g}" for m in STEPS} for c in checks.values())
    # on top of a configuration file too
    (tmp_path / "c.json").write_text(json.dumps(bitalloc.preset("aciq", 4, 4).to_dict()))
    code, _, err = run(["ptq", *common, "--config", str(tmp_path / "c.json"), "--clip-check", "network", "--out",
                        str(tmp_path / "q")], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "q" / "report.json").read_text())["calibration"]["clip_checks"] == checks
    # an image folder: the report keeps which images each model got right (to pair runs on the same images)
    code, _, err = run(["ptq", *_net(user), "--dataset", "imagefolder", "--data", str(user / "img"), "--calib", "6",
                        "--preset", "aciq", "--clip-check", "network", "--no-plot", "--out", str(tmp_path / "i")], capsys)
    assert code == 0, err
    from bitalloc.report.stats import decode_mask

    rep = json.loads((tmp_path / "i" / "report.json").read_text())
    correct, fp32 = (decode_mask(rep["per_sample"][k]) for k in ("correct", "fp32_correct"))
    assert len(correct) == len(fp32) == 15 - 6
    assert 100 * correct.mean() == pytest.approx(rep["top1"]) and 100 * fp32.mean() == pytest.approx(rep["fp32_top1"])
    assert rep["per_sample"]["against_fp32"]["n"] == 9
    code, _, err = run(["ptq", *common, "--preset", "minmax", "--online", "--clip-check", "network", "--out",
                        str(tmp_path / "e")], capsys)
    assert code == 2 and "--clip-check" in err and err.count("\n") == 1
