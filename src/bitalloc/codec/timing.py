"""Real run times of the codec's decoder networks and of whole-frame encoding / decoding, per execution backend.

The codec's decoder networks (synthesis and hyper synthesis of the intra, motion and residual coders,
:func:`bitalloc.codec.precision.decoder_networks`) are run by several *backends*, each a set of callables with the
networks' signature (a float tensor in, a float tensor out):

===================  ================================================================================================
``torch-fp32``       the FP32 codec: the float networks in PyTorch (the training-time networks; for a quantized
                     codec, its QuantLayers replaced by the layers they wrap)
``bitalloc-int8``    the static 8-bit codec as the bitstream runs it: frozen 8-bit networks in
                     :func:`bitalloc.runtime.integer.integer_mode` with ``kernel="float"`` (integer codes through
                     float32 kernels: exact integer sums, not faster than float)
``fakequant-int8``   the same 8-bit networks in fake quantization (float32, the emulation used in training)
``ort-fp32``         the float networks exported to ONNX (:func:`bitalloc.runtime.onnx_export.export_float`) in
                     onnxruntime
``ort-int8``         the 8-bit networks exported to ONNX QDQ (:func:`bitalloc.runtime.onnx_export.export_onnx`,
                     ``align="none"``: exactly bitalloc's quantization points) in onnxruntime, whose QDQ fusion runs
                     every convolution between two 8-bit grids as QLinearConv (int8 kernels, requantized to the next
                     layer's grid); the 16-bit layers (:data:`bitalloc.codec.precision.WIDE_LAYERS`) and the last
                     convolution of each network (its output is not quantized) run as float convolutions
``ort-int8-u8w``     ``ort-int8`` with the int8 weight codes stored as uint8 (codes + 128, zero point 128: the same
                     real values): onnxruntime's u8 x u8 kernels do not saturate on CPUs without VNNI (see below)
``ort-int8-all``     every 8-bit convolution in int8: ``bitalloc export onnx``'s default alignment
                     (:func:`bitalloc.runtime.align.align_for_ort`: uint8 points on the outputs feeding additions),
                     uint8 weights, and an export-only uint8 min-max point on each network output computed by a
                     convolution (the hyper synthesis' last layer); these points add roundings the bitalloc model
                     does not have (their error is reported)
``torch-x86-int8``   PyTorch's quantized CPU kernels (``quantized::conv2d``, engine ``x86``: fbgemm / oneDNN), built
                     from the frozen 8-bit networks' integer codes (:func:`torch_int8_network`), outputs of the last
                     convolutions on uint8 min-max grids like ``ort-int8-all``
``torch-qnnpack-int8`` the same modules on PyTorch's QNNPACK engine (exact 32-bit accumulation, slower on x86)
``bitalloc-int4`` /  the decoder networks re-quantized at 4 / 2 bits (``decoder_quant_configs(bits, "fixed")``,
``bitalloc-int2``    calibrated on the timed frames) in ``integer_mode``: no 4- or 2-bit convolution kernel exists
                     on this CPU, so they run like the 8-bit codes, emulated in float32
``ort-int4-on-int8`` the 4-bit networks exported like ``ort-int8-u8w``: 4-bit codes on the int8 kernels (an integer
                     Clip keeps activations on the 4-bit grid); the narrow width buys no speed
===================  ================================================================================================

**Native kernels.** :func:`native_kernels` reads what the installed onnxruntime and PyTorch register: QLinearConv
and ConvInteger take 8-bit tensors only; MatMulNBits (2/4/8-bit *weights*, float or int8 activations) exists for
MatMul only; DequantizeLinear reads int4 / int2 but onnxruntime then runs a float convolution. So 8 bits is the
narrowest width with native convolution kernels here; 2 and 4 bits are emulated (in float, or as codes on 8-bit
kernels) at the cost of the 8-bit or float path.

**Saturation without VNNI.** On AVX2 CPUs without VNNI, the u8 x s8 int8 GEMM kernels of onnxruntime (MLAS) and of
PyTorch's fbgemm multiply with ``vpmaddubsw``, which adds pairs of u8 x s8 products in a *saturating* int16:
two products 255 x 127 overflow it. bitalloc's 8-bit activations use all 256 codes and its weights +-127, so
outputs can differ from the exact integer sums; :func:`network_errors` measures it against ``bitalloc-int8`` (the
usual remedy, ``reduce_range``, 7-bit weights or activations, changes the network; storing the weights as uint8
does not, and onnxruntime's u8 x u8 kernels do not saturate).

**Timing protocol** (:func:`time_networks`, :func:`time_frames`): every backend of one item (a network, or the
encoding / decoding of an I or a P frame) is timed in turns with :func:`bitalloc.runtime.ort.interleaved_latency`
(each turn: a 0.1 s pause so that onnxruntime's spinning worker threads go idle, one untimed run, then timed runs;
at least ``runs`` runs and ``min_seconds`` of them per backend), so that background load hits all backends alike;
compare backends through ratios of one run. Whole frames are the codec's own per-frame work
(:class:`~bitalloc.codec.codec.VideoCoder`'s frame methods with the backend's networks swapped in): decoding =
entropy decoding, the decoder networks, motion compensation and reconstruction; encoding adds the analysis
transforms (float PyTorch in every backend: the sender's networks are not quantized) and the DIS motion estimate.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from bitalloc.codec.frames import YUVFrames
from bitalloc.codec.model import CodecConfig, VideoCodec
from bitalloc.codec.networks import pad_to
from bitalloc.codec.precision import coders, decoder_networks, decoder_quant_configs, freeze_decoders, quantize_decoders
from bitalloc.errors import ConfigError
from bitalloc.model.layers import QuantLayer, quant_layers

#: every backend :func:`build_backends` knows, in table order
BACKENDS = ("torch-fp32", "bitalloc-int8", "fakequant-int8", "ort-fp32", "ort-int8", "ort-int8-u8w", "ort-int8-all",
            "torch-x86-int8", "torch-qnnpack-int8", "bitalloc-int4", "bitalloc-int2", "ort-int4-on-int8")
#: the reference of the error columns and the denominator of the speed ratios
REFERENCE = "bitalloc-int8"
BASELINE = "torch-fp32"
FRAME_ITEMS = ("decode I", "decode P", "decode I+P", "encode I", "encode P", "encode I+P")


# ---- codecs to time ------------------------------------------------------------------------------------------------

def float_network(net: nn.Module) -> nn.Module:
    """A float copy of a (prepared) network: every QuantLayer replaced by the layer it wraps (its bias gated as its
    forward gates it). An unprepared network is copied as it is."""
    from bitalloc.model.fold_bn import set_submodule

    m = copy.deepcopy(net)
    for name, ql in quant_layers(m):
        inner = ql.layer
        if inner.bias is not None:
            with torch.no_grad():
                ql.quantized_weight()
                b = ql.gated_bias()
                if b is not None and b is not inner.bias:
                    inner.bias.copy_(b)
        set_submodule(m, name, inner)
    for attr in ("bitalloc_info", "bitalloc_calibration"):
        m.__dict__.pop(attr, None)
    return m.eval()


def float_codec(model: VideoCodec) -> VideoCodec:
    """A copy of ``model`` whose decoder networks are float (:func:`float_network`): the FP32 codec."""
    m = copy.deepcopy(model)
    for cname, coder in coders(m).items():
        for part in ("synthesis", "hyper_synthesis"):
            setattr(coder, part, float_network(getattr(coder, part)))
    return m.eval()


def untrained_codec(cfg: CodecConfig | None = None, *, seed: int = 0) -> VideoCodec:
    """An untrained float codec (default sizes) for development timing: the hyper gains raised so that the
    hyper-latents vary (as ``tests/codec_util.tiny_codec`` does), and the zero-initialised last layers of the
    transforms' nonlinear branches given small random weights, so that every layer computes something (errors of a
    backend would otherwise hide behind zero weights)."""
    torch.manual_seed(seed)
    model = VideoCodec(cfg or CodecConfig()).eval()
    with torch.no_grad():
        for coder in coders(model).values():
            coder.log_hyper_gain[0].fill_(math.log(30.0))
            branches = (coder.analysis.nonlinear, coder.synthesis.nonlinear, coder.synthesis.context,
                        getattr(coder.hyper_synthesis, "context", None))
            for branch in (b for b in branches if b is not None):
                last = branch[-1]
                nn.init.normal_(last.weight, std=0.05 / math.sqrt(last.weight[0].numel()))
                nn.init.normal_(last.bias, std=0.01)
    return model


def clip_tensor(frames: YUVFrames, count: int | None = None, crop: int | None = None) -> Tensor:
    """The first ``count`` frames as the codec's training input [1, T, 6, h, w] in [0, 1] (padded to 16 luma
    pixels), optionally the top-left ``crop`` x ``crop`` luma pixels (a multiple of 16)."""
    from bitalloc.codec.codec import frame_tensor, padded_size

    size = padded_size(frames.height, frames.width)
    n = len(frames) if count is None else min(count, len(frames))
    x = torch.stack([frame_tensor(frames, i, size)[0].float() / 255.0 for i in range(n)])[None]
    if crop is not None:
        x = x[..., : crop // 2, : crop // 2]
    return x


@torch.no_grad()
def quantize_codec(model: VideoCodec, bits: int, frames: YUVFrames, *, crop: int = 128) -> VideoCodec:
    """A copy of ``model`` (float, or quantized: its float networks are used) with decoder networks at ``bits``
    bits (fixed quantizers, :func:`~bitalloc.codec.precision.decoder_quant_configs`), calibrated by coding the first
    frames of ``frames`` (a top-left ``crop`` x ``crop`` luma window) at every quality level, frozen, with its coding
    tables stored (what :func:`~bitalloc.codec.precision.save_codec` stores)."""
    import bitalloc

    m = float_codec(model)
    quantize_decoders(m, decoder_quant_configs(bits, "fixed"))
    clip = clip_tensor(frames, 2, crop)
    if clip.shape[1] < 2:
        raise ConfigError("calibrating the codec's networks needs at least 2 frames (an I and a P frame)")
    with bitalloc.calibration(m):
        for level in range(m.cfg.levels):
            m(clip, torch.tensor([level]))
    freeze_decoders(m)
    for coder in coders(m).values():
        coder.update()
    return m.eval()


def synthetic_video(frames: int, height: int, width: int, *, seed: int = 0) -> YUVFrames:
    """A deterministic test clip: a sum of oriented gratings drifting by (1, 3) pixels per frame over smooth chroma
    ramps, with mild noise (any size)."""
    rng = np.random.default_rng(seed)
    t = np.arange(frames, dtype=np.float64)[:, None, None]
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    xs, ys = xx[None] - 3 * t, yy[None] - t
    luma = 120 + 50 * np.sin(xs / 6.5 + ys / 9.0) + 30 * np.cos(xs / 17.0 - ys / 4.5) * np.sin(ys / 23.0)
    y = np.clip(luma + rng.normal(0, 3, luma.shape), 0, 255).astype(np.uint8)
    ch, cw = (height + 1) // 2, (width + 1) // 2
    cy, cx = np.mgrid[0:ch, 0:cw].astype(np.float64)
    u = np.broadcast_to(110 + 40 * cx / max(cw, 1) + 2 * t, (frames, ch, cw))
    v = np.broadcast_to(140 - 30 * cy / max(ch, 1) - t, (frames, ch, cw))
    return YUVFrames(y, np.clip(u, 0, 255).astype(np.uint8), np.clip(v, 0, 255).astype(np.uint8))


def network_macs(net: nn.Module, x: tuple[Tensor, ...]) -> int:
    """Multiply-accumulates of the convolutions of ``net`` on inputs ``x``: C_out H_out W_out C_in k_h k_w / groups
    each (counted from the output shapes of a forward pass of its float copy)."""
    total = 0

    def hook(mod: nn.Conv2d, args: Any, out: Tensor) -> None:
        nonlocal total
        total += out.numel() * mod.in_channels * math.prod(mod.kernel_size) // mod.groups

    m = float_network(net)
    handles = [mod.register_forward_hook(hook) for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    with torch.no_grad():
        m(*x)
    for h in handles:
        h.remove()
    return total


# ---- backends ----------------------------------------------------------------------------------------------------

@dataclass
class Backend:
    """One way of running the decoder networks: ``networks`` by name (callables on float tensors, nn.Modules),
    ``enter()`` the context they must run in (e.g. integer mode on their model), and what was found building it."""

    name: str
    label: str
    kernels: str  # "float32", "int8", "8-bit codes in float32 kernels", ...
    bits: int  # width of most layers (32: float)
    networks: dict[str, nn.Module]
    enter: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    ops: dict[str, dict[str, int]] = field(default_factory=dict)  # onnxruntime's optimized op counts per network
    notes: list[str] = field(default_factory=list)
    #: the networks are frozen bitalloc networks that the codec runs in its integer mode
    integer: bool = False

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "label": self.label, "kernels": self.kernels, "bits": self.bits,
                "ops": self.ops, "notes": self.notes}


def torch_float_backend(fmodel: VideoCodec) -> Backend:
    return Backend("torch-fp32", "FP32 codec, float PyTorch", "float32", 32, dict(decoder_networks(fmodel)))


def integer_backend(qmodel: VideoCodec, name: str, bits: int) -> Backend:
    """The quantized networks in ``integer_mode(kernel="float", strict=True)`` (the bitstream's path)."""
    from bitalloc.runtime.integer import integer_mode

    cache: dict = {}
    return Backend(name, f"{bits}-bit networks, bitalloc integer_mode(kernel='float') (the bitstream's path)",
                   f"{bits}-bit codes in float32 kernels (exact integer sums)", bits, dict(decoder_networks(qmodel)),
                   lambda: integer_mode(qmodel, kernel="float", strict=True, cache=cache), integer=True)


def fake_quant_backend(qmodel: VideoCodec, name: str, bits: int) -> Backend:
    return Backend(name, f"{bits}-bit networks in fake quantization (PyTorch float32)", "float32 (emulated)", bits,
                   dict(decoder_networks(copy.deepcopy(qmodel))))


class OrtNetwork(nn.Module):
    """An onnxruntime session with a network's signature (float tensors in, a float tensor out)."""

    def __init__(self, session: Any):
        super().__init__()
        self.session = session
        self.input_names = [i.name for i in session.get_inputs()]

    def forward(self, *xs: Tensor) -> Tensor:
        feed = {n: np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32) for n, x in zip(self.input_names, xs)}
        return torch.from_numpy(self.session.run(None, feed)[0])


