"""The per-frame bit-width selector of the content-adaptive codec (SPEC section 3; rebuttal A2-A3).

Per frame and region (ROI, non-ROI) four statistics, computed over the region's pixels as a whole (rebuttal A3:
"the overall standard deviation and average magnitude of each region, computed over its pixels"):

====  ==========================================================================================================
 0    sigma(x): standard deviation of the luma in the region, luma in [0, 1] (8-bit value / 255)
 1    G(x): mean magnitude of the luma, mean |x| (x >= 0, so the mean brightness)
 2    sigma(v): spread of the motion field, sqrt(mean ||v - v_bar||^2) with v_bar the region's mean vector
      (0 for a uniform motion such as a pan, whatever its speed)
 3    G(v): mean magnitude of the motion, mean ||v||
====  ==========================================================================================================

features 0-3 for the ROI, 4-7 for the non-ROI (8 numbers); motion in luma pixels divided by
:data:`MOTION_SCALE` (8, the codec's flow scaling), so every feature is of order 1. Luma, not packed YUV: the ROI
mask lives at luma resolution and viewers' attention (and PSNR_YUV's weight 6/8) is on luma. The motion field is
the encoder's motion (the codec's estimate or its decoded flow, [2, h, w] in luma pixels at luma or half luma
resolution), brought to luma resolution by repetition, so each luma pixel counts once and a soft mask weights
both regions (weights m and 1 - m; the statistics are weighted means). Intra frames have no motion: zeros. An
empty region (no pixel, or zero weight) has all four features 0.

**Determinism.** The selector runs at the encoder only: the widths it picks are written into the stream (two 16-bit
fields per frame) and the decoder reads them, never recomputing features from data it does not have. The features
are still computed reproducibly: float64 NumPy (single-threaded pairwise summation: the same bits for the same
frame on any machine and thread count).

**Selector.** ``nn.Linear(8, 2K)`` gives K logits per region (ROI first). Training: a Gumbel-softmax sample per
region (:func:`bitalloc.quant.gates.gumbel_softmax_sample`, temperature ``tau``, straight-through one-hot with
``hard=True``) -> weights over the K candidates that
:func:`bitalloc.model.region.region_precision` takes as ``roi`` / ``non_roi``. Test time: the argmax per region
(:meth:`WidthSelector.select` gives the widths in bits). With an empty region its width is set to the other
region's (the frame then runs at one width: one pass per layer), so the signalled pair never asks for a
computation that has no pixel.

**Per quality level** (``WidthSelector(levels=L)``, ``CodecConfig(selector_per_level=True)``): the logits gain a
learned bias per quality level, logits = W f + b + B[l] (B: [L, 2K], zero at the start), so that the selector may
choose differently at each rate point, as a selector would that came with each model of a codec trained one model
per rate point (DVC, Lu et al. 2019, and its successors). This codec's levels share one model (gain units), so a
selector without B uses one rule at every rate, while what a width buys differs between rates (the shipped
{4,8,16} codec codes carphone's 16 frames at level 1 with about 2.7% fewer bits at 8/8 than at 4/4 at equal PSNR,
at levels 3-7 with more; BENCHMARKS.md "ROI-aware dynamic precision"). The level is the stream's (its header's
quality; P-frame level offsets are chosen after the widths); the widths are signalled as before, so decoding needs
nothing new.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from bitalloc.codec.roi import flows_at_luma, luma_of
from bitalloc.errors import ConfigError, ShapeError
from bitalloc.quant.gates import GUMBEL_TAU, categorical_test_choice, gumbel_softmax_sample, uniform_noise

#: motion features are in luma pixels divided by this
MOTION_SCALE = 8.0
FEATURE_NAMES = tuple(f"{region}_{name}" for region in ("roi", "non_roi")
                      for name in ("frame_std", "frame_mean_abs", "motion_std", "motion_mean_abs"))
NUM_FEATURES = len(FEATURE_NAMES)


def _weighted_stats(values: np.ndarray, weight: np.ndarray) -> tuple[float, float]:
    """(sigma, G) of ``values`` ([P] scalars or [2, P] vectors) with weights [P]: sigma = sqrt(sum w ||v - v_bar||^2 /
    sum w), G = sum w ||v|| / sum w; (0, 0) when sum w = 0."""
    total = float(weight.sum())
    if total <= 0.0:
        return 0.0, 0.0
    v = values.reshape(-1, weight.size)
    mean = (v * weight).sum(axis=1) / total
    spread = float((((v - mean[:, None]) ** 2).sum(axis=0) * weight).sum() / total)
    magnitude = float((np.sqrt((v ** 2).sum(axis=0)) * weight).sum() / total)
    return float(np.sqrt(max(spread, 0.0))), magnitude


def region_features(luma: np.ndarray, mask: np.ndarray, flow: np.ndarray | None = None) -> np.ndarray:
    """The 8 features of one frame (module docstring): ``luma`` uint8 [H, W] (or float in [0, 1]), ``mask`` bool or
    float [H, W] (luma resolution), ``flow`` [2, H, W] at luma resolution in pixels, or None. float64 [8]."""
    x = np.asarray(luma)
    x = x.astype(np.float64) / 255.0 if x.dtype == np.uint8 else x.astype(np.float64)
    m = np.asarray(mask, dtype=np.float64)
    if m.shape != x.shape or x.ndim != 2:
        raise ShapeError(f"a frame {tuple(x.shape)} and its ROI mask {tuple(m.shape)} must be [H, W] of one size")
    if flow is not None and tuple(np.shape(flow)) != (2, *x.shape):
        raise ShapeError(f"the motion field must be [2, {x.shape[0]}, {x.shape[1]}] at luma resolution, got "
                         f"{tuple(np.shape(flow))}")
    v = None if flow is None else np.asarray(flow, dtype=np.float64).reshape(2, -1) / MOTION_SCALE
    out = []
    for w in (m.reshape(-1), 1.0 - m.reshape(-1)):
        out.extend(_weighted_stats(x.reshape(-1), w))
        out.extend(_weighted_stats(v, w) if v is not None else (0.0, 0.0))
    return np.asarray(out, dtype=np.float64)


def frame_features(frames: Any, masks: np.ndarray, flows: Any = None, *,
                   intra: Sequence[bool] | None = None) -> np.ndarray:
    """Features of T frames: float64 [T, 8]. ``frames``: YUVFrames or uint8 luma [T, H, W]; ``masks`` [T, H, W];
    ``flows``: [T, 2, h, w] / T - 1 fields (see :func:`bitalloc.codec.roi.flows_at_luma`) or None; ``intra``:
    frames without motion (their motion features are 0)."""
    y = luma_of(frames)
    masks = np.asarray(masks)
    if masks.shape != y.shape:
        raise ShapeError(f"{tuple(masks.shape)} masks for {tuple(y.shape)} frames; give one luma-size mask per frame")
    f = flows_at_luma(flows, len(y), *y.shape[1:]) if flows is not None else None
    rows = []
    for t in range(len(y)):
        no_motion = f is None or (intra is not None and bool(intra[t]))
        rows.append(region_features(y[t], masks[t], None if no_motion else f[t]))
    return np.stack(rows)


class WidthSelector(nn.Module):
    """Per-frame widths for the ROI and the rest: ``nn.Linear(8, 2K)`` -> K logits per region (module docstring).

    ``candidates``: the K widths (ascending); ``tau``: Gumbel-softmax temperature; ``hard``: straight-through
    one-hot samples in training (else soft); ``levels`` L > 0: a learned bias per quality level added to the logits
    (``level_bias`` [L, 2K], module docstring; every call then names the frames' levels). ``forward(features,
    level=...)`` returns ``(roi, non_roi)`` weights [B, K]: samples in training mode, one-hot argmax in eval mode.
    """

    def __init__(self, candidates: Sequence[int] = (2, 4, 8), tau: float = GUMBEL_TAU, hard: bool = True,
                 levels: int = 0):
        super().__init__()
        cands = tuple(int(b) for b in candidates)
        if len(cands) < 1 or list(cands) != sorted(set(cands)):
            raise ConfigError(f"candidates {list(candidates)} must be distinct widths in ascending order, "
                              "e.g. [2, 4, 8]")
        if float(tau) <= 0:
            raise ConfigError(f"tau={tau} must be > 0")
        self.candidates = cands
        self.tau = float(tau)
        self.hard = bool(hard)
        if int(levels) < 0:
            raise ConfigError(f"levels={levels}: give the codec's number of quality levels, or 0 for one rule at all")
        self.fc = nn.Linear(NUM_FEATURES, 2 * len(cands))
        self.level_bias = nn.Parameter(torch.zeros(int(levels), 2 * len(cands))) if int(levels) else None

    @property
    def k(self) -> int:
        return len(self.candidates)

    @property
    def levels(self) -> int:
        """The number of quality levels with their own bias (0: one rule at every level)."""
        return 0 if self.level_bias is None else int(self.level_bias.shape[0])

    def _level_bias(self, level: Any, batch: int) -> Tensor | None:
        """B[level] [batch, 2K] of a per-level selector (``level``: an int or [batch] integers); None otherwise."""
        if self.level_bias is None:
            return None
        if level is None:
            raise ConfigError("this width selector has a bias per quality level: give the frames' level(s)")
        idx = torch.as_tensor(np.asarray(level) if not isinstance(level, Tensor) else level).to(torch.int64)
        idx = idx.reshape(-1).to(self.level_bias.device)
        if idx.numel() == 1:
            idx = idx.expand(batch)
        if idx.numel() != batch:
            raise ShapeError(f"{idx.numel()} levels for {batch} frames; give one level, or one per frame")
        self.check_levels(idx.tolist())
        return self.level_bias[idx]

    def check_levels(self, levels: Sequence[int]) -> None:
        """ConfigError naming them when any of ``levels`` is outside this per-level selector's 0..L-1."""
        bad = sorted({int(v) for v in levels if not 0 <= int(v) < self.levels})
        if bad:
            raise ConfigError(f"quality level(s) {bad} outside the selector's 0-{self.levels - 1}")

    def _features(self, features: Tensor | np.ndarray) -> Tensor:
        f = torch.as_tensor(features, dtype=self.fc.weight.dtype, device=self.fc.weight.device)
        if f.ndim == 1:
            f = f[None]
        if f.ndim != 2 or f.shape[1] != NUM_FEATURES:
            raise ShapeError(f"selector features must be [B, {NUM_FEATURES}], got shape {tuple(f.shape)}")
        return f

    def logits(self, features: Tensor | np.ndarray, level: Any = None) -> Tensor:
        """[B, 2, K]: the ROI's logits, then the non-ROI's (``level``: the frames' quality levels, which a per-level
        selector needs and a plain one ignores)."""
        out = self.fc(self._features(features))
        bias = self._level_bias(level, out.shape[0])
        return (out if bias is None else out + bias).reshape(-1, 2, self.k)

    def probabilities(self, features: Tensor | np.ndarray, level: Any = None) -> Tensor:
        """softmax of the logits per region, [B, 2, K]."""
        return torch.softmax(self.logits(features, level), dim=-1)

    def forward(self, features: Tensor | np.ndarray, generator: torch.Generator | None = None,
                level: Any = None) -> tuple[Tensor, Tensor]:
        logits = self.logits(features, level)
        if self.training:
            u = uniform_noise(logits.shape, generator, device=logits.device, dtype=logits.dtype)
            w = gumbel_softmax_sample(logits, u, self.tau, self.hard)
        else:
            w = categorical_test_choice(logits)
        return w[:, 0], w[:, 1]

    def expected_bits(self, features: Tensor | np.ndarray, level: Any = None) -> Tensor:
        """Expected width per region under the softmax, [B, 2] (for reports and regularisers)."""
        c = torch.tensor(self.candidates, dtype=self.fc.weight.dtype, device=self.fc.weight.device)
        return (self.probabilities(features, level) * c).sum(-1)

    @torch.no_grad()
    def select(self, features: Tensor | np.ndarray, roi_fraction: Sequence[float] | np.ndarray | None = None,
               level: Any = None) -> Tensor:
        """Test-time widths in bits, int64 [B, 2] (ROI, non-ROI): the argmax per region; where ``roi_fraction``
        (per frame) is 0 the ROI gets the non-ROI width, where it is 1 the non-ROI gets the ROI width."""
        idx = self.logits(features, level).argmax(-1).cpu()
        bits = torch.tensor(self.candidates, dtype=torch.int64)[idx]
        if roi_fraction is not None:
            frac = torch.as_tensor(np.asarray(roi_fraction, dtype=np.float64)).reshape(-1)
            if frac.numel() != bits.shape[0]:
                raise ShapeError(f"{frac.numel()} ROI fractions for {bits.shape[0]} frames")
            bits[frac <= 0, 0] = bits[frac <= 0, 1]
            bits[frac >= 1, 1] = bits[frac >= 1, 0]
        return bits


