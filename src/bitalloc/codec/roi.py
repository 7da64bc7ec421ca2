"""Regions of interest (ROI) per frame, from pluggable sources, and the ROI mask at any codec resolution.

Every source maps frames (a :class:`~bitalloc.codec.frames.YUVFrames`, or luma as uint8 [T, H, W]) to an
:class:`ROIResult`: one boolean mask per frame at luma resolution ([T, H, W], True = ROI), the score map it was
thresholded from, and the measured time per frame (``time.perf_counter`` around each frame's work; one-off setup
such as loading a cascade is reported apart, as ``setup_seconds``). The paper (SPEC section 3, rebuttal A2) used
UNISAL, a video saliency network whose weights cannot be obtained offline here; docs/roi.md says what replaces it.

Sources (``ROI_SOURCES``; ``--roi`` text parsed by :func:`parse_roi_spec`):

* ``spectral`` -- spectral-residual saliency (Hou & Zhang, "Saliency detection: a spectral residual approach",
  CVPR 2007; OpenCV contrib's ``cv2.saliency.StaticSaliencySpectralResidual``, which works on a 64 x 64 copy of
  the frame and resizes the map back), on luma.
* ``motion`` -- motion saliency. ``method="diff"``: the absolute luma difference with the previous frame,
  Gaussian-smoothed (sigma ``sigma`` pixels); frame 0 uses the difference with frame 1. ``method="flow"``: the
  magnitude of a motion field relative to the frame's median motion (so a camera pan is not salient), from the
  flows given to the call (e.g. the codec's own motion, [T, 2, h, w] in luma pixels at 1/1 or 1/2 resolution,
  ``flows[t]`` the motion of frame t; a list of T - 1 flows is taken as frames 1..T-1) or, without them, DIS
  optical flow (:func:`bitalloc.codec.motion.estimate_flow`) between consecutive frames, timed per frame.
  Scores below ``floor`` (luma levels for "diff", pixels for "flow") are never ROI, so a still scene has none.
* ``faces`` -- OpenCV's Haar cascade face detector (Viola & Jones 2001; the cascades shipped inside the OpenCV
  wheel, ``cv2.data.haarcascades``); each detection's box, enlarged by ``margin`` of its size on every side,
  is ROI.
* ``mask:PATH`` -- user masks: a ``.npy`` array ([T, H, W] or [H, W] for every frame; bool, integers (nonzero =
  ROI) or floats in [0, 1] (>= 0.5 = ROI)), a folder of PNG frames (natural order; grey level >= 128 = ROI) or
  one PNG for every frame. At luma resolution; more masks than frames are fine (the first T are used).

**Threshold rule** (saliency sources): per frame, the score map is scaled to 0..255 and split by Otsu's
threshold (the level that maximises the between-class variance of the two classes; Otsu 1979, via
``cv2.threshold``), or, with ``top=p``, the pixels scoring at least the (1 - p) quantile are kept (top-p share, ties
included). Connected ROI components (8-connected) smaller than ``min_area`` (a fraction of the frame area) are
dropped. A constant score map gives no ROI.

**At the codec's resolutions** (:func:`to_latent`): the latents are at 1/16 of luma resolution and the decoder's
layers at 1/8, 1/4, 1/2; a block of ``factor x factor`` luma pixels is ROI iff any of its pixels is (rule
"any", the default: max pooling), or iff at least ``min_fraction`` of them are (rule "fraction"), or carries the
fraction itself (rule "soft"); the frame is padded with non-ROI to whole blocks. "any" is the default because
the ROI is where viewers look: every ROI pixel then lies in an ROI block at every resolution, so it is coded and
reconstructed at the ROI width wherever it appears, and the masks are nested (the mask at 1/16 contains the
block-reduced mask at 1/8). The price is a larger ROI at coarse resolutions (at most one block around each
region), which the cost model counts (:mod:`bitalloc.codec.cost`). The same rule serves the region quantizers
(:func:`bitalloc.quantizers.region.mask_at`).

OpenCV is imported inside the functions that need it: importing this module needs numpy and torch only.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from bitalloc.errors import ConfigError, DataError, ShapeError
from bitalloc.quantizers.region import apply_rule, block_fraction, check_rule

HAAR_CASCADES = {"frontalface_default": "haarcascade_frontalface_default.xml",
                 "frontalface_alt": "haarcascade_frontalface_alt.xml",
                 "frontalface_alt2": "haarcascade_frontalface_alt2.xml",
                 "profileface": "haarcascade_profileface.xml"}


def _cv2() -> Any:
    try:
        import cv2
    except ImportError:  # pragma: no cover - the codec extra is installed with `all`
        raise ConfigError("ROI detection needs OpenCV: pip install 'bitalloc[codec]'") from None
    return cv2


@dataclass
class ROIResult:
    """ROI masks of T frames: ``masks`` bool [T, H, W] (luma resolution); ``scores`` float32 [T, H, W] (the map
    that was thresholded; None for user masks); ``seconds`` float64 [T] measured per frame; ``setup_seconds``
    one-off work (loading a cascade or a mask file); ``source`` the spec text of the source."""

    masks: np.ndarray
    seconds: np.ndarray
    source: str
    scores: np.ndarray | None = None
    setup_seconds: float = 0.0

    @property
    def fraction(self) -> np.ndarray:
        """Share of ROI pixels per frame, float64 [T]."""
        return self.masks.reshape(len(self.masks), -1).mean(1, dtype=np.float64)

    @property
    def mean_seconds(self) -> float:
        return float(np.mean(self.seconds)) if len(self.seconds) else 0.0

    def summary(self) -> dict[str, Any]:
        """Plain numbers for reports: source, frames, mean ROI share, time per frame (ms), setup (ms)."""
        return {"source": self.source, "frames": int(len(self.masks)), "roi_fraction": float(np.mean(self.fraction)),
                "ms_per_frame": 1e3 * self.mean_seconds, "setup_ms": 1e3 * self.setup_seconds}


def luma_of(frames: Any) -> np.ndarray:
    """Luma of ``frames`` as uint8 [T, H, W]: a YUVFrames' ``y``, or a uint8 array [T, H, W] / [H, W]."""
    y = getattr(frames, "y", frames)
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    y = np.asarray(y)
    if y.ndim == 2:
        y = y[None]
    if y.ndim != 3 or y.dtype != np.uint8 or 0 in y.shape:
        raise ShapeError(f"ROI sources take YUVFrames or luma as uint8 [T, H, W]; got a {y.dtype} array of shape "
                         f"{tuple(y.shape)}")
    return y


