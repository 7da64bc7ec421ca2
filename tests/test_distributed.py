"""Data-parallel training: 2 CPU processes launched through the real torchrun entry point
(``python -m torch.distributed.run --standalone --nproc_per_node 2``) must reproduce the single-process run
with the same seed and global batch size, within float tolerance.

Cases (one torchrun launch for all, to keep the test well under a minute):
* ``plain``: MLP, SGD + Nesterov, cosine, a partial last global batch; fit initialises the process group itself
  (then the ``distributed()`` context reuses it, and it is destroyed at exit);
* ``items_aug``: per-item random augmentation drawn from the global torch RNG (reseeded per sample);
* ``batches_aug``: a dataset with vectorised ``get_batch`` + augmentation, Adam, grad clipping, label smoothing;
* ``bn_sync``: a BatchNorm model with ``sync_bn=True`` (CPU: bitalloc's CPUSyncBatchNorm over gloo);
* ``resume``: 1 epoch, checkpoint (rank 0 only), resume, 1 more epoch under DDP == uninterrupted;
* ``bn_local``: BatchNorm without sync: trains, ranks stay identical (statistics are per rank, documented);
* collectives: all_reduce_tensors (sum / mean / max, several dtypes), all_reduce_dict, evaluate's sharding.
"""

from __future__ import annotations

import textwrap

import pytest
import torch

from bitalloc.train import distributed as D
from tests.torchrun import load_worker, run_torchrun

WORKER = textwrap.dedent('''
    import json, sys
    from pathlib import Path

    import torch
    from torch import nn

    from bitalloc.train import TrainConfig, StopAfter, evaluate, fit, load_checkpoint
    from bitalloc.train import distributed as D
    from tests.synthetic import blobs


    class ItemsAug(torch.utils.data.Dataset):
        def __init__(self, base):
            self.x, self.y = base.tensors
        def __len__(self):
            return len(self.y)
        def __getitem__(self, i):
            return self.x[i] + 0.2 * torch.randn(self.x.shape[1]), self.y[i]


    class BatchesAug(ItemsAug):
        augment = True
        def get_batch(self, idx, generator=None):
            idx = torch.as_tensor(idx)
            return self.x[idx] + 0.2 * torch.randn(len(idx), self.x.shape[1], generator=generator), self.y[idx]


    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


    def bn_net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))


    SGD = dict(optimizer="sgd", lr=0.05, momentum=0.9, nesterov=True, batch_size=32, epochs=2, progress="off")
    CASES = {
        "plain": (mlp, lambda: blobs(200), SGD),  # 6 full batches + one of 8
        "items_aug": (mlp, lambda: ItemsAug(blobs(160)), dict(SGD, weight_decay=1e-3)),
        "batches_aug": (mlp, lambda: BatchesAug(blobs(160)),
                        dict(SGD, optimizer="adam", lr=0.01, max_grad_norm=0.5, label_smoothing=0.1)),
        "bn_sync": (bn_net, lambda: blobs(160), dict(SGD, sync_bn=True)),
    }
    VAL = lambda: blobs(70, noise_seed=5)  # 70 = 35 per rank: sharded evaluation must count each sample once


    def run_case(name, **extra):
        make_model, make_data, cfg = CASES[name]
        model = make_model()
        r = fit(model, make_data(), VAL(), TrainConfig(**dict(cfg, **extra)))
        return {"weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
                "history": [{k: h.get(k) for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy",
                                                   "train_samples")} for h in r.history]}


    def main(out):
        out = Path(out)
        results = {"plain": run_case("plain")}  # fit initialises the process group itself (kept until exit)
        assert torch.distributed.is_initialized()
        with D.distributed("cpu"):
            rank, world = D.rank(), D.world_size()
            assert world == 2 and D.is_main_process() == (rank == 0)
            for name in ("items_aug", "batches_aug", "bn_sync"):
                results[name] = run_case(name)
            ck = out / "resume.pt"
            make_model, make_data, cfg = CASES["plain"]
            fit(make_model(), make_data(), VAL(), TrainConfig(**dict(cfg, checkpoint=str(ck))), callbacks=[StopAfter(1)])
            results["resume"] = run_case("plain", checkpoint=str(ck), resume=True)
            state = load_checkpoint(ck)
            results["checkpoint"] = {"world_size": state["world_size"], "rng_states": len(state["rng"]),
                                     "epoch": state["epoch"], "complete": state["complete"]}
            # BatchNorm without sync: runs; DDP keeps parameters identical on both ranks
            model = bn_net()
            r = fit(model, blobs(160), VAL(), TrainConfig(**SGD))
            params = D.all_gather_object({k: v for k, v in model.named_parameters()})
            results["bn_local"] = {"finite": all(bool(torch.isfinite(v).all()) for v in params[0].values()),
                                   "ranks_equal": all(torch.equal(params[0][k], params[1][k]) for k in params[0]),
                                   "val_accuracy": r.final_accuracy}
            # collectives
            a = torch.tensor([rank + 1.0, 10.0 * rank], dtype=torch.float64)
            b = torch.tensor([[rank, 1], [2, rank]], dtype=torch.int64)
            c = torch.tensor([rank + 0.5], dtype=torch.float32)
            D.all_reduce_tensors(a, [b, c])
            m = torch.tensor([float(rank)]); D.all_reduce_tensors(m, op="max")
            mean = torch.tensor([2.0 * rank]); D.all_reduce_tensors(mean, op="mean")
            ev = evaluate(bn_net(), VAL(), batch_size=16, progress="off", per_sample=True)
            results["collectives"] = {"a": a.tolist(), "b": b.tolist(), "c": c.tolist(), "max": m.item(),
                                      "mean": mean.item(), "dict": D.all_reduce_dict({"x": rank + 1, "y": 2}),
                                      "eval_count": ev.count, "per_sample": ev.per_sample,
                                      "gathered": D.all_gather_object(rank),
                                      "broadcast": D.broadcast_object("hello" if rank == 0 else None)}
            if rank == 0:
                torch.save(results, out / "ddp.pt")


    if __name__ == "__main__":
        main(sys.argv[1])
''')