class _Wrapped(nn.Module):
    """A network under a plain parent: :func:`~bitalloc.runtime.align.align_for_ort` adds its quantization points as
    a child module, which an ``nn.Sequential`` (the hyper synthesis) would call as one of its stages."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, *xs: Tensor) -> Tensor:
        return self.net(*xs)


def _onnx() -> Any:
    from bitalloc.runtime.onnx_export import _require_onnx

    return _require_onnx()


def uint8_weights(proto: Any) -> int:
    """Store every int8 weight initializer read by a DequantizeLinear as uint8 (codes + 128, zero point + 128):
    the same real values, executed by onnxruntime's u8 x u8 kernels. Returns how many were converted."""
    onnx = _onnx()
    from onnx import numpy_helper

    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    converted = 0
    for node in g.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        w = inits[node.input[0]]
        if w.data_type != onnx.TensorProto.INT8 or len(node.input) < 3 or node.input[2] not in inits:
            continue
        codes = numpy_helper.to_array(w).astype(np.int16) + 128
        zp = numpy_helper.to_array(inits[node.input[2]]).astype(np.int16) + 128
        wname, zname = node.input[0] + "_u8", node.input[2] + "_u8_" + str(converted)
        g.initializer.append(numpy_helper.from_array(codes.astype(np.uint8), wname))
        g.initializer.append(numpy_helper.from_array(zp.astype(np.uint8), zname))
        node.input[0], node.input[2] = wname, zname
        converted += 1
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return converted


