"""Training the video codec through the one training loop (:func:`bitalloc.train.loop.fit`).

The codec plugs in as an objective with a ``task_loss`` hook: the rate-distortion loss
R + lambda_l * 255^2 * D averaged over a clip's frames (R in bits per luma pixel, D the MSE_YUV weighting
(6 Y + U + V) / 8 of the evaluation's PSNR; lambda_l the level's lambda, levels drawn per sample: gain units,
Cui et al. 2021). Everything else (optimizer groups, schedules, resumable checkpoints, progress bars, JSON logs,
torchrun / DDP) is the loop's.

Stages (``part``):

* ``"intra"``: one-frame clips (images and video frames); the inter codec is frozen;
* ``"inter"``: clips of T >= 2 frames, the first coded by the (frozen, eval-mode) intra codec, the others as P
  frames referencing the previous reconstruction (detached); the intra codec is frozen;
* ``"all"``: everything trains.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from bitalloc.errors import ConfigError
from bitalloc.train.loop import Objective

PARTS = ("intra", "inter", "all")


def _inner(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


#: the width selector's lr as a multiple of the base lr (CodecObjective.selector_lr_scale): 333 x the dynamic
#: stage's 6e-5 = 0.02
SELECTOR_LR_SCALE = 333.0


class CodecObjective(Objective):
    """Rate-distortion objective of :class:`bitalloc.codec.model.VideoCodec` (see the module docstring)."""

    def __init__(self, part: str = "intra", *, first: str = "intra", gain_lr_scale: float = 10.0,
                 gamma: float | None = None, selector_lr_scale: float = SELECTOR_LR_SCALE, step_lr_scale: float = 100.0,
                 freeze_codec: bool = False, encoder_only: bool = False, explore: float = 0.0):
        if part not in PARTS:
            raise ValueError(f"part={part!r}: choose one of {PARTS}")
        self.part = part
        self.first = first
        self.gain_lr_scale = gain_lr_scale
        #: the width selector (one small linear layer, trained from scratch in a fine-tuning stage whose base lr is
        #: set for the pretrained codec) learns at ``selector_lr_scale`` x the base lr: its features are of order 1,
        #: so Adam moves its logits by about that lr per update; 333 x 6e-5 = 0.02 lets them part by a few units in
        #: ~100 updates (measured: at 100 x, 150 updates left the choice near where the random init put it)
        self.selector_lr_scale = selector_lr_scale
        #: the region quantizers' log steps (bitalloc.quantizers.region: one update is a relative change of the step)
        #: learn at ``step_lr_scale`` x the base lr: 100 x 6e-5 moves a step by up to 0.6% per update
        self.step_lr_scale = step_lr_scale
        #: train only the width selector and the quantizers' steps (the codec's weights, gains and entropy models
        #: stay as trained): dynamic precision on top of a codec without changing it
        self.freeze_codec = freeze_codec
        #: train only the sender's networks (analysis and hyper analysis of every coder) against the fixed decoder
        #: (decoder networks, gains, entropy models), with rounding as coding does it (straight-through): the
        #: decoder, and every stream it reads, stay as they are
        self.encoder_only = encoder_only
        if freeze_codec and encoder_only:
            raise ValueError("freeze_codec and encoder_only train disjoint parameters: choose one")
        self.gamma = gamma  # dynamic precision: weight of the relative Bit-FLOPs (bitalloc.codec.dynamic)
        #: dynamic precision: share of frames coded at uniformly random widths (bitalloc.codec.dynamic.DynamicFrames)
        self.explore = explore
        self._table: Any = None
        self._roi: Any = None

    def _freeze(self, model: nn.Module) -> None:
        if self.encoder_only:
            from bitalloc.codec.precision import coders

            model.requires_grad_(False)
            for coder in coders(_inner(model)).values():
                coder.analysis.requires_grad_(True)
                coder.hyper_analysis.requires_grad_(True)
                coder.proxy = "ste"
            return
        if self.freeze_codec:
            for n, p in model.named_parameters():
                p.requires_grad_("quantizer." in n or "selector" in n.split(".")[:2])
            return
        if self.part == "intra":
            model.inter.requires_grad_(False)
        elif self.part == "inter":
            model.intra.requires_grad_(False)

    def on_train_start(self, model: nn.Module, info: Mapping[str, Any]) -> None:
        self._freeze(model)

    def on_epoch_start(self, model: nn.Module, epoch: int) -> None:
        self._freeze(model)

    def param_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The log gains get their own group at ``gain_lr_scale`` x the base lr: they set each level's quantization
        steps and must move far from their initialisation (a factor of e in ~500 steps at 2e-3)."""
        self._freeze(model)
        gains = [p for n, p in model.named_parameters() if n.endswith(("log_gain", "log_hyper_gain")) and p.requires_grad]
        groups = [{"params": gains, "name": "gains", "lr_scale": self.gain_lr_scale}] if gains else []
        sel = [p for n, p in model.named_parameters() if "selector" in n.split(".")[:2] and p.requires_grad]
        if sel:
            groups.append({"params": sel, "name": "selector", "lr_scale": self.selector_lr_scale})
        steps = [p for n, p in model.named_parameters() if n.endswith("quantizer.log_steps") and p.requires_grad]
        if steps:
            groups.append({"params": steps, "name": "log steps", "lr_scale": self.step_lr_scale})
        return groups

    def task_loss(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, float]]:
        inner = _inner(model)
        if self.part == "inter":
            inner.intra.eval()
        hook = None
        if self.gamma is not None:
            from bitalloc.codec.dynamic import BitFlopsTable, DynamicFrames
            from bitalloc.codec.roi import parse_roi_spec

            if self._table is None:
                self._table = BitFlopsTable.build(inner)
                self._roi = parse_roi_spec(inner.cfg.roi)
            hook = DynamicFrames(inner, self._table, self._roi, explore=self.explore, level=y)
        out = model(x, y, first=self.first, frame_hook=hook)
        loss, terms = inner.loss(x, y, out)
        logs: dict[str, float] = {}
        if hook is not None:
            cost = torch.stack([c.relative_bit_flops for c in hook.choices]).mean(0)  # [B], averaged over frames
            loss = loss + self.gamma * cost
            cands = torch.tensor(inner.selector.candidates, dtype=torch.float32)
            logs.update(bit_flops=float(cost.detach().mean()),
                        roi_bits=float(torch.stack([(c.roi.detach() * cands).sum(-1) for c in hook.choices]).mean()),
                        non_roi_bits=float(torch.stack([(c.non_roi.detach() * cands).sum(-1)
                                                        for c in hook.choices]).mean()))
        terms = {k: v.detach() for k, v in terms.items()}
        with torch.no_grad():
            mse = terms["mse"].clamp_min(1e-10)
            psnr = (10 * torch.log10(1.0 / mse)).mean()
        return loss.sum(), {"bpp": float(terms["bpp"].mean()), "psnr": float(psnr), **logs}


