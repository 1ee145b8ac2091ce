"""Resize modes and pixel-perfect resolution against hand-computed cases (preprocessors/resize.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from controlstack.preprocessors import common
from controlstack.preprocessors.resize import (
    RESIZE_MODES,
    fit_image,
    fit_mask,
    pixel_perfect_resolution,
    scaled_size,
)
from PIL import Image

pytestmark = pytest.mark.unit


# ---------------------------------------------------------------- pixel-perfect resolution


@pytest.mark.parametrize(
    ("h", "w", "th", "tw", "mode", "expected"),
    [
        # k = max(512/300, 512/500) = 1.7067 -> 1.7067 * 300 = 512
        (300, 500, 512, 512, "crop and resize", 512),
        (300, 500, 512, 512, "just resize", 512),
        # k = min(...) = 1.024 -> 307.2 -> 307
        (300, 500, 512, 512, "resize and fill", 307),
        # portrait target from a landscape 1080p frame (downscale): k = max(768/1080, 512/1920) = 0.7111 -> 768
        (1080, 1920, 768, 512, "crop and resize", 768),
        # k = min(...) = 512/1920 = 0.26667 -> 0.26667 * 1080 = 288
        (1080, 1920, 768, 512, "resize and fill", 288),
        # upscale: 64 x 100 -> 512 x 512: k = max(8, 5.12) = 8 -> 512; fill: 5.12 * 64 = 327.68 -> 328
        (64, 100, 512, 512, "crop and resize", 512),
        (64, 100, 512, 512, "resize and fill", 328),
        # identity
        (512, 768, 512, 768, "crop and resize", 512),
        (512, 768, 512, 768, "resize and fill", 512),
        # 1-pixel image onto 512 x 768: k = max(512, 768) = 768
        (1, 1, 512, 768, "crop and resize", 768),
        (1, 1, 512, 768, "resize and fill", 512),
    ],
)
def test_pixel_perfect_resolution_hand_cases(h, w, th, tw, mode, expected):
    assert pixel_perfect_resolution(h, w, th, tw, mode) == expected


@pytest.mark.parametrize("mode", ["crop and resize", "resize and fill"])
@pytest.mark.parametrize(
    ("h", "w", "th", "tw"), [(300, 451, 512, 768), (1080, 1920, 768, 512), (77, 33, 640, 640)]
)
def test_pixel_perfect_hint_lands_on_the_scaled_size(h, w, th, tw, mode):
    # The point of pixel-perfect: the hint made at that resolution is the size the resize mode scales to.
    res = pixel_perfect_resolution(h, w, th, tw, mode)
    hint_h, hint_w = common.output_size(h, w, res)
    sh, sw = scaled_size(h, w, th, tw, mode)
    assert abs(hint_h - sh) <= 1 and abs(hint_w - sw) <= 1


def test_pixel_perfect_rejects_bad_input():
    with pytest.raises(ValueError, match="mode"):
        pixel_perfect_resolution(10, 10, 10, 10, "stretch")
    with pytest.raises(ValueError, match="image_h"):
        pixel_perfect_resolution(0, 10, 10, 10, "just resize")
    with pytest.raises(ValueError, match="target_w"):
        pixel_perfect_resolution(10, 10, 10, 10.5, "just resize")


# ---------------------------------------------------------------- fit_image geometry


@pytest.mark.parametrize("mode", RESIZE_MODES)
@pytest.mark.parametrize(
    ("h", "w", "th", "tw"), [(300, 451, 512, 768), (512, 512, 77, 133), (1, 1, 64, 32), (97, 13, 13, 97)]
)
def test_fit_image_shape_dtype_range(mode, h, w, th, tw):
    x = torch.rand(2, h, w, 3)
    y = fit_image(x, tw, th, mode)
    assert y.shape == (2, th, tw, 3)
    assert y.dtype == x.dtype
    assert y.min() >= x.min() and y.max() <= x.max()  # no cubic overshoot


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_fit_image_constant_stays_constant(mode):
    x = torch.full((1, 37, 91, 3), 0.3)
    assert torch.allclose(fit_image(x, 200, 64, mode), torch.full((1, 64, 200, 3), 0.3), atol=1e-6)


def test_fit_image_same_size_is_identity():
    x = torch.rand(1, 64, 80, 3)
    for mode in RESIZE_MODES:
        assert fit_image(x, 80, 64, mode) is x


def test_crop_and_resize_takes_the_centre_without_scaling():
    # 4 x 8 -> 4 x 4: k = max(4/4, 4/8) = 1, no resampling, columns 2..5 are kept.
    x = torch.arange(8, dtype=torch.float32).repeat(4, 1)[None, :, :, None]
    y = fit_image(x, 4, 4, "crop and resize")
    assert torch.equal(y[0, :, :, 0], torch.tensor([[2.0, 3, 4, 5]] * 4))


def test_crop_and_resize_downscale_crops_the_middle_band():
    # 200 x 100 (tall) -> 50 x 50: k = max(0.25, 0.5) = 0.5 -> 100 x 50, rows 25..74 kept = the middle band.
    x = torch.zeros(1, 200, 100, 1)
    x[:, 50:150] = 0.5
    x[:, 150:] = 1.0
    y = fit_image(x, 50, 50, "crop and resize")
    assert y.shape == (1, 50, 50, 1)
    assert torch.allclose(y[0, 2:-2], torch.full((46, 50, 1), 0.5), atol=1e-5)


def test_resize_and_fill_pads_with_the_median_border_colour():
    # 4 x 8 -> 8 x 8: k = min(2, 1) = 1 -> 4 x 8 placed at rows 2..5; rows 0,1,6,7 = median of the border.
    x = torch.full((1, 4, 8, 3), 0.25)
    x[0, 1:3, 1:7] = torch.tensor([1.0, 0.0, 0.5])  # interior: must not leak into the fill colour
    x[0, 0, 0] = 0.9  # one odd border pixel: the median ignores it
    y = fit_image(x, 8, 8, "resize and fill")
    assert torch.equal(y[0, 2:6], x[0])
    for rows in (y[0, :2], y[0, 6:]):
        assert torch.equal(rows, torch.full((2, 8, 3), 0.25))


def test_resize_and_fill_median_is_per_image_and_per_channel():
    x = torch.zeros(2, 10, 20, 3)
    x[0] = torch.tensor([0.1, 0.2, 0.3])
    x[1] = torch.tensor([0.7, 0.8, 0.9])
    y = fit_image(x, 20, 20, "resize and fill")  # k = min(2, 1) = 1 -> rows 5..14
    assert torch.allclose(y[0, 0, 0], torch.tensor([0.1, 0.2, 0.3]))
    assert torch.allclose(y[1, -1, -1], torch.tensor([0.7, 0.8, 0.9]))


def test_resize_and_fill_upscale_centres_the_image():
    # 2 x 4 -> 8 x 8: k = min(4, 2) = 2 -> 4 x 8 at rows 2..5.
    x = torch.ones(1, 2, 4, 1)
    x[:, :, :, :] = 0.5
    y = fit_image(x, 8, 8, "resize and fill")
    assert y.shape == (1, 8, 8, 1)
    assert torch.allclose(y, torch.full_like(y, 0.5))


def test_just_resize_stretches():
    x = torch.zeros(1, 10, 10, 1)
    x[:, :, 5:] = 1.0  # right half white
    y = fit_image(x, 40, 20, "just resize")
    assert y.shape == (1, 20, 40, 1)
    assert y[0, :, :18].max() < 1e-6 and y[0, :, 22:].min() > 1 - 1e-6


def test_fit_image_keeps_half_precision_and_negative_inpaint_values():
    x = torch.rand(1, 30, 40, 3).half()
    assert fit_image(x, 64, 64, "crop and resize").dtype == torch.float16
    hint = torch.rand(1, 32, 32, 3)
    hint[:, 8:24, 8:24] = -1.0
    y = fit_image(hint, 64, 64, "just resize")
    assert y.min() >= -1.0 and (y == -1.0).sum() > 0


def test_fit_image_bad_input():
    with pytest.raises(ValueError, match="images"):
        fit_image(torch.zeros(0, 8, 8, 3), 4, 4, "just resize")
    with pytest.raises(ValueError, match="images"):
        fit_image(torch.zeros(8, 8, 3), 4, 4, "just resize")
    with pytest.raises(ValueError, match="images"):
        fit_image(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), 4, 4, "just resize")
    with pytest.raises(ValueError, match="width"):
        fit_image(torch.zeros(1, 8, 8, 3), 0, 4, "just resize")
    with pytest.raises(ValueError, match="height"):
        fit_image(torch.zeros(1, 8, 8, 3), 4, 100_000, "just resize")
    with pytest.raises(ValueError, match="resize mode"):
        fit_image(torch.zeros(1, 8, 8, 3), 4, 4, "Crop And Resize")


# ---------------------------------------------------------------- fit_mask


@pytest.mark.parametrize("mode", RESIZE_MODES)
def test_fit_mask_shapes_and_exact_ones(mode):
    m = torch.ones(3, 30, 50)
    y = fit_mask(m, 77, 41, mode)
    assert y.shape == (3, 41, 77)
    assert torch.equal(y, torch.ones_like(y))  # an all-ones mask stays exactly 1 (clamped, median fill)
    assert fit_mask(torch.zeros(30, 50), 64, 64, mode).shape == (1, 64, 64)


@pytest.mark.parametrize(
    ("mode", "box"),
    [
        # 40 x 80 -> 40 x 40: k = 1, centre columns 20..59 kept -> the mask's columns 30..49 land at 10..29
        ("crop and resize", (slice(10, 30), slice(10, 30))),
        # 40 x 80 -> 80 x 80: k = min(2, 1) = 1, rows 20..59 hold the image (the border median, 0, elsewhere)
        ("resize and fill", (slice(30, 50), slice(30, 50))),
    ],
)
def test_fit_mask_puts_the_masked_box_where_the_geometry_says(mode, box):
    m = torch.zeros(40, 80)
    m[10:30, 30:50] = 1.0
    size = 40 if mode == "crop and resize" else 80
    y = fit_mask(m, size, size, mode)[0]
    want = torch.zeros(size, size)
    want[box] = 1.0
    assert torch.equal(y, want)  # k = 1 in both: no resampling, so exact


# ---------------------------------------------------------------- the filters, against independent implementations


def _keys(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """Keys' cubic convolution kernel (a = -0.75, the value OpenCV's INTER_CUBIC and torch's bicubic use)."""
    t = np.abs(t)
    near = (a + 2) * t**3 - (a + 3) * t**2 + 1
    far = a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def _cubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """n_out x n_in resampling matrix: pixel centres aligned (half-pixel), borders replicated."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        x = (i + 0.5) * n_in / n_out - 0.5
        f = np.floor(x)
        for k in range(-1, 3):
            m[i, min(max(int(f) + k, 0), n_in - 1)] += _keys(np.array(x - (f + k)))
    return m


def test_upscale_is_bicubic_clamped_to_the_input_range():
    b = np.random.default_rng(0).random((7, 9))
    y = fit_image(torch.from_numpy(b).float()[None, :, :, None], 23, 16, "just resize")[0, :, :, 0]
    ref = (_cubic_matrix(7, 16) @ b @ _cubic_matrix(9, 23).T).clip(b.min(), b.max())
    assert np.abs(y.double().numpy() - ref).max() < 1e-6


def test_downscale_is_antialiased_bilinear_like_pil():
    # PIL's BILINEAR resize widens the triangle filter by the scale factor (area-like, no aliasing)
    a = np.random.default_rng(1).random((40, 60)).astype(np.float32)
    y = fit_image(torch.from_numpy(a)[None, :, :, None], 25, 17, "just resize")[0, :, :, 0]
    ref = np.asarray(Image.fromarray(a, mode="F").resize((25, 17), Image.BILINEAR))
    assert np.abs(y.numpy() - ref).max() < 1e-5
    # by hand: halving a row of 1-pixel stripes averages each pair (triangle of width 4: weights 1, 3, 3, 1 / 8)
    row = torch.tensor([0.0, 1.0] * 8)[None, None, :, None].expand(1, 2, 16, 1)
    half = fit_image(row, 8, 2, "just resize")[0, 0, 1:-1, 0]
    assert torch.allclose(half, torch.full((6,), 0.5))


def test_fit_mask_bad_input():
    with pytest.raises(ValueError, match="masks"):
        fit_mask(torch.zeros(1, 1, 8, 8), 4, 4, "just resize")
    with pytest.raises(ValueError, match="masks"):
        fit_mask(torch.zeros(0, 8, 8), 4, 4, "just resize")
