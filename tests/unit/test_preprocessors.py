"""Per-image preprocessors, shared helpers and the batch runner (controlstack.preprocessors)."""

from __future__ import annotations

import controlstack.preprocessors as P
import cv2
import numpy as np
import pytest
import torch
from controlstack.preprocessors import common
from skimage import data

pytestmark = pytest.mark.unit

PHOTOS = {"astronaut": data.astronaut, "coffee": data.coffee, "chelsea": data.chelsea}


@pytest.fixture(scope="module", params=sorted(PHOTOS))
def photo(request) -> np.ndarray:
    return np.ascontiguousarray(PHOTOS[request.param]())


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return np.ascontiguousarray(data.astronaut())


def to_tensor(*images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).float() / 255.0


# ---------------------------------------------------------------- every preprocessor: shape, dtype, range


@pytest.mark.parametrize("name", sorted(P.PREPROCESSORS))
def test_each_preprocessor_shape_dtype(name, photo):
    out = P.PREPROCESSORS[name](photo)
    assert out.shape == photo.shape
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous


@pytest.mark.parametrize("name", sorted(P.PREPROCESSORS))
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (5, 3), (63, 65)])
def test_each_preprocessor_tiny_and_odd_sizes(name, shape):
    img = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    out = P.PREPROCESSORS[name](img)
    assert out.shape == img.shape and out.dtype == np.uint8


@pytest.mark.parametrize("name", sorted(P.PREPROCESSORS))
def test_each_preprocessor_accepts_gray_and_rgba(name, astronaut):
    gray = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)
    rgba = np.dstack([astronaut, np.full(astronaut.shape[:2], 255, np.uint8)])
    assert P.PREPROCESSORS[name](gray).shape == astronaut.shape
    # opaque RGBA == RGB
    assert np.array_equal(P.PREPROCESSORS[name](rgba), P.PREPROCESSORS[name](astronaut))


