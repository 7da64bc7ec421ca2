"""ROI sources (bitalloc.codec.roi) on synthetic frames, user masks from files, and the mask at latent resolution.

References: where the synthetic object is (a bright square moving over fixed noise, a drawn face, a flow field
with one moving block over a camera pan), files written with NumPy / Pillow themselves, and a brute-force loop for
the block rule of :func:`to_latent`.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitalloc.codec.frames import YUVFrames
from bitalloc.codec.roi import (ROI_SOURCES, FaceROI, MotionSaliency, SpectralSaliency, UserMasks, pad_masks,
                                parse_roi_spec, read_masks, roi_source, threshold_scores, to_latent)
from bitalloc.errors import ConfigError, DataError, ShapeError

pytestmark = pytest.mark.usefixtures("one_thread")

T, H, W = 4, 96, 112


def moving_square() -> tuple[np.ndarray, np.ndarray]:
    """Luma [T, H, W]: fixed Gaussian noise, a bright 24 x 24 square moving right by 6 pixels a frame; and the
    square's masks."""
    rng = np.random.default_rng(0)
    bg = rng.normal(100, 20, (H, W)).clip(0, 255).astype(np.uint8)
    frames = np.repeat(bg[None], T, 0)
    square = np.zeros((T, H, W), dtype=bool)
    for t in range(T):
        square[t, 30:54, 20 + 6 * t:44 + 6 * t] = True
    frames[square] = 230
    return frames, square


