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


def default_weights_path() -> Path:
    return SHIPPED


def load_default_or(path: str | os.PathLike | None = None) -> VideoCodec:
    """The codec in ``path``, or the shipped one (ConfigError naming the fix when neither exists)."""
    from bitalloc.codec.precision import load_codec

    if path is None:
        if not SHIPPED.is_file():
            raise ConfigError(f"this installation has no shipped codec weights ({SHIPPED} is missing); pass "
                              "--weights FILE written by `bitalloc codec train --stage qat`")
        path = SHIPPED
    return load_codec(path)


def describe_weights(model: VideoCodec, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Sizes, parameters, quality levels and the quantization of each decoder network of a codec."""
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
            "config": str(model.cfg.to_dict()), "levels": list(model.cfg.lambdas), "networks": networks}