@pytest.mark.parametrize("name", sorted(P.PREPROCESSORS))
def test_each_preprocessor_rejects_bad_arrays(name):
    with pytest.raises(ValueError, match="image"):
        P.PREPROCESSORS[name](np.zeros((8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="image"):
        P.PREPROCESSORS[name](np.zeros((1, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="image"):
        P.PREPROCESSORS[name](np.zeros((0, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="image"):
        P.PREPROCESSORS[name](np.zeros((8, 8, 2), np.uint8))


# ---------------------------------------------------------------- Canny


@pytest.mark.parametrize(("low", "high"), [(100, 200), (0, 0), (50, 51), (10, 1000)])
def test_canny_equals_opencv(photo, low, high):
    out = P.canny(photo, low, high)
    ref = cv2.Canny(photo, low, high)
    assert np.array_equal(out, np.dstack([ref, ref, ref]))


def test_canny_at_native_resolution_equals_opencv(astronaut):
    # 512 x 512 at resolution 512: no resize and no padding, so the wrapped call is OpenCV's Canny exactly.
    out = P.at_resolution(P.canny, 512)(astronaut, low_threshold=100, high_threshold=200)
    assert np.array_equal(out[:, :, 0], cv2.Canny(astronaut, 100, 200))


def test_canny_threshold_errors(astronaut):
    with pytest.raises(ValueError, match="high_threshold"):
        P.canny(astronaut, 100, 1e9)
    with pytest.raises(ValueError, match="low_threshold"):
        P.canny(astronaut, -1, 200)
    with pytest.raises(ValueError, match="low_threshold"):
        P.canny(astronaut, float("nan"), 200)
    with pytest.raises(ValueError, match="low_threshold: expected <= high_threshold"):
        P.canny(astronaut, 201, 200)
    # the largest allowed thresholds (L1 gradient max 2040) are valid and give an empty map
    assert P.canny(astronaut, P.CANNY_MAX_THRESHOLD, P.CANNY_MAX_THRESHOLD).max() == 0


# ---------------------------------------------------------------- the others


def test_threshold_and_binary_are_two_tone(photo):
    for out in (
        P.threshold(photo, 127),
        P.binary(photo, "otsu"),
        P.binary(photo, "fixed", 100),
        P.scribble(photo),
    ):
        assert set(np.unique(out)) <= {0, 255}
        assert np.array_equal(out[:, :, 0], out[:, :, 2])


def test_threshold_uses_the_channel_minimum():
    img = np.array([[[200, 200, 200], [200, 200, 50], [128, 128, 128]]], np.uint8)
    assert P.threshold(img, 127)[0, :, 0].tolist() == [255, 0, 255]


def test_binary_matches_opencv_otsu_inverted(astronaut):
    gray = cv2.cvtColor(astronaut, cv2.COLOR_RGB2GRAY)
    _, ref = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    assert np.array_equal(P.binary(astronaut, "otsu")[:, :, 0], ref)
    fixed = P.binary(astronaut, "fixed", 100)[:, :, 0]
    assert np.array_equal(fixed, np.where(gray > 100, 0, 255).astype(np.uint8))
    with pytest.raises(ValueError, match="mode"):
        P.binary(astronaut, "adaptive")
    with pytest.raises(ValueError, match="threshold"):
        P.binary(astronaut, "fixed", 300)


def test_invert(photo):
    assert np.array_equal(P.invert(photo), 255 - photo)
    assert np.array_equal(P.invert(P.invert(photo)), photo)


def test_lineart_standard_flat_image_is_black_not_nan():
    flat = np.full((64, 64, 3), 128, np.uint8)
    assert P.lineart_standard(flat).max() == 0


def test_lineart_standard_finds_a_dark_line():
    img = np.full((128, 128, 3), 255, np.uint8)
    img[:, 62:65] = 0
    out = P.lineart_standard(img)[:, :, 0]
    assert out[:, 62:65].min() > 100 and out[:, :40].max() == 0
    with pytest.raises(ValueError, match="gaussian_sigma"):
        P.lineart_standard(img, gaussian_sigma=0)


def test_color_makes_flat_64px_blocks(astronaut):
    out = P.color(astronaut)
    blocks = out.reshape(8, 64, 8, 64, 3)
    assert (blocks == blocks[:, :1, :, :1]).all()
    ref = cv2.resize(
        cv2.resize(astronaut, (8, 8), interpolation=cv2.INTER_CUBIC),
        (512, 512),
        interpolation=cv2.INTER_NEAREST,
    )
    assert np.array_equal(out, ref)
    with pytest.raises(ValueError, match="block_size"):
        P.color(astronaut, 0)


def test_shuffle_is_deterministic_per_seed(photo):
    a, b, c = P.shuffle(photo, seed=1), P.shuffle(photo, seed=1), P.shuffle(photo, seed=2)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, photo)
    # a remap only moves pixels: every output colour is an interpolation of input colours, mean roughly kept
    assert abs(float(a.mean()) - float(photo.mean())) < 40


def test_shuffle_flow_is_cached_and_read_only():
    f = P.shuffle_flow(64, 96, 3)
    assert f is P.shuffle_flow(64, 96, 3)
    assert f.shape == (64, 96, 2) and f.dtype == np.float32 and not f.flags.writeable
    assert f[..., 0].min() >= 0 and f[..., 0].max() <= 95 and f[..., 1].max() <= 63


def test_shuffle_bad_seed(astronaut):
    with pytest.raises(ValueError, match="seed"):
        P.shuffle(astronaut, seed=-1)
    with pytest.raises(ValueError, match="seed"):
        P.shuffle(astronaut, seed=1.5)


def test_tile(photo):
    assert np.array_equal(P.tile(photo, 0, 0.0), photo)
    assert P.tile(photo, 0, 0.0) is not photo
    soft = P.tile(photo, 3)
    # detail removed: much less high-frequency energy than the photo
    lap = lambda x: np.abs(cv2.Laplacian(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.CV_32F)).mean()  # noqa: E731
    assert lap(soft) < 0.5 * lap(photo)
    with pytest.raises(ValueError, match="pyramid_levels"):
        P.tile(photo, 9)
    with pytest.raises(ValueError, match="blur_sigma"):
        P.tile(photo, 1, float("inf"))


def test_inpaint_marks_masked_pixels(astronaut):
    mask = np.zeros(astronaut.shape[:2], np.float32)
    mask[100:200, 50:300] = 1.0
    out = P.inpaint(astronaut, mask)
    assert out.dtype == np.float32 and out.shape == astronaut.shape
    assert (out[100:200, 50:300] == -1).all()
    keep = mask < 0.5
    assert np.allclose(out[keep], astronaut[keep] / 255.0)
    with pytest.raises(ValueError, match="mask"):
        P.inpaint(astronaut, mask[:-1])


# ---------------------------------------------------------------- shared helpers


def test_hwc3_gray_rgba_composites_on_white():
    gray = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert np.array_equal(P.hwc3(gray), np.dstack([gray] * 3))
    assert np.array_equal(P.hwc3(gray[:, :, None]), np.dstack([gray] * 3))
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, :, :3] = [10, 20, 30]
    rgba[0, :, 3] = [0, 255, 128]
    out = P.hwc3(rgba)
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent -> white paper
    assert out[0, 1].tolist() == [10, 20, 30]  # opaque -> colour
    a = 128 / 255
    assert out[0, 2].tolist() == [round(c * a + 255 * (1 - a)) for c in (10, 20, 30)]
    rgb = np.zeros((2, 2, 3), np.uint8)
    assert P.hwc3(rgb) is rgb


@pytest.mark.parametrize(
    ("shape", "res", "out", "padded"),
    [
        ((512, 512), 512, (512, 512), (512, 512)),
        ((300, 451), 300, (300, 451), (320, 512)),  # chelsea: no resize, edge-padded to multiples of 64
        ((300, 451), 512, (512, 770), (512, 832)),  # upscale: 451 * 512/300 = 769.7 -> 770
        ((1080, 1920), 512, (512, 910), (512, 960)),  # downscale: 1920 * 512/1080 = 910.2 -> 910
        ((1, 1), 512, (512, 512), (512, 512)),
    ],
)
def test_resize_image_with_pad_sizes(shape, res, out, padded):
    img = np.zeros((*shape, 3), np.uint8)
    p, remove_pad = P.resize_image_with_pad(img, res)
    assert p.shape[:2] == padded
    assert remove_pad(p).shape[:2] == out
    assert P.output_size(*shape, res) == out


def test_resize_refuses_absurd_sizes():
    with pytest.raises(ValueError, match="resolution"):
        P.resize_image_with_pad(np.zeros((1, 4000, 3), np.uint8), 512)  # 512 x 2,048,000
    with pytest.raises(ValueError, match="resolution"):
        P.at_resolution(P.canny, 0)
    with pytest.raises(ValueError, match="resolution"):
        P.at_resolution(P.canny, 512.0)


def test_resize_short_side_64_rounds_both_sides():
    assert P.resize_short_side_64(np.zeros((300, 451, 3), np.uint8), 512).shape == (512, 768, 3)
    assert P.resize_short_side_64(np.zeros((1080, 1920, 3), np.uint8), 512).shape == (512, 896, 3)
    assert P.resize_short_side_64(np.zeros((10, 10, 3), np.uint8), 20).shape == (64, 64, 3)


def test_pad64():
    assert [common.pad64(x) for x in (1, 63, 64, 65, 512)] == [63, 1, 0, 63, 0]


# ---------------------------------------------------------------- batch runner


def test_run_batched_equals_frame_by_frame(astronaut):
    frames = [astronaut, P.invert(astronaut), np.roll(astronaut, 50, axis=1)]
    images = to_tensor(*frames)
    out = P.run_batched(P.canny, images, low_threshold=100, high_threshold=200)
    assert out.shape == (3, 512, 512, 3) and out.dtype == torch.float32
    for i, f in enumerate(frames):
        assert torch.equal(out[i], torch.from_numpy(P.canny(f, 100, 200)).float() / 255)
    assert torch.equal(out, P.run_batched(P.canny, images, workers=1, low_threshold=100, high_threshold=200))


def test_run_batched_progress_sums_to_batch():
    images = torch.rand(7, 16, 16, 3)
    ticks: list[int] = []
    P.run_batched(P.invert, images, workers=2, progress=ticks.append)
    assert sum(ticks) == 7 and all(t >= 1 for t in ticks)


def test_run_batched_converts_rgba_gray_and_clamps():
    rgba = torch.zeros(1, 4, 4, 4)  # alpha 0 -> white
    assert torch.equal(P.run_batched(P.invert, rgba), torch.zeros(1, 4, 4, 3))
    gray = torch.full((2, 4, 4, 1), 0.2)
    assert P.run_batched(P.invert, gray).shape == (2, 4, 4, 3)
    wild = torch.tensor([-3.0, 0.5, 7.0]).repeat(1, 2, 2, 1)  # out of range: clamped to [0, 1]
    out = P.run_batched(P.invert, wild)[0, 0, 0]
    assert torch.allclose(out, torch.tensor([1.0, 127 / 255, 0.0]))


def test_run_batched_keeps_float_results():
    mask = np.ones((4, 4), np.float32)
    out = P.run_batched(P.inpaint, torch.rand(2, 4, 4, 3), mask=mask)
    assert (out == -1).all()


@pytest.mark.parametrize(
    "images",
    [
        torch.zeros(0, 8, 8, 3),
        torch.zeros(8, 8, 3),
        torch.zeros(1, 8, 8, 2),
        torch.zeros(1, 8, 8, 3, dtype=torch.uint8),
    ],
    ids=["empty", "3d", "2ch", "uint8"],
)
def test_run_batched_bad_batches(images):
    with pytest.raises(ValueError, match="images"):
        P.run_batched(P.invert, images)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_run_batched_refuses_nan(bad):
    images = torch.rand(3, 8, 8, 3)
    images[2, 4, 4, 1] = bad
    with pytest.raises(ValueError, match="images: expected finite values.*frame 2"):
        P.run_batched(P.invert, images)


def test_run_preprocessor_resolution_and_pixel_perfect():
    images = torch.rand(2, 300, 500, 3)
    assert P.run_preprocessor(P.canny, images, 256).shape == (2, 256, 427, 3)
    # pixel perfect onto 512 x 512, crop: resolution 512 -> 512 x 853, which crops to 512 x 512 with no resampling
    out = P.run_preprocessor(P.canny, images, 64, True, 512, 512, "crop and resize")
    assert out.shape == (2, 512, 853, 3)
    out = P.run_preprocessor(P.invert, images, 64, True, 512, 512, "resize and fill")
    assert out.shape == (2, 307, 512, 3)
    with pytest.raises(ValueError, match="resize_mode"):
        P.run_preprocessor(P.invert, images, 64, True, 512, 512, "fill")
    with pytest.raises(ValueError, match="resolution"):
        P.run_preprocessor(P.invert, torch.rand(1, 1, 100, 3), 512)


def test_run_preprocessor_shuffle_frames_share_the_seed(astronaut):
    images = to_tensor(astronaut, astronaut)
    out = P.run_preprocessor(P.shuffle, images, 512, seed=5)
    assert torch.equal(out[0], out[1])
    assert torch.equal(out, P.run_preprocessor(P.shuffle, images, 512, seed=5))


def test_run_inpaint():
    images = torch.rand(2, 100, 150, 3)
    mask = torch.zeros(1, 50, 75)
    mask[:, :25] = 1.0
    out = P.run_inpaint(images, mask, 200)
    assert out.shape == (2, 200, 300, 3) and out.dtype == torch.float32
    assert (out[:, :95] == -1).all() and (out[:, 105:] >= 0).all()
    with pytest.raises(ValueError, match="mask"):
        P.run_inpaint(images, torch.zeros(3, 10, 10), 200)
    with pytest.raises(ValueError, match="images"):
        P.run_inpaint(torch.zeros(0, 10, 10, 3), mask, 200)
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="images"):
        P.run_inpaint(bad, mask, 200)


# ---------------------------------------------------------------- the reference formulas, written plainly


def test_lineart_standard_equals_the_reference_formula(photo):
    x = photo.astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), 6.0)
    intensity = np.min(g - x, axis=2).clip(0, 255)
    intensity /= max(16, np.median(intensity[intensity > 8]))
    intensity *= 127
    ref = intensity.clip(0, 255).astype(np.uint8)
    assert np.array_equal(P.lineart_standard(photo)[:, :, 0], ref)


def test_scribble_equals_the_reference_formula(photo):
    x = photo.astype(np.float32)
    g1, g2 = cv2.GaussianBlur(x, (0, 0), 0.5), cv2.GaussianBlur(x, (0, 0), 5.0)
    dog = (255 - np.min(g2 - g1, axis=2)).clip(0, 255).astype(np.uint8)
    ref = np.where(2 * (255 - dog.astype(np.int32)) > 32, 255, 0)
    assert np.array_equal(P.scribble(photo, 32)[:, :, 0], ref)


def test_threshold_equals_the_reference_formula(photo):
    ref = np.where(photo.min(axis=2) > 127, 255, 0)
    assert np.array_equal(P.threshold(photo, 127)[:, :, 0], ref)
    assert np.array_equal(P.threshold(photo, 126.5)[:, :, 0], np.where(photo.min(axis=2) > 126.5, 255, 0))
