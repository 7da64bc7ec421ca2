"""ONNX QDQ export: structure (types, axes, codes), equality with the fake-quant model in onnxruntime, what
onnxruntime fuses into int8 kernels, its own static quantization (the anchor), and the two commands.

References: bitalloc's own integer codes (the exported initializers must equal them exactly) and the
fake-quant PyTorch model (onnxruntime without graph optimizations computes the same function up to float32
rounding; with them, its int8 kernels requantize, so only agreement is checked there).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bitalloc
from bitalloc.errors import ConfigError
from tests.nets import SamePadConv, make_net

onnx = pytest.importorskip("onnx", reason="ONNX export tests need the onnx package (pip install 'bitalloc[onnx]')")
ort = pytest.importorskip("onnxruntime", reason="ONNX export tests need onnxruntime (pip install 'bitalloc[onnx]')")

from onnx import numpy_helper  # noqa: E402

from bitalloc.runtime.onnx_export import export_onnx  # noqa: E402
from bitalloc.runtime.ort import (agreement, int8_compute_ops, make_session, optimized_op_counts,  # noqa: E402
                                  ort_static_quantize, run_session, run_torch)


class Residual(nn.Module):
    """conv-bn-relu6 blocks with "same" padding, a residual add, pooling and a classifier."""

    def __init__(self):
        super().__init__()
        self.stem = SamePadConv(3, 8, 3, stride=2, image_size=16)
        self.bn = nn.BatchNorm2d(8)
        self.dw = SamePadConv(8, 8, 3, image_size=8, groups=8)
        self.pw = nn.Conv2d(8, 8, 1)
        self.head = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu6(self.bn(self.stem(x)))
        y = self.pw(F.relu6(self.dw(x)))
        x = x + y
        x = F.relu6(self.head(x))
        return self.fc(x.mean(dim=(2, 3)))


class Seq(nn.Module):
    """A linear layer on 3-d inputs (exported as MatMul with a transposed weight)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 5)

    def forward(self, x):
        return self.b(torch.relu(self.a(x))).mean(dim=1)


def data(shape, n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g) * 1.3 + 0.2


def quantized(model, x, preset="minmax", w=8, a=8, **kw):
    torch.manual_seed(0)
    return bitalloc.quantize(model, bitalloc.preset(preset, w_bits=w, a_bits=a, **kw), [x])


def close_to_fake_quant(q, proto, x, *, level="none", exact=False):
    """onnxruntime (no graph optimizations) against the fake-quant model.

    ``exact``: one quantized layer, so the outputs agree to float32 rounding. Several layers: a float32
    rounding difference (summation order) that straddles a rounding boundary of the next quantizer moves
    that code by one step, so only the mean difference is small and the arg-max agrees.
    """
    ref, _ = run_torch(q, [x])
    got, _ = run_session(make_session(proto.SerializeToString(), level=level), [x])
    a = agreement(ref, got)
    if exact:
        assert a.max_abs_error <= 2e-5 * max(1.0, a.max_abs_output), a
    else:
        assert a.mean_abs_error <= 2e-3 * max(1.0, a.max_abs_output) and a.top1_agreement >= 95, a
    return a


def inits(proto):
    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def test_w8a8_structure_codes_and_equality():
    net = make_net()
    x = data((3, 16, 16))
    q = quantized(net, x)
    proto, rep = export_onnx(q, x[:2])
    names = {l.name: l for l in rep.layers}
    assert set(names) == {"stem", "dw", "pw", "conv1d", "fc"}
    assert all(l.weight == "int8" and l.act == "uint8" and not l.narrow for l in rep.layers)
    assert {f["name"] for f in rep.float_layers} >= {"tconv", "unused"}  # stays float
    init = inits(proto)
    for name in names:  # the int8 initializers are bitalloc's codes, the scales its steps
        ql = q.get_submodule(name)
        p = ql.weight_quantizer.qparams()
        codes = p.quantize(ql.layer.weight).numpy()
        assert np.array_equal(init[f"{name}.weight_quantized"].astype(np.int64), codes)
        assert init[f"{name}.weight_quantized"].dtype == np.int8
        np.testing.assert_array_equal(init[f"{name}.weight_scale"], (p.scale * p.corr_scale).detach().numpy())
    dq_axes = [a.i for n in proto.graph.node if n.op_type == "DequantizeLinear" and "weight" in n.input[0]
               for a in n.attribute if a.name == "axis"]
    assert dq_axes and set(dq_axes) == {0}
    assert not any(n.domain == "bitalloc" for n in proto.graph.node)
    assert not any(n.op_type == "Pad" for n in proto.graph.node)  # zero pads folded into the convs
    close_to_fake_quant(q, proto, x)
    ref, _ = run_torch(q, [x])  # with onnxruntime's int8 kernels: requantization, so compare loosely
    got, _ = run_session(make_session(proto.SerializeToString()), [x])
    assert agreement(ref, got).top1_agreement >= 90