def add_output_points(proto: Any, outputs: Sequence[np.ndarray]) -> list[str]:
    """Insert uint8 QuantizeLinear -> DequantizeLinear before every graph output produced by a Conv, on the min-max
    grid of ``outputs`` (arrays of that output on calibration inputs, in graph-output order; zero inside the range,
    onnxruntime's convention): onnxruntime then fuses that Conv into QLinearConv. An export-only rounding point.
    Returns the names of the outputs given a point."""
    onnx = _onnx()
    from onnx import helper, numpy_helper

    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    done = []
    for k, out in enumerate(g.output):
        node = producer.get(out.name)
        if node is None or node.op_type != "Conv":
            continue
        lo, hi = min(float(outputs[k].min()), 0.0), max(float(outputs[k].max()), 0.0)
        scale = (hi - lo) / 255.0 if hi > lo else 1.0
        zp = int(np.clip(round(-lo / scale), 0, 255))
        raw, qname = out.name + "_float", out.name + "_q"
        node.output[list(node.output).index(out.name)] = raw
        s_name, z_name = out.name + "_out_scale", out.name + "_out_zp"
        g.initializer.append(numpy_helper.from_array(np.array(scale, dtype=np.float32), s_name))
        g.initializer.append(numpy_helper.from_array(np.array(zp, dtype=np.uint8), z_name))
        g.node.append(helper.make_node("QuantizeLinear", [raw, s_name, z_name], [qname], name=out.name + "_out_q"))
        g.node.append(helper.make_node("DequantizeLinear", [qname, s_name, z_name], [out.name], name=out.name + "_out_dq"))
        done.append(out.name)
    if done:
        from bitalloc.runtime.onnx_export import _topo_sort

        _topo_sort(g)
        onnx.checker.check_model(proto)
    return done


def ort_session(data: bytes, threads: int) -> tuple[OrtNetwork, dict[str, int]]:
    """An onnxruntime session of the ONNX bytes ``data`` as a network, and the operator counts of the graph it runs
    after its optimizations (QLinearConv = an int8 convolution)."""
    import collections
    import tempfile
    from pathlib import Path

    from bitalloc.runtime.ort import make_session

    onnx = _onnx()
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "optimized.onnx"
        session = make_session(data, threads=threads, optimized_path=out)
        counts = collections.Counter(n.op_type for n in onnx.load(str(out)).graph.node)
    return OrtNetwork(session), dict(counts.most_common())


def ort_float_backend(fmodel: VideoCodec, inputs: dict[str, tuple[Tensor, ...]], *, threads: int) -> Backend:
    """The float networks exported to ONNX and run by onnxruntime (all graph optimizations)."""
    from bitalloc.runtime.onnx_export import export_float

    nets, ops = {}, {}
    for name, net in decoder_networks(fmodel):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warnings
            data = export_float(net, inputs[name], dynamic_batch=False).SerializeToString()
        nets[name], ops[name] = ort_session(data, threads)
    return Backend("ort-fp32", "FP32 codec exported to ONNX, onnxruntime", "float32", 32, nets, ops=ops)


