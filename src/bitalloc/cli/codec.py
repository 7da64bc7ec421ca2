"""``bitalloc codec``: the learned video codec from the command line.

::

    bitalloc codec encode INPUT -o OUT.bav --quality Q [--frames N] [--intra-period P]   # any FFmpeg input
    bitalloc codec decode OUT.bav -o REC.y4m | REC.mkv | FOLDER/ [--reference INPUT]
    bitalloc codec info OUT.bav
    bitalloc codec eval --clips a.mp4 b.avi [--images imagenet-sample.zip] --out DIR
    bitalloc codec train --stage intra|inter|joint|qat ...                              (see docs/codec.md)

Encoding prints a summary (frames, bytes, bits per pixel, kbps, PSNR, encode and decode fps) and, with
``--verify`` (the default), decodes the written file again and checks that it reproduces the encoder's
reconstruction bit for bit.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from bitalloc.errors import ConfigError, DataError


def register(sub: Any) -> None:
    from bitalloc.codec.codec import add_p_level_args
    from bitalloc.codec.refine import add_refine_args

    p = sub.add_parser("codec", help="the learned video codec: encode, decode, info, eval, train",
                       description="Encode and decode video with bitalloc's learned codec (integer-exact decoder, "
                                   "per-frame bit widths in the stream), evaluate it against x265 and JPEG, train it.")
    cs = p.add_subparsers(dest="codec_command", metavar="SUBCOMMAND")
    cs.required = True

    e = cs.add_parser("encode", help="encode a video (any FFmpeg input, y4m, PNG folder, image) into a .bav stream")
    e.add_argument("input", help="video file (mp4, avi, mkv, y4m ...), folder of PNG frames, or an image")
    e.add_argument("-o", "--output", required=True, help="the .bav stream to write")
    e.add_argument("--quality", "-q", type=int, required=True, help="quality level (0 = lowest rate; see `codec info`)")
    e.add_argument("--frames", type=int, help="encode only the first N frames")
    e.add_argument("--start", type=int, default=0, help="first frame to encode (default 0)")
    e.add_argument("--intra-period", type=int, default=32, help="an I frame every P frames; -1: only the first (32)")
    e.add_argument("--motion-preset", choices=("ultrafast", "fast", "medium"), default="medium",
                   help="speed of the encoder's motion estimation (DIS optical flow preset)")
    e.add_argument("--adaptive-intra", action="store_true",
                   help="also try every P frame as an I frame and keep the cheaper (rate + lambda * distortion): "
                        "scene cuts, content motion does not predict; twice the encoding work for P frames")
    e.add_argument("--analysis-scales", metavar="A,B,...", default=None,
                   help="weights of the analysis' nonlinear branch the encoder tries on every frame, keeping the "
                        "payload of least rate + lambda * distortion (default 0,0.25,0.5,0.75,1: one encode each; "
                        "1 alone encodes fastest); the stream and the decoder do not depend on it")
    add_refine_args(e)
    add_p_level_args(e)
    e.add_argument("--dynamic", action="store_true",
                   help="ROI-aware dynamic precision: per-frame bit widths for the region of interest and the rest, "
                        "chosen by the codec's selector and written in the stream (the shipped dynamic weights, or "
                        "--weights of a codec trained with --stage dynamic)")
    e.add_argument("--roi", help="with --dynamic: the ROI source (spectral, motion, faces, mask:PATH; default: the "
                                 "codec's, see docs/roi.md)")
    e.add_argument("--widths", metavar="R,N|search",
                   help="with --dynamic: code every frame at ROI width R and non-ROI width N (candidates of the codec) "
                        "instead of the selector's choice (the ROI mask is still computed and coded); or 'search': "
                        "code every frame at every pair and keep the one of least rate + lambda * distortion + "
                        "--gamma * relative Bit-FLOPs (K^2 times the encoding work; the decoder needs nothing more)")
    e.add_argument("--gamma", type=float, help="with --widths search: weight of the frame's Bit-FLOPs relative to 8 "
                                                "bits everywhere (the training objective's gamma)")
    e.add_argument("--lookahead", type=int, default=0, metavar="N",
                   help="with --widths search: score each pair by its frame plus the next N frames coded at the same "
                        "pair from its reconstruction ((1 + N) times the search's work; default 0)")
    e.add_argument("--shortlist", type=int, metavar="M",
                   help="with --lookahead: look ahead from the M pairs that code the frame itself best only, and "
                        "keep the best of those (K^2 + M N trials per frame instead of K^2 (1 + N); default: all)")
    _common(e)
    e.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip decoding the written stream again (by default it is decoded and compared bit for bit)")
    e.add_argument("--reconstruction", help="also write the encoder's reconstruction (.y4m / .mkv / folder)")
    e.set_defaults(func=run_encode)

    d = cs.add_parser("decode", help="decode a .bav stream into y4m, lossless video (FFV1 .mkv) or PNG frames")
    d.add_argument("input", help="the .bav stream")
    d.add_argument("-o", "--output", required=True, help="REC.y4m, REC.mkv (lossless FFV1) or a folder for PNG frames")
    d.add_argument("--frames", type=int, help="decode only the first N frames")
    d.add_argument("--reference", help="the source video, to report PSNR")
    _common(d)
    d.set_defaults(func=run_decode)

    i = cs.add_parser("info", help="print a .bav stream's header and frames, or the codec's quality levels")
    i.add_argument("input", nargs="?", help="a .bav stream (omit to describe the codec weights)")
    i.add_argument("--weights", help="codec weights file (default: the weights shipped with bitalloc)")
    i.add_argument("--json", help="write the description as JSON here")
    i.add_argument("--layers", action="store_true",
                   help="also list every layer of every network: quantized or float, its widths, and why")
    i.set_defaults(func=run_info)

    from bitalloc.codec.evaluate import add_eval_args
    from bitalloc.train.codec import add_train_args

    ev = cs.add_parser("eval", help="rate-distortion evaluation against x265 (and JPEG / x265 intra on images)")
    add_eval_args(ev)
    ev.set_defaults(func=run_eval)

    t = cs.add_parser("train", help="train the codec (stages: intra, inter, joint, qat, dynamic); see docs/codec.md")
    add_train_args(t)
    t.set_defaults(func=run_train)

    f = cs.add_parser("fit-selector", help="fit a dynamic codec's width selector to the encoder's width search on "
                                           "videos (per-frame costs of every width pair); see docs/roi.md")
    f.add_argument("videos", nargs="*", help="training videos (any FFmpeg input, y4m, PNG folders)")
    f.add_argument("-o", "--output", required=True, help="the codec weights to write (the input's, new selector)")
    f.add_argument("--gamma", type=float, required=True,
                   help="weight of the relative Bit-FLOPs in each frame's cost (rate + lambda D + gamma C)")
    f.add_argument("--frames", type=int, default=16, help="first N frames of each video (16)")
    f.add_argument("--levels", default="1,3,5,7", help="quality levels to code each video at (1,3,5,7)")
    f.add_argument("--crop", metavar="WxH", help="code the centre WxH of each video (faster on large videos)")
    f.add_argument("--intra-period", type=int, default=32, help="an I frame every P frames; -1: only the first (32)")
    f.add_argument("--analysis-scales", metavar="A,B,...", default=None,
                   help="the encoder's analysis scales during the search (default: encode's)")
    f.add_argument("--roi", help="the ROI source (default: the codec's)")
    f.add_argument("--lookahead", type=int, default=0, metavar="N",
                   help="search with N frames of lookahead (encode --lookahead): each pair's cost includes the next "
                        "N frames coded at it ((1 + N) times the work; default 0)")
    f.add_argument("--costs", choices=("search", "fixed"), default="search",
                   help="search: each frame's cost at every pair from the width search (every pair tried on the frame "
                        "from one reference; default); fixed: each video coded at every pair throughout, each frame "
                        "costed in the encode at its pair (what a fixed assignment does to the frames that follow; "
                        "docs/roi.md)")
    f.add_argument("--per-level", action="store_true",
                   help="a selector with a learned bias per quality level (it may choose differently at each rate "
                        "point; docs/roi.md); default: one rule at every level")
    f.add_argument("--l2", type=float, default=1e-3, help="weight decay of the fit (1e-3)")
    f.add_argument("--cross-validate", action="store_true",
                   help="also fit a selector with each video left out and cost it on that video against the best "
                        "fixed pair there (leave-one-video-out; needs two or more videos): does the fit generalise?")
    f.add_argument("--from-search", metavar="REPORT.json",
                   help="encode nothing: fit again (e.g. at another --gamma) to the search costs that an earlier "
                        "--json report keeps, made with the same --weights (its frames' choices were made at its gamma)")
    _common(f)  # --weights: dynamic weights (default: the shipped dynamic codec); --json: the report
    f.set_defaults(func=run_fit_selector, dynamic=True)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", help="codec weights file (default: the weights shipped with bitalloc)")
    p.add_argument("--json", help="write the summary as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")


def _check_out(path: str | None, overwrite: bool) -> None:
    if path and Path(path).exists() and not overwrite:
        raise ConfigError(f"{path} already exists; pass --overwrite to replace it, or choose another path")


def _setup(args: argparse.Namespace, stream: bytes | None = None) -> Any:
    """The coder for encode (the codec of --weights, or the shipped one; --dynamic: the dynamic-precision one) or
    for decoding ``stream`` (the shipped codec whose model id the stream names, or --weights)."""
    import torch

    from bitalloc.codec.codec import ANALYSIS_SCALES, VideoCoder
    from bitalloc.codec.refine import DEFAULT_LR
    from bitalloc.codec.weights import load_default_or, load_for_stream

    if getattr(args, "threads", None):
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads}: give a positive number")
        torch.set_num_threads(args.threads)
    dynamic, roi = getattr(args, "dynamic", False), getattr(args, "roi", None)
    if stream is not None:
        from bitalloc.codec.bitstream import StreamHeader

        model = load_for_stream(StreamHeader.unpack(stream[:64], source=str(args.input)).model_id, args.weights)
    else:
        model = load_default_or(args.weights, dynamic=dynamic)
    if dynamic and not model.cfg.candidates:
        raise ConfigError(f"--dynamic and fit-selector need dynamic-precision weights; {args.weights} has one fixed "
                          "precision (train one with `bitalloc codec train --stage dynamic`)")
    if roi and not dynamic:
        raise ConfigError("--roi goes with --dynamic")
    scales = getattr(args, "analysis_scales", None)  # VideoCoder checks them
    return VideoCoder(model, motion_preset=getattr(args, "motion_preset", "medium"), roi=roi,
                      analysis_scales=ANALYSIS_SCALES if scales is None else scales,
                      adaptive_intra=getattr(args, "adaptive_intra", False),
                      refine_steps=getattr(args, "refine_steps", 0), refine_lr=getattr(args, "refine_lr", DEFAULT_LR),
                      p_level_offsets=getattr(args, "p_level_offsets", "0"))


def _counts(values: Any) -> str | None:
    """How often each value occurs, in order, e.g. "0.25 x12, 0.5 x4"; None for no values."""
    from collections import Counter

    return ", ".join(f"{v:g} x{n}" for v, n in sorted(Counter(values).items())) or None


def _bar(total: int, desc: str) -> Any:
    from bitalloc.train.progress import Progress

    return Progress(total, desc, mode="auto")


def _frames_target(path: str) -> str:
    """The form of a frames output by its name: "y4m", "mkv" (lossless FFV1) or "png" (a folder)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".y4m", ".mkv"):
        return suffix[1:]
    if suffix:
        raise ConfigError(f"output {path}: unsupported extension {suffix!r}; use .y4m, .mkv (lossless FFV1) or a "
                          "folder name (PNG frames)")
    return "png"