@pytest.mark.parametrize("preset,w,a,kw", [
    ("minmax", 4, 4, {}),
    ("aciq", 4, 8, {}),  # bias correction, exact shift branch
    ("aciq", 3.5, 4, {"act_granularity": "channel"}),  # mixed per-channel bits, per-axis activations
    ("minmax", 12, 10, {}),  # wider than 8 bits: float emulation
])
def test_narrow_wide_per_channel_and_bias_shift_equal_fake_quant(preset, w, a, kw):
    net = make_net()
    x = data((3, 16, 16))
    q = quantized(net, x, preset, w, a, **kw)
    proto, rep = export_onnx(q, x[:2])
    onnx.checker.check_model(proto)
    mid = {l.name: l for l in rep.layers}["dw"]
    if a < 8:
        assert mid.narrow and mid.act == "uint8"
        if kw.get("act_granularity") != "channel":  # per-tensor narrow grid: integer Clip between Q and DQ
            clips = [n for n in proto.graph.node if n.op_type == "Clip" and "dw_input" in n.name]
            assert clips and inits(proto)[clips[0].input[2]].dtype == np.uint8
    if a > 8:
        assert mid.act.startswith("float-emulated") and mid.weight.startswith("float")
    if preset == "aciq":
        assert mid.bias_shift == "exact"
    if kw.get("act_granularity") == "channel":
        assert mid.per_channel_act and not mid.int8
    close_to_fake_quant(q, proto, x)


class One(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


@pytest.mark.parametrize("make,shape,preset,w,a,kw", [
    (lambda: SamePadConv(3, 6, 3, stride=2, image_size=9), (3, 9, 9), "minmax", 4, 4, {}),
    (lambda: nn.Conv2d(6, 6, 3, padding=1, groups=6), (6, 7, 7), "aciq", 4, 8, {}),
    (lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2), (4, 7, 7), "aciq", 3.5, 4, {"act_granularity": "channel"}),
    (lambda: nn.Conv1d(4, 5, 3, padding=2, dilation=2), (4, 11), "minmax", 12, 10, {}),
    (lambda: nn.Linear(6, 5), (3, 6), "aciq", 4, 4, {"act_granularity": "channel"}),
    (lambda: nn.Linear(6, 5), (6,), "aciq", 5, 6, {}),
], ids=["same-pad-w4a4", "depthwise-shift", "grouped-mixed-per-channel", "conv1d-wide", "linear-3d", "linear-2d"])
def test_single_layer_export_equals_fake_quant(make, shape, preset, w, a, kw):
    x = data(shape, seed=1)
    cfg = bitalloc.preset(preset, w_bits=w, a_bits=a, first_last_bits=None, **kw)
    torch.manual_seed(0)
    q = bitalloc.quantize(One(make()), cfg, [x])
    proto, _ = export_onnx(q, x[:2], int32_bias=False)
    close_to_fake_quant(q, proto, x, exact=True)
    # default: a Gemm's bias is stored as int32 codes (for QGemm); its rounding is the only difference
    proto, rep = export_onnx(q, x[:2])
    a = agreement(run_torch(q, [x])[0], run_session(make_session(proto.SerializeToString(), level="none"), [x])[0])
    assert a.max_abs_error <= rep.layers[0].max_bias_rounding * 1.001 + 2e-5 * a.max_abs_output
    assert rep.layers[0].int32_bias == (rep.layers[0].op == "Gemm" and rep.layers[0].act == "uint8"
                                        and not rep.layers[0].per_channel_act)


