"""Codec run-time tooling (bitalloc.codec.timing): every backend builds and runs on a tiny codec at 64x64, its
networks agree with the bitstream's integer path within stated tolerances, onnxruntime really runs int8 kernels,
and the uint8-weight export does not saturate where the int8 one can (AVX2 without VNNI)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

pytest.importorskip("onnxruntime")
pytest.importorskip("constriction")

import bitalloc  # noqa: E402
from bitalloc.codec import timing as T  # noqa: E402
from bitalloc.codec.codec import VideoCoder  # noqa: E402
from bitalloc.codec.precision import decoder_networks  # noqa: E402
from bitalloc.errors import ConfigError  # noqa: E402
from bitalloc.model.layers import QuantLayer  # noqa: E402
from bitalloc.runtime.integer import integer_mode  # noqa: E402
from bitalloc.runtime.ort import make_session, optimized_op_counts  # noqa: E402

from tests.codec_util import TINY  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

QUALITY = 1
#: max |backend - bitalloc-int8| / max |bitalloc-int8| per network (measured on this tiny codec: fake quant 2e-5,
#: ort-int8-u8w 1.5e-4, ort-int8 3e-4, the "all" / torch int8 variants 4e-3, float 2e-3). Fake quantization differs
#: by float rounding (a code of the next layer flips where a value lies within float error of a rounding boundary);
#: backends with bitalloc's exact grids add onnxruntime's requantization rounding and, for u8 x s8 kernels on CPUs
#: without VNNI, int16 saturation; the "all" variants and PyTorch's int8 networks add 8-bit output points; float
#: backends differ by the 8-bit quantization error itself.
TOLERANCE = {"fakequant-int8": 1e-4, "ort-int8-u8w": 1e-3, "ort-int8": 5e-3, "ort-int8-all": 0.02,
             "torch-x86-int8": 0.02, "torch-qnnpack-int8": 0.02, "torch-fp32": 0.02, "ort-fp32": 0.02}


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    video = T.synthetic_video(3, 64, 64)
    model = T.quantize_codec(T.untrained_codec(TINY), 8, video)
    inputs = T.capture_inputs(model, video, QUALITY)
    failed = {}
    backends = T.build_backends(model, inputs, T.BACKENDS, frames=video, threads=1,
                                on_error=lambda n, e: failed.setdefault(n, e))
    return video, model, inputs, {b.name: b for b in backends}, failed


def test_every_backend_builds_and_inputs_have_the_decoder_shapes(setup):
    video, model, inputs, backends, failed = setup
    assert not failed, failed
    assert list(backends) == list(T.BACKENDS)
    # 64x64 frames: latents at 1/16 (4x4), hyper-latents at ceil(4/4) = 1
    assert tuple(inputs["intra.synthesis"][0].shape) == (1, TINY.m, 4, 4)
    assert tuple(inputs["motion.synthesis"][0].shape) == (1, TINY.motion_m, 4, 4)
    assert tuple(inputs["residual.hyper_synthesis"][0].shape) == (1, TINY.nz, 1, 1)
    assert tuple(inputs["motion.hyper_synthesis"][0].shape) == (1, TINY.motion_nz, 1, 1)
    assert set(inputs) == {n for n, _ in decoder_networks(model)}


def test_float_network_is_the_model_with_quantizers_disabled(setup):
    _, model, inputs, _, _ = setup
    for name, net in decoder_networks(model):
        with torch.no_grad(), bitalloc.float_mode(net):
            ref = net(*inputs[name])
        got = T.float_network(net)(*inputs[name])
        assert not any(isinstance(m, QuantLayer) for m in T.float_network(net).modules())
        assert torch.allclose(got, ref, rtol=0, atol=1e-6), name


def test_network_macs_match_the_cost_model(setup):
    _, model, inputs, _, _ = setup
    for name, net in decoder_networks(model):
        ref = bitalloc.cost_report(T.float_network(net), inputs[name]).macs
        assert T.network_macs(net, inputs[name]) == pytest.approx(ref, rel=1e-9), name


def test_backends_agree_with_the_integer_path(setup):
    _, model, inputs, backends, _ = setup
    rows = T.network_errors(list(backends.values()), inputs, model)
    assert {(r["item"], r["backend"]) for r in rows} == {(n, b) for n in inputs for b in backends}
    for r in rows:
        if r["backend"] == T.REFERENCE:
            assert r["max_abs_error"] == 0 and r["scale_index_mismatch"] in (0.0, None)
        tol = TOLERANCE.get(r["backend"])
        if tol is not None:
            assert r["max_abs_error"] <= tol * r["max_abs_reference"], r
    # the scale indices (the entropy model's input) of the exact-grid backends match the integer path's
    for name in ("fakequant-int8", "ort-int8-u8w"):
        mism = [r["scale_index_mismatch"] for r in rows if r["backend"] == name and r["scale_index_mismatch"] is not None]
        assert len(mism) == 3 and max(mism) <= 0.01, (name, mism)
    # narrower widths change the function (far more than requantization does)
    int4 = max(r["max_abs_error"] / r["max_abs_reference"] for r in rows if r["backend"] == "bitalloc-int4")
    u8w = max(r["max_abs_error"] / r["max_abs_reference"] for r in rows if r["backend"] == "ort-int8-u8w")
    assert int4 > u8w


def test_onnxruntime_runs_the_8bit_convolutions_in_int8(setup):
    _, _, _, backends, _ = setup
    for name in ("ort-int8", "ort-int8-u8w", "ort-int4-on-int8"):
        ops = backends[name].ops
        # synthesis: the three sub-pixel convolutions (between two 8-bit grids); hyper synthesis: the middle one
        for net, n in (("synthesis", 3), ("hyper_synthesis", 1)):
            for coder in ("intra", "motion", "residual"):
                assert ops[f"{coder}.{net}"].get("QLinearConv", 0) == n, (name, coder, net, ops[f"{coder}.{net}"])
    ops = backends["ort-int8-all"].ops
    for coder in ("intra", "motion", "residual"):
        assert ops[f"{coder}.synthesis"]["QLinearConv"] == 4 and ops[f"{coder}.hyper_synthesis"]["QLinearConv"] == 2
    assert not backends["ort-fp32"].ops["intra.synthesis"].get("QLinearConv")


def _int8_chain_case() -> tuple[nn.Module, Tensor, Tensor, float]:
    """Two 1x1 convolutions; the first one's u8 x s8 products come in pairs of 255 x 127 + 255 x 126 = 64515 (over
    int16 when a pair is added, as AVX2's vpmaddubsw does). Returns the quantized model, the input, its exact
    integer-path output and the largest change one code of the second layer's input can make."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(16, 4, 1), nn.Conv2d(4, 2, 1))
    with torch.no_grad():
        net[0].weight.fill_(1.0)
        net[0].weight[:, 1::2] = 0.99  # codes 127 and 126 on the per-channel symmetric grid
        net[0].bias.zero_()
    x = torch.ones(1, 16, 3, 3)  # the top of the input grid: code 255
    calib = [(torch.cat([x, torch.rand(3, 16, 3, 3)]), None)]
    q = bitalloc.quantize(net, bitalloc.preset("minmax", w_bits=8, a_bits=8, first_last_bits=None), calib)
    with torch.no_grad(), integer_mode(q, kernel="reference"):
        exact = q(x)
    pw = q[1].weight_quantizer.qparams()
    w = pw.dequantize(pw.quantize(q[1].layer.weight))
    one_code = float(q[1].input_quantizer.qparams().scale) * float(w.abs().sum(dim=(1, 2, 3)).max())
    return q, x, exact, one_code