def _close(a: torch.Tensor, b: torch.Tensor, rel: float) -> bool:
    scale = max(float(b.abs().max()), 1e-12)
    return float((a.double() - b.double()).abs().max()) <= rel * scale


@pytest.mark.xdist_group("torchrun")
def test_torchrun_two_processes_match_one(tmp_path):
    """One torchrun launch (all checks in one test so that pytest-xdist never launches it twice)."""
    mod = load_worker(WORKER, tmp_path / "ddp_worker.py")
    run_torchrun(tmp_path / "ddp_worker.py", str(tmp_path))
    results = torch.load(tmp_path / "ddp.pt", weights_only=False)

    # 1. DDP == single process with the same seed and global batch (float tolerance)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        singles = {case: mod.run_case(case) for case in ("plain", "items_aug", "batches_aug", "bn_sync")}
    finally:
        torch.set_num_threads(threads)
    for case, single in singles.items():
        multi = results[case]
        for k, v in single["weights"].items():
            assert _close(multi["weights"][k], v, 1e-5), f"{case}: {k} differs: {multi['weights'][k]} vs {v}"
        for hs, hm in zip(single["history"], multi["history"], strict=True):
            assert hm["train_samples"] == hs["train_samples"], case
            for key in ("train_loss", "val_loss"):
                assert hm[key] == pytest.approx(hs[key], rel=1e-5), (case, key)
            for key in ("train_accuracy", "val_accuracy"):
                assert hm[key] == pytest.approx(hs[key], abs=1.5 / 70), (case, key)  # one borderline flip at most

    # 2. resume under DDP: bitwise equal to the uninterrupted run; only rank 0 wrote, atomically
    for k, v in results["plain"]["weights"].items():
        assert torch.equal(results["resume"]["weights"][k], v), k
    assert results["checkpoint"] == {"world_size": 2, "rng_states": 2, "epoch": 2, "complete": True}
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers, f"temporary files left behind: {leftovers}"

    # 3. BatchNorm without sync trains; DDP keeps the ranks' parameters identical
    assert results["bn_local"]["finite"] and results["bn_local"]["ranks_equal"]
    assert results["bn_local"]["val_accuracy"] > 0.5

    # 4. collectives and sharded evaluation
    c = results["collectives"]
    assert c["a"] == [3.0, 10.0] and c["b"] == [[1, 2], [4, 1]] and c["c"] == [2.0]
    assert c["max"] == 1.0 and c["mean"] == 1.0 and c["dict"] == {"x": 3.0, "y": 4.0}
    assert c["eval_count"] == 70 and c["gathered"] == [0, 1] and c["broadcast"] == "hello"
    # per-sample outcomes gathered across ranks in data order == one process
    single_eval = mod.evaluate(mod.bn_net(), mod.VAL(), progress="off", per_sample=True)
    assert torch.equal(c["per_sample"], single_eval.per_sample)