def write_frames(path: str, frames: Any) -> Path:
    """Write decoded frames by the output's form: .y4m, .mkv (lossless FFV1), or a folder of PNG frames."""
    from bitalloc.codec.video_io import write_lossless, write_png_frames, write_y4m

    writer = {"y4m": write_y4m, "mkv": write_lossless, "png": write_png_frames}[_frames_target(path)]
    return writer(path, frames)


def _summary_rows(s: dict[str, Any]) -> list[list[Any]]:
    keys = [("frames", "frames"), ("size", "size"), ("bytes", "bytes"), ("bits per pixel", "bpp"), ("kbps", "kbps"),
            ("PSNR YUV (dB)", "psnr_yuv"), ("PSNR Y (dB)", "psnr_y"), ("PSNR RGB (dB)", "psnr_rgb"),
            ("encode fps", "encode_fps"), ("analysis scales chosen", "analysis_scales"),
            ("P-frame levels chosen", "p_levels"),
            ("frames with refined latents", "frames_refined"), ("decode fps", "decode_fps"),
            ("exact decode", "exact"),
            ("widths by search, gamma", "width_search_gamma"), ("search lookahead (frames)", "width_search_lookahead"),
            ("search shortlist (pairs)", "width_search_shortlist"),
            ("ROI source", "roi_source"),
            ("ROI share of the frame", "roi_fraction"), ("mean ROI bits", "mean_roi_bits"),
            ("mean non-ROI bits", "mean_non_roi_bits"), ("width fields' share of the rate", "width_fields_share"),
            ("ROI mask's share of the rate", "mask_share"), ("ROI ms per frame", "roi_ms_per_frame")]
    return [[label, s[k]] for label, k in keys if s.get(k) is not None]


