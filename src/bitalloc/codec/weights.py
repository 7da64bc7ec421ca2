"""The codec weights shipped with bitalloc, and descriptions of weight files.

The shipped file (``bitalloc/codec/weights/bitalloc-codec.pt``, written by :func:`bitalloc.codec.precision.save_codec`
with a SHA-256 trailer) holds the trained codec with its decoder networks quantized to 8 bits and frozen; the
commands that reproduce it are in docs/codec.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from bitalloc.codec.model import VideoCodec
from bitalloc.errors import ConfigError

SHIPPED = Path(__file__).with_name("weights") / "bitalloc-codec.pt"
SHIPPED_DYNAMIC = Path(__file__).with_name("weights") / "bitalloc-codec-dynamic.pt"


def default_weights_path(dynamic: bool = False) -> Path:
    return SHIPPED_DYNAMIC if dynamic else SHIPPED


def load_default_or(path: str | os.PathLike | None = None, *, dynamic: bool = False) -> VideoCodec:
    """The codec in ``path``, or the shipped one (the dynamic-precision one with ``dynamic``); ConfigError naming
    the fix when neither exists."""
    from bitalloc.codec.precision import load_codec

    if path is None:
        shipped = default_weights_path(dynamic)
        if not shipped.is_file():
            stage = "dynamic" if dynamic else "qat"
            raise ConfigError(f"this installation has no shipped {'dynamic-precision ' if dynamic else ''}codec weights "
                              f"({shipped} is missing); pass --weights FILE written by `bitalloc codec train --stage "
                              f"{stage} --ship FILE`")
        path = shipped
    return load_codec(path)


def load_for_stream(model_id: bytes, path: str | os.PathLike | None = None) -> VideoCodec:
    """The codec that decodes a stream with ``model_id``: the weights in ``path``, else whichever shipped codec
    (fixed or dynamic precision) has that id. The caller checks the id of an explicit ``path``."""
    from bitalloc.codec.precision import model_id as id_of

    if path is not None:
        return load_default_or(path)
    tried = []
    for dynamic in (False, True):
        if not default_weights_path(dynamic).is_file():
            continue
        model = load_default_or(None, dynamic=dynamic)
        if id_of(model) == model_id:
            return model
        tried.append(model)
    if not tried:
        return load_default_or(None)  # raises: nothing shipped
    return tried[0]  # the decoder reports the id mismatch


def describe_weights(model: VideoCodec, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Sizes, parameters, multiply-accumulates per luma pixel (:func:`bitalloc.codec.cost.macs_per_pixel`), quality
    levels and the quantization of each decoder network of a codec."""
    from bitalloc.codec.cost import macs_per_pixel
    from bitalloc.codec.precision import decoder_networks, model_id
    from bitalloc.model.layers import quant_layers
    from bitalloc.model.prepare import prepare_info

    networks = []
    for name, net in decoder_networks(model):
        info = getattr(net, "bitalloc_info", None)
        layers = prepare_info(net).layers if info is not None else []
        q = [l for l in layers if l.status == "quantized"]
        bits = sorted({int(qq.qparams().bits.max()) for _, layer in quant_layers(net) for qq in layer.quantizers()})
        networks.append({"name": name, "quantized": len(q), "float": len([l for l in layers if l.status == "float"]),
                         "bits": "/".join(map(str, bits)) or "float"})
    params = sum(p.numel() for p in model.parameters())
    return {"path": str(path or SHIPPED), "model_id": model_id(model).hex(), "parameters": params,
            "intra parameters": sum(p.numel() for p in model.intra.parameters()),
            "inter parameters": sum(p.numel() for p in model.inter.parameters()),
            "config": str(model.cfg.to_dict()), "levels": list(model.cfg.lambdas), "networks": networks,
            "macs_per_pixel": macs_per_pixel(model), "layers": layer_table(model)}


def _widths(spec: dict[str, Any] | None) -> str:
    if not spec:
        return "float"
    if spec.get("quantizer") == "lsq_region":
        return "/".join(str(b) for b in (spec.get("options") or {}).get("candidates", [spec.get("bits")]))
    return str(int(spec["bits"]))


def layer_table(model: VideoCodec) -> list[dict[str, Any]]:
    """Every layer of every network of the codec: quantized or float, its widths (weights, activations; ``4/8/16``
    = a per-frame choice among the candidates) and why."""
    from bitalloc.codec.precision import (ALL_PARTS, CONTEXT_FIXED_LAYERS, DECODER_PARTS, FIXED_LAYERS, WIDE_LAYERS,
                                          coders)
    from bitalloc.config import match_pattern
    from bitalloc.model.prepare import prepare_info

    rows = []
    for cname, coder in coders(model).items():
        for part in ALL_PARTS:
            net = getattr(coder, part)
            if getattr(net, "bitalloc_info", None) is None:
                sender = "it runs only at the sender; the stream does not depend on its arithmetic"
                if part in DECODER_PARTS:
                    why = "not quantized"
                elif model.cfg.candidates:
                    why = f"float (DYNAMIC_FLOAT_PARTS): {sender}"
                else:
                    why = f"encoder network of a codec with fixed precision: float {sender}"
                rows += [{"network": f"{cname}.{part}", "layer": n, "type": type(m).__name__, "status": "float",
                          "weight_bits": "float", "act_bits": "float", "reason": why}
                         for n, m in net.named_modules() if any(True for _ in m.parameters(recurse=False))]
                continue
            for r in prepare_info(net).layers:
                if r.status != "quantized":
                    why = r.reason or r.status
                elif (r.weight or {}).get("quantizer") == "lsq_region":
                    why = "region LSQ: the ROI and the rest each at the width the frame signals"
                elif any(match_pattern(p, r.name, r.type) for p in WIDE_LAYERS.get(part, {})):
                    why = "reads decoded latents: fixed 16-bit input grid (WIDE_LAYERS)"
                elif part in CONTEXT_FIXED_LAYERS and match_pattern(CONTEXT_FIXED_LAYERS[part], r.name, r.type):
                    why = "fixed grid (CONTEXT_FIXED_LAYERS): reads the prediction"
                elif any(match_pattern(p, r.name, r.type) for p in FIXED_LAYERS.get(part, ())):
                    why = ("fixed grid (FIXED_LAYERS): "
                           + ("reads the frame or residual" if part == "analysis"
                              else "hyper synthesis (the entropy model's scales)"))
                else:
                    why = "decoder network at the codec's precision"
                rows.append({"network": f"{cname}.{part}", "layer": r.name, "type": r.type, "status": r.status,
                             "weight_bits": _widths(r.weight), "act_bits": _widths(r.act), "reason": why})
    return rows