# ---- single-process pieces ------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,batch,world,drop_last", [(103, 10, 3, False), (100, 10, 4, True), (21, 8, 2, False),
                                                     (17, 8, 2, False)])
def test_global_batches_partition_the_single_process_batches(n, batch, world, drop_last):
    single = D.GlobalBatchSampler(n, batch, seed=3, rank=0, world_size=1, drop_last=drop_last)
    ranks = [D.GlobalBatchSampler(n, batch, seed=3, rank=r, world_size=world, drop_last=drop_last)
             for r in range(world)]
    for epoch in (0, 1):
        for s in [single, *ranks]:
            s.set_epoch(epoch)
        ref = [[i for _, i in b] for b in single]
        per_rank = [[[i for _, i in b] for b in s] for s in ranks]
        assert all(len(p) == len(per_rank[0]) for p in per_rank)  # same number of steps on every rank
        for step, parts in enumerate(zip(*per_rank)):
            joined = [i for p in parts for i in p]
            assert joined == ref[step]
            assert max(map(len, parts)) - min(map(len, parts)) <= 1 and min(map(len, parts)) >= 1
        skipped = len(ref) - len(per_rank[0])
        assert skipped in (0, 1) and (skipped == 0 or len(ref[-1]) < world)
    single.set_epoch(0)
    e0 = [i for b in single for _, i in b]
    single.set_epoch(1)
    e1 = [i for b in single for _, i in b]
    assert sorted(e0) == list(range(n)) and e0 != e1  # a new permutation per epoch


def test_single_process_helpers_are_noops():
    t = torch.tensor([1.0, 2.0])
    assert D.all_reduce_tensors(t)[0] is t and t.tolist() == [1.0, 2.0]
    assert D.world_size() == 1 and D.rank() == 0 and D.is_main_process() and not D.is_distributed()
    assert D.all_gather_object(5) == [5] and D.broadcast_object("x") == "x"
    assert D.select_device("cpu").type == "cpu"
    assert D.shard_bounds(10, 0, 3) == (0, 4) and D.shard_bounds(10, 2, 3) == (7, 10)


def test_sync_bn_conversion_round_trip():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.BatchNorm1d(4 * 6 * 6)))
    keys = list(net.state_dict())
    weight = net[1].weight
    D.convert_sync_batchnorm(net, "cpu")
    assert isinstance(net[1], D.CPUSyncBatchNorm) and net[1].weight is weight
    assert list(net.state_dict()) == keys
    x = torch.randn(5, 3, 8, 8)
    net.train()
    y = net(x)  # outside a process group it is ordinary batch norm
    D.revert_sync_batchnorm(net)
    assert type(net[1]) is torch.nn.BatchNorm2d and type(net[2][1]) is torch.nn.BatchNorm1d
    assert net[1].weight is weight and y.shape == (5, 4 * 6 * 6)