def ort_int8_network(qnet: nn.Module, x: tuple[Tensor, ...], *, threads: int, align: str = "none", u8_weights: bool = False,
                     output_points: bool = False) -> tuple[OrtNetwork, dict[str, int], list[str], bytes]:
    """One quantized network exported to ONNX QDQ (:func:`~bitalloc.runtime.onnx_export.export_onnx`) in an
    onnxruntime session. ``align``: "none" (exactly bitalloc's quantization points) or "model"
    (:func:`~bitalloc.runtime.align.align_for_ort` first, as ``bitalloc export onnx`` does by default: extra uint8
    points let onnxruntime run convolutions feeding additions in int8); ``u8_weights``: :func:`uint8_weights`;
    ``output_points``: :func:`add_output_points`. ``x``: the example inputs and the calibration sample of the new
    points' ranges. Returns the network, onnxruntime's optimized op counts, notes, and the ONNX bytes."""
    from bitalloc.runtime.align import align_for_ort
    from bitalloc.runtime.onnx_export import export_onnx

    if align not in ("none", "model"):
        raise ConfigError(f"align={align!r}: use 'none' or 'model'")
    net = align_for_ort(_Wrapped(qnet), [(x,)]) if align == "model" else qnet
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warnings
        proto, report = export_onnx(net, x, None, dynamic_batch=False)
    notes = []
    if align == "model":
        notes.append(f"align model: {len(net.bitalloc_ort_alignment.points)} uint8 quantization points added")
    notes += [f"{l.name}: not on int8 types (weights {l.weight}, activations {l.act})" for l in report.layers
              if not l.int8]
    if u8_weights:
        notes.append(f"{uint8_weights(proto)} weight tensors stored as uint8 (zero point 128)")
    if output_points:
        with torch.no_grad():
            ref = net(*x)
        if add_output_points(proto, [ref.numpy()]):
            notes.append("export-only uint8 min-max point on the network output")
    data = proto.SerializeToString()
    return (*ort_session(data, threads), notes, data)


def ort_int8_backend(qmodel: VideoCodec, inputs: dict[str, tuple[Tensor, ...]], name: str, *, threads: int, bits: int = 8,
                     align: str = "none", u8_weights: bool = False, output_points: bool = False) -> Backend:
    nets, ops, notes = {}, {}, []
    for net_name, net in decoder_networks(qmodel):
        nets[net_name], ops[net_name], n, _ = ort_int8_network(net, inputs[net_name], threads=threads, align=align,
                                                               u8_weights=u8_weights, output_points=output_points)
        notes += [f"{net_name}: {s}" for s in n]
    how = ("bitalloc's quantization points only" if align == "none" else "align model") + \
        (", u8 weights" if u8_weights else ", s8 weights") + (", 8-bit network outputs" if output_points else "")
    kernels = "int8 kernels (QLinearConv)" if bits == 8 else f"{bits}-bit codes on int8 kernels (QLinearConv + Clip)"
    return Backend(name, f"{bits}-bit networks, ONNX QDQ ({how}), onnxruntime", kernels, bits, nets, ops=ops,
                   notes=notes)


# ---- PyTorch's quantized kernels ------------------------------------------------------------------------------------

def _leaves(m: nn.Module) -> list[nn.Module]:
    if isinstance(m, QuantLayer) or not list(m.children()):
        return [m]
    return [leaf for c in m.children() for leaf in _leaves(c)]


def _int8_grid(p: Any) -> bool:
    """A per-tensor activation grid that quint8 represents exactly (256 codes, real zero on the grid)."""
    return (not p.per_channel) and int(p.qmax) - int(p.qmin) == 255


def _int8_layer(ql: QuantLayer) -> bool:
    if not isinstance(ql.layer, nn.Conv2d) or type(ql.layer).forward is not nn.Conv2d.forward:
        return False
    pw, pa = ql.weight_quantizer.qparams(), ql.input_quantizer.qparams()
    return _int8_grid(pa) and int(pw.bits.max()) <= 8 and pw.signed and bool((pw.zero_point == 0).all())


class _Quantize(nn.Module):
    def __init__(self, scale: float, zero_point: int):
        super().__init__()
        self.scale, self.zero_point = scale, zero_point

    def forward(self, x: Tensor) -> Tensor:
        return torch.quantize_per_tensor(x, self.scale, self.zero_point, torch.quint8)


class _Dequantize(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.dequantize()


class TorchInt8Chain(nn.Module):
    """A sequence of stages, some on quantized tensors, run with PyTorch's quantized engine ``engine``."""

    def __init__(self, stages: list[nn.Module], engine: str):
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.engine = engine

    def forward(self, x: Tensor) -> Tensor:
        torch.backends.quantized.engine = self.engine
        for s in self.stages:
            x = s(x)
        return x


def _qconv(ql: QuantLayer, relu: bool, scale: float, zero_point: int) -> nn.Module:
    """``quantized::conv2d`` (``ConvReLU2d`` with ``relu``) with the layer's integer weight codes and per-channel
    steps s_w xi, its bias, and output grid (scale, zero_point)."""
    import torch.ao.nn.intrinsic.quantized as nniq
    import torch.ao.nn.quantized as nnq

    from bitalloc.runtime.integer import layer_ints

    ints = layer_ints(ql)
    conv = ql.layer
    cls = nniq.ConvReLU2d if relu else nnq.Conv2d
    q = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)
    s = ints.w_scale.to(torch.float64)
    w = torch._make_per_channel_quantized_tensor(ints.w.to(torch.int8), s, torch.zeros(len(s), dtype=torch.int64), 0)
    q.set_weight_bias(w, None if ints.bias is None else ints.bias.float())
    q.scale, q.zero_point = float(scale), int(zero_point)
    return q


