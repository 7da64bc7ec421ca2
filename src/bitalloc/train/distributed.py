"""Data-parallel training and reductions across processes (torchrun / DistributedDataParallel).

Launch any bitalloc training (the ``fit`` function or ``bitalloc train``) with
``torchrun --nproc_per_node N ...``: the process group is initialised from torchrun's environment variables
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), with backend ``nccl`` when
the device is CUDA and ``gloo`` on CPU. Outside torchrun (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) everything
here degrades to single-process no-ops, so library code can call the helpers unconditionally:

* :func:`world_size`, :func:`rank`, :func:`local_rank`, :func:`is_main_process`, :func:`is_distributed`;
* :func:`all_reduce_tensors` (sum / mean / max / min of tensors across ranks, in place, one collective per
  dtype), :func:`all_reduce_dict`, :func:`broadcast_object`, :func:`all_gather_object`, :func:`barrier`;
* :func:`select_device`, :func:`init_distributed` / :func:`cleanup` and the :func:`distributed` context.

**Global batches.** :class:`GlobalBatchSampler` draws one seeded permutation per epoch (``seed``, ``epoch``),
cuts it into global batches of ``batch_size`` samples exactly as a single process would, and gives rank r
the r-th contiguous chunk of each global batch. The union of the ranks' chunks is the single-process
batch; the loss of each rank is scaled so that DDP's gradient average equals the single-process mean
gradient (see :mod:`bitalloc.train.loop`). A final partial global batch smaller than the number of ranks
is skipped (it cannot give every rank a sample); a single process skips nothing.

**BatchNorm under DDP.** Plain BatchNorm normalises with the statistics of each rank's own chunk, so a
model with BatchNorm does not match the single-process run exactly (running statistics are rank 0's,
broadcast by DDP at each forward). ``sync_bn=True`` makes the statistics global: on CUDA with
``torch.nn.SyncBatchNorm``; on CPU, where ``torch.nn.SyncBatchNorm`` refuses CPU tensors (torch 2.13:
"SyncBatchNorm expected input tensor to be on GPU ..."), with :class:`CPUSyncBatchNorm` (all-reduced
sum / sum of squares / count with a differentiable all-reduce, gloo). Both keep the state-dict keys of
``BatchNorm*d``, and :func:`revert_sync_batchnorm` restores plain modules after training.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from bitalloc.errors import ConfigError

_INITIALISED_HERE = False


# ---- who am I ---------------------------------------------------------------------------------------------

def is_distributed() -> bool:
    """True when a process group is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of processes (1 outside a distributed run)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """Global rank of this process (0 outside a distributed run)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


_rank, _world_size = rank, world_size


def local_rank() -> int:
    """Rank of this process on its machine (torchrun's ``LOCAL_RANK``; 0 if unset)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0)


def is_main_process() -> bool:
    """True on rank 0 (and in a single-process run): the process that writes files and prints."""
    return rank() == 0


def launched_distributed() -> bool:
    """True when the environment says this process is one of several (torchrun sets ``WORLD_SIZE``)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1
    except ValueError:
        return False


# ---- set-up --------------------------------------------------------------------------------------------

def select_device(device: str | torch.device | None = None) -> torch.device:
    """The device to train on: ``device`` if given (or env ``BITALLOC_DEVICE``), else ``cuda:LOCAL_RANK``
    when CUDA is available, else CPU. "auto" means the default choice."""
    if device is None or str(device) == "auto":
        device = os.environ.get("BITALLOC_DEVICE") or "auto"
    if str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() % max(1, torch.cuda.device_count()))
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {device!r} was requested but CUDA is not available; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank() % max(1, torch.cuda.device_count()))
    return dev


def _destroy_at_exit() -> None:
    # No barrier: at exit a rank may be leaving because of an error, and must not wait for the others.
    # Collect garbage first: a DistributedDataParallel wrapper kept alive by a reference cycle and destroyed
    # during interpreter teardown, after its process group, aborts the process ("terminate called ...").
    global _INITIALISED_HERE
    if _INITIALISED_HERE and dist.is_available() and dist.is_initialized():
        import gc

        gc.collect()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
    _INITIALISED_HERE = False


def init_distributed(device: str | torch.device | None = None, *, backend: str | None = None,
                     timeout_s: float = 1800.0, destroy_at_exit: bool = False) -> torch.device:
    """Initialise the default process group from torchrun's environment if this is a multi-process launch.

    Returns the device this rank should use. Does nothing (beyond choosing the device) when not launched
    with ``WORLD_SIZE > 1`` or when a group already exists. Backend: ``nccl`` for CUDA devices, ``gloo``
    otherwise, unless ``backend`` is given. ``destroy_at_exit`` registers ``destroy_process_group`` for
    interpreter exit (what :func:`bitalloc.train.fit` uses); otherwise call :func:`cleanup` or use the
    :func:`distributed` context manager. Initialise once per process: destroying and re-creating the
    default group under torchrun can hang on stale rendezvous keys.
    """
    global _INITIALISED_HERE
    dev = select_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if launched_distributed() and dist.is_available() and not dist.is_initialized():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise ConfigError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are not set; launch with "
                              f"torchrun --nproc_per_node N (it sets them) or unset WORLD_SIZE")
        from datetime import timedelta

        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        kwargs: dict[str, Any] = {}
        if dev.type == "cuda" and backend == "nccl":
            kwargs["device_id"] = dev
        dist.init_process_group(backend=backend, init_method="env://", timeout=timedelta(seconds=timeout_s),
                                **kwargs)
        _INITIALISED_HERE = True
        if destroy_at_exit:
            import atexit

            atexit.register(_destroy_at_exit)
    return dev


def cleanup(force: bool = False, *, wait: bool = True) -> None:
    """Destroy the process group if :func:`init_distributed` created it (or always with ``force``).

    ``wait`` first waits for the other ranks (a clean shutdown). On an error path pass ``wait=False``: a
    failing rank must exit, so that torchrun stops the others, instead of blocking in a barrier that the
    others never reach.
    """
    global _INITIALISED_HERE
    if dist.is_available() and dist.is_initialized() and (_INITIALISED_HERE or force):
        import gc

        gc.collect()  # see _destroy_at_exit
        if wait:
            with contextlib.suppress(Exception):
                dist.barrier()
        dist.destroy_process_group()
        _INITIALISED_HERE = False


@contextlib.contextmanager
def distributed(device: str | torch.device | None = None, *, backend: str | None = None) -> Iterator[torch.device]:
    """Context manager: initialise from the environment (if launched by torchrun), yield the device, clean up."""
    already = dist.is_available() and dist.is_initialized()
    dev = init_distributed(device, backend=backend)
    ok = False
    try:
        yield dev
        ok = True
    finally:
        if not already:
            cleanup(wait=ok)


def on_main_then_share(fn: Any) -> Any:
    """Run ``fn()`` on rank 0 only and give its result (or its exception) to every rank.

    For decisions that must agree across ranks and depend on the file system (does the checkpoint exist?):
    every rank returns the same value, or every rank raises the same exception.
    """
    if not is_distributed():
        return fn()
    box: list[Any] = [None]
    if rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # shared with the other ranks, then re-raised everywhere
            box[0] = ("error", exc)
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    status, value = box[0]
    if status == "error":
        raise value
    return value


# ---- collectives -------------------------------------------------------------------------------------------

_OPS = {"sum": "SUM", "mean": "SUM", "max": "MAX", "min": "MIN", "product": "PRODUCT"}


def _comm_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_tensors(*tensors: torch.Tensor | Sequence[torch.Tensor], op: str = "sum") -> list[torch.Tensor]:
    """Reduce tensors across all ranks **in place** and return them (as a list).

    ``op``: "sum", "mean" (sum divided by the world size; floating tensors only), "max", "min" or "product".
    Tensors of one dtype are flattened into one buffer, so a whole set of calibration statistics costs one
    collective per dtype. Works for tensors on any device (moved to the backend's device and back). In a
    single process this returns the tensors unchanged.
    """
    flat: list[torch.Tensor] = []
    for t in tensors:
        if isinstance(t, torch.Tensor):
            flat.append(t)
        else:
            flat.extend(t)
    if op not in _OPS:
        raise ConfigError(f"all_reduce_tensors: op={op!r} is not one of {sorted(_OPS)}")
    if not is_distributed() or not flat:
        return flat
    reduce_op = getattr(dist.ReduceOp, _OPS[op])
    comm = _comm_device()
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in flat:
        by_dtype.setdefault(t.dtype, []).append(t)
    for dtype, group in by_dtype.items():
        if op == "mean" and not (dtype.is_floating_point or dtype.is_complex):
            raise ConfigError("all_reduce_tensors: op='mean' needs floating-point tensors; use 'sum' and divide")
        send_dtype = torch.int32 if dtype == torch.bool else dtype
        if dtype == torch.bool and op == "sum":
            raise ConfigError("all_reduce_tensors: cannot sum bool tensors; convert them to integers first")
        buf = torch.cat([t.detach().reshape(-1).to(comm, send_dtype) for t in group])
        dist.all_reduce(buf, op=reduce_op)
        if op == "mean":
            buf /= world_size()
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(buf[offset:offset + n].view(t.shape).to(t.device, dtype))
            offset += n
    return flat


def all_reduce_dict(values: dict[str, float], op: str = "sum") -> dict[str, float]:
    """Reduce a dict of numbers (same keys on every rank) across ranks; returns a new dict of floats."""
    if not is_distributed() or not values:
        return {k: float(v) for k, v in values.items()}
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    all_reduce_tensors(t, op=op)
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from rank ``src`` to every rank (identity in a single process)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device())
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


# ---- global batches ----------------------------------------------------------------------------------------

def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64 steps): distinct inputs give unrelated seeds."""
    x = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for p in parts:
        x = (x ^ (int(p) & mask)) & mask
        x = (x + 0x9E3779B97F4A7C15) & mask
        z = x
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        x = z ^ (z >> 31)
    return x & ((1 << 63) - 1)


def epoch_permutation(n: int, seed: int, epoch: int, shuffle: bool = True) -> torch.Tensor:
    """The order of the ``n`` samples in ``epoch``: a permutation seeded by (seed, epoch), or 0..n-1."""
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator()
    g.manual_seed(_mix(seed, epoch, 0x5EED))
    return torch.randperm(n, generator=g)


class GlobalBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's share of each *global* batch (see the module docstring); identical on every rank.

    ``mode="items"`` yields lists of ``(sample_seed, index)`` keys for :class:`SeededItems` (one item call
    per sample; random augmentation of a sample depends only on (seed, epoch, index)). ``mode="batches"``
    yields one batch key ``(generator_seed, global_indices, lo, hi)`` per step for :class:`BatchedView` (datasets with a vectorised
    ``get_batch(indices, generator=)``, e.g. bitalloc's in-memory image datasets). Call :meth:`set_epoch`
    before iterating each epoch.
    """

    def __init__(self, n: int, batch_size: int, *, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 rank: int | None = None, world_size: int | None = None, mode: str = "items"):
        if n <= 0:
            raise ConfigError("the training set is empty")
        if batch_size <= 0:
            raise ConfigError(f"batch size {batch_size} must be positive")
        if mode not in ("items", "batches"):
            raise ConfigError(f"GlobalBatchSampler mode={mode!r} must be 'items' or 'batches'")
        self.n, self.batch_size, self.seed, self.shuffle, self.drop_last = n, batch_size, seed, shuffle, drop_last
        self.rank = _rank() if rank is None else rank
        self.world = _world_size() if world_size is None else world_size
        self.mode = mode
        if self.batch_size < self.world:
            raise ConfigError(f"global batch size {batch_size} is smaller than the number of processes "
                              f"{self.world}; every process needs at least one sample per batch")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_sizes(self) -> list[int]:
        """Sizes of the global batches of an epoch (identical on every rank)."""
        full, rest = divmod(self.n, self.batch_size)
        sizes = [self.batch_size] * full
        if rest and not self.drop_last and rest >= self.world:
            sizes.append(rest)
        return sizes

    def __len__(self) -> int:
        return len(self.global_sizes())

    def __iter__(self) -> Iterator[Any]:
        perm = epoch_permutation(self.n, self.seed, self.epoch, self.shuffle)
        for i, size in enumerate(self.global_sizes()):
            batch = perm[i * self.batch_size:i * self.batch_size + size]
            lo, hi = shard_bounds(size, self.rank, self.world)
            if self.mode == "batches":
                yield (_mix(self.seed, self.epoch, i, 0xBA7C), batch, lo, hi)
            else:
                yield [(_mix(self.seed, self.epoch, int(j)), int(j)) for j in batch[lo:hi]]


# A batch key is the tuple ``(generator_seed, global_indices, lo, hi)``: one step's global batch and this
# rank's slice ``[lo, hi)`` of it (plain tuples pickle to loader workers).
BatchKey = tuple


class BatchedView(torch.utils.data.Dataset):
    """Dataset view for ``DataLoader(view, batch_size=None, sampler=GlobalBatchSampler(mode="batches"))``.

    ``base.get_batch(indices, generator=g)`` must return ``(inputs, labels)`` for many indices at once.
    With random augmentation (``base.augment`` true) every rank builds the *whole* global batch with the
    generator seeded for that step and keeps its slice, so crops and flips are exactly those of a single
    process (augmentation is cheap next to the model); without augmentation only the slice is built.
    ``index_map`` maps positions to the base dataset's indices (for ``Subset`` views).
    """

    def __init__(self, base: Any, index_map: torch.Tensor | None = None):
        self.base = base
        self.index_map = index_map
        self.augment = bool(getattr(base, "augment", True))

    def __len__(self) -> int:
        return len(self.index_map) if self.index_map is not None else len(self.base)

    def __getitem__(self, key: tuple) -> Any:
        seed, indices, lo, hi = key
        indices = torch.as_tensor(indices, dtype=torch.int64)
        if self.index_map is not None:
            indices = self.index_map[indices]
        g = torch.Generator()
        g.manual_seed(seed)
        if not self.augment:
            return self.base.get_batch(indices[lo:hi], generator=g)
        x, y = self.base.get_batch(indices, generator=g)
        return x[lo:hi], y[lo:hi]


def batched_base(dataset: Any) -> tuple[Any, torch.Tensor | None] | None:
    """``(base, index_map)`` when ``dataset`` (or the dataset under nested ``Subset`` views) has ``get_batch``."""
    index: torch.Tensor | None = None
    while isinstance(dataset, torch.utils.data.Subset):
        sub = torch.as_tensor(list(dataset.indices), dtype=torch.int64)
        index = sub if index is None else sub[index]
        dataset = dataset.dataset
    if callable(getattr(dataset, "get_batch", None)):
        return dataset, index
    return None


def shard_bounds(n: int, r: int | None = None, w: int | None = None) -> tuple[int, int]:
    """[start, stop) of rank r's contiguous share of n items (sizes differ by at most one)."""
    r = rank() if r is None else r
    w = world_size() if w is None else w
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return start, start + base + (1 if r < extra else 0)


class SeededItems(torch.utils.data.Dataset):
    """Dataset view whose items are read under a per-sample torch seed (for reproducible augmentation).

    Indexed by ``(sample_seed, index)`` keys from :class:`GlobalBatchSampler`; the global torch RNG state of
    the calling process is restored afterwards, so dropout and other model randomness are unaffected by
    data loading. Only torch's RNG is seeded (torchvision-style transforms use it); augmentation drawing
    from Python's ``random`` or numpy's global RNG is not made reproducible across process counts.
    """

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        seed, index = key
        gen = torch.default_generator  # the CPU generator only: torch.manual_seed would also touch CUDA (slow)
        state = gen.get_state()
        try:
            gen.manual_seed(seed)
            return self.dataset[index]
        finally:
            gen.set_state(state)


# ---- model wrapping ----------------------------------------------------------------------------------------

class _DiffAllReduce(torch.autograd.Function):
    """Differentiable sum all-reduce: the gradient of a sum over ranks is the all-reduced gradient."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose batch statistics are computed over the samples of all ranks (works with gloo on CPU).

    Forward in training mode: every rank computes per-channel sum, sum of squares and count of its chunk;
    one differentiable all-reduce gives the global mean and (biased) variance, exactly the statistics a
    single process sees on the whole global batch. Running statistics are updated with the unbiased global
    variance, like ``BatchNorm``. Accepts inputs of any rank >= 2 (channel dimension 1). In eval mode, or
    outside a distributed run, it is ordinary batch norm.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        use_batch = self.training or self.running_mean is None
        if not (use_batch and is_distributed()):
            return super().forward(input)
        dims = [0] + list(range(2, input.dim()))
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = torch.cat([x.sum(dims), (x * x).sum(dims), count])
        stats = _DiffAllReduce.apply(stats)
        c = x.shape[1]
        total = stats[2 * c]
        mean = stats[:c] / total
        var = (stats[c:2 * c] / total - mean * mean).clamp_min(0)
        if self.training and self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                n = float(total)
                unbiased = var.detach() * (n / max(n - 1.0, 1.0))
                self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.to(self.running_var.dtype), alpha=m)
        shape = [1, c] + [1] * (input.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


def _convert(module: nn.Module, make) -> nn.Module:
    out = make(module)
    for name, child in module.named_children():
        new = _convert(child, make)
        if new is not child:
            out.add_module(name, new)
    return out


def _copy_bn(src: nn.Module, cls: type) -> nn.Module:
    new = cls(src.num_features, src.eps, src.momentum, src.affine, src.track_running_stats)
    if src.affine:
        with torch.no_grad():
            new.weight = src.weight
            new.bias = src.bias
    new.running_mean = src.running_mean
    new.running_var = src.running_var
    new.num_batches_tracked = src.num_batches_tracked
    new.train(src.training)
    new._bitalloc_original_class = getattr(src, "_bitalloc_original_class", type(src))  # type: ignore[attr-defined]
    return new


def convert_sync_batchnorm(model: nn.Module, device: torch.device | str = "cpu") -> nn.Module:
    """Replace BatchNorm layers by cross-rank synchronised ones (parameters and buffers are shared, not copied).

    CUDA: ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``. CPU: :class:`CPUSyncBatchNorm`. Returns the
    converted model (the same object unless ``model`` itself is a BatchNorm layer).
    """
    cls = nn.SyncBatchNorm if torch.device(device).type == "cuda" else CPUSyncBatchNorm

    def make(m: nn.Module) -> nn.Module:
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not isinstance(m, (CPUSyncBatchNorm, nn.SyncBatchNorm)):
            return _copy_bn(m, cls)
        return m

    return _convert(model, make)


def revert_sync_batchnorm(model: nn.Module) -> nn.Module:
    """Undo :func:`convert_sync_batchnorm`: plain ``BatchNorm1d/2d/3d`` modules sharing the same tensors."""
    by_dim = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}

    def make(m: nn.Module) -> nn.Module:
        if isinstance(m, (CPUSyncBatchNorm, nn.SyncBatchNorm)):
            cls = getattr(m, "_bitalloc_original_class", None) or by_dim[4]
            new = _copy_bn(m, cls)
            with contextlib.suppress(AttributeError):
                del new._bitalloc_original_class
            return new
        return m

    return _convert(model, make)


def wrap_ddp(model: nn.Module, device: torch.device, *, find_unused_parameters: bool = False,
             broadcast_buffers: bool = True) -> nn.Module:
    """Wrap ``model`` (already on ``device``) in DistributedDataParallel when running distributed."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("the model has no trainable parameters; nothing to train")
    import inspect

    ids = [device.index] if device.type == "cuda" else None
    kwargs: dict[str, Any] = {"find_unused_parameters": find_unused_parameters}
    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:  # torch >= 2.13 renamed it
        kwargs["forward_sync_buffers"] = broadcast_buffers
    else:  # pragma: no cover - older torch
        kwargs["broadcast_buffers"] = broadcast_buffers
    return DDP(model, device_ids=ids, output_device=device.index if device.type == "cuda" else None, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP (or DataParallel) wrapper."""
    return getattr(model, "module", model) if isinstance(
        model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


__all__ = [
    "is_distributed", "world_size", "rank", "local_rank", "is_main_process", "launched_distributed",
    "select_device", "init_distributed", "cleanup", "distributed", "all_reduce_tensors", "all_reduce_dict",
    "broadcast_object", "all_gather_object", "barrier", "on_main_then_share", "GlobalBatchSampler", "SeededItems", "BatchKey",
    "BatchedView", "batched_base", "epoch_permutation",
    "shard_bounds", "CPUSyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm", "wrap_ddp", "unwrap",
]