def test_bias_shift_requantize_and_fold_are_reported_approximations():
    net = make_net()
    x = data((3, 16, 16))
    q = quantized(net, x, "aciq", 4, 8)
    ref, _ = run_torch(q, [x])
    exact, _ = export_onnx(q, x[:2])
    rq, rep = export_onnx(q, x[:2], bias_shift="requantize")
    fold, rep_f = export_onnx(q, x[:2], bias_shift="fold", calibration_data=[x])
    dw = {l.name: l for l in rep.layers}["dw"]
    assert dw.bias_shift.startswith("requantized") and 0 <= dw.max_shift_error <= dw.max_abs_shift
    assert {l.name: l for l in rep_f.layers}["dw"].bias_shift == "folded"
    errs = {}
    for name, proto in (("exact", exact), ("requantize", rq), ("fold", fold)):
        got, _ = run_session(make_session(proto.SerializeToString(), level="none"), [x])
        errs[name] = agreement(ref, got).mean_abs_error
    assert errs["exact"] < 1e-5 < errs["requantize"]
    assert errs["fold"] > errs["exact"]
    with pytest.raises(ConfigError, match="calibration_data"):
        export_onnx(q, x[:2], bias_shift="fold")


def test_linear_on_3d_inputs_uses_a_transposed_int8_weight():
    x = data((4, 6))
    q = quantized(Seq(), x, "minmax", 8, 8)
    proto, rep = export_onnx(q, x[:2])
    assert {l.op for l in rep.layers} == {"MatMul"}
    w = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "a.weight_quantized"][0]
    assert [a.i for a in w.attribute if a.name == "axis"] == [1]
    assert inits(proto)["a.weight_quantized"].shape == (6, 8)
    assert not any(n.op_type == "Transpose" for n in proto.graph.node)
    close_to_fake_quant(q, proto, x)


def test_align_ort_runs_every_conv_and_add_in_int8():
    x = data((3, 16, 16))
    q = quantized(Residual(), x)
    plain, rep0 = export_onnx(q, x[:2])
    aligned, rep = export_onnx(q, x[:2], align="ort", calibration_data=[x])
    c0 = optimized_op_counts(plain.SerializeToString())
    c1 = optimized_op_counts(aligned.SerializeToString())
    assert c1.get("QLinearConv", 0) == 4 and c1.get("QLinearAdd", 0) == 1 and "Conv" not in c1
    assert int8_compute_ops(c1) == 5  # 4 convs + the classifier (QGemm)
    assert int8_compute_ops(c0) < int8_compute_ops(c1)
    assert rep.extra_qdq and not rep0.extra_qdq
    ref, _ = run_torch(q, [x])
    got, _ = run_session(make_session(aligned.SerializeToString()), [x])
    a = agreement(ref, got)
    assert a.top1_agreement >= 90 and a.max_abs_error < 0.1 * a.max_abs_output


def test_errors_and_files(tmp_path):
    x = data((3, 16, 16))
    online = quantized(make_net(), x, online=True)
    with pytest.raises(ConfigError, match="online"):
        export_onnx(online, x[:2])
    with pytest.raises(ConfigError, match="no quantized layers"):
        export_onnx(make_net(), x[:2])
    q = quantized(make_net(), x)
    with pytest.raises(ConfigError, match="align"):
        export_onnx(q, x[:2], align="always")
    path = tmp_path / "m.onnx"
    export_onnx(q, x[:2], path)
    onnx.checker.check_model(str(path))
    assert make_session(path).get_inputs()[0].shape[0] == "batch"  # dynamic batch axis


def test_onnxruntime_static_quantization_anchor(tmp_path):
    from bitalloc.runtime.onnx_export import export_float

    net = Residual().eval()
    x = data((3, 16, 16), n=8)
    fp32 = tmp_path / "fp32.onnx"
    fp32.write_bytes(export_float(net, x[:1]).SerializeToString())
    out = ort_static_quantize(fp32, tmp_path / "q.onnx", [(x, None)], method="minmax")
    counts = optimized_op_counts(out)
    assert counts.get("QLinearConv", 0) == 4
    ref = net(x).detach().numpy()
    got, _ = run_session(make_session(out), [x])
    assert agreement(ref, got).max_abs_error < 0.2 * np.abs(ref).max()
    # entropy calibration with TensorRT's 2048 / 128 bins gives other (clipped) ranges than MinMax
    ent = ort_static_quantize(fp32, tmp_path / "e.onnx", [(x, None)], method="entropy")
    a, b = inits(onnx.load(str(out))), inits(onnx.load(str(ent)))
    scales = [k for k in a if k.endswith("_scale") and a[k].size == 1 and k in b]
    assert scales and any(b[k] < a[k] for k in scales)