def codec_sources(videos: list[str], images: str | None, *, image_limit: int | None = None,
                  video_frames: int | None = None) -> list[Any]:
    """YUVFrames training sources: every frame of each video (even-sized) and the training part of an image
    folder / zip (:func:`bitalloc.codec.dataset.load_images`)."""
    from bitalloc.codec.dataset import load_images
    from bitalloc.codec.video_io import read_video

    sources = []
    for v in videos:
        f = read_video(v, frames=video_frames)
        h, w = f.height // 2 * 2, f.width // 2 * 2
        sources.append(f.crop(h, w) if (h, w) != (f.height, f.width) else f)
    if images:
        sources.extend(load_images(images, "train", limit=image_limit))
    return sources


def train_codec(model: nn.Module, sources: list[Any], cfg: Any, *, part: str = "intra", crop: int = 128,
                frames: int = 1, samples_per_epoch: int = 8000, first: str = "intra", gamma: float | None = None,
                image_share: float | None = 0.5, pan: int = 0, callbacks: tuple = (), freeze_codec: bool = False,
                selector_lr_scale: float = SELECTOR_LR_SCALE, encoder_only: bool = False, explore: float = 0.0) -> Any:
    """Train ``model`` (a VideoCodec) on random clips of ``sources`` with :func:`bitalloc.train.loop.fit`
    (``cfg``: a TrainConfig; its model_factory / model_kwargs should name ``bitalloc.codec.model:build_codec``)."""
    from bitalloc.codec.dataset import ClipDataset
    from bitalloc.train.loop import fit

    data = ClipDataset(sources, crop=crop, frames=frames, samples=samples_per_epoch, levels=model.cfg.levels,
                       image_share=image_share, pan=pan)
    objective = CodecObjective(part, first=first, gamma=gamma, freeze_codec=freeze_codec,
                               selector_lr_scale=selector_lr_scale, encoder_only=encoder_only, explore=explore)
    return fit(model, data, None, cfg, objective=objective, callbacks=callbacks)