def test_uint8_weights_are_exact_where_int8_weights_may_saturate():
    from bitalloc.runtime.onnx_export import export_onnx

    q, x, exact, one_code = _int8_chain_case()
    errors = {}
    for u8 in (False, True):
        proto, _ = export_onnx(q, x, None, dynamic_batch=False)
        if u8:
            assert T.uint8_weights(proto) == 2
            assert any(t.data_type == 2 for t in proto.graph.initializer)  # onnx.TensorProto.UINT8
        data = proto.SerializeToString()
        assert optimized_op_counts(data, threads=1).get("QLinearConv", 0) == 1
        errors[u8] = float((T.OrtNetwork(make_session(data, threads=1))(x) - exact).abs().max())
    assert errors[True] <= one_code + 1e-5  # uint8 weights: at most one requantization step
    cpu = T.cpu_flags()
    if cpu["avx2"] and not (cpu["avx512_vnni"] or cpu["avx_vnni"]):
        assert errors[False] > 10 * one_code  # int8 weights on AVX2 without VNNI: the int16 pair sums saturate


def test_pixel_shuffle_networks_export_with_qlinearconv_on_the_exact_grids():
    """Conv -> PixelShuffle -> ReLU -> Conv: the quantizer of the second convolution's input is copied across
    DepthToSpace, so the first convolution runs as QLinearConv with no new rounding point."""
    from bitalloc.runtime.onnx_export import export_onnx

    torch.manual_seed(1)
    net = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.PixelShuffle(2), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))
    calib = [(torch.randn(4, 8, 6, 6), None)]
    q = bitalloc.quantize(net, bitalloc.preset("minmax", w_bits=8, a_bits=8, first_last_bits=None), calib)
    x = torch.randn(1, 8, 6, 6)
    proto, _ = export_onnx(q, x, None, dynamic_batch=False)
    T.uint8_weights(proto)
    data = proto.SerializeToString()
    assert optimized_op_counts(data, threads=1).get("QLinearConv", 0) == 1
    got = T.OrtNetwork(make_session(data, threads=1))(x)
    with torch.no_grad(), integer_mode(q, kernel="reference"):
        ref = q(x)
    # one requantization step of the second layer's input (onnxruntime rounds its float rescale) at most
    step = float(q[3].input_quantizer.qparams().scale)
    w = q[3].weight_quantizer.qparams().dequantize(q[3].weight_quantizer.qparams().quantize(q[3].layer.weight))
    assert float((got - ref).abs().max()) <= step * float(w.abs().sum(dim=(1, 2, 3)).max()) + 1e-5