# ---- thresholding -------------------------------------------------------------------------------------------

def threshold_scores(score: np.ndarray, *, top: float | None = None, min_area: float = 0.0,
                     floor: float | None = None) -> np.ndarray:
    """Boolean ROI mask of one score map [H, W] (module docstring: Otsu, or the top ``top`` share; components
    below ``min_area`` of the frame dropped; scores below ``floor`` never ROI)."""
    cv2 = _cv2()
    s = np.nan_to_num(np.asarray(score, dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(s.min()), float(s.max())
    if hi <= lo:
        return np.zeros(s.shape, dtype=bool)
    if top is not None:
        k = max(1, int(np.ceil(float(top) * s.size)))
        kth = np.partition(s.reshape(-1), s.size - k)[s.size - k]
        mask = s >= kth
    else:
        s8 = np.rint((s - lo) * (255.0 / (hi - lo))).astype(np.uint8)
        level, _ = cv2.threshold(s8, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
        mask = s8 > level
    if floor is not None:
        mask &= s >= float(floor)
    if min_area > 0 and mask.any():
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        small = np.flatnonzero(stats[:, cv2.CC_STAT_AREA] < float(min_area) * s.size)
        small = small[small != 0]
        if small.size:
            mask &= ~np.isin(labels, small)
    return mask


def _check_threshold_options(top: float | None, min_area: float) -> None:
    if top is not None and not 0.0 < float(top) <= 1.0:
        raise ConfigError(f"top={top} must be a share of the frame in (0, 1], e.g. top=0.1")
    if not 0.0 <= float(min_area) < 1.0:
        raise ConfigError(f"min_area={min_area} must be a share of the frame in [0, 1), e.g. min_area=0.002")


# ---- sources ------------------------------------------------------------------------------------------------

class ROISource:
    """Base of ROI sources: ``source(frames, flows=None) -> ROIResult``."""

    name = "base"

    def __call__(self, frames: Any, flows: Any = None) -> ROIResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def spec(self) -> str:
        """The ``--roi`` text that rebuilds this source."""
        opts = ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self)  # type: ignore[arg-type]
                        if getattr(self, f.name) != f.default)
        return self.name + (f":{opts}" if opts else "")


def _timed_frames(y: np.ndarray, score_of: Callable[[int], np.ndarray], threshold: Callable[[np.ndarray], np.ndarray],
                  source: str, setup: float = 0.0) -> ROIResult:
    """Score and threshold every frame, timing each (``time.perf_counter``)."""
    masks = np.zeros(y.shape, dtype=bool)
    scores = np.zeros(y.shape, dtype=np.float32)
    seconds = np.zeros(len(y), dtype=np.float64)
    for t in range(len(y)):
        start = time.perf_counter()
        score = score_of(t)
        masks[t] = threshold(score)
        seconds[t] = time.perf_counter() - start
        scores[t] = score
    return ROIResult(masks, seconds, source, scores, setup)


@dataclass
class SpectralSaliency(ROISource):
    """Spectral-residual saliency on luma (module docstring), thresholded by Otsu or ``top``."""

    top: float | None = None
    min_area: float = 0.002
    name = "spectral"

    def __post_init__(self) -> None:
        _check_threshold_options(self.top, self.min_area)

    def __call__(self, frames: Any, flows: Any = None) -> ROIResult:
        y = luma_of(frames)
        cv2 = _cv2()
        start = time.perf_counter()
        model = cv2.saliency.StaticSaliencySpectralResidual_create()
        setup = time.perf_counter() - start

        def score_of(t: int) -> np.ndarray:
            ok, sal = model.computeSaliency(np.ascontiguousarray(y[t]))
            if not ok:  # pragma: no cover - OpenCV reports failure only for empty images
                raise DataError(f"spectral-residual saliency failed on frame {t}")
            return sal.astype(np.float32)

        return _timed_frames(y, score_of, lambda s: threshold_scores(s, top=self.top, min_area=self.min_area),
                             self.spec(), setup)


MOTION_METHODS = ("diff", "flow")


def flows_at_luma(flows: Any, count: int, height: int, width: int) -> np.ndarray:
    """Motion fields as float32 [T, 2, H, W] at luma resolution: from [T, 2, h, w] (or T - 1 fields, taken as frames
    1..T-1, frame 0 getting frame 1's) with H / h an integer factor (nearest upsampling, then cropped)."""
    f = flows.detach().cpu().numpy() if isinstance(flows, torch.Tensor) else np.asarray(
        [x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in flows]
        if isinstance(flows, (list, tuple)) else flows)
    if f.ndim != 4 or f.shape[1] != 2:
        raise ShapeError(f"motion fields must be [T, 2, h, w] (x, y in luma pixels), got shape {tuple(f.shape)}")
    if len(f) == count - 1 and count > 1:
        f = np.concatenate([f[:1], f])
    if len(f) < count:
        raise ShapeError(f"{len(f)} motion fields for {count} frames; give one per frame (or one per P frame)")
    f = f[:count].astype(np.float32)
    h, w = f.shape[-2:]
    fy, fx = -(-height // h), -(-width // w)
    if fy != fx:
        raise ShapeError(f"a {h}x{w} motion field does not cover {height}x{width} frames by one integer factor "
                         "(give fields at luma or half luma resolution)")
    if fy > 1:
        f = f.repeat(fy, axis=2).repeat(fx, axis=3)
    return np.ascontiguousarray(f[:, :, :height, :width])


@dataclass
class MotionSaliency(ROISource):
    """Motion saliency: ``method`` "diff" (frame differences) or "flow" (motion relative to the median motion,
    from the given flows or DIS optical flow); see the module docstring."""

    method: str = "diff"
    sigma: float = 2.0
    floor: float | None = None
    top: float | None = None
    min_area: float = 0.002
    name = "motion"

    def __post_init__(self) -> None:
        if self.method not in MOTION_METHODS:
            raise ConfigError(f"motion method {self.method!r} is not one of {MOTION_METHODS}")
        if float(self.sigma) < 0:
            raise ConfigError(f"sigma={self.sigma} must be >= 0 (pixels)")
        _check_threshold_options(self.top, self.min_area)

    @property
    def score_floor(self) -> float:
        """Scores below this are never ROI: 8 luma levels ("diff") or 0.5 pixel ("flow") unless ``floor`` is set."""
        return float(self.floor) if self.floor is not None else (8.0 if self.method == "diff" else 0.5)

    def _smooth(self, s: np.ndarray) -> np.ndarray:
        if self.sigma <= 0:
            return s
        return _cv2().GaussianBlur(s, (0, 0), float(self.sigma))

    def __call__(self, frames: Any, flows: Any = None) -> ROIResult:
        y = luma_of(frames)
        t_count, height, width = y.shape
        yf = y.astype(np.float32)
        if self.method == "diff":
            if flows is not None:
                raise ConfigError("motion method 'diff' uses frame differences; pass flows with method='flow'")

            def score_of(t: int) -> np.ndarray:
                if t_count == 1:
                    return np.zeros((height, width), np.float32)
                other = t - 1 if t > 0 else 1
                return self._smooth(np.abs(yf[t] - yf[other]))
        else:
            given = flows_at_luma(flows, t_count, height, width) if flows is not None else None

            def score_of(t: int) -> np.ndarray:
                if given is not None:
                    f = given[t]
                elif t_count == 1:
                    f = np.zeros((2, height, width), np.float32)
                else:
                    from bitalloc.codec.motion import estimate_flow

                    other = t - 1 if t > 0 else 1
                    f = estimate_flow(y[t], y[other])
                rel = f - np.median(f.reshape(2, -1), axis=1).reshape(2, 1, 1)
                return self._smooth(np.sqrt(rel[0] ** 2 + rel[1] ** 2).astype(np.float32))

        return _timed_frames(y, score_of, lambda s: threshold_scores(s, top=self.top, min_area=self.min_area,
                                                                 floor=self.score_floor), self.spec())


@dataclass
class FaceROI(ROISource):
    """Faces by OpenCV's Haar cascade (``cascade``: a key of :data:`HAAR_CASCADES`), boxes enlarged by
    ``margin``; ``scale_factor``, ``min_neighbors``, ``min_size`` (full-resolution pixels) as in
    ``detectMultiScale``. ``downscale`` = d > 1 detects on a copy shrunk d times (``cv2.INTER_AREA``) and scales
    the boxes back: about d^2 times faster, for faces of at least ``d * 24`` pixels."""

    cascade: str = "frontalface_default"
    scale_factor: float = 1.1
    min_neighbors: int = 5
    min_size: int = 20
    margin: float = 0.2
    downscale: int = 1
    name = "faces"

    def __post_init__(self) -> None:
        if self.cascade not in HAAR_CASCADES:
            raise ConfigError(f"cascade {self.cascade!r} is not one of {sorted(HAAR_CASCADES)}")
        if float(self.scale_factor) <= 1.0:
            raise ConfigError(f"scale_factor={self.scale_factor} must be > 1 (e.g. 1.1)")
        if (int(self.min_neighbors) < 0 or int(self.min_size) < 1 or not 0.0 <= float(self.margin) <= 2.0
                or int(self.downscale) < 1):
            raise ConfigError("faces options: min_neighbors >= 0, min_size >= 1 pixel, margin in [0, 2], "
                              "downscale >= 1")

    def load(self) -> Any:
        """The cascade classifier from the OpenCV wheel's data (DataError if it is missing or unreadable)."""
        cv2 = _cv2()
        path = os.path.join(cv2.data.haarcascades, HAAR_CASCADES[self.cascade])
        clf = cv2.CascadeClassifier(path)
        if clf.empty():
            raise DataError(f"the Haar cascade {path} is missing or unreadable; reinstall "
                            "opencv-contrib-python-headless (pip install --force-reinstall 'bitalloc[codec]')")
        return clf

    def boxes_to_mask(self, boxes: np.ndarray, height: int, width: int) -> np.ndarray:
        """Union of the boxes (x, y, w, h), each enlarged by ``margin`` of its size per side, clipped: bool [H, W]."""
        mask = np.zeros((height, width), dtype=bool)
        for x, y, w, h in np.asarray(boxes, dtype=np.int64).reshape(-1, 4):
            dx, dy = int(round(self.margin * w)), int(round(self.margin * h))
            mask[max(0, y - dy):min(height, y + h + dy), max(0, x - dx):min(width, x + w + dx)] = True
        return mask

    def __call__(self, frames: Any, flows: Any = None) -> ROIResult:
        y = luma_of(frames)
        cv2 = _cv2()
        start = time.perf_counter()
        clf = self.load()
        setup = time.perf_counter() - start
        masks = np.zeros(y.shape, dtype=bool)
        seconds = np.zeros(len(y), dtype=np.float64)
        d = int(self.downscale)
        small = (max(1, y.shape[2] // d), max(1, y.shape[1] // d))
        side = max(1, int(round(self.min_size / d)))
        for t in range(len(y)):
            start = time.perf_counter()
            img = np.ascontiguousarray(y[t]) if d == 1 else cv2.resize(y[t], small, interpolation=cv2.INTER_AREA)
            boxes = clf.detectMultiScale(img, scaleFactor=float(self.scale_factor),
                                         minNeighbors=int(self.min_neighbors), minSize=(side, side))
            masks[t] = self.boxes_to_mask(np.asarray(boxes).reshape(-1, 4) * d, *y.shape[1:])
            seconds[t] = time.perf_counter() - start
        return ROIResult(masks, seconds, self.spec(), masks.astype(np.float32), setup)


def _mask_values(arr: np.ndarray, where: str) -> np.ndarray:
    if arr.dtype == np.bool_:
        return arr
    if np.issubdtype(arr.dtype, np.integer):
        return arr != 0
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise DataError(f"{where}: float masks must lie in [0, 1] (>= 0.5 is ROI); rescale the array")
        return arr >= 0.5
    raise DataError(f"{where}: masks of dtype {arr.dtype} are not supported; save bool, integer or float arrays")


def read_masks(path: str | os.PathLike) -> np.ndarray:
    """User masks from ``path`` as bool [T, H, W] (module docstring: .npy, a folder of PNG frames, or one PNG)."""
    from bitalloc.codec.video_io import _natural_key

    p = Path(path)
    if not p.exists():
        raise DataError(f"mask path {p} does not exist; give a .npy array or a folder of PNG masks (--roi mask:PATH)")
    if p.is_dir() or p.suffix.lower() == ".png":
        files = [p] if not p.is_dir() else sorted(
            (f for f in p.iterdir() if f.is_file() and f.suffix.lower() == ".png"), key=lambda f: _natural_key(f.name))
        if not files:
            raise DataError(f"{p} holds no PNG masks; give a folder of .png masks (one per frame) or a .npy array")
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - the codec extra installs Pillow
            raise ConfigError("PNG masks need Pillow: pip install 'bitalloc[codec]'") from None
        planes = []
        for f in files:
            try:
                with Image.open(f) as im:
                    planes.append(np.asarray(im.convert("L")) >= 128)
            except (OSError, ValueError) as exc:
                raise DataError(f"{f} is not a readable PNG mask ({exc}); re-create it") from None
        if len({a.shape for a in planes}) != 1:
            raise DataError(f"the PNG masks in {p} have different sizes; give every mask at the frames' luma size")
        return np.stack(planes)
    if p.suffix.lower() != ".npy":
        raise DataError(f"{p}: masks are read from .npy arrays or PNG files; got {p.suffix or 'no extension'}")
    try:
        arr = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"{p} is not a readable .npy array ({str(exc)[:120]}); re-create it with numpy.save") from None
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or 0 in arr.shape:
        raise DataError(f"{p}: masks must be [T, H, W] or [H, W], got shape {tuple(arr.shape)}")
    return _mask_values(arr, str(p))


@dataclass
class UserMasks(ROISource):
    """Masks from a file or folder (:func:`read_masks`), checked against the frames' count and luma size."""

    path: str = ""
    name = "mask"

    def __post_init__(self) -> None:
        if not str(self.path):
            raise ConfigError("user masks need a path: --roi mask:PATH (a .npy array or a folder of PNG masks)")

    def spec(self) -> str:
        return f"mask:{self.path}"

    def __call__(self, frames: Any, flows: Any = None) -> ROIResult:
        y = luma_of(frames)
        start = time.perf_counter()
        masks = read_masks(self.path)
        setup = time.perf_counter() - start
        t_count, height, width = y.shape
        if masks.shape[1:] != (height, width):
            raise DataError(f"the masks in {self.path} are {masks.shape[1]}x{masks.shape[2]} but the frames are "
                            f"{height}x{width}; give masks at the frames' luma resolution")
        if len(masks) == 1:
            masks = np.repeat(masks, t_count, axis=0)
        elif len(masks) < t_count:
            raise DataError(f"{self.path} holds {len(masks)} masks for {t_count} frames; give one mask per frame (or "
                            "one for all), or code fewer frames (--frames)")
        masks = np.ascontiguousarray(masks[:t_count])
        return ROIResult(masks, np.full(t_count, setup / t_count), self.spec(), None, setup)


ROI_SOURCES: dict[str, type[ROISource]] = {"spectral": SpectralSaliency, "motion": MotionSaliency, "faces": FaceROI,
                                           "mask": UserMasks}


def roi_source(name: str, **options: Any) -> ROISource:
    """The ROI source ``name`` (a key of :data:`ROI_SOURCES`) with ``options`` (its dataclass fields)."""
    try:
        cls = ROI_SOURCES[name]
    except KeyError:
        raise ConfigError(f"unknown ROI source {name!r}; choose one of {sorted(ROI_SOURCES)} "
                          "(--roi spectral|motion|faces|mask:PATH)") from None
    valid = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"ROI source {name!r} has no option {', '.join(unknown)}; its options: {', '.join(valid)}")
    return cls(**options)


def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_roi_spec(text: str) -> ROISource:
    """Parse ``--roi`` text: ``NAME`` or ``NAME:KEY=VALUE[,KEY=VALUE...]`` (e.g. ``spectral:top=0.1``,
    ``motion:method=flow``, ``faces:min_neighbors=3``), or ``mask:PATH`` (everything after the colon is the path)."""
    spec = str(text).strip()
    name, _, rest = spec.partition(":")
    name = name.strip().lower()
    if name == "mask":
        return roi_source("mask", path=rest)
    options: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--roi {spec!r}: option {item!r} is not KEY=VALUE (e.g. spectral:top=0.1)")
        options[key.strip()] = _value(value)
    return roi_source(name, **options)


# ---- masks at the codec's resolutions ----------------------------------------------------------------------

def to_latent(mask: np.ndarray | torch.Tensor, factor: int = 16, *, rule: str = "any",
              min_fraction: float = 0.5) -> np.ndarray | torch.Tensor:
    """Masks [T, H, W] (or [H, W]) at 1/``factor`` resolution: [T, ceil(H / f), ceil(W / f)], the frame padded
    with non-ROI to whole blocks; a block is ROI by ``rule`` (module docstring: "any" = max pooling, "fraction" =
    at least ``min_fraction`` of its pixels, "soft" = the fraction, float32). Same type (numpy / torch) as given."""
    check_rule(rule, min_fraction)
    is_np = not isinstance(mask, torch.Tensor)
    m = torch.from_numpy(np.asarray(mask)) if is_np else mask
    squeeze = m.ndim == 2
    if squeeze:
        m = m[None]
    if m.ndim != 3:
        raise ShapeError(f"masks must be [T, H, W] or [H, W], got shape {tuple(m.shape)}")
    out = apply_rule(block_fraction(m[:, None], factor), rule, min_fraction)[:, 0]
    out = out[0] if squeeze else out
    return out.numpy() if is_np else out


def pad_masks(mask: np.ndarray, height: int, width: int) -> np.ndarray:
    """Masks [T, H, W] padded with non-ROI (False) to ``height`` x ``width`` (the codec's padded frame size)."""
    t, h, w = mask.shape
    if height < h or width < w:
        raise ShapeError(f"cannot pad {h}x{w} masks to the smaller {height}x{width}")
    out = np.zeros((t, height, width), dtype=mask.dtype)
    out[:, :h, :w] = mask
    return out


__all__ = ["HAAR_CASCADES", "MOTION_METHODS", "ROI_SOURCES", "FaceROI", "MotionSaliency", "ROIResult", "ROISource",
           "SpectralSaliency", "UserMasks", "flows_at_luma", "luma_of", "pad_masks", "parse_roi_spec", "read_masks",
           "roi_source", "threshold_scores", "to_latent"]
