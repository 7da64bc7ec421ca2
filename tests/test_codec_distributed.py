"""`bitalloc codec train` under torchrun: 2 CPU processes (gloo) train one codec, ranks stay identical, and the
checkpoint resumes in one process."""

from __future__ import annotations

import json
import textwrap

import pytest

from bitalloc.codec.video_io import write_y4m
from tests.codec_util import moving_video
from tests.torchrun import run_torchrun

WORKER = textwrap.dedent('''
    import hashlib, json, sys
    from pathlib import Path
    import torch
    from bitalloc.cli import main
    from bitalloc.train import distributed as D

    out = Path(sys.argv[1])
    sizes = json.dumps({"n": 16, "nz": 8, "motion_n": 8, "motion_nz": 8, "lambdas": [0.005, 0.05]})
    code = main(["codec", "train", "--stage", "inter", "--videos", str(out / "clip.y4m"), "--steps", "3",
                 "--batch-size", "4", "--crop", "32", "--samples-per-epoch", "8", "--warmup-steps", "0",
                 "--codec-config", sizes, "--progress", "off", "--out", str(out / "ddp.pt")])
    assert code == 0
    from bitalloc.train.checkpoint import load_model_checkpoint
    model = load_model_checkpoint(out / "ddp.pt")
    h = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
    (out / f"rank{D.rank()}.json").write_text(json.dumps({"hash": h, "world": D.world_size()}))
''')


@pytest.mark.slow
@pytest.mark.xdist_group("torchrun")
def test_codec_training_under_torchrun(tmp_path):
    write_y4m(tmp_path / "clip.y4m", moving_video(4, 48, 64))
    (tmp_path / "worker.py").write_text(WORKER)
    run_torchrun(tmp_path / "worker.py", str(tmp_path))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["world"] == ranks[1]["world"] == 2
    assert ranks[0]["hash"] == ranks[1]["hash"]
    log = [json.loads(line) for line in (tmp_path / "ddp.pt.jsonl").read_text().splitlines()]
    assert log[0]["world_size"] == 2 and log[-1]["event"] == "end" and log[-1]["steps"] == 3