def dilate(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            out |= np.roll(np.roll(mask, dy, axis=-2), dx, axis=-1)
    return out


def draw_face(size: int = 160, noise: float = 0.0) -> np.ndarray:
    """A frontal face drawn with OpenCV: oval, eyes, brows, nose, mouth (the Haar cascade finds it)."""
    import cv2

    img = np.full((size, size), 60, np.uint8)
    c = size // 2
    cv2.ellipse(img, (c, c), (40, 52), 0, 0, 360, 190, -1)
    for dx in (-16, 16):
        cv2.ellipse(img, (c + dx, c - 12), (9, 5), 0, 0, 360, 30, -1)
        cv2.line(img, (c + dx - 10, c - 24), (c + dx + 10, c - 24), 50, 3)
    cv2.line(img, (c, c - 6), (c, c + 12), 150, 3)
    cv2.ellipse(img, (c, c + 28), (15, 5), 0, 0, 360, 70, -1)
    img = cv2.GaussianBlur(img, (5, 5), 1.5)
    if noise:
        img = np.clip(img + np.random.default_rng(0).normal(0, noise, img.shape), 0, 255).astype(np.uint8)
    return img


# ---- sources ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("source", [SpectralSaliency(), SpectralSaliency(top=0.05)])
def test_spectral_saliency_finds_the_square(source):
    frames, square = moving_square()
    res = source(frames)
    assert res.masks.shape == (T, H, W) and res.masks.dtype == bool
    assert res.seconds.shape == (T,) and bool((res.seconds > 0).all())
    for t in range(T):
        roi = res.masks[t]
        assert roi.sum() > 0
        assert (roi & dilate(square[t], 8)).sum() >= 0.9 * roi.sum()  # what it marks is the square
        assert (roi & square[t]).sum() >= 0.3 * square[t].sum()  # and it marks much of it (edges, mostly)
    if source.top is not None:
        np.testing.assert_allclose(res.fraction, 0.05, atol=0.01)


def test_motion_saliency_from_frame_differences():
    frames, square = moving_square()
    res = MotionSaliency()(YUVFrames(frames, np.full((T, H // 2, W // 2), 128, np.uint8),
                                     np.full((T, H // 2, W // 2), 128, np.uint8)))
    for t in range(T):
        other = t - 1 if t else 1
        changed = frames[t] != frames[other]
        roi = res.masks[t]
        assert (roi & dilate(changed, 6)).sum() == roi.sum()  # only where the frame changed
        assert (roi & changed).sum() >= 0.5 * changed.sum()
    still = MotionSaliency()(np.repeat(frames[:1], 3, 0))  # a still scene has no motion ROI
    assert not still.masks.any()
    assert not MotionSaliency()(frames[:1]).masks.any()  # one frame: nothing to compare with
    with pytest.raises(ConfigError, match="flow"):
        MotionSaliency()(frames, flows=np.zeros((T, 2, H, W)))


def test_motion_saliency_from_given_flows_compensates_camera_motion():
    flows = np.zeros((T, 2, H // 2, W // 2), np.float32)
    flows[:, 0] += 1.5  # a pan: every vector moves by (1.5, -1)
    flows[:, 1] -= 1.0
    block = np.zeros((H, W), dtype=bool)
    block[40:64, 50:80] = True
    flows[:, 0, 20:32, 25:40] += 4.0  # one object moving 4 pixels further, at half resolution
    frames, _ = moving_square()
    res = MotionSaliency(method="flow", sigma=0)(frames, flows=torch.from_numpy(flows))
    for t in range(T):
        assert np.array_equal(res.masks[t], block)
    # T - 1 fields (P frames only): frame 0 takes frame 1's
    res2 = MotionSaliency(method="flow", sigma=0)(frames, flows=list(torch.from_numpy(flows[1:])))
    assert np.array_equal(res2.masks, res.masks)
    with pytest.raises(ShapeError):
        MotionSaliency(method="flow")(frames, flows=np.zeros((T, 2, 30, 56)))


def test_motion_saliency_with_estimated_flow_finds_the_square():
    frames, square = moving_square()
    res = MotionSaliency(method="flow")(frames)
    for t in range(1, T):
        assert (res.masks[t] & square[t]).sum() >= 0.5 * square[t].sum()
        assert (res.masks[t] & dilate(square[t] | square[t - 1], 12)).sum() >= 0.8 * res.masks[t].sum()


def test_faces_drawn_face_is_found_and_noise_is_not():
    src = FaceROI()
    assert not src.load().empty()  # the cascade ships inside the OpenCV wheel
    face = draw_face(size=240, noise=3.0)
    frames = np.stack([face, np.random.default_rng(1).integers(0, 256, face.shape, dtype=np.uint8)])
    res = src(frames)
    c = face.shape[0] // 2
    assert res.masks[0, c - 20:c + 20, c - 20:c + 20].all()  # eyes, nose and mouth inside
    assert not res.masks[0, :5].any() and res.masks[0].mean() < 0.9
    assert not res.masks[1].any()
    assert res.setup_seconds > 0 and bool((res.seconds > 0).all())
    half = FaceROI(downscale=2)(np.stack([draw_face(size=480)]))  # found on the half-size copy, boxes scaled back
    assert half.masks[0, 240 - 40:240 + 40, 240 - 40:240 + 40].all() and half.masks[0].mean() < 0.6
    # box -> mask with margin, clipped at the borders (hand-computed)
    m = FaceROI(margin=0.5).boxes_to_mask(np.array([[10, 4, 8, 6], [0, 0, 2, 2]]), 20, 24)
    ref = np.zeros((20, 24), dtype=bool)
    ref[1:13, 6:22] = True
    ref[0:3, 0:3] = True
    assert np.array_equal(m, ref)
    with pytest.raises(ConfigError, match="cascade"):
        FaceROI(cascade="cats")


def test_threshold_rules():
    rng = np.random.default_rng(2)
    s = rng.random((40, 50))
    top = threshold_scores(s, top=0.1)
    assert top.sum() == 200 and s[top].min() >= s[~top].max()
    assert not threshold_scores(np.full((8, 8), 3.0)).any()  # constant map: no ROI
    two = np.zeros((40, 50))
    two[5:25, 5:25] = 1.0  # 400 pixels
    two[30:32, 40:42] = 1.0  # 4 pixels
    kept = threshold_scores(two, min_area=0.01)  # 20 pixels minimum
    assert kept[5:25, 5:25].all() and not kept[30:32, 40:42].any() and kept.sum() == 400
    assert threshold_scores(two).sum() == 404


# ---- user masks -------------------------------------------------------------------------------------------------

def test_user_masks_npy_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    masks = rng.random((T, H, W)) < 0.2
    frames, _ = moving_square()
    for arr in (masks, masks.astype(np.uint8) * 7, masks.astype(np.float32), masks[:, None]):
        np.save(tmp_path / "m.npy", arr)
        res = UserMasks(str(tmp_path / "m.npy"))(frames)
        assert np.array_equal(res.masks, masks) and res.scores is None
    np.save(tmp_path / "static.npy", masks[0])
    assert np.array_equal(UserMasks(str(tmp_path / "static.npy"))(frames).masks, np.repeat(masks[:1], T, 0))
    np.save(tmp_path / "long.npy", np.concatenate([masks, masks]))
    assert np.array_equal(UserMasks(str(tmp_path / "long.npy"))(frames).masks, masks)


def test_user_masks_png_folder_round_trip(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(4)
    masks = rng.random((12, 20, 24)) < 0.3
    folder = tmp_path / "masks"
    folder.mkdir()
    for t in range(12):  # frame_2 sorts before frame_10 (natural order)
        Image.fromarray(masks[t].astype(np.uint8) * 255).save(folder / f"frame_{t}.png")
    assert np.array_equal(read_masks(folder), masks)
    Image.fromarray(masks[0].astype(np.uint8) * 255).convert("RGB").save(tmp_path / "one.png")
    assert np.array_equal(read_masks(tmp_path / "one.png"), masks[:1])
    src = parse_roi_spec(f"mask:{folder}")
    assert isinstance(src, UserMasks)
    assert np.array_equal(src(np.zeros((12, 20, 24), np.uint8)).masks, masks)


def test_user_mask_errors(tmp_path):
    frames, _ = moving_square()
    with pytest.raises(DataError, match="does not exist"):
        UserMasks(str(tmp_path / "nope.npy"))(frames)
    np.save(tmp_path / "small.npy", np.zeros((T, 10, 10), bool))
    with pytest.raises(DataError, match="luma resolution"):
        UserMasks(str(tmp_path / "small.npy"))(frames)
    np.save(tmp_path / "few.npy", np.zeros((2, H, W), bool))
    with pytest.raises(DataError, match="2 masks for 4 frames"):
        UserMasks(str(tmp_path / "few.npy"))(frames)
    np.save(tmp_path / "range.npy", np.full((T, H, W), 2.0))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        read_masks(tmp_path / "range.npy")
    np.save(tmp_path / "cut.npy", np.zeros((T, H, W), bool))
    raw = (tmp_path / "cut.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="not a readable"):
        read_masks(tmp_path / "cut.npy")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "0.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError, match="not a readable PNG"):
        read_masks(tmp_path / "bad")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no PNG"):
        read_masks(tmp_path / "empty")
    with pytest.raises(DataError, match="npy"):
        read_masks(tmp_path / "range.txt") if (tmp_path / "range.txt").write_text("x") else None
    with pytest.raises(ConfigError, match="path"):
        parse_roi_spec("mask:")


# ---- registry and --roi parsing ---------------------------------------------------------------------------------

def test_registry_and_spec_parsing():
    assert set(ROI_SOURCES) == {"spectral", "motion", "faces", "mask"}
    src = parse_roi_spec("spectral:top=0.1,min_area=0")
    assert isinstance(src, SpectralSaliency) and src.top == 0.1 and src.min_area == 0
    assert parse_roi_spec(src.spec()) == src
    mo = parse_roi_spec(" motion:method=flow,floor=none,sigma=1.5 ")
    assert mo == MotionSaliency(method="flow", floor=None, sigma=1.5) and parse_roi_spec(mo.spec()) == mo
    assert parse_roi_spec("faces:min_neighbors=3") == FaceROI(min_neighbors=3)
    assert parse_roi_spec("mask:/data/a:b,c.npy").path == "/data/a:b,c.npy"
    assert roi_source("faces") == FaceROI()
    with pytest.raises(ConfigError, match="unknown ROI source"):
        parse_roi_spec("unisal")
    with pytest.raises(ConfigError, match="no option thresh"):
        parse_roi_spec("spectral:thresh=3")
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_roi_spec("spectral:0.1")
    with pytest.raises(ConfigError, match="top"):
        parse_roi_spec("spectral:top=2")
    with pytest.raises(ConfigError, match="method"):
        parse_roi_spec("motion:method=optical")
    with pytest.raises(ShapeError):
        SpectralSaliency()(np.zeros((2, 8, 8), np.float32))


# ---- masks at latent and intermediate resolutions -----------------------------------------------------------

def brute_latent(mask: np.ndarray, f: int, rule: str, min_fraction: float = 0.5) -> np.ndarray:
    t, h, w = mask.shape
    hh, ww = -(-h // f), -(-w // f)
    out = np.zeros((t, hh, ww))
    for k in range(t):
        for i in range(hh):
            for j in range(ww):
                count = 0
                for a in range(i * f, min((i + 1) * f, h)):
                    for b in range(j * f, min((j + 1) * f, w)):
                        count += float(mask[k, a, b])
                out[k, i, j] = count / (f * f)  # pixels beyond the frame are non-ROI padding
    return out > 0 if rule == "any" else out >= min_fraction if rule == "fraction" else out


@pytest.mark.parametrize("factor", [16, 8, 4, 2, 3])
@pytest.mark.parametrize("rule", ["any", "fraction", "soft"])
def test_to_latent_matches_brute_force(factor, rule):
    rng = np.random.default_rng(factor)
    mask = np.zeros((2, 37, 50), dtype=bool)
    mask[0, 5:20, 7:30] = True
    mask[1] = rng.random((37, 50)) < 0.1
    got = to_latent(mask, factor, rule=rule, min_fraction=0.3 if rule == "fraction" else 0.5)
    ref = brute_latent(mask, factor, rule, 0.3)
    assert got.shape == ref.shape == (2, -(-37 // factor), -(-50 // factor))
    np.testing.assert_allclose(got.astype(np.float64), ref.astype(np.float64), rtol=0, atol=1e-6)
    assert isinstance(got, np.ndarray)
    tg = to_latent(torch.from_numpy(mask[0]), factor, rule=rule, min_fraction=0.3 if rule == "fraction" else 0.5)
    assert isinstance(tg, torch.Tensor) and np.allclose(tg.double().numpy(), ref[0].astype(np.float64), atol=1e-6)


def test_any_rule_nests_across_resolutions_and_padding():
    rng = np.random.default_rng(5)
    mask = rng.random((1, 64, 48)) < 0.02
    fine = to_latent(mask, 8)
    assert np.array_equal(to_latent(fine, 2), to_latent(mask, 16))  # max pooling composes
    padded = pad_masks(mask, 80, 64)
    assert padded.shape == (1, 80, 64) and not padded[:, 64:].any() and np.array_equal(padded[:, :64, :48], mask)
    with pytest.raises(ShapeError):
        pad_masks(mask, 32, 64)
