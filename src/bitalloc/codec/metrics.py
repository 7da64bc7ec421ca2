"""Quality and rate metrics of coded video: PSNR on YUV 4:2:0 and on RGB, Bjontegaard deltas, bits per pixel, kbps.

**PSNR** (per frame, per plane): PSNR = 10 log10(peak^2 / MSE), MSE the mean squared difference of the 8-bit
samples, peak = 255. A frame coded exactly (MSE = 0) has infinite PSNR; it is capped at 100 dB (as are the
rare finite values above 100 dB). PSNR_YUV = (6 PSNR_Y + PSNR_U + PSNR_V) / 8 (the JVET / MPEG weighting for
4:2:0, as in SPEC section 3). Averages over frames are reported (the video-coding convention) and, next to them,
the PSNR of the MSE averaged over frames (``*_mse`` keys), which a few exact frames cannot inflate.

**RGB PSNR**: the MSE over all three channels of 8-bit RGB frames; YUV frames are converted to RGB by the one
documented conversion (:func:`bitalloc.codec.frames.yuv420_to_rgb`) for source and decoded frames alike.

**Bjontegaard deltas** (G. Bjontegaard, "Calculation of average PSNR differences between RD-curves",
VCEG-M33, 2001): each curve is interpolated as log(rate) as a function of PSNR (BD-rate) or PSNR as a function
of log(rate) (BD-PSNR), both interpolants are integrated over the interval where the curves overlap, and the
mean difference (test - anchor) over that interval is the delta; BD-rate = 100 (exp(mean delta log-rate) - 1)
percent (the base of the logarithm cancels). Interpolants (``method``):

* ``"cubic"``: VCEG-M33's least-squares cubic polynomial (exact through 4 points; needs at least 4);
* ``"pchip"``: piecewise cubic Hermite interpolation (Fritsch-Carlson monotone slopes), what the JCT-VC / JVET
  common-test-condition spreadsheets use (JCTVC-L1100, JVET-T2010);
* ``"akima"``: Akima's piecewise cubic (Herglotz et al., ICIP 2022, "Beyond Bjontegaard"), linear for 2 points.

Checked against the PyPI ``bjontegaard`` package (FAU-LMS) in the tests.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from bitalloc.errors import ConfigError, DataError, ShapeError

from .frames import YUVFrames, check_rgb, yuv420_to_rgb

PSNR_CAP = 100.0
BD_METHODS = ("akima", "pchip", "cubic")


def psnr_from_mse(mse: np.ndarray | float, peak: float = 255.0) -> np.ndarray:
    """10 log10(peak^2 / mse), capped at 100 dB (mse = 0 gives 100)."""
    mse = np.asarray(mse, dtype=np.float64)
    with np.errstate(divide="ignore"):
        psnr = 10.0 * np.log10(peak * peak / mse)
    return np.minimum(psnr, PSNR_CAP)


def _mse_per_frame(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = a.astype(np.int64) - b.astype(np.int64)
    return (d * d).reshape(d.shape[0], -1).mean(axis=1)


def mse_yuv_per_frame(ref: YUVFrames, dec: YUVFrames) -> np.ndarray:
    """Per frame, MSE_YUV = (6 MSE_Y + MSE_U + MSE_V) / 8 in pixel units (float64 [T]): the distortion of the codec's
    objective (bits per pixel + lambda * MSE_YUV), weighted as PSNR_YUV is."""
    _check_pair(ref, dec)
    return (6 * _mse_per_frame(ref.y, dec.y) + _mse_per_frame(ref.u, dec.u) + _mse_per_frame(ref.v, dec.v)) / 8.0


def _check_pair(ref: YUVFrames, dec: YUVFrames) -> None:
    for name, x in (("ref", ref), ("dec", dec)):
        if not isinstance(x, YUVFrames):
            raise ShapeError(f"psnr_yuv: {name} must be YUVFrames, got {type(x).__name__}; convert RGB frames with "
                             f"rgb_to_yuv420 or use psnr_rgb.")
    if ref.y.shape != dec.y.shape:
        raise ShapeError(f"psnr: reference {list(ref.y.shape)} and decoded {list(dec.y.shape)} frames differ in "
                         f"count or size; compare the same frames (crop padding away first).")
    if len(ref) == 0:
        raise ShapeError("psnr: no frames to compare.")


def psnr_yuv(ref: YUVFrames, dec: YUVFrames, peak: float = 255.0) -> dict[str, Any]:
    """PSNR of decoded 4:2:0 frames against the reference, per plane and PSNR_YUV = (6 Y + U + V) / 8.

    Returns ``psnr_y``, ``psnr_u``, ``psnr_v``, ``psnr_yuv`` (means of the per-frame values), ``psnr_y_mse``,
    ``psnr_u_mse``, ``psnr_v_mse``, ``psnr_yuv_mse`` (PSNR of the MSE averaged over frames, the last weighted
    6:1:1 the same way), ``mse_y``, ``mse_u``, ``mse_v`` (mean MSE), ``frames`` and ``per_frame`` (lists
    ``psnr_y``, ``psnr_u``, ``psnr_v``, ``psnr_yuv``, one value per frame). Frames coded exactly cap at 100 dB.
    """
    _check_pair(ref, dec)
    out: dict[str, Any] = {"frames": len(ref)}
    per_frame: dict[str, list[float]] = {}
    weighted = np.zeros(len(ref))
    weighted_mse = 0.0
    for name, a, b, weight in (("y", ref.y, dec.y, 6), ("u", ref.u, dec.u, 1), ("v", ref.v, dec.v, 1)):
        mse = _mse_per_frame(a, b)
        psnr = psnr_from_mse(mse, peak)
        per_frame[f"psnr_{name}"] = psnr.tolist()
        out[f"psnr_{name}"] = float(psnr.mean())
        out[f"mse_{name}"] = float(mse.mean())
        out[f"psnr_{name}_mse"] = float(psnr_from_mse(mse.mean(), peak))
        weighted += weight * psnr
        weighted_mse += weight * out[f"psnr_{name}_mse"]
    per_frame["psnr_yuv"] = (weighted / 8.0).tolist()
    out["psnr_yuv"] = float(np.mean(weighted / 8.0))
    out["psnr_yuv_mse"] = weighted_mse / 8.0
    out["per_frame"] = per_frame
    return out


def _as_rgb(x: YUVFrames | np.ndarray) -> np.ndarray:
    return yuv420_to_rgb(x) if isinstance(x, YUVFrames) else check_rgb(x)


def psnr_rgb(ref: YUVFrames | np.ndarray, dec: YUVFrames | np.ndarray, peak: float = 255.0) -> dict[str, Any]:
    """PSNR on 8-bit RGB: YUV frames go through :func:`~bitalloc.codec.frames.yuv420_to_rgb` (the one
    documented conversion, for source and decoded frames alike); RGB arrays (uint8 [T, H, W, 3] or [H, W, 3])
    are used as they are. MSE per frame over H x W x 3 samples.

    Returns ``psnr_rgb`` (mean over frames), ``psnr_rgb_mse`` (PSNR of the mean MSE), ``mse_rgb``, ``frames``
    and ``per_frame`` (``psnr_rgb`` list). Frames coded exactly cap at 100 dB.
    """
    a, b = _as_rgb(ref), _as_rgb(dec)
    if a.shape != b.shape or a.shape[0] == 0:
        raise ShapeError(f"psnr_rgb: reference {list(a.shape)} and decoded {list(b.shape)} frames differ in count "
                         f"or size (or are empty); compare the same frames.")
    mse = _mse_per_frame(a, b)
    psnr = psnr_from_mse(mse, peak)
    return {"frames": int(a.shape[0]), "psnr_rgb": float(psnr.mean()),
            "psnr_rgb_mse": float(psnr_from_mse(mse.mean(), peak)), "mse_rgb": float(mse.mean()),
            "per_frame": {"psnr_rgb": psnr.tolist()}}


def bits_per_pixel(num_bytes: int, frames: int, height: int, width: int) -> float:
    """8 num_bytes / (frames x height x width): bits per (luma) pixel."""
    if frames < 1 or height < 1 or width < 1:
        raise ConfigError(f"bits_per_pixel needs frames, height and width >= 1, got {frames}, {height}, {width}.")
    return 8.0 * num_bytes / (frames * height * width)


def kbps(num_bytes: int, frames: int, fps: float) -> float:
    """Bit rate in kilobits (1000 bits) per second: 8 num_bytes / 1000 / (frames / fps)."""
    if frames < 1 or not fps > 0:
        raise ConfigError(f"kbps needs frames >= 1 and fps > 0, got frames={frames}, fps={fps}.")
    return 8.0 * num_bytes / 1000.0 * fps / frames


def _curve(x: Sequence[float], y: Sequence[float], what: str) -> tuple[np.ndarray, np.ndarray]:
    """The points sorted by x (ascending), checked: same length, at least 2, finite, distinct x."""
    xa, ya = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if xa.size != ya.size:
        raise ShapeError(f"{what}: {xa.size} and {ya.size} values; give one PSNR per rate.")
    if xa.size < 2:
        raise DataError(f"{what}: a curve needs at least 2 rate-PSNR points, got {xa.size}.")
    if not (np.all(np.isfinite(xa)) and np.all(np.isfinite(ya))):
        raise DataError(f"{what}: rates and PSNR values must be finite numbers.")
    order = np.argsort(xa, kind="stable")
    xa, ya = xa[order], ya[order]
    if np.any(np.diff(xa) == 0):
        raise DataError(f"{what}: two points share the same abscissa {xa[np.flatnonzero(np.diff(xa) == 0)[0]]:g}; "
                        f"drop the duplicate point.")
    return xa, ya


def _integral(x: np.ndarray, y: np.ndarray, lo: float, hi: float, method: str) -> float:
    """Integral over [lo, hi] of the ``method`` interpolant of the points (x, y) (x ascending)."""
    if method == "cubic":
        if x.size < 4:
            raise ConfigError(f"method='cubic' fits a cubic polynomial and needs at least 4 points per curve, got "
                              f"{x.size}; use method='pchip' or 'akima'.")
        poly = np.polynomial.Polynomial.fit(x, y, 3).integ()
        return float(poly(hi) - poly(lo))
    from scipy.interpolate import Akima1DInterpolator, PchipInterpolator

    if method == "pchip" or x.size == 2:  # two points: PCHIP (and Akima) reduce to the straight line
        return float(PchipInterpolator(x, y).integrate(lo, hi))
    return float(Akima1DInterpolator(x, y).integrate(lo, hi))


def _bd_mean(x_a: np.ndarray, y_a: np.ndarray, x_b: np.ndarray, y_b: np.ndarray, method: str) -> float:
    """Mean of (interpolant_b - interpolant_a) over the overlap of the abscissae; NaN without overlap."""
    if method not in BD_METHODS:
        raise ConfigError(f"BD method {method!r} is unknown; choose one of {', '.join(BD_METHODS)}.")
    lo, hi = max(x_a[0], x_b[0]), min(x_a[-1], x_b[-1])
    if not hi > lo:
        return math.nan
    return (_integral(x_b, y_b, lo, hi, method) - _integral(x_a, y_a, lo, hi, method)) / (hi - lo)


def _log_rates(rates: Sequence[float], what: str) -> np.ndarray:
    r = np.asarray(rates, dtype=np.float64).ravel()
    if not np.all(r > 0):
        raise DataError(f"{what}: every rate must be positive (got {r.min():g}).")
    return np.log(r)


def bd_rate(rates_a: Sequence[float], psnr_a: Sequence[float], rates_b: Sequence[float], psnr_b: Sequence[float],
            method: str = "akima") -> float:
    """Bjontegaard delta rate (percent) of curve b (test) against curve a (anchor): the average bit-rate change
    at equal PSNR, negative when b needs fewer bits. 100 (exp(D) - 1) with D the mean over the overlapping
    PSNR interval of ln r_b(PSNR) - ln r_a(PSNR), each curve interpolated by ``method`` (module docstring).
    NaN when the PSNR ranges do not overlap. Rates in any unit (the same for both curves)."""
    x_a, y_a = _curve(psnr_a, _log_rates(rates_a, "bd_rate anchor"), "bd_rate anchor")
    x_b, y_b = _curve(psnr_b, _log_rates(rates_b, "bd_rate test"), "bd_rate test")
    return 100.0 * math.expm1(_bd_mean(x_a, y_a, x_b, y_b, method))


def bd_psnr(rates_a: Sequence[float], psnr_a: Sequence[float], rates_b: Sequence[float], psnr_b: Sequence[float],
            method: str = "akima") -> float:
    """Bjontegaard delta PSNR (dB) of curve b against curve a: the mean over the overlapping log-rate interval
    of PSNR_b(log r) - PSNR_a(log r), each curve interpolated by ``method``; positive when b is better. NaN when
    the rate ranges do not overlap."""
    x_a, y_a = _curve(_log_rates(rates_a, "bd_psnr anchor"), psnr_a, "bd_psnr anchor")
    x_b, y_b = _curve(_log_rates(rates_b, "bd_psnr test"), psnr_b, "bd_psnr test")
    return _bd_mean(x_a, y_a, x_b, y_b, method)