def torch_int8_chain(seq: nn.Module, x: Tensor, engine: str, *, output_points: bool = True) -> tuple[TorchInt8Chain, int]:
    """A sequential network (Conv2d QuantLayers, ReLU, PixelShuffle) with every 8-bit convolution as
    ``quantized::conv2d`` whose output lands on the next layer's input grid (ReLU fused, PixelShuffle on quantized
    tensors). Wider layers (16-bit) run their fake-quant forward in float. The last convolution: on a uint8 min-max
    grid of its output on ``x`` (``output_points``), else in float on its dequantized input. Returns the chain and
    the number of int8 convolutions."""
    leaves = _leaves(seq)
    qidx = [i for i, m in enumerate(leaves) if isinstance(m, QuantLayer)]
    with torch.no_grad():
        final = seq(x)
    stages: list[nn.Module] = []
    quantized = False
    n_int8 = 0
    i = 0
    while i < len(leaves):
        m = leaves[i]
        if isinstance(m, QuantLayer) and _int8_layer(m):
            pa = m.input_quantizer.qparams()
            nxt = [j for j in qidx if j > i]
            if nxt and _int8_layer(leaves[nxt[0]]):
                between = leaves[i + 1: nxt[0]]
                if not all(isinstance(b, (nn.ReLU, nn.PixelShuffle)) for b in between):
                    raise ConfigError(f"torch int8: unsupported operator between layers {m.layer_name!r} and "
                                      f"{leaves[nxt[0]].layer_name!r}")
                pn = leaves[nxt[0]].input_quantizer.qparams()
                out = (float(pn.scale), int(pn.zero_point) - int(pn.qmin))
                tail, i_next = [b for b in between if not isinstance(b, nn.ReLU)], nxt[0]
                relu = any(isinstance(b, nn.ReLU) for b in between)
            elif (not nxt and output_points
                  and all(isinstance(b, (nn.ReLU, nn.PixelShuffle)) for b in leaves[i + 1:])):
                # the last convolution (only ReLU / PixelShuffle after it): on a uint8 min-max grid of the output
                lo, hi = min(float(final.min()), 0.0), max(float(final.max()), 0.0)
                sc = (hi - lo) / 255.0 if hi > lo else 1.0
                rest = leaves[i + 1:]
                out, i_next = (sc, int(np.clip(round(-lo / sc), 0, 255))), len(leaves)
                tail = [b for b in rest if not isinstance(b, nn.ReLU)] + [_Dequantize()]
                relu = any(isinstance(b, nn.ReLU) for b in rest)
            else:
                out = None
            if out is not None:
                if not quantized:
                    stages.append(_Quantize(float(pa.scale), int(pa.zero_point) - int(pa.qmin)))
                    quantized = True
                stages.append(_qconv(m, relu, *out))
                stages += tail
                n_int8 += 1
                quantized = not isinstance(tail[-1] if tail else None, _Dequantize)
                i = i_next
                continue
        if quantized and not isinstance(m, nn.PixelShuffle):
            stages.append(_Dequantize())
            quantized = False
        stages.append(m)
        i += 1
    if quantized:
        stages.append(_Dequantize())
    return TorchInt8Chain(stages, engine), n_int8


class ConditionalInt8Network(nn.Module):
    """A conditional decoder network (:class:`bitalloc.codec.networks.Synthesis` or
    :class:`~bitalloc.codec.networks.ConditionalHyperSynthesis` with a context) on PyTorch's quantized kernels:
    out = [L^T(y) +] S_out(S_hidden(y) + pad(C(c))), with S_hidden, C and S_out each a :class:`TorchInt8Chain`
    (S_hidden and C end on min-max uint8 grids of their outputs; their sum enters S_out on its input grid, as in the
    fake-quant network) and a synthesis' 16-bit linear branch L^T fake-quant float (None for a hyper synthesis)."""

    def __init__(self, linear: nn.Module | None, hidden: nn.Module, context: nn.Module, out: nn.Module):
        super().__init__()
        self.linear, self.hidden, self.context, self.out = linear, hidden, context, out

    def forward(self, y: Tensor, context: Tensor) -> Tensor:
        h = self.hidden(y)
        out = self.out(h + pad_to(self.context(context), h))
        return out if self.linear is None else self.linear(y) + out


def torch_int8_network(qnet: nn.Module, x: tuple[Tensor, ...], engine: str, *,
                       output_points: bool = True) -> tuple[nn.Module, int]:
    """A frozen quantized decoder network on PyTorch's quantized kernels: an ``nn.Sequential`` becomes one
    :func:`torch_int8_chain`; the synthesis' nonlinear branch likewise (its 16-bit linear branch stays fake-quant
    float); a conditional synthesis or hyper synthesis (a second input joining the nonlinear branch before its last
    layer) becomes a :class:`ConditionalInt8Network`. Returns the network and its number of int8 convolutions."""
    prev = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # quantized tensor creation is deprecated (still supported in 2.13)
            if isinstance(qnet, nn.Sequential):
                return torch_int8_chain(qnet, x[0], engine, output_points=output_points)
            if hasattr(qnet, "nonlinear") and isinstance(qnet.nonlinear, nn.Sequential):
                if getattr(qnet, "context", None) is None:
                    m = copy.deepcopy(qnet)
                    m.nonlinear, n = torch_int8_chain(qnet.nonlinear, x[0], engine, output_points=output_points)
                    return m, n
                y, c = x
                *layers, last = qnet.nonlinear
                hidden_net, last_net = nn.Sequential(*layers), nn.Sequential(last)
                with torch.no_grad():
                    hidden = hidden_net(y)
                    joined = hidden + pad_to(qnet.context(c), hidden)
                parts = (torch_int8_chain(hidden_net, y, engine, output_points=output_points),
                         torch_int8_chain(qnet.context, c, engine, output_points=output_points),
                         torch_int8_chain(last_net, joined, engine, output_points=output_points))
                linear = copy.deepcopy(qnet.linear) if hasattr(qnet, "linear") else None
                return ConditionalInt8Network(linear, *(p[0] for p in parts)), sum(p[1] for p in parts)
    finally:
        torch.backends.quantized.engine = prev
    raise ConfigError(f"torch int8: no conversion for a {type(qnet).__name__} network")