def test_torch_int8_networks_use_quantized_kernels(setup):
    _, model, inputs, backends, _ = setup
    for engine in ("x86", "qnnpack"):
        notes = backends[f"torch-{engine}-int8"].notes
        # synthesis: all but the 16-bit layers (4 of 6); hyper synthesis: all but the 16-bit first layer (2 of 3)
        assert sum("4 of 6" in n for n in notes) == 3 and sum("2 of 3" in n for n in notes) == 3, notes
    net = backends["torch-qnnpack-int8"].networks["intra.hyper_synthesis"]
    kinds = {type(m).__name__ for m in net.modules()}
    assert "ConvReLU2d" in kinds and "Conv2d" in kinds


def test_native_kernels_have_no_sub_8bit_convolution():
    nk = T.native_kernels()
    assert nk["sub8bit_conv_kernels"] == []
    assert "uint8" in nk["ort_kernel_types"]["QLinearConv"] and "int4" not in nk["ort_kernel_types"]["QLinearConv"]
    assert "int4" in nk["ort_kernel_types"]["DequantizeLinear"]
    assert isinstance(nk["cpu"]["avx2"], bool)


def test_timing_rows_and_frames(setup):
    video, model, inputs, backends, _ = setup
    chosen = [backends[n] for n in ("torch-fp32", "bitalloc-int8", "ort-int8-u8w", "torch-x86-int8")]
    rows = T.time_networks(chosen, inputs, runs=1, warmup=0, min_seconds=0, pause=0)
    assert len(rows) == len(inputs) * len(chosen)
    assert all(r["median_ms"] > 0 and r["runs"] >= 1 for r in rows)
    frows, quality = T.time_frames(chosen, model, video, QUALITY, runs=1, warmup=0, min_seconds=0, pause=0)
    items = {r["item"] for r in frows}
    assert items == set(T.FRAME_ITEMS)
    T.add_ratios(frows)
    assert all(r["x_torch-fp32"] == 1.0 for r in frows if r["backend"] == "torch-fp32" and r["median_ms"] > 0)
    by = {q["backend"]: q for q in quality}
    assert all(q["decode_exact"] for q in quality)
    # the bitalloc-int8 backend is the shipped path: the same stream as VideoCoder on the model itself (one
    # analysis pass, as the timing runs it)
    ref = VideoCoder(model, analysis_scales=(1.0,)).compress(video[:2], quality=QUALITY, intra_period=-1)
    assert by["bitalloc-int8"]["stream_bytes"] == len(ref.stream)
    assert by["bitalloc-int8"]["psnr_yuv"] == pytest.approx([f.psnr for f in ref.frames])
    assert all(math.isfinite(p) for q in quality for p in q["psnr_yuv"])


