"""Quantized products of two activations (attention's q k^T and weights x v): ``QuantConfig.product_bits``.

A transformer multiplies activations with activations twice per attention layer; those products have no weight,
so they are not layers and :func:`bitalloc.prepare` does not see them. With ``product_bits = b`` the prepared
model quantizes both operands of every such product to ``b`` bits on every input (online, like per-token
activations): each operand gets, per sample (its first dimension), the min-max grid over that sample's values,
signed and symmetric when the operand has negative values (q, k, v), unsigned and affine with zero point 0 when
it has none (softmax weights); the product then multiplies the grid values, as an integer kernel multiplying the
codes and rescaling would (Q8BERT, Zafrir et al. 2019, quantizes these matmuls' inputs the same way; I-BERT,
Kim et al. 2021, computes them on integers). The cost report counts them at ``b x b`` bits.

The products are found as :class:`torch.overrides.TorchFunctionMode` sees them: calls of ``torch.matmul`` / ``@``
/ ``bmm`` / ``baddbmm`` whose two operands are not parameters or buffers of the model, and
``scaled_dot_product_attention``, whose q, k and v are quantized when given positionally (its softmax weights
stay inside the fused kernel, in float: the cost report counts that half at 32 x b bits). The mode is entered
by a forward pre-hook of the model and left by a forward hook that runs even when the forward raises.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from bitalloc.quant.grid import fake_quantize, qparams_from_range

#: torch functions that multiply two tensors as matrices (activation x activation when neither is a parameter)
MATMUL_FUNCTIONS = {"matmul", "__matmul__", "__rmatmul__", "bmm", "baddbmm", "scaled_dot_product_attention"}


def constant_ids(model: nn.Module) -> set[int]:
    """ids of ``model``'s parameters and buffers: the tensors that are not activations."""
    return {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}


def quantize_operand(x: Tensor, bits: int) -> Tensor:
    """Fake-quantize ``x`` on the min-max grid of each sample (first dimension; a 1-d or 0-d tensor is one sample):
    symmetric signed when the sample has negative values, else unsigned from 0 (:mod:`bitalloc.quant.grid`)."""
    if not x.is_floating_point() or x.numel() == 0:
        return x
    rows = x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(1, -1)
    with torch.no_grad():
        lo, hi = rows.amin(dim=1).double(), rows.amax(dim=1).double()
        signed = lo < 0
        out = torch.empty_like(rows)
    for flag in (True, False):
        sel = signed == flag
        if not bool(sel.any()):
            continue
        scale, zp, qmin, qmax = qparams_from_range(lo[sel], hi[sel], bits, symmetric=flag)
        out[sel] = fake_quantize(rows[sel], scale, zp, qmin, qmax, axis=0)
    return out.reshape(x.shape)


def _operand_positions(name: str) -> list[int]:
    """Positions of the multiplied operands among a product's positional arguments (sdpa: q, k, v)."""
    if name == "scaled_dot_product_attention":
        return [0, 1, 2]
    if name == "baddbmm":
        return [1, 2]
    return [0, 1]


class ProductMode(TorchFunctionMode):
    """Fake-quantizes the operands of activation x activation products (module docstring)."""

    def __init__(self, owner: "ProductQuantizer"):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        owner = self.owner
        if owner.enabled and name in MATMUL_FUNCTIONS:
            pos = _operand_positions(name)
            operands = [args[i] for i in pos if i < len(args)]
            if (len(operands) >= 2 and all(isinstance(t, Tensor) for t in operands)
                    and not any(id(t) in owner.constants for t in operands)):
                args = tuple(quantize_operand(a, owner.bits) if i in pos else a for i, a in enumerate(args))
                owner.calls += 1
        return func(*args, **kwargs)


class ProductQuantizer(nn.Module):
    """The state of a model's product quantization: ``bits``, ``enabled`` (:class:`bitalloc.float_mode` turns it
    off), and the ids of the model's parameters and buffers (operands that are not activations). No tensors: it
    adds nothing to the state dict."""

    def __init__(self, bits: int):
        super().__init__()
        self.bits = int(bits)
        self.enabled = True
        self.calls = 0  # products quantized so far (a count for reports and tests)
        self.constants: set[int] = set()  # ids of the model's parameters and buffers, taken at each forward
        self._modes: list[ProductMode] = []

    def enter(self, module: nn.Module, args: Any) -> None:
        self.constants = constant_ids(module)
        mode = ProductMode(self)
        mode.__enter__()
        self._modes.append(mode)

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self._modes:
            self._modes.pop().__exit__(None, None, None)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, enabled={self.enabled}"


def attach_product_quantizer(model: nn.Module, bits: int) -> ProductQuantizer:
    """Quantize ``model``'s activation x activation products to ``bits`` on every forward (module docstring):
    ``model.bitalloc_products`` holds the :class:`ProductQuantizer`."""
    pq = ProductQuantizer(bits)
    model.bitalloc_products = pq
    model.register_forward_pre_hook(pq.enter)
    model.register_forward_hook(pq.leave, always_call=True)
    return pq


def product_bits(model: nn.Module) -> int | None:
    """The bit width of ``model``'s quantized activation products (None: float)."""
    pq = getattr(model, "bitalloc_products", None)
    return pq.bits if isinstance(pq, ProductQuantizer) else None


__all__ = ["MATMUL_FUNCTIONS", "ProductQuantizer", "attach_product_quantizer", "constant_ids", "product_bits",
           "quantize_operand"]