# ---- fitting the selector to the encoder's width search ------------------------------------------------------------

def search_costs(frames: Sequence[Any], candidates: Sequence[int], gamma: float) -> tuple[np.ndarray, np.ndarray]:
    """The fitting data of frames coded with the encoder's width search (``VideoCoder.compress(search_gamma=...)``,
    their ``FrameInfo``): features float64 [N, 8] and costs float64 [N, K, K], cost[t, i, j] = bits per pixel +
    lambda * MSE_YUV + ``gamma`` * relative Bit-FLOPs of frame t at (ROI candidates[i], non-ROI candidates[j]).
    A frame that is all ROI or has none was tried at equal pairs only; its table is completed by the rule of
    :meth:`WidthSelector.select` (no ROI: the ROI takes the non-ROI width; all ROI: the reverse). Frames searched
    with a lookahead (``search_lookahead=N``, their ``pair_lookahead``) add the next N frames' cost at the same
    pair, rd + ``gamma`` * C summed: the cost the search's choice minimised."""
    cands = [int(b) for b in candidates]
    feats, tables = [], []
    for f in frames:
        pc = getattr(f, "pair_costs", None)
        if not pc or getattr(f, "features", None) is None:
            raise ConfigError(f"frame {getattr(f, 'index', '?')} has no width-search costs; encode with "
                              "compress(search_gamma=...) to fit a selector")
        frac = float(f.roi_fraction)
        ahead = getattr(f, "pair_lookahead", None) or {}
        if ahead and set(ahead) != set(pc):
            raise ConfigError(f"frame {getattr(f, 'index', '?')} was searched with a shortlist: the lookahead costs of "
                              f"{len(pc) - len(ahead)} pairs are missing; fit to a search without a shortlist")

        def cost(r: int, n: int) -> float:
            r, n = (n, n) if frac <= 0 else (r, r) if frac >= 1 else (r, n)
            rd, rel = pc[(r, n)]
            la_rd, la_rel = ahead.get((r, n), (0.0, 0.0))
            return float(rd) + float(la_rd) + float(gamma) * (float(rel) + float(la_rel))

        tables.append([[cost(r, n) for n in cands] for r in cands])
        feats.append(np.asarray(f.features, dtype=np.float64))
    return np.stack(feats), np.asarray(tables, dtype=np.float64)