def torch_int8_backend(qmodel: VideoCodec, inputs: dict[str, tuple[Tensor, ...]], engine: str) -> Backend:
    if engine not in torch.backends.quantized.supported_engines:
        raise ConfigError(f"PyTorch's quantized engine {engine!r} is not available here (supported: "
                          f"{torch.backends.quantized.supported_engines})")
    nets, notes = {}, []
    for name, net in decoder_networks(qmodel):
        nets[name], n = torch_int8_network(net, inputs[name], engine)
        total = sum(1 for _ in quant_layers(net))
        notes.append(f"{name}: {n} of {total} convolutions in quantized::conv2d")
    label = {"x86": "x86 (fbgemm / oneDNN)", "fbgemm": "fbgemm", "onednn": "oneDNN", "qnnpack": "QNNPACK"}.get(engine, engine)
    return Backend(f"torch-{engine}-int8", f"8-bit networks, PyTorch quantized kernels, engine {label}, 8-bit outputs",
                   "int8 kernels (quantized::conv2d)", 8, nets, notes=notes)


# ---- native kernel inventory -----------------------------------------------------------------------------------------

def cpu_flags() -> dict[str, bool]:
    """x86 features that decide the int8 kernels: AVX2, AVX-512 and the VNNI dot-product instructions."""
    from pathlib import Path

    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    return {f: f in flags for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")}


def native_kernels() -> dict[str, Any]:
    """What the installed onnxruntime and PyTorch register for quantized convolutions / matrix products (type
    constraints of the CPU kernels), and the CPU features."""
    out: dict[str, Any] = {"cpu": cpu_flags(), "torch_engines": list(torch.backends.quantized.supported_engines),
                           "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}
    try:
        import onnxruntime
        from onnxruntime.capi import _pybind_state as C
    except ImportError:
        out["onnxruntime"] = None
        return out
    kernels: dict[str, set[str]] = {}
    for d in C.get_all_opkernel_def():
        if d.provider != "CPUExecutionProvider" or d.op_name not in (
                "QLinearConv", "ConvInteger", "MatMulNBits", "MatMulInteger", "QLinearMatMul", "DequantizeLinear"):
            continue
        types = kernels.setdefault(d.op_name, set())
        for k, v in d.type_constraints.items():
            types.update(t.replace("tensor(", "").rstrip(")") for t in v)
    out["onnxruntime"] = onnxruntime.__version__
    out["ort_kernel_types"] = {k: sorted(v) for k, v in sorted(kernels.items())}
    bits = None
    for s in C.get_all_operator_schema():
        if s.name == "MatMulNBits" and "bits" in s.attributes:
            bits = s.attributes["bits"].description
    out["MatMulNBits_bits"] = bits
    conv_types = set(out["ort_kernel_types"].get("QLinearConv", [])) | set(out["ort_kernel_types"].get("ConvInteger", []))
    out["sub8bit_conv_kernels"] = sorted(t for t in conv_types if t in ("int4", "uint4", "int2", "uint2"))
    return out


# ---- building the backends for one frame size ----------------------------------------------------------------------

def capture_inputs(model: VideoCodec, frames: YUVFrames, quality: int) -> dict[str, tuple[Tensor, ...]]:
    """The inputs of every decoder network (a tuple: the latents, and the prediction for a conditional synthesis)
    while the quantized ``model`` codes frame 0 (I) and frame 1 (P) of ``frames`` with :meth:`VideoCoder.compress`
    (the real shapes and value ranges at that frame size)."""
    from bitalloc.codec.codec import VideoCoder

    if len(frames) < 2:
        raise ConfigError("timing needs at least 2 frames (an I and a P frame)")
    got: dict[str, Tensor] = {}

    def keep(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(_m: nn.Module, args: tuple) -> None:
            if name not in got:
                got[name] = tuple(a.detach().clone() for a in args if a is not None)
        return hook

    handles = [net.register_forward_pre_hook(keep(name)) for name, net in decoder_networks(model)]
    try:
        VideoCoder(model, analysis_scales=(1.0,)).compress(frames[:2], quality=quality, intra_period=-1)
    finally:
        for h in handles:
            h.remove()
    return got


def build_backends(model: VideoCodec, inputs: dict[str, tuple[Tensor, ...]], names: Sequence[str] = BACKENDS, *,
                   frames: YUVFrames | None = None, threads: int = 1,
                   on_error: Callable[[str, Exception], None] | None = None) -> list[Backend]:
    """The backends ``names`` (of :data:`BACKENDS`) for the quantized codec ``model`` at the input shapes of
    ``inputs`` (:func:`capture_inputs`). ``frames`` calibrate the 4- and 2-bit codecs. A backend that cannot be
    built is reported to ``on_error`` (name, exception) and left out; without ``on_error`` the error propagates."""
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise ConfigError(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    fmodel = float_codec(model)
    narrow: dict[int, VideoCodec] = {}

    def at_bits(b: int) -> VideoCodec:
        if b not in narrow:
            if frames is None:
                raise ConfigError(f"the {b}-bit backends need frames to calibrate on")
            narrow[b] = quantize_codec(model, b, frames)
        return narrow[b]

    makers: dict[str, Callable[[], Backend]] = {
        "torch-fp32": lambda: torch_float_backend(fmodel),
        "bitalloc-int8": lambda: integer_backend(model, "bitalloc-int8", 8),
        "fakequant-int8": lambda: fake_quant_backend(model, "fakequant-int8", 8),
        "ort-fp32": lambda: ort_float_backend(fmodel, inputs, threads=threads),
        "ort-int8": lambda: ort_int8_backend(model, inputs, "ort-int8", threads=threads),
        "ort-int8-u8w": lambda: ort_int8_backend(model, inputs, "ort-int8-u8w", threads=threads, u8_weights=True),
        "ort-int8-all": lambda: ort_int8_backend(model, inputs, "ort-int8-all", threads=threads, align="model",
                                                 u8_weights=True, output_points=True),
        "torch-x86-int8": lambda: torch_int8_backend(model, inputs, "x86"),
        "torch-qnnpack-int8": lambda: torch_int8_backend(model, inputs, "qnnpack"),
        "bitalloc-int4": lambda: integer_backend(at_bits(4), "bitalloc-int4", 4),
        "bitalloc-int2": lambda: integer_backend(at_bits(2), "bitalloc-int2", 2),
        "ort-int4-on-int8": lambda: ort_int8_backend(at_bits(4), inputs, "ort-int4-on-int8", threads=threads, bits=4,
                                                     u8_weights=True),
    }
    out = []
    for n in names:
        try:
            out.append(makers[n]())
        except Exception as exc:  # noqa: BLE001 - reported per backend (e.g. an engine this torch lacks)
            if on_error is None:
                raise
            on_error(n, exc)
    return out


# ---- measuring -------------------------------------------------------------------------------------------------------

class _Runner:
    """A callable dressed as an onnxruntime session for :func:`bitalloc.runtime.ort.interleaved_latency`."""

    def __init__(self, fn: Callable[[], Any]):
        self.fn = fn

    def run(self, _outputs: Any, _feed: Any) -> Any:
        return self.fn()


_FEED = {"x": np.zeros(1, dtype=np.float32)}


@contextlib.contextmanager
def _entered(backends: Iterable[Backend]) -> Iterator[None]:
    with contextlib.ExitStack() as stack, torch.no_grad():
        for b in backends:
            stack.enter_context(b.enter())
        yield


def _interleaved(fns: dict[str, Callable[[], Any]], *, runs: int, warmup: int, min_seconds: float,
                 pause: float) -> dict[str, Any]:
    from bitalloc.runtime.ort import interleaved_latency

    return interleaved_latency({k: _Runner(f) for k, f in fns.items()}, _FEED, runs=runs, warmup=warmup,
                               min_seconds=min_seconds, pause=pause)


def _row(item: str, backend: str, lat: Any) -> dict[str, Any]:
    return {"item": item, "backend": backend, "median_ms": lat.median_ms, "p10_ms": lat.p10_ms, "p90_ms": lat.p90_ms,
            "runs": lat.runs}


def time_networks(backends: Sequence[Backend], inputs: dict[str, tuple[Tensor, ...]], *, runs: int = 10, warmup: int = 2,
                  min_seconds: float = 1.0, pause: float = 0.1) -> list[dict[str, Any]]:
    """Per decoder network, every backend timed in turns on that network's input (module docstring). One row per
    (network, backend): median / p10 / p90 milliseconds and runs."""
    rows = []
    with _entered(backends):
        for name, x in inputs.items():
            fns = {b.name: (lambda n=b.networks[name], x=x: n(*x)) for b in backends}
            for k, lat in _interleaved(fns, runs=runs, warmup=warmup, min_seconds=min_seconds, pause=pause).items():
                rows.append(_row(name, k, lat))
    return rows


def _scale_index_mismatch(model: VideoCodec, name: str, ref: Tensor, out: Tensor) -> float | None:
    """For a hyper synthesis: the fraction of latents whose scale-table index (what the entropy coder reads)
    differs between the two outputs; a decoder needs 0 to decode the other's stream."""
    cname, part = name.split(".")
    if part != "hyper_synthesis":
        return None
    gc = coders(model)[cname].gaussian_conditional
    a = gc.scale_index(ref.chunk(2, dim=1)[1])
    b = gc.scale_index(out.chunk(2, dim=1)[1])
    return float((a != b).to(torch.float64).mean())


def network_errors(backends: Sequence[Backend], inputs: dict[str, tuple[Tensor, ...]], model: VideoCodec,
                   reference: str = REFERENCE) -> list[dict[str, Any]]:
    """Per network and backend, the output against the reference backend's on the same input: max and mean
    |difference|, max |reference|, and for hyper syntheses the fraction of scale indices that differ."""
    by = {b.name: b for b in backends}
    if reference not in by:
        raise ConfigError(f"the error reference {reference!r} is not among the backends built")
    rows = []
    with _entered(backends):
        for name, x in inputs.items():
            ref = by[reference].networks[name](*x).to(torch.float64)
            for b in backends:
                out = b.networks[name](*x).to(torch.float64)
                d = (out - ref).abs()
                rows.append({"item": name, "backend": b.name, "max_abs_error": float(d.max()),
                             "mean_abs_error": float(d.mean()), "max_abs_reference": float(ref.abs().max()),
                             "scale_index_mismatch": _scale_index_mismatch(model, name, ref.float(), out.float())})
    return rows


class _Opaque(nn.Module):
    """Runs a network that stays outside the module tree, so that the codec's ``integer_mode`` (entered by
    :meth:`VideoCoder.compress` / ``decompress`` on the whole model) leaves it as its backend built it."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.__dict__["net"] = net

    def forward(self, *xs: Tensor) -> Tensor:
        return self.net(*xs)


def backend_coder(model: VideoCodec, backend: Backend) -> Any:
    """A :class:`~bitalloc.codec.codec.VideoCoder` of a copy of the quantized ``model`` with ``backend``'s decoder
    networks swapped in after construction (the coder's checks need the quantized networks). Networks of backends
    that are not run by ``integer_mode`` are hidden from it (:class:`_Opaque`). The encoder runs one analysis pass
    (``analysis_scales=(1.0,)``): encode times are those of one pass; the default encoder's search over
    :data:`~bitalloc.codec.codec.ANALYSIS_SCALES` runs one pass per scale."""
    from bitalloc.codec.codec import VideoCoder

    coder = VideoCoder(copy.deepcopy(model), analysis_scales=(1.0,))
    for name, net in backend.networks.items():
        cname, part = name.split(".")
        setattr(coders(coder.model)[cname], part, net if backend.integer else _Opaque(net))
    return coder


def _derived(rows: list[dict[str, Any]], item: str, whole: str, first: str, frames: int) -> list[dict[str, Any]]:
    """Per backend, (median of ``whole`` - median of ``first``) / ``frames``: the time of one P frame."""
    out = []
    med = {(r["item"], r["backend"]): r["median_ms"] for r in rows}
    for (it, b), v in med.items():
        if it == whole and (first, b) in med:
            out.append({"item": item, "backend": b, "median_ms": (v - med[(first, b)]) / frames, "p10_ms": None,
                        "p90_ms": None, "runs": None})
    return out


def time_frames(backends: Sequence[Backend], model: VideoCodec, frames: YUVFrames, quality: int, *,
                p_frames: int = 1, runs: int = 5, warmup: int = 1, min_seconds: float = 1.0,
                pause: float = 0.1) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Whole-frame coding per backend with the codec's public verbs, timed in turns (module docstring):
    :meth:`VideoCoder.compress` / ``decompress`` of the first frame (an I frame: items "encode I", "decode I") and
    of the first 1 + ``p_frames`` frames (items "encode I+P", "decode I+P"); "encode P" / "decode P" are the
    differences of the medians per P frame. Returns (timing rows, one quality row per backend: bytes and PSNR_YUV
    of each frame, and whether decoding reproduced the encoder's reconstruction in this process)."""
    if len(frames) < 1 + p_frames:
        raise ConfigError(f"timing {p_frames} P frame(s) needs {1 + p_frames} frames, got {len(frames)}")
    clips = {"I": frames[:1], "I+P": frames[: 1 + p_frames]}
    coder_of = {b.name: backend_coder(model, b) for b in backends}
    streams: dict[tuple[str, str], bytes] = {}
    quality_rows = []
    for b in backends:
        c = coder_of[b.name]
        for k, clip in clips.items():
            res = c.compress(clip, quality=quality, intra_period=-1)
            streams[(b.name, k)] = res.stream
        dec = c.decompress(res.stream)
        rec = res.reconstruction
        exact = all(np.array_equal(getattr(dec, p), getattr(rec, p)) for p in ("y", "u", "v"))
        quality_rows.append({"backend": b.name, "bytes": [f.bytes for f in res.frames],
                             "psnr_yuv": [f.psnr for f in res.frames], "stream_bytes": len(res.stream),
                             "decode_exact": exact})
    rows = []
    for k, clip in clips.items():
        jobs = {f"encode {k}": lambda c, n, clip=clip: c.compress(clip, quality=quality, intra_period=-1),
                f"decode {k}": lambda c, n, k=k: c.decompress(streams[(n, k)])}
        for item, job in jobs.items():
            fns = {b.name: (lambda j=job, c=coder_of[b.name], n=b.name: j(c, n)) for b in backends}
            for name, lat in _interleaved(fns, runs=runs, warmup=warmup, min_seconds=min_seconds, pause=pause).items():
                rows.append(_row(item, name, lat))
    rows += _derived(rows, "encode P", "encode I+P", "encode I", p_frames)
    rows += _derived(rows, "decode P", "decode I+P", "decode I", p_frames)
    return rows, quality_rows


def add_ratios(rows: list[dict[str, Any]], baseline: str = BASELINE) -> None:
    """Add ``x_<baseline>``: the baseline's median / the row's median for the same item (> 1: faster)."""
    base = {r["item"]: r["median_ms"] for r in rows if r["backend"] == baseline}
    for r in rows:
        b = base.get(r["item"])
        r["x_" + baseline] = (b / r["median_ms"]) if b and r["median_ms"] > 0 else None


@contextlib.contextmanager
def thread_count(threads: int) -> Iterator[None]:
    """torch intra-op threads (and OpenCV's, which the motion estimate uses) set to ``threads`` inside the block."""
    prev = torch.get_num_threads()
    cv2 = None
    try:
        import cv2  # type: ignore[no-redef]

        cv_prev = cv2.getNumThreads()
        cv2.setNumThreads(threads)
    except ImportError:  # pragma: no cover - the codec extra brings OpenCV
        cv2 = None
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(prev)
        if cv2 is not None:
            cv2.setNumThreads(cv_prev)


def codec_timing(model: VideoCodec, videos: Sequence[YUVFrames], *, quality: int | None = None,
                 backends: Sequence[str] = BACKENDS, frame_backends: Sequence[str] | None = None, threads: int = 1,
                 runs: int = 10, frame_runs: int = 5, p_frames: int = 1, min_seconds: float = 1.0,
                 pause: float = 0.1,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Everything for each video (one per frame size; its first two frames are timed): the backends, per-network
    times and output errors, and per-frame encode / decode times and quality. ``model``: a quantized, frozen codec
    (the static 8-bit codec). ``frame_backends``: the backends whose whole frames are timed (default: all built).
    Returns a JSON-able dict (``sizes``: one entry per video)."""
    from bitalloc.codec.codec import padded_size
    from bitalloc.codec.precision import is_quantized

    if getattr(model.cfg, "candidates", None):
        raise ConfigError("codec timing measures static-precision codecs; this one has dynamic precision (candidates "
                          f"{list(model.cfg.candidates)}): time a static codec, e.g. quantize_codec(model, bits, frames)")
    if not is_quantized(model):
        raise ConfigError("codec timing needs the quantized codec (load shipped weights with bitalloc.codec.load_codec, "
                          "or quantize one with bitalloc.codec.timing.quantize_codec)")
    say = log or (lambda s: None)
    q = model.cfg.levels // 2 if quality is None else int(quality)
    if not 0 <= q < model.cfg.levels:
        raise ConfigError(f"quality {q} is out of range; this codec has levels 0..{model.cfg.levels - 1}")
    result: dict[str, Any] = {"quality": q, "threads": threads, "runs": runs, "frame_runs": frame_runs,
                              "min_seconds": min_seconds, "native_kernels": native_kernels(), "sizes": [],
                              "failed_backends": {}}
    with thread_count(threads):
        for video in videos:
            t0 = time.perf_counter()
            label = f"{video.width}x{video.height}"
            inputs = capture_inputs(model, video, q)

            def failed(name: str, exc: Exception, _label: str = label) -> None:
                msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
                result["failed_backends"][f"{name} @ {_label}"] = msg
                say(f"{_label}: backend {name} failed: {msg}")

            built = build_backends(model, inputs, backends, frames=video, threads=threads, on_error=failed)
            say(f"{label}: {len(built)} backends built in {time.perf_counter() - t0:.0f} s")
            nets = [{"name": k, "input_shape": [list(t.shape) for t in v] if len(v) > 1 else list(v[0].shape),
                     "macs": network_macs(dict(decoder_networks(model))[k], v)}
                    for k, v in inputs.items()]
            rows = time_networks(built, inputs, runs=runs, min_seconds=min_seconds, pause=pause)
            say(f"{label}: networks timed")
            errors = network_errors(built, inputs, model)
            fb = [b for b in built if frame_backends is None or b.name in frame_backends]
            frows, quality_rows = time_frames(fb, model, video, q, p_frames=p_frames, runs=frame_runs,
                                              min_seconds=min_seconds, pause=pause)
            say(f"{label}: frames timed ({time.perf_counter() - t0:.0f} s)")
            rows += frows
            add_ratios(rows)
            result["sizes"].append({"size": label, "padded": list(padded_size(video.height, video.width)),
                                    "networks": nets, "backends": [b.describe() for b in built], "rows": rows,
                                    "errors": errors, "frames": quality_rows})
    return result
