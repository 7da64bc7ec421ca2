"""Explicit forms of PyTorch's attention blocks, so that their Linear layers can be quantized.

``nn.MultiheadAttention`` keeps its query / key / value projections in one raw parameter (``in_proj_weight``)
and applies its output projection functionally (``out_proj`` is never called as a module), and in eval mode
under ``torch.no_grad()`` ``nn.TransformerEncoderLayer`` / ``nn.TransformerEncoder`` run a fused kernel that
reads every weight directly. A wrapper around any of those layers would never run. :func:`rewrite_attention`
replaces, in a model about to be prepared,

* each ``nn.MultiheadAttention`` by an :class:`ExplicitMultiheadAttention`: four ``nn.Linear`` layers
  ``q_proj``, ``k_proj``, ``v_proj`` (the three row blocks of ``in_proj_weight`` and ``in_proj_bias``, or the
  separate ``q/k/v_proj_weight`` when ``kdim`` / ``vdim`` differ from ``embed_dim``) and ``out_proj``, called
  as modules, then the computation of ``torch.nn.functional.multi_head_attention_forward`` step by step:
  ``softmax(q k^T / sqrt(d) + mask) v`` per head (Vaswani et al. 2017, eq. 1), ``bias_k`` / ``bias_v`` and
  ``add_zero_attn`` included; ``scaled_dot_product_attention`` when no weights are returned, as PyTorch does;
* each ``nn.TransformerEncoderLayer`` by an :class:`ExplicitTransformerEncoderLayer`, the same module whose
  ``forward`` always takes the regular (non-fused) path of ``TransformerEncoderLayer.forward``;
* and switches off ``nn.TransformerEncoder``'s nested-tensor path (``use_nested_tensor = False``).

The FP32 function is unchanged (up to float rounding: the fused kernels and one packed projection round
differently from three separate ones; ``prepare`` checks the output, and the tests compare in float64). The one
documented difference: with ``src_key_padding_mask``, the encoder's nested-tensor path returns 0 at the padded
positions, the regular path values computed there (as in training mode); unpadded positions are the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True = not allowed to attend) as an additive float mask (0 / -inf); float masks as is.
    (What ``torch.nn.functional._canonical_mask`` does.)"""
    if mask is None or mask.is_floating_point():
        return mask
    if mask.dtype != torch.bool:
        raise TypeError(f"only bool and floating-point attention masks are supported, got {mask.dtype}")
    return torch.zeros_like(mask, dtype=dtype).masked_fill_(mask, float("-inf"))


class ExplicitMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` from four ``nn.Linear`` layers called as modules (see the module docstring).

    Same constructor attributes (``embed_dim``, ``kdim``, ``vdim``, ``num_heads``, ``head_dim``, ``dropout``,
    ``batch_first``, ``bias_k``, ``bias_v``, ``add_zero_attn``) and the same ``forward`` signature and results
    as ``nn.MultiheadAttention``. Build it with :meth:`from_module`.
    """

    def __init__(self, embed_dim: int, num_heads: int, *, kdim: int | None = None, vdim: int | None = None,
                 bias: bool = True, dropout: float = 0.0, batch_first: bool = False, add_bias_kv: bool = False,
                 add_zero_attn: bool = False):
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        self.head_dim = embed_dim // num_heads
        if self.head_dim * num_heads != embed_dim:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.bias_v = nn.Parameter(torch.zeros(1, 1, embed_dim))
        else:
            self.bias_k = self.bias_v = None

    @classmethod
    @torch.no_grad()
    def from_module(cls, mha: nn.MultiheadAttention) -> "ExplicitMultiheadAttention":
        """The explicit form of ``mha`` (its parameters copied; dtype, device and train/eval mode kept)."""
        ref = mha.out_proj.weight
        new = cls(mha.embed_dim, mha.num_heads, kdim=mha.kdim, vdim=mha.vdim, bias=mha.in_proj_bias is not None,
                  dropout=mha.dropout, batch_first=mha.batch_first, add_bias_kv=mha.bias_k is not None,
                  add_zero_attn=mha.add_zero_attn).to(device=ref.device, dtype=ref.dtype)
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.split(e)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = mha.in_proj_bias.split(e) if mha.in_proj_bias is not None else (None, None, None)
        for lin, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases):
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
            lin.weight.requires_grad_(w.requires_grad)
        new.out_proj.weight.copy_(mha.out_proj.weight)
        if mha.out_proj.bias is not None:
            new.out_proj.bias.copy_(mha.out_proj.bias)
        if mha.bias_k is not None:
            new.bias_k.copy_(mha.bias_k)
            new.bias_v.copy_(mha.bias_v)
        return new.train(mha.training)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """``nn.MultiheadAttention.forward``: the same arguments, shapes and results."""
        batched = query.dim() == 3
        if self.batch_first and batched:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        if not batched:
            query, key, value = (t.unsqueeze(1) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, bsz, _ = query.shape
        heads, d = self.num_heads, self.head_dim
        key_padding_mask = _additive_mask(key_padding_mask, query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # scaled_dot_product_attention applies the causal mask itself
        else:
            attn_mask = _additive_mask(attn_mask, query.dtype)
            if key_padding_mask is not None:
                is_causal = False
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        if attn_mask is not None and attn_mask.dim() == 2:
            attn_mask = attn_mask.unsqueeze(0)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.repeat(1, bsz, 1)])
            v = torch.cat([v, self.bias_v.repeat(1, bsz, 1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        q = q.reshape(tgt_len, bsz * heads, d).transpose(0, 1)
        k = k.reshape(k.shape[0], bsz * heads, d).transpose(0, 1)
        v = v.reshape(v.shape[0], bsz * heads, d).transpose(0, 1)
        if self.add_zero_attn:
            zeros = torch.zeros(bsz * heads, 1, d, dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.shape[1]
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, heads, -1, -1).reshape(bsz * heads, 1, src_len)
            attn_mask = kpm if attn_mask is None else attn_mask + kpm
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:  # softmax(q k^T / sqrt(d) + mask) v, keeping the weights
            scores = torch.bmm(q * math.sqrt(1.0 / d), k.transpose(-2, -1))
            if attn_mask is not None:
                scores = scores + attn_mask
            weights = F.softmax(scores, dim=-1)
            if p > 0.0:
                weights = F.dropout(weights, p=p)
            out = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * bsz, self.embed_dim)
            weights = weights.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not batched:
                weights = weights.squeeze(0)
        else:
            if attn_mask is not None:
                attn_mask = (attn_mask.unsqueeze(0) if attn_mask.shape[0] == 1 and attn_mask.dim() == 3
                             else attn_mask.view(bsz, heads, -1, src_len))
            out = F.scaled_dot_product_attention(q.view(bsz, heads, tgt_len, d), k.view(bsz, heads, src_len, d),
                                                 v.view(bsz, heads, src_len, d), attn_mask, p, is_causal)
            out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, self.embed_dim)
        out = self.out_proj(out).view(tgt_len, bsz, self.embed_dim)
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}"


class ExplicitTransformerEncoderLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` that always runs its regular path (``norm_first`` or not), never the
    fused ``torch._transformer_encoder_layer_fwd`` kernel, so that its submodules are called as modules."""

    def forward(self, src: Tensor, src_mask: Tensor | None = None, src_key_padding_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        x = src
        if self.norm_first:
            x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
            return x + self._ff_block(self.norm2(x))
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        return self.norm2(x + self._ff_block(x))


@dataclass
class Rewrite:
    """One module rewritten by :func:`rewrite_attention`: its name, original type, what was done, and how to
    undo it."""

    name: str
    type: str
    what: str
    undo: Callable[[], None]


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def rewrite_attention(model: nn.Module) -> list[Rewrite]:
    """Rewrite ``model``'s attention blocks in place into their explicit forms (module docstring).

    Returns what was rewritten. Subclasses of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` (which
    may compute something else) are left alone, as is the model itself when it is a MultiheadAttention."""
    done: list[Rewrite] = []
    for name, m in list(model.named_modules()):
        if type(m) is nn.MultiheadAttention and name:
            _set(model, name, ExplicitMultiheadAttention.from_module(m))
            done.append(Rewrite(name, "MultiheadAttention", "in_proj_weight / in_proj_bias split into the Linear "
                                "layers q_proj, k_proj, v_proj; out_proj called as a module (the same function)",
                                lambda _n=name, _m=m: _set(model, _n, _m)))
        elif type(m) is nn.TransformerEncoderLayer:
            m.__class__ = ExplicitTransformerEncoderLayer
            done.append(Rewrite(name, "TransformerEncoderLayer", "runs its regular path, not PyTorch's fused "
                                "kernel (which reads the weights directly and would bypass quantization)",
                                lambda _m=m: setattr(_m, "__class__", nn.TransformerEncoderLayer)))
        elif type(m) is nn.TransformerEncoder and getattr(m, "use_nested_tensor", False):
            m.use_nested_tensor = False
            done.append(Rewrite(name, "TransformerEncoder", "nested-tensor fast path off (it bypasses the layers' "
                                "modules); outputs at padded positions are computed instead of set to 0",
                                lambda _m=m: setattr(_m, "use_nested_tensor", True)))
    return done
