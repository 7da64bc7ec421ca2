"""Eager dataflow tracing of a real forward pass.

Runs the model once on example inputs and records a graph of *atomic* calls: calls of atomic modules
(modules without children, plus any module the caller declares atomic, e.g. a Conv2d subclass that owns a
padding child) and calls of torch functions and tensor methods made outside atomic modules (``x + y``,
``torch.flatten``, ``F.relu``...). Each node lists the identities of its input and output tensors, so the
graph says which call produced a tensor and which calls consumed it.

Unlike symbolic tracing (torch.fx), this works for any model that runs, whatever Python control flow its
forward uses, because it only observes one real execution. It is used to find Conv/Linear -> BatchNorm
pairs that can be folded, the execution order of layers (first and last), layers that are never called,
and what feeds each layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from bitalloc.batches import model_args


@dataclass
class Node:
    """One atomic call: a module call (``module`` set) or a torch function call."""

    index: int
    target: str
    module: nn.Module | None
    inputs: list[int]
    outputs: list[int]
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    output_shapes: list[tuple[int, ...]] = field(default_factory=list)
    #: the innermost (non-atomic) module whose forward made this call ("" for the model itself)
    scope: str = ""


@dataclass
class Trace:
    nodes: list[Node]
    #: tensor id -> index of the node that produced it (the last one, for in-place ops)
    producer: dict[int, int]
    #: tensor id -> indices of nodes that consumed it
    consumers: dict[int, list[int]]
    #: module qualified name -> indices of its call nodes
    calls: dict[str, list[int]]
    output_ids: list[int]

    def called(self, name: str) -> bool:
        return bool(self.calls.get(name))

    def order(self, names: list[str]) -> list[str]:
        """``names`` that were called, sorted by their first call."""
        called = [n for n in names if self.called(n)]
        return sorted(called, key=lambda n: self.calls[n][0])

    def nearest_upstream(self, names: list[str]) -> dict[str, set[str]]:
        """For each module of ``names`` that was called, the modules of ``names`` whose outputs reach its inputs
        without passing through another module of ``names`` (its nearest upstream layers, by dataflow)."""
        wanted = set(names)
        src: dict[int, frozenset[str]] = {}  # tensor id -> nearest layers it comes from
        up: dict[str, set[str]] = {n: set() for n in names if self.called(n)}
        for node in self.nodes:
            came = frozenset().union(*(src.get(t, frozenset()) for t in node.inputs))
            if node.module is not None and node.target in wanted:
                up[node.target] |= came
                came = frozenset((node.target,))
            for t in node.outputs:
                src[t] = src.get(t, frozenset()) | came if t in node.inputs else came
        return up

    def boundary_layers(self, names: list[str]) -> tuple[list[str], list[str]]:
        """(first, last) among the called modules of ``names``, by dataflow: the first read the model's inputs
        with no module of ``names`` before them (e.g. a transformer's query, key and value projections, which
        read the same embeddings); the last have no module of ``names`` after them (their outputs reach the
        model's outputs only through other operations), so an unused or side module is neither."""
        up = self.nearest_upstream(names)
        feeding = set().union(*up.values()) if up else set()
        order = self.order(list(up))
        return [n for n in order if not up[n]], [n for n in order if n not in feeding]


def _flatten_tensors(obj: Any, out: list[Tensor]) -> list[Tensor]:
    if isinstance(obj, Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _flatten_tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _flatten_tensors(o, out)
    return out


class _Recorder(TorchFunctionMode):
    def __init__(self, tracer: "_Tracer"):
        super().__init__()
        self.tracer = tracer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.tracer.depth == 0:
            name = getattr(func, "__name__", None) or repr(func)
            if name == "__get__":  # a tensor property: record those that give a tensor (x.T, x.mT), for dataflow
                if isinstance(out, Tensor):
                    self.tracer.record(getattr(getattr(func, "__self__", None), "__name__", name), None, (args, kwargs),
                                       out)
            elif name not in ("size", "dim", "numel", "__len__", "is_floating_point", "__format__"):
                self.tracer.record(name, None, (args, kwargs), out)
        return out


class _Tracer:
    def __init__(self) -> None:
        self.depth = 0
        self.nodes: list[Node] = []
        self.keep: list[Tensor] = []  # keep every tensor alive so ids stay unique during the trace
        self.producer: dict[int, int] = {}
        self.consumers: dict[int, list[int]] = {}
        self.calls: dict[str, list[int]] = {}
        self.scope: list[str] = []  # names of the non-atomic modules whose forward is running

    def record(self, target: str, module: nn.Module | None, inputs: Any, outputs: Any) -> Node:
        ins = _flatten_tensors(inputs, [])
        outs = _flatten_tensors(outputs, [])
        self.keep.extend(ins)
        self.keep.extend(outs)
        node = Node(len(self.nodes), target, module, [id(t) for t in ins], [id(t) for t in outs],
                    [tuple(t.shape) for t in ins], [tuple(t.shape) for t in outs],
                    self.scope[-1] if self.scope else "")
        self.nodes.append(node)
        for t in node.inputs:
            self.consumers.setdefault(t, []).append(node.index)
        for t in node.outputs:
            self.producer[t] = node.index
        if module is not None:
            self.calls.setdefault(target, []).append(node.index)
        return node


def trace_model(model: nn.Module, example_inputs: Any, *,
                atomic: Callable[[str, nn.Module], bool] | None = None) -> Trace:
    """Run ``model(*example_inputs)`` under no_grad and record its dataflow graph.

    ``example_inputs``: a tensor, a tuple of positional arguments or a dict of keyword arguments (as
    :func:`bitalloc.batches.call_model` passes them). ``atomic(name, module)`` marks extra
    modules whose internals are not traced (modules without children always are).
    """
    tracer = _Tracer()
    handles = []
    stack: list[tuple] = []

    def is_atomic(name: str, m: nn.Module) -> bool:
        return len(m._modules) == 0 or (atomic is not None and atomic(name, m))

    for name, module in model.named_modules():
        if not is_atomic(name, module):
            def enter(m, args, _name=name):
                tracer.scope.append(_name)

            def leave(m, args, output):
                tracer.scope.pop()

            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave))
            continue

        def pre(m, args, kwargs, _name=name):
            if tracer.depth == 0:
                stack.append((_name, args, kwargs))
            tracer.depth += 1

        def post(m, args, kwargs, output, _name=name):
            tracer.depth -= 1
            if tracer.depth == 0:
                name_, a, k = stack.pop()
                tracer.record(name_, m, (a, k), output)

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))
    args, kwargs = model_args(model, example_inputs)
    try:
        with torch.no_grad(), _Recorder(tracer):
            out = model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    outs = _flatten_tensors(out, [])
    tracer.keep.extend(outs)
    return Trace(tracer.nodes, tracer.producer, tracer.consumers, tracer.calls, [id(t) for t in outs])
