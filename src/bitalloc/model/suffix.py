"""Run a prepared model again with one layer replaced, recomputing only what that layer changes.

The sensitivity pass evaluates hundreds of variants of one model that differ in a single layer (that layer
quantized at some candidate width, everything else as in a base pass). Everything computed before that layer
is the same in every variant, so :class:`SuffixRunner` runs the base pass once per batch through a
``torch.fx`` graph of the model (QuantLayers as leaves), keeps the values that are still needed after some
layer starts (its input, and tensors that skip over it, such as residual branches), and runs each variant from
that layer's first call on. A value is kept when some replaceable layer's first call lies strictly after the
node that made it and at or before its last use; nothing else is stored.

Models that ``torch.fx`` cannot trace (data-dependent control flow), or whose graph does not reproduce the
model's output exactly on the first batch, are run whole for every variant (the layer swapped in with
``set_submodule``): the same numbers, about twice the time. ``engine`` says which is in use.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.fx
from torch import Tensor, nn

from bitalloc.batches import call_model, model_args
from bitalloc.model.fold_bn import set_submodule
from bitalloc.model.layers import QuantLayer
from bitalloc.model.trace import _flatten_tensors


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QuantLayer) or super().is_leaf_module(m, qualname)


def first_output(out: Any) -> Tensor:
    """The first tensor of a model's output (logits of a classifier)."""
    tensors = _flatten_tensors(out, [])
    if not tensors:
        raise TypeError("the model's output holds no tensor")
    return tensors[0]


class SuffixRunner:
    """Base pass and single-layer variants of ``model`` over a list of input batches.

    ``layers``: the names of the layers that variants may replace. ``check(x)`` compares the graph with the model
    on a small batch (call it first; it falls back to whole models on any difference); ``base()`` runs every
    batch once (with the model as it is: float mode or quantized) and returns the outputs; ``variant(name, module, i)`` is the
    output of batch ``i`` with layer ``name`` replaced by ``module`` at each of its calls. ``hooks`` run during
    the base pass (e.g. observers) are the caller's business."""

    def __init__(self, model: nn.Module, layers: Sequence[str], inputs: list[Any], *, use_fx: bool = True):
        self.model = model
        self.layers = list(layers)
        self.inputs = inputs
        self.engine = "full-forward"
        self.graph: torch.fx.Graph | None = None
        self._caches: list[dict[torch.fx.Node, Any]] = []
        if use_fx:
            try:
                self.graph = _LeafTracer().trace(model)
                self._plan()
                self.engine = "fx-suffix"
            except Exception:  # noqa: BLE001 - any tracing failure: run whole models instead
                self.graph = None

    # ---- plan ----------------------------------------------------------------------------------------
    def _plan(self) -> None:
        assert self.graph is not None
        nodes = list(self.graph.nodes)
        index = {n: i for i, n in enumerate(nodes)}
        last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in nodes}
        starts: dict[str, int] = {}
        for n in nodes:
            if n.op == "call_module" and n.target in self.layers:
                starts.setdefault(str(n.target), index[n])
        missing = [name for name in self.layers if name not in starts]
        if missing:
            raise RuntimeError(f"layers not called in the traced graph: {missing}")
        self.nodes, self.index, self.last_use, self.starts = nodes, index, last_use, starts
        start_list = sorted(set(starts.values()))
        self.kept = {n for n in nodes if n.op != "output" and any(index[n] < s <= last_use[n] for s in start_list)}
        self.placeholders = [n for n in nodes if n.op == "placeholder"]

    def _bind(self, x: Any) -> dict[torch.fx.Node, Any]:
        args, kwargs = model_args(self.model, x)
        env: dict[torch.fx.Node, Any] = {}
        positional = list(args)
        for p in self.placeholders:
            if positional:
                env[p] = positional.pop(0)
            elif p.target in kwargs:
                env[p] = kwargs[p.target]
            elif p.args:  # a default value
                env[p] = p.args[0]
            else:
                raise TypeError(f"no input for the model's argument {p.target!r}")
        return env

    def _execute(self, env: dict[torch.fx.Node, Any], start: int, substitute: tuple[str, nn.Module] | None,
                 keep: bool) -> Any:
        interp = torch.fx.Interpreter(self.model, garbage_collect_values=False, graph=self.graph)
        interp.env = env
        cache: dict[torch.fx.Node, Any] = {}
        for i in range(start, len(self.nodes)):
            node = self.nodes[i]
            if node.op == "placeholder":
                continue
            if substitute is not None and node.op == "call_module" and node.target == substitute[0]:
                args, kwargs = interp.fetch_args_kwargs_from_env(node)
                value = substitute[1](*args, **kwargs)
            else:
                value = interp.run_node(node)
            if node.op == "output":
                return value, cache
            env[node] = value
            if keep and node in self.kept:
                cache[node] = value
            for a in node.all_input_nodes:  # free what no later node reads
                if self.last_use[a] <= i and a in env and not (keep and a in self.kept):
                    del env[a]
        raise RuntimeError("the traced graph has no output")

    # ---- passes --------------------------------------------------------------------------------------
    @torch.no_grad()
    def check(self, x: Any) -> bool:
        """With the fx engine: run ``x`` (a small batch) through the graph and through the model itself; unless
        the outputs are identical, fall back to whole-model variants. Returns whether the fx engine stays."""
        if self.engine != "fx-suffix":
            return False
        try:
            out, _ = self._execute(self._bind(x), 0, None, keep=False)
            out = first_output(out)
            ref = first_output(call_model(self.model, x))
            ok = ref.shape == out.shape and torch.equal(ref, out)
        except Exception:  # noqa: BLE001 - the graph does not run these inputs
            ok = False
        if not ok:
            self.engine = "full-forward"
        return ok

    @torch.no_grad()
    def base(self) -> list[Tensor]:
        """Run every batch through the model as it is now; keep what variants need. Returns the outputs."""
        outs: list[Tensor] = []
        self._caches = []
        for x in self.inputs:
            if self.engine == "fx-suffix":
                env = self._bind(x)
                cache_in = {p: v for p, v in env.items() if p in self.kept}
                out, cache = self._execute(env, 0, None, keep=True)
                cache.update(cache_in)
                self._caches.append(cache)
                outs.append(first_output(out))
            else:
                outs.append(first_output(call_model(self.model, x)))
        return outs

    @torch.no_grad()
    def variant(self, name: str, module: nn.Module, i: int) -> Tensor:
        """The output of batch ``i`` with layer ``name`` replaced by ``module`` (after :meth:`base`)."""
        if self.engine == "fx-suffix":
            start = self.starts[name]
            env = {n: v for n, v in self._caches[i].items() if self.index[n] < start <= self.last_use[n]}
            out, _ = self._execute(env, start, (name, module), keep=False)
            return first_output(out)
        original = self.model.get_submodule(name)
        set_submodule(self.model, name, module)
        try:
            return first_output(call_model(self.model, self.inputs[i]))
        finally:
            set_submodule(self.model, name, original)

    def release(self) -> None:
        """Drop the cached values."""
        self._caches = []


__all__ = ["SuffixRunner", "first_output"]
