"""One variable-rate codec or one codec per rate? Equal extra training from the same start, compared at one level.

    python benchmarks/codec_rate_modes.py --init runs/codec/intra.pt --data "$DATA" --steps 250 --level 3

From the intra-codec checkpoint ``--init`` (trained with gain units at every quality level), two runs of
``--steps`` more steps each (batch 8, 128x128 crops, Adam 1e-4 cosine, seed 5, one thread):

* variable: the same codec, levels drawn uniformly, every level's lambda (what ships);
* single: a one-level codec (lambdas = (lambda_L,)) holding the same weights and level L's gains, trained at
  lambda_L only: the "one model per rate" alternative, given the same training.

Both are evaluated at level L on 48 held-out ImageNet images (every tenth image, 256x256 centre crops): bits per
pixel from the likelihoods (rounded latents), PSNR_YUV, and the rate-distortion loss J = bpp + lambda_L 255^2 MSE
(lower is better). One model per rate multiplies the weights to ship by the number of levels; it pays only if its
J is clearly lower. Writes benchmarks/results/codec_rate_modes.json and the BENCHMARKS.md section
"codec-rate-modes".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, command_line, git_revision, machine, md_table, update_section  # noqa: E402

from bitalloc.io import write_json  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "codec_rate_modes.json"


def single_rate_copy(base, level: int):
    """A one-level codec with ``base``'s weights and level ``level``'s gains and lambda."""
    from bitalloc.codec.model import build_codec

    model = build_codec(**{**base.cfg.to_dict(), "lambdas": (base.cfg.lambdas[level],)})
    own = model.state_dict()
    for k, v in base.state_dict().items():
        if own[k].shape == v.shape:
            own[k] = v
        elif v.dim() >= 2 and v.shape[1] == base.cfg.levels:  # [2, levels, C] gains
            own[k] = v[:, level:level + 1]
        else:  # [levels] lambdas
            own[k] = v[level:level + 1]
    model.load_state_dict(own)
    return model


def run(mode: str, args: argparse.Namespace, out: Path) -> dict:
    from bitalloc.codec.dataset import frames_to_tensor, load_images
    from bitalloc.codec.model import bits_of
    from bitalloc.codec.networks import weighted_mse
    from bitalloc.train.codec import codec_sources, load_float_start, train_codec
    from bitalloc.train.loop import TrainConfig

    base = load_float_start(args.init)
    lam = base.cfg.lambdas[args.level]
    model = single_rate_copy(base, args.level) if mode == "single" else base
    d = Path(args.data)
    src = codec_sources([str(d / "video" / v) for v in ("bikes.mp4", "dhf1k_0068.avi", "vtest.avi")],
                        str(d / "imagenet-sample.zip"))
    cfg = TrainConfig(steps=args.steps, batch_size=8, optimizer="adam", lr=1e-4, schedule="cosine", warmup_steps=0,
                      max_grad_norm=1.0, checkpoint=str(out / f"rate_{mode}.pt"), overwrite=True,
                      log=str(out / f"rate_{mode}.jsonl"), model_factory="bitalloc.codec.model:build_codec",
                      model_kwargs=model.cfg.to_dict(), progress="log", device="cpu", seed=5)
    train_codec(model, src, cfg, part="intra", crop=128, frames=1, samples_per_epoch=args.steps * 8)
    model.eval()
    imgs = load_images(str(d / "imagenet-sample.zip"), "test", limit=48, min_size=256)
    x = torch.cat([frames_to_tensor(im.crop(256, 256, (im.height - 256) // 4 * 2, (im.width - 256) // 4 * 2))
                   for im in imgs])
    with torch.no_grad():
        o = model.intra(x, torch.full((len(x),), 0 if mode == "single" else args.level))
        bpp = (bits_of(o["likelihoods"]) / (256 * 256)).mean().item()
        mse = weighted_mse(o["x_hat"].clamp(0, 1), x)
        psnr = (10 * torch.log10(1 / mse)).mean().item()
    return {"mode": mode, "steps": args.steps, "level": args.level, "lambda": lam, "bpp": bpp, "psnr_yuv": psnr,
            "rd_loss": bpp + lam * 255 ** 2 * mse.mean().item(), "images": len(x),
            "weights_to_ship": 1 if mode == "variable" else base.cfg.levels}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--init", required=True, help="intra-codec training checkpoint (bitalloc codec train --stage intra)")
    ap.add_argument("--data", required=True, help="the benchmark data folder (video/, imagenet-sample.zip)")
    ap.add_argument("--steps", type=int, default=250)
    ap.add_argument("--level", type=int, default=3)
    ap.add_argument("--work", default="runs/codec-rate-modes", help="folder for the two runs' checkpoints and logs")
    ap.add_argument("--no-md", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    rows = [run(m, args, out) for m in ("single", "variable")]
    res = {"command": command_line(), "revision": git_revision(), "machine": machine(), "init": args.init, "rows": rows}
    text = "\n".join([
        "### One variable-rate codec or one codec per rate", "",
        f"From `{args.init}`, {args.steps} more training steps each, evaluated at level {args.level} "
        f"(lambda {rows[0]['lambda']}) on {rows[0]['images']} held-out ImageNet images (256x256); J = bpp + lambda "
        "255^2 MSE, lower is better.", "",
        md_table(["codec", "bits/pixel", "PSNR YUV", "J", "weight files to ship"],
                 [[r["mode"], f"{r['bpp']:.4f}", f"{r['psnr_yuv']:.2f}", f"{r['rd_loss']:.4f}", r["weights_to_ship"]]
                  for r in rows]), "",
        f"Machine: {res['machine']}. Revision {res['revision']}. Command: `{res['command']}`"])
    print(text)
    if not args.no_md:
        write_json(RESULTS, res)
        update_section("codec-rate-modes", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