# ---- command line: bitalloc codec train ------------------------------------------------------------------------

STAGES = {
    # stage: (part, first, default frames, default lr, default schedule, default steps)
    "intra": ("intra", "intra", 1, 2e-4, "cosine", 20000),
    "inter": ("inter", "reference", 2, 2e-4, "constant", 6000),
    "joint": ("inter", "intra", 3, 1e-4, "cosine", 2000),
    "qat": ("all", "intra", 3, 2e-5, "cosine", 1000),
    # post-training quantization: min-max calibrated fixed grids, no optimizer steps
    "ptq": ("all", "intra", 3, 0.0, "constant", 0),
    # dynamic precision: 6e-5 (not qat's 2e-5) lets the shared weights adapt to the narrow widths, and 3-frame clips
    # train P frames on P references (measured in the session of 2026-12-07, twentieth: 4/4 BD-rate against FP32 on
    # 16 frames of carphone / tree +1.1% / +3.1% after 700 steps, against +7.9% / +8.9% at 2e-5 on 2 frames)
    "dynamic": ("all", "intra", 3, 6e-5, "cosine", 700),
    # the sender's networks against a shipped (quantized, frozen) decoder
    "encoder": ("all", "intra", 3, 1e-4, "cosine", 300),
}


def add_train_args(p: Any) -> None:
    """Options of ``bitalloc codec train`` (docs/codec.md gives the commands that made the shipped weights)."""
    p.add_argument("--stage", choices=tuple(STAGES), required=True,
                   help="intra: I-frame codec on images and frames; inter: P-frame codec (motion, residual) on frame "
                        "pairs with uncoded references; joint: the P-frame codec on 3-frame clips (I P P) whose "
                        "references are the intra codec's and its own reconstructions (intra frozen); qat: 8-bit LSQ "
                        "fine-tuning of the decoder networks, then frozen into the shippable weights (--ship); ptq: the "
                        "same networks on min-max calibrated 8-bit grids without training, frozen and shipped; "
                        "dynamic: ROI-aware per-frame widths (--candidates, --gamma, --roi) from a float codec; "
                        "encoder: the analysis and hyper analysis networks of codec weights (--init, default the "
                        "shipped ones) trained against their fixed decoder with rounding as coding does it (the "
                        "decoder, its tables and the streams it reads do not change), shipped with --ship")
    p.add_argument("--videos", nargs="*", default=[], help="training videos (random crops of consecutive frames)")
    p.add_argument("--images", help="folder or zip of training images (ImageFolder layout; every 10th held out); in "
                   "stages of clips of several frames each image makes clips by a synthetic pan (--image-pan)")
    p.add_argument("--out", help="training checkpoint (resumable with --resume); every stage but ptq")
    p.add_argument("--init", help="start from this checkpoint (its whole codec), or from codec weights (--ship "
                   "output, e.g. the shipped ones: their float weights)")
    p.add_argument("--init-inter", help="take the inter codec from this checkpoint (with --init for the intra one)")
    p.add_argument("--codec-config", help="sizes of a fresh codec as JSON, e.g. '{\"n\": 64, \"m\": 96}' (fields of "
                                          "bitalloc.codec.model.CodecConfig; default: the shipped codec's)")
    p.add_argument("--residual-context", action="store_true",
                   help="conditional reconstruction of P frames: the residual synthesis reads the motion-compensated "
                        "prediction (a context branch added to a codec from --init, starting at zero so that it codes as "
                        "before; or part of a fresh codec)")
    p.add_argument("--prior-context", action="store_true",
                   help="conditional entropy model of P frames: the residual's hyper synthesis reads the motion-"
                        "compensated prediction (a context branch added to a codec from --init, starting at zero so "
                        "that it codes as before; or part of a fresh codec)")
    p.add_argument("--steps", type=int, help="optimizer steps (default per stage: intra 20000, inter 6000, joint 2000, "
                                             "qat 1000, dynamic 700, encoder 300)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, help="Adam learning rate (default per stage)")
    p.add_argument("--schedule", help="lr schedule (default per stage: cosine, or constant for inter)")
    p.add_argument("--warmup-steps", type=int, default=200)
    p.add_argument("--crop", type=int, default=128, help="crop size in luma pixels (multiple of 16)")
    p.add_argument("--frames", type=int, help="frames per clip (default per stage: intra 1, inter 2, "
                                                               "3 otherwise)")
    p.add_argument("--samples-per-epoch", type=int, help="clips per epoch (8000 intra, 4000 otherwise)")
    p.add_argument("--image-share", default="0.5", help="share of the samples drawn from --images when --videos are "
                                                        "given too (default 0.5; 'area' = by area)")
    p.add_argument("--image-pan", type=int, default=8, help="clips of several frames from --images: a pan of up to "
                   "this many luma pixels per frame in each direction, one random velocity per clip (default 8)")
    p.add_argument("--bits", type=int, default=8, help="qat: bits of the decoder networks' weights and activations")
    p.add_argument("--ship", help="qat / dynamic: write the codec weights here (what encode / decode load)")
    p.add_argument("--gamma", type=float, help="dynamic: weight of the relative Bit-FLOPs in the loss "
                                               "(R + lambda D + gamma C)")
    p.add_argument("--selector-lr-scale", type=float,
                   help=f"dynamic: the width selector's lr as a multiple of --lr (default {SELECTOR_LR_SCALE:g})")
    p.add_argument("--freeze-codec", action="store_true",
                   help="dynamic: train only the width selector and the quantizers' steps (the codec's weights stay)")
    p.add_argument("--explore", type=float, metavar="P",
                   help="dynamic: share of frames coded at uniformly random widths instead of the selector's sample, "
                        "so that every candidate width trains the shared weights (default 0; see docs/roi.md)")
    p.add_argument("--per-level-selector", action="store_true",
                   help="dynamic: the width selector has a learned bias per quality level (docs/roi.md)")
    p.add_argument("--candidates", default="4,8,16", help="dynamic: candidate bit widths (default 4,8,16)")
    p.add_argument("--hyper-bits", type=int, help="dynamic: width of the hyper synthesis' fixed grids (default 8; 4 "
                                                  "for a {2,4,8} codec, see docs/roi.md)")
    p.add_argument("--roi", default="spectral", help="dynamic: ROI source (spectral, motion, faces, mask:PATH; "
                                                     "see docs/roi.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--overwrite", action="store_true", help="start afresh even if --out exists")
    p.add_argument("--threads", type=int, help="torch threads per process")
    p.add_argument("--progress", choices=("auto", "bar", "log", "off"), default="auto")


#: the stages that write codec weights (--ship)
SHIPPING = ("qat", "ptq", "dynamic", "encoder")


def encoder_stage_model(path: str | None) -> Any:
    """The codec whose encoder ``--stage encoder`` trains: codec weights (``path``, default the shipped ones) with
    quantized, frozen decoder networks and one fixed precision; ConfigError naming the fix otherwise."""
    from bitalloc.codec.precision import is_quantized
    from bitalloc.codec.weights import load_default_or

    model = load_default_or(path)
    if not is_quantized(model) or model.cfg.candidates:
        raise ConfigError(f"--stage encoder trains the encoder of fixed-precision codec weights (a file written by "
                          f"--stage ptq or qat --ship); {path} is not one")
    return model


def load_float_start(path: str) -> Any:
    """The float codec to start a stage from (or to compare with): a training checkpoint of ``bitalloc codec train``,
    or codec weights written by ``--ship`` (:func:`bitalloc.codec.precision.float_codec`: their weights as stored,
    the large tensors float16-rounded and the decoder networks' weights as their quantizers left them), in eval
    mode with its coding tables updated; CheckpointError naming the fix for anything else."""
    from bitalloc.codec.model import VideoCodec
    from bitalloc.codec.precision import FORMAT, codec_from_state, coders, float_codec
    from bitalloc.io import torch_load
    from bitalloc.train.checkpoint import load_model_checkpoint

    state = torch_load(path, what="codec checkpoint", fix="give a checkpoint written by `bitalloc codec train --out` "
                       "or codec weights written by --ship")
    if isinstance(state, dict) and state.get("format") == FORMAT:
        return float_codec(codec_from_state(state, path)).eval()
    model = load_model_checkpoint(path)
    if not isinstance(model, VideoCodec):
        raise ConfigError(f"{path} holds a {type(model).__name__}, not a codec; give a checkpoint written by "
                          "`bitalloc codec train` (e.g. the joint stage) or codec weights written by --ship")
    for c in coders(model).values():
        c.update()
    return model.eval()


def build_stage_model(args: Any) -> Any:
    """The codec a stage starts from: fresh, or --init (and --init-inter); quantized for qat."""
    import json

    from bitalloc.codec.model import build_codec, with_context

    if args.codec_config and args.init:
        raise ConfigError("--codec-config sets the sizes of a fresh codec; --init already gives one: drop one of them")
    kwargs = {}
    if args.codec_config:
        try:
            kwargs = json.loads(args.codec_config)
            model = build_codec(**kwargs)
        except (json.JSONDecodeError, TypeError) as exc:
            raise ConfigError(f"--codec-config {args.codec_config!r} is not a JSON object of CodecConfig fields ({exc})"
                              ) from None
    model = load_float_start(args.init) if args.init else build_codec(**kwargs)
    model = with_context(model, residual=args.residual_context, prior=args.prior_context)
    if args.init_inter:
        other = load_float_start(args.init_inter)
        # the intra codec of one with the P-frame codec of another that has a context branch (or gets it now)
        branches = {"residual": model.cfg.residual_context or other.cfg.residual_context,
                    "prior": model.cfg.prior_context or other.cfg.prior_context}
        model, other = with_context(model, **branches), with_context(other, **branches)
        if other.cfg != model.cfg:
            raise ConfigError(f"--init-inter {args.init_inter} has another codec configuration than --init; give "
                              "checkpoints of the same codec")
        model.inter.load_state_dict(other.inter.state_dict())
    return model


def run_train_cli(args: Any) -> int:
    """``bitalloc codec train``: build the stage's model and data, train with the loop, ship (qat)."""
    import torch

    from bitalloc.codec.precision import (calibrate_codec, decoder_quant_configs, freeze_decoders, quantize_decoders,
                                          save_codec)
    from bitalloc.train.loop import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    part, first, frames, lr, schedule, steps = STAGES[args.stage]
    frames = args.frames or frames
    if args.stage == "intra" and frames != 1:
        raise ConfigError("--stage intra trains on single frames; drop --frames")
    if args.stage not in ("intra", "encoder") and frames < 2:
        raise ConfigError(f"--stage {args.stage} needs clips of at least 2 frames (--frames)")
    if args.stage in ("intra", "encoder") and not (args.videos or args.images):
        raise ConfigError("give training data: --videos and/or --images")
    if args.stage not in ("intra", "encoder") and not args.videos:
        raise ConfigError(f"--stage {args.stage} trains on video: give --videos")
    if args.image_pan < 0 or args.image_pan % 2:
        raise ConfigError(f"--image-pan {args.image_pan}: give an even number of luma pixels >= 0 (whole chroma "
                          "pixels)")
    if args.images and args.stage == "ptq":
        raise ConfigError("--stage ptq calibrates on --videos only: drop --images")
    if args.images and frames > 1 and not args.image_pan:
        raise ConfigError(f"--images with clips of {frames} frames needs --image-pan > 0 (images have one frame): "
                          "give --image-pan 8, or drop --images")
    if args.stage in SHIPPING and not args.ship:
        raise ConfigError(f"--stage {args.stage} writes the codec weights: give --ship FILE")
    if args.ship and args.stage not in SHIPPING:
        raise ConfigError(f"--ship belongs to --stage {', '.join(SHIPPING)}")
    if args.stage in ("joint", "qat", "ptq", "dynamic") and not args.init:
        raise ConfigError(f"--stage {args.stage} fine-tunes a trained codec: give --init (and --init-inter)")
    if args.stage != "ptq" and not args.out:
        raise ConfigError(f"--stage {args.stage} trains: give --out (the training checkpoint)")
    if args.stage == "ptq" and (args.steps or args.out or args.resume):
        raise ConfigError("--stage ptq calibrates without training and writes only --ship: drop --steps / --out / "
                          "--resume (or use --stage qat)")
    for flag in ("residual_context", "prior_context"):
        if getattr(args, flag) and args.stage in ("ptq", "encoder"):
            raise ConfigError(f"--{flag.replace('_', '-')} adds a branch that needs training; --stage {args.stage} does "
                              "not train the decoder: give it with --stage inter or joint (the codec it makes keeps "
                              "the branch)")
    if args.explore is not None and (args.stage != "dynamic" or not 0.0 <= args.explore <= 1.0):
        raise ConfigError(f"--explore {args.explore}: it belongs to --stage dynamic and is a share of frames, 0 to 1")
    if args.freeze_codec and args.stage != "dynamic":
        raise ConfigError("--freeze-codec belongs to --stage dynamic")
    if args.per_level_selector and args.stage != "dynamic":
        raise ConfigError("--per-level-selector belongs to --stage dynamic (or fit one with `bitalloc codec "
                          "fit-selector --per-level`)")
    if args.selector_lr_scale is not None and (args.stage != "dynamic" or args.selector_lr_scale <= 0):
        raise ConfigError("--selector-lr-scale belongs to --stage dynamic and must be positive")
    if args.hyper_bits is not None and (args.stage != "dynamic" or not 2 <= args.hyper_bits <= 16):
        raise ConfigError("--hyper-bits belongs to --stage dynamic and must be 2 to 16 (bits)")
    if (args.gamma is None) != (args.stage != "dynamic"):
        raise ConfigError("--gamma belongs to --stage dynamic (and that stage needs it)")
    model = encoder_stage_model(args.init) if args.stage == "encoder" else build_stage_model(args)
    sources = codec_sources(args.videos, args.images)
    if args.stage == "ptq":  # bitalloc's post-training path: calibrated min-max grids, frozen, shipped
        quantize_decoders(model, decoder_quant_configs(args.bits, "fixed"))
        calibrate_codec(model, sources, frames=frames, crop=args.crop, seed=args.seed)
        freeze_decoders(model)
        save_codec(model.eval(), args.ship, extra={"trained_by": f"bitalloc codec train --stage ptq --init {args.init}"})
        print(f"codec weights: {args.ship}")
        return 0
    if args.stage == "qat":
        quantize_decoders(model, decoder_quant_configs(args.bits, "lsq"))
        calibrate_codec(model, sources, frames=frames, crop=args.crop, seed=args.seed)
    if args.stage == "dynamic":
        from bitalloc.codec.dynamic import prepare_dynamic, with_candidates

        model = with_candidates(model, _widths(args.candidates), args.roi, per_level=args.per_level_selector)
        prepare_dynamic(model, hyper_bits=args.hyper_bits or 8)
        calibrate_codec(model, sources, frames=frames, crop=args.crop, seed=args.seed)
    cfg = TrainConfig(steps=args.steps or steps, batch_size=args.batch_size, optimizer="adam", lr=args.lr or lr,
                      schedule=args.schedule or schedule, warmup_steps=args.warmup_steps, max_grad_norm=1.0,
                      checkpoint=args.out, resume="auto" if args.resume else False, overwrite=args.overwrite,
                      log=str(args.out) + ".jsonl", model_factory="bitalloc.codec.model:build_codec",
                      model_kwargs=model.cfg.to_dict(), progress=args.progress, device="cpu", seed=args.seed,
                      dataset="codec-clips")
    samples = args.samples_per_epoch or (8000 if args.stage == "intra" else 4000)
    train_codec(model, sources, cfg, part=part, crop=args.crop, frames=frames, samples_per_epoch=samples, first=first,
                gamma=args.gamma, image_share=_share(args.image_share), pan=args.image_pan,
                freeze_codec=args.freeze_codec,
                selector_lr_scale=args.selector_lr_scale or SELECTOR_LR_SCALE, encoder_only=args.stage == "encoder",
                explore=args.explore or 0.0)
    if args.stage in ("qat", "dynamic", "encoder"):
        if args.stage == "qat":
            freeze_decoders(model)  # dynamic codecs keep their K steps; VideoCoder freezes one branch per width
        save_codec(model.eval(), args.ship,
                   extra={"trained_by": f"bitalloc codec train --stage {args.stage} --out {args.out}",
                          "gamma": args.gamma, "freeze_codec": bool(args.freeze_codec), "steps": cfg.steps,
                          "explore": args.explore or 0.0})
        print(f"codec weights: {args.ship}")
    return 0


def _share(text: str) -> float | None:
    if str(text) == "area":
        return None
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not 0.0 < v < 1.0:
        raise ConfigError(f"--image-share {text!r}: give a fraction between 0 and 1, or 'area'")
    return v


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(sorted({int(t) for t in str(text).split(",") if t.strip()}))
    except ValueError:
        raise ConfigError(f"--candidates {text!r}: give comma-separated bit widths, e.g. 4,8,16") from None
    if len(widths) < 2 or any(not 2 <= b <= 16 for b in widths):
        raise ConfigError(f"--candidates {text!r}: give at least two widths between 2 and 16, e.g. 4,8,16 or 2,4,8")
    return widths