def _frame_levels(selector: WidthSelector, levels: Any, count: int) -> np.ndarray | None:
    """The per-frame levels [count] int64 a per-level ``selector`` is fitted with (None for a plain one, which
    ignores them); ConfigError / ShapeError naming the problem."""
    if not selector.levels:
        return None
    if levels is None:
        raise ConfigError("a per-level selector is fitted to the frames' quality levels: give levels=, each frame's "
                          "stream quality level")
    lv = np.asarray(levels).reshape(-1)
    if lv.size != count:
        raise ShapeError(f"{lv.size} levels for {count} frames; give one level per frame")
    if not np.issubdtype(lv.dtype, np.integer) and not np.all(lv == np.round(lv)):
        raise ConfigError("levels must be whole numbers")
    lv = lv.astype(np.int64)
    selector.check_levels(lv.tolist())
    return lv


def fit_selector(selector: WidthSelector, features: np.ndarray, costs: np.ndarray, *, levels: Any = None,
                 l2: float = 1e-3, max_iter: int = 200) -> dict[str, Any]:
    """Fit ``selector.fc`` to per-frame costs of every width pair (``costs`` [N, K, K], from :func:`search_costs`):
    minimise the expected cost under the selector's two softmaxes,

        E(W, b) = mean_t sum_{i,j} p_roi(i | f_t) p_non(j | f_t) (c_t[i, j] - min c_t) / s + l2 ||W||^2,

    (s: the mean of the shifted costs, so l2 has the same meaning at every rate) on standardised features, by
    L-BFGS in float64 from the best constant choice; the standardisation is folded into ``fc`` so the selector
    reads raw features. Argmax at test time then picks, frame by frame, the pair of least predicted cost: a
    cost-sensitive classifier of the search's choices, instead of the Gumbel-softmax training of ``--stage
    dynamic``. A per-level selector (``selector.levels`` > 0) fits its bias per level instead of one b, from the
    frames' ``levels`` [N] (each level's bias starts at that level's best constant choice; a level without frames
    keeps the best constant choice of all frames). Returns the mean cost per frame (same units as ``costs``) of the
    search (each frame's least), of the fitted selector's argmax, of the best fixed pair (and which), and how often
    the selector's pair is the search's; with levels also per level (:func:`_choice_report`)."""
    f = np.asarray(features, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    k = selector.k
    if f.ndim != 2 or f.shape[1] != NUM_FEATURES or c.shape != (len(f), k, k) or len(f) == 0:
        raise ShapeError(f"fitting needs features [N, {NUM_FEATURES}] and costs [N, {k}, {k}] for N > 0 frames, got "
                         f"{tuple(f.shape)} and {tuple(c.shape)}")
    if not np.isfinite(c).all() or not np.isfinite(f).all():
        raise ConfigError("fitting data has non-finite features or costs")
    if float(l2) < 0:
        raise ConfigError(f"l2={l2} must be >= 0")
    lv = _frame_levels(selector, levels, len(f))
    mu, sd = f.mean(0), f.std(0)
    sd = np.where(sd > 1e-12, sd, 1.0)
    z = torch.from_numpy((f - mu) / sd)
    d = c - c.min(axis=(1, 2), keepdims=True)
    scale = float(d.mean()) or 1.0
    dt = torch.from_numpy(d / scale)
    w = torch.zeros(2 * k, NUM_FEATURES, dtype=torch.float64, requires_grad=True)
    rows = max(selector.levels, 1)
    b = torch.zeros(rows, 2, k, dtype=torch.float64)
    for row in range(rows):  # start at the best fixed pair (a soft choice of it): the level's, else all frames'
        sub = c if lv is None or not np.any(lv == row) else c[lv == row]
        fixed = np.unravel_index(int(sub.sum(0).argmin()), (k, k))
        b[row, 0, fixed[0]] = b[row, 1, fixed[1]] = 2.0
    b = b.reshape(rows, -1).requires_grad_(True)
    index = torch.zeros(len(f), dtype=torch.int64) if lv is None else torch.from_numpy(lv)

    def objective() -> Tensor:
        logits = (z @ w.T + b[index]).reshape(-1, 2, k)
        p = torch.softmax(logits, -1)
        expected = torch.einsum("ti,tj,tij->t", p[:, 0], p[:, 1], dt).mean()
        return expected + float(l2) * w.square().sum()

    opt = torch.optim.LBFGS([w, b], max_iter=int(max_iter), line_search_fn="strong_wolfe", tolerance_grad=1e-10,
                            tolerance_change=1e-12)

    def closure() -> Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        w_raw = w.detach() / torch.from_numpy(sd)
        shift = -(w_raw @ torch.from_numpy(mu))
        selector.fc.weight.copy_(w_raw.to(selector.fc.weight.dtype))
        if selector.levels:
            selector.fc.bias.copy_(shift.to(selector.fc.bias.dtype))
            selector.level_bias.copy_(b.detach().to(selector.level_bias.dtype))
        else:
            selector.fc.bias.copy_((b.detach()[0] + shift).to(selector.fc.bias.dtype))
    return _choice_report(selector, f, c, lv)


def _choice_report(selector: WidthSelector, f: np.ndarray, c: np.ndarray, levels: np.ndarray | None = None
                   ) -> dict[str, Any]:
    """Mean cost per frame of the search (each frame's least), of ``selector``'s argmax and of the best fixed pair
    on these frames (and which), how often the selector's pair is the search's, and the pairs each chose. With the
    frames' ``levels``, also per level (``per_level``: the same numbers on that level's frames) and
    ``fixed_per_level_cost``: the cost of the best fixed pair of each level, the bar that the frame statistics
    must pass (what a selector gains beyond it is content adaptation; up to it, rate adaptation)."""
    k, cands = selector.k, selector.candidates
    idx = selector.logits(f, levels).argmax(-1).numpy()  # [N, 2]
    chosen = c[np.arange(len(c)), idx[:, 0], idx[:, 1]]
    best = c.reshape(len(c), -1).argmin(1)
    fixed = np.unravel_index(int(c.sum(0).argmin()), (k, k))

    def pairs(i: np.ndarray, j: np.ndarray) -> dict[str, int]:
        return {f"{cands[a]}/{cands[b]}": int(np.sum((i == a) & (j == b))) for a in range(k) for b in range(k)}

    out = {"frames": len(c), "search_cost": float(c.min(axis=(1, 2)).mean()), "selector_cost": float(chosen.mean()),
           "fixed_pair": [cands[int(fixed[0])], cands[int(fixed[1])]],
           "fixed_cost": float(c[:, fixed[0], fixed[1]].mean()),
           "agreement": float(np.mean(idx[:, 0] * k + idx[:, 1] == best)),
           "selector_pairs": pairs(idx[:, 0], idx[:, 1]), "search_pairs": pairs(best // k, best % k)}
    if levels is not None:
        lv = np.asarray(levels).reshape(-1)
        per = {}
        for level in sorted(set(lv.tolist())):
            m = lv == level
            fl = np.unravel_index(int(c[m].sum(0).argmin()), (k, k))
            per[str(level)] = {"frames": int(m.sum()), "search_cost": float(c[m].min(axis=(1, 2)).mean()),
                               "selector_cost": float(chosen[m].mean()),
                               "fixed_pair": [cands[int(fl[0])], cands[int(fl[1])]],
                               "fixed_cost": float(c[m][:, fl[0], fl[1]].mean()),
                               "selector_pairs": pairs(idx[m, 0], idx[m, 1])}
        out["per_level"] = per
        out["fixed_per_level_cost"] = float(sum(v["fixed_cost"] * v["frames"] for v in per.values()) / len(c))
    return out


def _captured(r: dict[str, Any]) -> float | None:
    """(best fixed - selector) / (best fixed - search) of a cost report; None when the search gains nothing."""
    gap = r["fixed_cost"] - r["search_cost"]
    return float((r["fixed_cost"] - r["selector_cost"]) / gap) if gap > 0 else None


def cross_validate(candidates: Sequence[int], features: np.ndarray, costs: np.ndarray, groups: Sequence[Any], *,
                   levels: Any = None, num_levels: int = 0, l2: float = 1e-3, max_iter: int = 200) -> dict[str, Any]:
    """Leave-one-group-out cross-validation of :func:`fit_selector` (groups: e.g. the video of each frame): for each
    group g a fresh :class:`WidthSelector` is fitted to the frames of the other groups and its argmax is costed on
    g's frames. Per group: the mean cost per frame (bpp + lambda D + gamma C, as ``costs``) of that held-out
    selector, of the width search, of the best fixed pair *of g itself* (the bar a selector must pass: a selector
    whose cost is above it is no better than some constant pair on that content) and of the fixed pair the other
    groups would choose. ``captured`` = (best fixed - selector) / (best fixed - search): the share of the search's
    gain over the best fixed pair that the selector realises on content it was not fitted to (1: all of it, 0:
    none, < 0: worse than the fixed pair). Needs at least two groups. ``num_levels`` L > 0: per-level selectors
    (``WidthSelector(levels=L)``) fitted with the frames' ``levels``; each group's row then also has
    ``fixed_per_level_cost``, the cost there of each level's own best fixed pair."""
    f = np.asarray(features, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    g = np.asarray([str(v) for v in groups])
    if len(g) != len(f):
        raise ShapeError(f"{len(g)} group labels for {len(f)} frames; give one per frame")
    names = list(dict.fromkeys(g.tolist()))
    if len(names) < 2:
        raise ConfigError(f"cross-validation needs frames of at least two groups (videos), got {len(names)}; "
                          "fit on two or more videos")
    lv = _frame_levels(WidthSelector(candidates, levels=num_levels), levels, len(f))
    rows = []
    for name in names:
        test = g == name
        sel = WidthSelector(candidates, levels=num_levels)
        train = fit_selector(sel, f[~test], c[~test], levels=None if lv is None else lv[~test], l2=l2,
                             max_iter=max_iter)
        held = _choice_report(sel, f[test], c[test], None if lv is None else lv[test])
        cands = sel.candidates
        ti, tj = cands.index(train["fixed_pair"][0]), cands.index(train["fixed_pair"][1])
        rows.append({"group": name, "frames": held["frames"], "selector_cost": held["selector_cost"],
                     "search_cost": held["search_cost"], "fixed_pair": held["fixed_pair"],
                     "fixed_cost": held["fixed_cost"], "train_fixed_pair": train["fixed_pair"],
                     "train_fixed_cost": float(c[test][:, ti, tj].mean()),
                     "captured": _captured(held),
                     "beats_fixed": bool(held["selector_cost"] < held["fixed_cost"]),
                     "selector_pairs": held["selector_pairs"], "train_selector_cost": train["selector_cost"],
                     **({"fixed_per_level_cost": held["fixed_per_level_cost"]} if lv is not None else {})})
    weights = np.array([r["frames"] for r in rows], dtype=np.float64)

    def mean(key: str) -> float:
        return float(np.dot(weights, [r[key] for r in rows]) / weights.sum())

    total = {k: mean(k) for k in ("selector_cost", "search_cost", "fixed_cost", "train_fixed_cost")
             + (("fixed_per_level_cost",) if lv is not None else ())}
    total["captured"] = _captured(total)
    return {"groups": rows, "mean": total, "l2": float(l2),
            "beats_fixed_on_every_group": all(r["beats_fixed"] for r in rows)}


__all__ = ["FEATURE_NAMES", "MOTION_SCALE", "NUM_FEATURES", "WidthSelector", "cross_validate", "fit_selector",
           "frame_features", "region_features", "search_costs"]