def _parse_widths(text: str, coder: Any) -> tuple[int, int]:
    """``--widths R,N`` -> (R, N), checked against the codec's candidates (one-line ConfigError naming them)."""
    try:
        return coder.check_widths([int(t) for t in text.split(",")])
    except (ValueError, ConfigError):
        raise ConfigError(f"--widths {text!r}: give two widths R,N (ROI, non-ROI) among this codec's candidate widths "
                          f"{sorted(coder.model.cfg.candidates)}") from None


def _parse_levels(text: str, levels: int) -> list[int]:
    from bitalloc.codec.evaluate import _ints

    out = _ints(text, "--levels")
    if not out or any(not 0 <= v < levels for v in out):
        raise ConfigError(f"--levels {text!r}: give comma-separated quality levels among 0..{levels - 1}")
    return out


def _parse_crop(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        w = h = 0
    if w < 16 or h < 16:
        raise ConfigError(f"--crop {text!r}: give WIDTHxHEIGHT of at least 16x16 pixels, e.g. 256x192")
    return w, h


def run_fit_selector(args: argparse.Namespace) -> int:
    """Encode each video with the width search at every level (or, ``--costs fixed``, at every fixed pair:
    :meth:`bitalloc.codec.codec.VideoCoder.fixed_pair_costs`), fit the selector to the per-frame costs
    (:func:`bitalloc.codec.selector.fit_selector`; ``--per-level``: with a bias per quality level), write the codec
    with the new selector."""
    import copy
    import dataclasses

    from bitalloc.codec.precision import save_codec
    from bitalloc.codec.selector import WidthSelector, cross_validate, fit_selector, search_costs
    from bitalloc.codec.video_io import read_video
    from bitalloc.io import write_json
    from bitalloc.report.tables import print_table

    for path in (args.output, args.json):
        _check_out(path, args.overwrite)
    if args.frames < 1:
        raise ConfigError(f"--frames {args.frames}: give a positive number of frames")
    if not args.gamma >= 0:
        raise ConfigError(f"--gamma {args.gamma}: give a weight >= 0")
    if bool(args.videos) == bool(args.from_search):
        raise ConfigError("give training videos to search on, or --from-search REPORT.json, not both")
    if args.lookahead < 0 or (args.lookahead and (args.from_search or args.costs == "fixed")):
        raise ConfigError(f"--lookahead {args.lookahead}: give a number of frames >= 0, with training videos and "
                          "--costs search (a --from-search report keeps the lookahead it was searched with; fixed "
                          "pairs code whole videos)")
    if args.costs == "fixed" and args.from_search:
        raise ConfigError("--costs fixed codes the videos at every pair; a --from-search report keeps the costs it "
                          "was made with: give one or the other")
    if args.cross_validate and args.videos and len(set(args.videos)) < 2:
        raise ConfigError("--cross-validate leaves one video out at a time: give two or more training videos")
    crop = _parse_crop(args.crop)
    coder = _setup(args)  # dynamic weights (a one-line error otherwise)
    cands = coder.model.cfg.candidates
    if args.from_search:
        searched, groups, qualities, meta = _load_search(args.from_search, cands)
        if args.per_level and qualities is None:
            raise ConfigError(f"--per-level: {args.from_search} does not say each frame's quality level; run "
                              "fit-selector on the videos again with --json")
    else:
        levels = _parse_levels(args.levels, coder.model.cfg.levels)
        clips = []
        for path in args.videos:
            frames = read_video(path, frames=args.frames)
            if crop:
                w, h = min(crop[0], frames.width), min(crop[1], frames.height)
                frames = frames.crop(h, w, (frames.height - h) // 2 // 2 * 2, (frames.width - w) // 2 // 2 * 2)
            clips.append((path, frames))
        searched, groups, qualities = [], [], []
        fixed = args.costs == "fixed"
        per_clip = len(cands) ** 2 if fixed else 1
        with _bar(per_clip * len(levels) * sum(len(f) for _, f in clips),
                  "fixed pairs" if fixed else "width search") as bar:
            for path, frames in clips:
                for level in levels:
                    if fixed:
                        searched += coder.fixed_pair_costs(frames, quality=level, intra_period=args.intra_period,
                                                           progress=bar.update)
                    else:
                        searched += coder.compress(frames, quality=level, intra_period=args.intra_period,
                                                   progress=bar.update, search_gamma=args.gamma,
                                                   search_lookahead=args.lookahead).frames
                    qualities += [level] * (len(searched) - len(groups))
                    groups += [str(path)] * (len(searched) - len(groups))
        meta = {"videos": [str(p) for p in args.videos], "levels": levels, "frames_per_video": args.frames,
                "crop": args.crop, "search_gamma": None if fixed else args.gamma, "search_lookahead": args.lookahead,
                "costs": args.costs}
    if args.cross_validate and args.from_search and len(set(groups)) < 2:  # videos: checked before the search
        raise ConfigError(f"--cross-validate leaves one video out at a time: {args.from_search} holds frames of "
                          f"{len(set(groups))} video(s); refit on two or more videos with --json")
    feats, costs = search_costs(searched, cands, args.gamma)
    model = copy.deepcopy(coder.model)
    levels_fit = None
    if args.per_level or model.cfg.selector_per_level:  # a fresh selector of the kind asked for
        model.cfg = dataclasses.replace(model.cfg, selector_per_level=bool(args.per_level))
        model.selector = WidthSelector(cands, levels=model.cfg.levels if args.per_level else 0)
        levels_fit = np.asarray(qualities, dtype=np.int64) if args.per_level else None
    report = fit_selector(model.selector, feats, costs, levels=levels_fit, l2=args.l2)
    report.update(meta, gamma=args.gamma, weights=str(args.weights or "shipped dynamic codec"),
                  output=str(args.output), per_level_selector=bool(args.per_level))
    save_codec(model, args.output, extra={"selector_fit": report})
    report["search"] = {"candidates": list(cands), "frames": [
        {"video": g, **({"level": int(q)} if q is not None else {}),
         "features": [float(v) for v in f.features], "roi_fraction": float(f.roi_fraction),
         "pair_costs": [[r, n, rd, rel] for (r, n), (rd, rel) in f.pair_costs.items()],
         "pair_lookahead": [[r, n, rd, rel] for (r, n), (rd, rel) in (f.pair_lookahead or {}).items()]}
        for f, g, q in zip(searched, groups, qualities or [None] * len(searched))]}
    source = "fixed-pair costs" if report.get("costs") == "fixed" else "the width search"
    print_table(f"selector fitted to {source} (gamma {args.gamma:g}, {report['frames']} frames) -> "
                f"{args.output}", ["", "mean cost per frame (bpp + lambda D + gamma C)", "pairs chosen"],
                [[f"{'fixed pairs' if report.get('costs') == 'fixed' else 'width search'} (per frame, least)",
                  f"{report['search_cost']:.5f}",
                  _pair_counts(report["search_pairs"])],
                 ["fitted selector", f"{report['selector_cost']:.5f}", _pair_counts(report["selector_pairs"])],
                 [f"best fixed pair {report['fixed_pair'][0]}/{report['fixed_pair'][1]}", f"{report['fixed_cost']:.5f}",
                  ""]]
                + ([["best fixed pair of each level", f"{report['fixed_per_level_cost']:.5f}",
                     ", ".join(f"level {lv}: {v['fixed_pair'][0]}/{v['fixed_pair'][1]}"
                               for lv, v in report["per_level"].items())]] if "per_level" in report else []))
    if args.cross_validate:
        cv = cross_validate(cands, feats, costs, groups, levels=levels_fit, num_levels=model.selector.levels,
                            l2=args.l2)
        report["cross_validation"] = cv
        _print_cross_validation(cv)
    if args.json:
        write_json(args.json, report, overwrite=True)
    return 0


def _print_cross_validation(cv: dict[str, Any]) -> None:
    """The leave-one-video-out table of fit-selector --cross-validate."""
    from bitalloc.report.tables import print_table

    def captured(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:+.0f}%"

    per = "fixed_per_level_cost" in cv["mean"]  # per-level selectors: also each level's own best fixed pair

    def level_bar(r: dict[str, Any]) -> list[str]:
        return [f"{r['fixed_per_level_cost']:.5f}"] if per else []

    rows = [[Path(r["group"]).name, str(r["frames"]), f"{r['selector_cost']:.5f}",
             f"{r['fixed_cost']:.5f} ({r['fixed_pair'][0]}/{r['fixed_pair'][1]})", *level_bar(r),
             f"{r['search_cost']:.5f}", captured(r["captured"]), "yes" if r["beats_fixed"] else "no",
             _pair_counts(r["selector_pairs"])] for r in cv["groups"]]
    m = cv["mean"]
    rows.append(["all (frame-weighted)", str(sum(r["frames"] for r in cv["groups"])), f"{m['selector_cost']:.5f}",
                 f"{m['fixed_cost']:.5f}", *level_bar(m), f"{m['search_cost']:.5f}", captured(m["captured"]),
                 "every video" if cv["beats_fixed_on_every_group"] else "not every video", ""])
    print_table("leave-one-video-out: a selector fitted without the video, costed on it (mean cost per frame)",
                ["held-out video", "frames", "selector", "best fixed pair there",
                 *(["best fixed pair of each level there"] if per else []), "search", "gain captured",
                 "beats fixed", "pairs chosen"], rows)


def _load_search(path: str, candidates: Any) -> tuple[list[Any], list[str], list[int] | None, dict[str, Any]]:
    """The searched frames of a fit-selector --json report (as objects :func:`search_costs` reads), the video and
    quality level of each and the report's provenance; ConfigError naming the problem when it is not such a report
    or was made at other widths. Reports written before frames named their video or level: they are recovered from
    the report's videos x levels x frames per video when the count matches (else each frame's video is unknown, one
    group, and the levels None)."""
    import json
    from types import SimpleNamespace

    try:
        rep = json.loads(Path(path).read_text())
        data = rep["search"]
        frames = [SimpleNamespace(index=i, features=np.asarray(f["features"], dtype=np.float64),
                                  roi_fraction=float(f["roi_fraction"]),
                                  pair_costs=_pairs(f["pair_costs"]),
                                  pair_lookahead=_pairs(f.get("pair_lookahead", [])))
                  for i, f in enumerate(data["frames"])]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--from-search {path}: not a `bitalloc codec fit-selector --json` report with search costs "
                          f"({type(exc).__name__}: {exc}); run fit-selector on videos with --json first") from None
    if list(data["candidates"]) != list(candidates) or not frames:
        raise ConfigError(f"--from-search {path}: searched at widths {data['candidates']}, these weights have "
                          f"{list(candidates)}; give the weights it was made with (--weights)")
    meta = {k: rep.get(k) for k in ("videos", "levels", "frames_per_video", "crop", "search_lookahead")}
    meta["costs"] = rep.get("costs") or "search"
    meta.update(search_gamma=rep.get("search_gamma", rep.get("gamma")), from_search=str(path))
    groups = [str(f.get("video", "")) for f in data["frames"]]
    qualities = [f.get("level") for f in data["frames"]]
    levels, each = list(meta.get("levels") or []), int(meta.get("frames_per_video") or 0)
    videos, per = meta.get("videos") or [], len(levels) * each
    matches = bool(per) and len(frames) == len(videos) * per  # the search's order: videos, levels, frames
    if not all(groups) and matches:
        groups = [str(videos[i // per]) for i in range(len(frames))]
    if any(q is None for q in qualities):
        qualities = [int(levels[i % per // each]) for i in range(len(frames))] if matches else None
    return frames, groups, qualities, meta


def _pairs(rows: Any) -> dict[tuple[int, int], tuple[float, float]]:
    """A report's [[r, n, rd, rel], ...] -> {(r, n): (rd, rel)}."""
    return {(int(r), int(n)): (float(rd), float(rel)) for r, n, rd, rel in rows}


def _pair_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{p} x{n}" for p, n in counts.items() if n)


def run_encode(args: argparse.Namespace) -> int:
    from bitalloc.codec.metrics import bits_per_pixel, kbps, psnr_rgb, psnr_yuv
    from bitalloc.codec.video_io import read_video
    from bitalloc.io import write_bytes, write_json
    from bitalloc.report.tables import print_table

    for path in (args.output, args.json, args.reconstruction):
        _check_out(path, args.overwrite)
    if args.reconstruction:
        _frames_target(args.reconstruction)
    if args.frames is not None and args.frames < 1:
        raise ConfigError(f"--frames {args.frames}: give a positive number of frames")
    if args.widths is not None and not args.dynamic:
        raise ConfigError("--widths goes with --dynamic (a fixed-precision codec has one width)")
    search = args.widths == "search"
    if search != (args.gamma is not None):
        raise ConfigError("--widths search needs --gamma G (the weight of the relative Bit-FLOPs), and --gamma "
                          "goes only with --widths search")
    if args.lookahead and not search:
        raise ConfigError("--lookahead goes with --widths search --gamma G")
    if args.lookahead < 0:
        raise ConfigError(f"--lookahead {args.lookahead}: give a number of frames >= 0")
    if args.shortlist is not None and (args.shortlist < 1 or not args.lookahead):
        raise ConfigError(f"--shortlist {args.shortlist}: give a number of pairs >= 1, with --lookahead N")
    coder = _setup(args)
    widths = None if args.widths is None or search else _parse_widths(args.widths, coder)
    frames = read_video(args.input, frames=args.frames, start=args.start)
    with _bar(len(frames), "encode") as bar:
        res = coder.compress(frames, quality=args.quality, intra_period=args.intra_period, progress=bar.update,
                             widths=widths, search_gamma=args.gamma, search_lookahead=args.lookahead,
                             search_shortlist=args.shortlist)
    checked: dict[str, Any] = {}

    def verify(tmp: Path) -> None:  # decode the written file before it replaces anything
        t0 = time.perf_counter()
        with _bar(len(frames), "verify (decode)") as bar:
            dec = coder.decompress(tmp.read_bytes(), source=str(args.output), progress=bar.update)
        checked["decode_fps"] = len(frames) / (time.perf_counter() - t0)
        checked["exact"] = bool(dec.equal(res.reconstruction))
        if not checked["exact"]:
            raise DataError(f"{args.output}: decoding the written stream did not reproduce the encoder's "
                            "reconstruction, so it was not written; please report this (it is a bug)")

    write_bytes(args.output, res.stream, verify=verify if args.verify else None)
    p = psnr_yuv(frames, res.reconstruction)
    summary: dict[str, Any] = {
        "input": str(args.input), "output": str(args.output), "frames": len(frames),
        "size": f"{frames.width}x{frames.height}", "width": frames.width, "height": frames.height,
        "fps": frames.fps, "quality": args.quality, "intra_period": args.intra_period, "bytes": res.bytes,
        "bpp": bits_per_pixel(res.bytes, len(frames), frames.height, frames.width),
        "kbps": kbps(res.bytes, len(frames), frames.fps), "psnr_yuv": p["psnr_yuv"], "psnr_y": p["psnr_y"],
        "psnr_rgb": psnr_rgb(frames, res.reconstruction)["psnr_rgb"],
        "encode_fps": len(frames) / res.encode_seconds,
        "frame_types": "".join(f.kind for f in res.frames),
        "per_frame": [{"index": f.index, "type": f.kind, "bytes": f.bytes, "psnr_yuv": f.psnr,
                       "roi_bits": f.roi_bits, "non_roi_bits": f.non_roi_bits, "roi_fraction": f.roi_fraction,
                       "mask_bits": f.mask_bits, "roi_seconds": f.roi_seconds, "analysis_scale": f.analysis_scale,
                       "refined": f.refined, "level": f.level}
                      for f in res.frames],
        "clamped_symbols": sum(f.clamped for f in res.frames),
        "analysis_scales": _counts(f.analysis_scale for f in res.frames),
        "p_levels": _counts(f.level for f in res.frames if f.kind == "P"),
        "frames_refined": (f"{sum(f.refined for f in res.frames)} of {len(res.frames)} ({coder.refiner.steps} steps)"
                           if coder.refiner.steps else None),
        "width_search_gamma": args.gamma, "width_search_lookahead": args.lookahead if search else None,
        "width_search_shortlist": args.shortlist,
    }
    if coder.dynamic:  # the widths' and the mask's share of the rate, the ROI source's time
        side = 4 * len(res.frames)  # two 16-bit fields per frame
        mask = sum(f.mask_bits for f in res.frames) / 8
        summary.update(dynamic=True, roi_source=coder.roi.spec(), mean_roi_bits=float(np.mean([f.roi_bits for f in res.frames])),
                       mean_non_roi_bits=float(np.mean([f.non_roi_bits for f in res.frames])),
                       roi_fraction=float(np.mean([f.roi_fraction for f in res.frames])),
                       width_fields_share=side / res.bytes, mask_share=mask / res.bytes,
                       roi_ms_per_frame=1000 * float(np.mean([f.roi_seconds for f in res.frames])))
    summary.update(checked)
    if args.reconstruction:
        write_frames(args.reconstruction, res.reconstruction)
    print_table(f"{args.input} -> {args.output} (quality {args.quality})", ["", "value"], _summary_rows(summary))
    if args.json:
        write_json(args.json, summary, overwrite=True)
    return 0


def run_decode(args: argparse.Namespace) -> int:
    from bitalloc.codec.metrics import bits_per_pixel, kbps, psnr_rgb, psnr_yuv
    from bitalloc.codec.video_io import read_video
    from bitalloc.io import write_json
    from bitalloc.report.tables import print_table

    _check_out(args.output, args.overwrite)
    _check_out(args.json, args.overwrite)
    _frames_target(args.output)
    src = Path(args.input)
    if not src.is_file():
        raise DataError(f"{src}: no such stream file; give the .bav file written by `bitalloc codec encode`")
    data = src.read_bytes()
    coder = _setup(args, data)
    from bitalloc.codec.bitstream import read_stream

    header, _ = read_stream(data, source=str(src), limit=0)
    n = header.frame_count if args.frames is None else min(args.frames, header.frame_count)
    t0 = time.perf_counter()
    with _bar(n, "decode") as bar:
        frames = coder.decompress(data, frames=args.frames, source=str(src), progress=bar.update)
    seconds = time.perf_counter() - t0
    write_frames(args.output, frames)
    summary: dict[str, Any] = {"input": str(src), "output": str(args.output), "frames": len(frames),
                               "size": f"{frames.width}x{frames.height}", "bytes": len(data),
                               "bpp": bits_per_pixel(len(data), header.frame_count, frames.height, frames.width),
                               "kbps": kbps(len(data), header.frame_count, float(header.fps)),
                               "decode_fps": len(frames) / seconds, "quality": header.quality}
    if args.reference:
        ref = read_video(args.reference, frames=len(frames))
        if (ref.width, ref.height) != (frames.width, frames.height):
            raise DataError(f"--reference {args.reference} is {ref.width}x{ref.height}, the stream is "
                            f"{frames.width}x{frames.height}; give the source the stream was encoded from")
        p = psnr_yuv(ref, frames)
        summary.update(psnr_yuv=p["psnr_yuv"], psnr_y=p["psnr_y"], psnr_rgb=psnr_rgb(ref, frames)["psnr_rgb"])
    print_table(f"{src} -> {args.output}", ["", "value"], _summary_rows(summary))
    if args.json:
        write_json(args.json, summary, overwrite=True)
    return 0


def run_info(args: argparse.Namespace) -> int:
    from bitalloc.codec.bitstream import FRAME_TYPES, read_stream
    from bitalloc.codec.weights import describe_weights, load_default_or
    from bitalloc.io import write_json
    from bitalloc.report.tables import print_table

    if args.input is None:
        model = load_default_or(args.weights)
        desc = describe_weights(model, args.weights)
        print_table("codec weights " + desc["path"], ["", "value"],
                    [[k, v] for k, v in desc.items() if k not in ("levels", "networks", "layers", "macs_per_pixel")])
        print_table("quality levels", ["level", "lambda"], [[i, lam] for i, lam in enumerate(desc["levels"])])
        print_table("decoder networks", ["network", "quantized layers", "float layers", "bits"],
                    [[n["name"], n["quantized"], n["float"], n["bits"]] for n in desc["networks"]])
        macs = desc["macs_per_pixel"]
        print_table(f"multiply-accumulates per luma pixel ({macs['luma']}x{macs['luma']} frame; GDN's channel mixing "
                    "not counted)", ["network / frame", "MACs per pixel"],
                    [[n, f"{v:,.0f}"] for n, v in macs["networks"].items()]
                    + [[f"{kind} frame, {verb}", f"{v[verb]:,.0f}"] for kind, v in macs["frames"].items()
                       for verb in ("encode", "decode")])
        if args.layers:
            print_table("layers (bits: weights / activations; 4/8/16 = chosen per frame and region)",
                        ["network", "layer", "type", "status", "weight bits", "act bits", "why"],
                        [[r[k] for k in ("network", "layer", "type", "status", "weight_bits", "act_bits", "reason")]
                         for r in desc["layers"]])
        if args.json:
            write_json(args.json, desc, overwrite=True)
        return 0
    src = Path(args.input)
    if not src.is_file():
        raise DataError(f"{src}: no such stream file")
    data = src.read_bytes()
    header, records = read_stream(data, source=str(src))
    keys = ["index", "type", "level", "bytes", "roi_bits", "non_roi_bits"]
    rows = [[i, FRAME_TYPES[r.kind], r.level, r.size, r.roi_bits, r.non_roi_bits] for i, r in enumerate(records)]
    out = {"file": str(src), "bytes": len(data), "model_id": header.model_id.hex(), "quality": header.quality,
           "width": header.width, "height": header.height, "frames": header.frame_count, "fps": float(header.fps),
           "intra_period": header.intra_period, "version": header.version,
           "frame_records": [dict(zip(keys, r)) for r in rows]}
    print_table(f"{src}: {header.width}x{header.height}, {header.frame_count} frames at {float(header.fps):.3g} fps, "
                f"quality {header.quality}, intra period {header.intra_period}, model {header.model_id.hex()}, "
                f"bitstream version {header.version}",
                ["frame", "type", "level", "bytes", "ROI bits", "non-ROI bits"], rows)
    if args.json:
        write_json(args.json, out, overwrite=True)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from bitalloc.codec.evaluate import run_eval_cli

    return run_eval_cli(args)


def run_train(args: argparse.Namespace) -> int:
    from bitalloc.train.codec import run_train_cli

    return run_train_cli(args)