def test_export_and_bench_commands(tmp_path, monkeypatch):
    """The two commands end to end on a tiny zoo model saved as a quantized file and a synthetic data set."""
    from bitalloc.cli import main
    from bitalloc.cli import bench as bench_cli
    from bitalloc.model.serialize import save_quantized

    torch.manual_seed(0)
    from bitalloc import models

    model = models.create("lenet5").eval()
    x = torch.randn(40, 1, 28, 28)
    y = torch.randint(0, 10, (40,))
    q = bitalloc.quantize(model, bitalloc.preset("minmax", w_bits=8, a_bits=8), [x[:16]])
    qpath = save_quantized(q, tmp_path / "q.pt", model_name="lenet5", example_shape=(1, 28, 28))
    out = tmp_path / "m.onnx"
    monkeypatch.delenv("BITALLOC_DATA", raising=False)
    # the default --align model needs calibration images: a clear error without them
    assert main(["export", "onnx", "--quantized", str(qpath), "--out", str(out)]) == 2 and not out.exists()
    assert main(["export", "onnx", "--quantized", str(qpath), "--out", str(out), "--align", "none"]) == 0
    assert out.exists() and json.loads(out.with_suffix(".json").read_text())["int8_layers"] == 4
    assert main(["export", "onnx", "--quantized", str(qpath), "--out", str(out), "--align", "none"]) == 2  # no overwrite
    # the bench runner on in-memory batches (the CLI wraps it with data loading)
    calib, evaluation = [(x[:16], y[:16])], [(x[i:i + 8], y[i:i + 8]) for i in range(0, 40, 8)]
    res = bench_cli.bench_cpu(model, calib, evaluation, bench_cli.parse_configs("minmax/8x8/ort,minmax/4x4/none"),
                              tmp_path / "bench", batch_sizes=(1, 8), runs=2, warmup=1, min_seconds=0.0, anchors=("minmax",),
                              log=lambda s: None)
    labels = [r["label"] for r in res["rows"]]
    assert labels[0].startswith("FP32") and len(labels) == 4
    for r in res["rows"]:
        assert set(r["latency"]) == {"1", "8"} and r["latency"]["8"]["median_ms"] > 0
    assert res["rows"][2]["agreement"] >= 90
    with pytest.raises(ConfigError, match="PRESET"):
        bench_cli.parse_configs("minmax")


def test_frozen_pruned_layer_exports_exactly():
    from bitalloc.model.freeze import freeze

    x = data((3, 7, 7), seed=2)
    cfg = bitalloc.preset("aciq", w_bits=4, a_bits=4, first_last_bits=None)
    torch.manual_seed(0)
    q = freeze(bitalloc.quantize(One(nn.Conv2d(3, 6, 3, padding=1)), cfg, [x]))
    with torch.no_grad():
        q.layer.weight_quantizer.kept[[0, 3]] = False
    proto, rep = export_onnx(q, x[:2])
    codes = inits(proto)["layer.weight_quantized"]
    assert not codes[[0, 3]].any()
    close_to_fake_quant(q, proto, x, exact=True)


# ---- onnxruntime's int8 quantization points in the bitalloc model (runtime/align.py) ---------------------------------

def _conv_biases_on_int32_grid(proto):
    """Every Conv / Gemm bias fed by 8-bit per-tensor DQ inputs is an integer multiple of s_x * s_w[c] (float32)."""
    vals = inits(proto)
    prod = {o: n for n in proto.graph.node for o in n.output}
    checked = 0
    for n in proto.graph.node:
        if n.op_type != "Conv" or len(n.input) < 3 or n.input[2] not in vals:
            continue
        dx, dw = prod[n.input[0]], prod[n.input[1]]
        sx = vals[dx.input[1]].astype(np.float32)
        sw = vals[dw.input[1]].astype(np.float32).reshape(-1)
        k = vals[n.input[2]].astype(np.float64) / (sx * sw).astype(np.float64)
        # float32 biases hold k * step to float32 precision (2^-24 relative): onnxruntime's rounding recovers k
        assert (np.abs(k - np.round(k)) <= 1e-3 + 2**-22 * np.abs(k)).all() and np.abs(k).max() < 2**31 - 1
        checked += 1
    return checked


