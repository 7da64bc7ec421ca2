"""bitalloc: decide how many bits each layer, channel and region of a network gets, then make the quantized
model really smaller and faster.

The core (this namespace) needs only torch and numpy::

    import bitalloc
    cfg = bitalloc.preset("aciq", w_bits=4, a_bits=4)           # or build a QuantConfig by hand
    qmodel = bitalloc.quantize(model, cfg, calibration_loader)  # prepare + calibrate
    report = bitalloc.cost_report(qmodel, example_input)        # MACs, BOPs, memory per layer

See README.md for the whole API.
"""

from bitalloc.calibration import calibrate, calibration
from bitalloc.config import LayerConfig, QuantConfig, TensorConfig, preset
from bitalloc.cost import CostReport, cost_report
from bitalloc.errors import (BitallocError, CheckpointError, ConfigError, DataError, ShapeError,
                             UnsupportedLayerError)
from bitalloc.model.layers import QuantLayer, float_mode, quant_layers
from bitalloc.model.freeze import freeze
from bitalloc.model.prepare import prepare, prepare_info
from bitalloc.ptq import bit_map, check_config, quantize
from bitalloc.quant.allocation import allocate_channel_bits
from bitalloc.quant.clipping import aciq_clip_ratio
from bitalloc.quantizers import QuantParams, Quantizer
from bitalloc.search import layer_sensitivity
from bitalloc import runtime  # noqa: E402 - ``bitalloc.runtime.*`` after ``import bitalloc`` (its ONNX parts stay lazy)

__version__ = "0.1.0"

__all__ = [
    "BitallocError", "CheckpointError", "ConfigError", "CostReport", "DataError", "LayerConfig", "QuantConfig",
    "QuantLayer", "QuantParams", "Quantizer", "ShapeError", "TensorConfig", "UnsupportedLayerError",
    "aciq_clip_ratio", "allocate_channel_bits", "bit_map", "calibrate", "calibration", "check_config", "cost_report",
    "float_mode",
    "freeze",
    "layer_sensitivity", "prepare", "prepare_info", "preset", "quant_layers", "quantize", "runtime",
]