def test_bad_requests_are_one_line_errors(setup):
    video, model, inputs, _, _ = setup
    with pytest.raises(ConfigError, match="unknown backend"):
        T.build_backends(model, inputs, ["ort-int3"])
    with pytest.raises(ConfigError, match="needs the quantized codec"):
        T.codec_timing(T.untrained_codec(TINY), [video])
    with pytest.raises(ConfigError, match="quality 9 is out of range"):
        T.codec_timing(model, [video], quality=9)
    with pytest.raises(ConfigError, match="needs at least 2 frames"):
        T.capture_inputs(model, video[:1], QUALITY)
    with pytest.raises(ConfigError, match="align"):
        T.ort_int8_network(decoder_networks(model).__next__()[1], inputs["intra.synthesis"], threads=1, align="ort")


def test_codec_timing_end_to_end(setup):
    video, model, _, _, _ = setup
    res = T.codec_timing(model, [video], quality=QUALITY, backends=("torch-fp32", "bitalloc-int8"),
                         runs=1, frame_runs=1, min_seconds=0, pause=0)
    s = res["sizes"][0]
    assert s["size"] == "64x64" and s["padded"] == [64, 64]
    assert {r["backend"] for r in s["rows"]} == {"torch-fp32", "bitalloc-int8"}
    assert {r["item"] for r in s["rows"]} == set(T.FRAME_ITEMS) | {n["name"] for n in s["networks"]}
    assert all(n["macs"] > 0 for n in s["networks"])
    assert res["threads"] == 1 and res["native_kernels"]["sub8bit_conv_kernels"] == []
    assert np.isfinite([r["median_ms"] for r in s["rows"]]).all()


@pytest.mark.parametrize("flag", ["residual_context", "prior_context"])
def test_a_conditional_network_runs_on_every_backend(flag):
    """A conditional synthesis (``residual_context``) or hyper synthesis (``prior_context``) of the residual coder."""
    import dataclasses

    video = T.synthetic_video(3, 64, 64)
    model = T.quantize_codec(T.untrained_codec(dataclasses.replace(TINY, **{flag: True})), 8, video)
    inputs = T.capture_inputs(model, video, QUALITY)
    # the network reads its input and the prediction (packed YUV at half the luma resolution)
    net = "residual.synthesis" if flag == "residual_context" else "residual.hyper_synthesis"
    plain = net.replace("residual.", "intra.")
    first = (1, TINY.m, 4, 4) if flag == "residual_context" else (1, TINY.nz, 1, 1)
    assert [tuple(t.shape) for t in inputs[net]] == [first, (1, 6, 32, 32)]
    failed: dict = {}
    names = ("torch-fp32", "bitalloc-int8", "fakequant-int8", "ort-fp32", "ort-int8-u8w", "ort-int8-all",
             "torch-x86-int8", "torch-qnnpack-int8")
    backends = T.build_backends(model, inputs, names, frames=video, threads=1,
                                on_error=lambda n, e: failed.setdefault(n, e))
    assert not failed, failed
    # on PyTorch's quantized kernels: as many int8 convolutions as the plain network of the same shape, plus the
    # context branch's two
    nets = dict(decoder_networks(model))
    torch_net = next(b for b in backends if b.name == "torch-x86-int8").networks[net]
    assert isinstance(torch_net, T.ConditionalInt8Network)
    n_int8 = {k: T.torch_int8_network(nets[k], inputs[k], "x86")[1] for k in (net, plain)}
    assert n_int8[net] == n_int8[plain] + 2 >= 3, n_int8
    for r in T.network_errors(backends, inputs, model):
        tol = TOLERANCE.get(r["backend"])
        if tol is not None:
            assert r["max_abs_error"] <= tol * r["max_abs_reference"], r
    # the context branch's MACs: of a synthesis, two 3x3 convolutions at 32x32, 6 -> n/2 and n/2 -> n/2 channels; of
    # a hyper synthesis, a 1x1 convolution of the 384 unshuffled values to n channels and a 3x3 n -> n, at 4x4
    half, n = TINY.n // 2, TINY.n
    extra = T.network_macs(nets[net], inputs[net]) - T.network_macs(nets[plain], inputs[plain])
    if flag == "residual_context":
        assert extra == 32 * 32 * (6 * half * 9 + half * half * 9)
    else:
        assert extra == 4 * 4 * (384 * n + n * n * 9)
    chosen = [b for b in backends if b.name in ("bitalloc-int8", "ort-int8-u8w")]
    _, quality = T.time_frames(chosen, model, video, QUALITY, runs=1, warmup=0, min_seconds=0, pause=0)
    assert all(q["decode_exact"] for q in quality)