def _cpu_has_vnni() -> bool:
    """Whether the CPU has VNNI (exact u8 x s8 dot products in onnxruntime's int8 kernels); Linux only, else True."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return True
    return "avx512_vnni" in flags or "avx_vnni" in flags or "amx_int8" in flags


def test_align_model_puts_ort_points_in_the_model():
    from bitalloc.runtime import integer_check
    from bitalloc.runtime.align import align_for_ort, tensor_points

    x = data((3, 16, 16))
    q = quantized(Residual(), x)
    bias0 = q.pw.layer.bias.detach().clone()
    a = align_for_ort(q, [x])
    rep = a.bitalloc_ort_alignment
    # the skip input (after stem's ReLU6) shares dw's input grid; pw's output (into the add) and head's output
    # (into the mean) get new uint8 min-max grids; every int8 layer's bias goes on the int32 grid
    assert [(p.site, p.shares) for p in rep.points] == [("stem", "dw"), ("pw", None), ("head", None)]
    assert rep.int32_biases == ["stem", "dw", "pw", "head", "fc"] and not rep.unsupported
    assert not tensor_points(q) and torch.equal(q.pw.layer.bias.detach(), bias0)  # the original is untouched
    assert set(tensor_points(a)) == {"p0", "p1", "p2"}
    with pytest.raises(ConfigError, match="already aligned"):
        align_for_ort(a, [x])
    # exported: every conv and the add in int8, no export-only points, and the same function as the aligned model
    proto, er = export_onnx(a, x[:2], align="ort", calibration_data=[x])
    assert er.extra_qdq == [] and len(er.model_points) == 3
    counts = optimized_op_counts(proto.SerializeToString())
    assert counts.get("QLinearConv", 0) == 4 and counts.get("QLinearAdd", 0) == 1 and "Conv" not in counts
    assert _conv_biases_on_int32_grid(proto) == 4
    close_to_fake_quant(a, proto, x, exact=True)  # unfused onnxruntime: float32 rounding only
    ref, _ = run_torch(a, [x])
    got, _ = run_session(make_session(proto.SerializeToString()), [x])  # int8 kernels: requantization may move a code
    fused = agreement(ref, got)
    # On CPUs with VNNI (AVX-512 VNNI / AVX-VNNI) onnxruntime's u8 x s8 kernels are exact and only requantization
    # moves a code (mean error ~1e-4 of the output range). Without VNNI (AVX2 only, e.g. the AMD EPYC machines
    # bitalloc is also tested on) they pair products in saturating int16 (vpmaddubsw), which onnxruntime documents
    # (its reduce_range option); measured here: mean error 1.6% of the output range. So the bound depends on the ISA.
    vnni = _cpu_has_vnni()
    assert fused.mean_abs_error <= (1e-3 if vnni else 3e-2) * fused.max_abs_output, (vnni, fused)
    # the arg-max agrees wherever the model's top-2 margin exceeds twice the largest deviation of the int8 kernels
    # (an untrained net has near-ties)
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * np.abs(ref - got).max(-1)
    assert (ref.argmax(-1) == got.argmax(-1))[clear].all()
    assert fused.top1_agreement >= (95 if vnni else 75)
    # the export-only points of align="ort" on the unaligned model are farther from their model
    only, _ = export_onnx(q, x[:2], align="ort", calibration_data=[x])
    ref0, _ = run_torch(q, [x])
    got0, _ = run_session(make_session(only.SerializeToString()), [x])
    if vnni:  # without VNNI the kernels' int16 saturation dominates both errors (see above)
        assert agreement(ref0, got0).mean_abs_error > 3 * fused.mean_abs_error
    # the aligned model still runs in integers (its tensor quantizers act on the integer layers' outputs)
    chk = integer_check(a, [x], samples=4)
    assert chk.within_bound and len(chk.layers) == 5


def test_align_model_on_blocks_with_shortcuts():
    """ResNet-20 (blocks returning relu(out + shortcut(x)), option-A shortcuts): points hooked on block modules."""
    from bitalloc import models
    from bitalloc.runtime.align import align_for_ort

    torch.manual_seed(0)
    net = models.create("resnet20").eval()
    x = torch.randn(8, 3, 32, 32)
    q = bitalloc.quantize(net, bitalloc.preset("minmax", w_bits=8, a_bits=8), [x])
    a = align_for_ort(q, [x])
    rep = a.bitalloc_ort_alignment
    assert not rep.unsupported and any(p.site.endswith("relu2") or p.site.startswith("layer") for p in rep.points)
    # the two strided, zero-padded shortcuts select values of the block input: they take the grid of the
    # conv reading that input (as onnxruntime propagates grids through Slice / Pad), so no requantization
    shortcuts = {p.site: p.shares for p in rep.points if p.site.endswith("shortcut")}
    assert shortcuts == {"layer2.0.shortcut": "layer2.0.conv1", "layer3.0.shortcut": "layer3.0.conv1"}
    proto, er = export_onnx(a, x[:1], align="ort", calibration_data=[x])
    assert er.extra_qdq == []
    counts = optimized_op_counts(proto.SerializeToString())
    assert counts.get("QLinearConv", 0) == 19 and "Conv" not in counts and counts.get("QLinearAdd", 0) == 9
    # Q / DQ nodes left in onnxruntime's graph: the input's Q and the two shortcuts' DQ -> Pad -> Q (the
    # logits leave QGemm in float); a requantization (DQ -> Q between two grids) would add a pair per shortcut
    assert counts.get("QuantizeLinear", 0) == 3 and counts.get("DequantizeLinear", 0) == 2
    close_to_fake_quant(a, proto, x)  # 19 layers: float32 rounding can move single codes (see the helper)


def test_align_widens_weight_steps_whose_bias_overflows_int32():
    """A dead output channel (weights ~1e-9, large bias) gets a tiny min-max step: b / (s_x s_w) overflows int32.
    The aligned model enlarges that channel's step like onnxruntime's quantizer; the channel still outputs b."""
    from bitalloc.runtime.align import align_for_ort

    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight[2].uniform_(-1e-9, 1e-9)
        conv.bias[2] = 0.75
    x = data((3, 8, 8))
    q = quantized(One(conv), x)
    p = q.layer.weight_quantizer.qparams()
    sx = float(q.layer.input_quantizer.qparams().scale)
    assert 0.75 / (sx * float(p.scale[2])) > 2**31  # would overflow
    a = align_for_ort(q, [x])
    assert a.bitalloc_ort_alignment.widened_weight_steps == {"layer": 1}
    pa = a.layer.weight_quantizer.qparams()
    assert 0.75 / (sx * float(pa.scale[2])) < 2**31 - 1
    assert torch.equal(pa.scale[[0, 1, 3]], p.scale[[0, 1, 3]])  # the other channels keep their steps
    with torch.no_grad():
        out = a(x)
    assert torch.allclose(out[:, 2], torch.full_like(out[:, 2], 0.75), atol=1e-6)
    proto, _ = export_onnx(a, x[:2])
    assert _conv_biases_on_int32_grid(proto) == 1
    close_to_fake_quant(a, proto, x, exact=True)


def test_align_model_with_requantized_bias_shifts():
    """ACIQ's bias-correction shift requantized *into* the aligned model: int8 layers, and the export computes
    what that model computes (single layer: to float32 rounding)."""
    from bitalloc.runtime.align import align_for_ort

    x = data((3, 7, 7), seed=4)
    cfg = bitalloc.preset("aciq", w_bits=8, a_bits=8, first_last_bits=None)
    torch.manual_seed(0)
    q = bitalloc.quantize(One(nn.Conv2d(3, 6, 3, padding=1)), cfg, [x])
    assert q.layer.weight_quantizer.qparams().corr_shift is not None
    with pytest.raises(ConfigError, match="bias_shift"):
        align_for_ort(q, [x], bias_shift="fold")
    a = align_for_ort(q, [x], bias_shift="requantize")
    rep = a.bitalloc_ort_alignment
    assert set(rep.requantized_shifts) == {"layer"} and rep.int32_biases == ["layer"]
    p = a.layer.weight_quantizer.qparams()
    assert (p.corr_shift is None or not p.corr_shift.any()) and p.per_channel
    proto, er = export_onnx(a, x[:2])
    assert er.layers[0].bias_shift == "none" and er.layers[0].int8
    close_to_fake_quant(a, proto, x, exact=True)
    # the represented shift differs from beta by at most half a (finer) weight step
    assert rep.requantized_shifts["layer"] <= float(q.layer.weight_quantizer.qparams().scale.max()) / 2 + 1e-9
    # on the residual net: every conv in int8
    xr = data((3, 16, 16))
    qr = quantized(Residual(), xr, "aciq", 8, 8)
    ar = align_for_ort(qr, [xr], bias_shift="requantize")
    pr, _ = export_onnx(ar, xr[:2], align="ort", calibration_data=[xr])
    counts = optimized_op_counts(pr.SerializeToString())
    assert counts.get("QLinearConv", 0) == 4 and "Conv" not in counts
    close_to_fake_quant(ar, pr, xr)


def test_interleaved_latency_turns_pauses_and_minimum_time(monkeypatch):
    """Turns of ``block`` timed runs after a pause and one untimed run, until every session has ``runs`` runs
    and ``min_seconds`` of them; a fake clock makes the counts exact (session a: 10 ms per run, b: 1 ms)."""
    from bitalloc.runtime import ort as ortmod

    clock = {"t": 0.0}
    calls = []

    class Fake:
        def __init__(self, name, dt):
            self.name, self.dt = name, dt

        def get_inputs(self):
            return [type("I", (), {"name": "x"})()]

        def run(self, outputs, feed):
            calls.append(self.name)
            clock["t"] += self.dt

    monkeypatch.setattr(ortmod.time, "perf_counter", lambda: clock["t"])
    monkeypatch.setattr(ortmod.time, "sleep", lambda s: calls.append(f"pause {s}"))
    lat = ortmod.interleaved_latency({"a": Fake("a", 0.010), "b": Fake("b", 0.001)}, np.zeros((1, 2), np.float32),
                                     runs=10, warmup=2, block=5, pause=0.1, min_seconds=0.02)
    # a: 10 runs (0.1 s >= 0.02 s); b: 10 runs are only 0.01 s, so one more turn of about turn_seconds
    # (0.05 s / 1 ms = 50 runs)
    assert lat["a"].runs == 10 and 59 <= lat["b"].runs <= 61
    assert lat["a"].median_ms == pytest.approx(10.0) and lat["b"].median_ms == pytest.approx(1.0)
    assert calls[:4] == ["a", "a", "b", "b"]  # warm-up
    assert calls[4:11] == ["pause 0.1", "a"] + ["a"] * 5  # a turn: pause, untimed run, 5 timed runs
    assert calls.count("pause 0.1") == 2 + 3  # a: 2 turns, b: 3 turns


class PoolSkip(nn.Module):
    """A strided skip of a quantized layer's input through a pooling module (``pool``) into a residual add."""

    def __init__(self, pool):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.pool = pool
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        return self.fc(F.relu(self.conv(x) + self.pool(x)).mean(dim=(2, 3)))


@pytest.mark.parametrize("pool, shares", [(nn.MaxPool2d(2), "conv"), (nn.AvgPool2d(2), None)])
def test_align_shares_the_source_grid_through_value_selecting_modules(pool, shares):
    from bitalloc.runtime.align import align_for_ort

    x = data((3, 8, 8))
    a = align_for_ort(quantized(PoolSkip(pool), x), [x])
    skip = [p for p in a.bitalloc_ort_alignment.points if p.site == "pool"]
    # max pooling keeps every value on conv's input grid (the point adds no rounding); averaging does not
    assert len(skip) == 1 and skip[0].shares == shares
    ref = F.relu(a.stem(x))
    if shares:  # the point is exact: the pooled values are already on the grid
        torch.testing.assert_close(a.pool(ref), pool(ref), rtol=0, atol=0)
