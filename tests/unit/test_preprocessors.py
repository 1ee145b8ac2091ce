"""Per-image preprocessors, shared helpers and the batch runner (controlstack.preprocessors)."""

from __future__ import annotations

import controlstack.preprocessors as P
import cv2
import numpy as np
import pytest
import torch
from controlstack.preprocessors import common
from scipy import ndimage
from skimage import data, filters

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


def _square(size: int = 64, lo: int = 20, hi: int = 44, value: int = 255) -> np.ndarray:
    """A black image with a flat square [lo, hi) x [lo, hi): its only edges are the square's four sides."""
    img = np.zeros((size, size, 3), np.uint8)
    img[lo:hi, lo:hi] = value
    return img


def _assert_square_outline(edges: np.ndarray, lo: float, hi: float, slack: float = 1.0) -> None:
    """``edges`` (H x W, 0 / 255) outlines the square whose sides are the lines x, y = lo - 0.5 and hi - 0.5:
    every edge pixel within ``slack`` px of a side, nothing inside or outside, every side traced."""
    assert set(np.unique(edges)) == {0, 255}
    ys, xs = np.nonzero(edges)
    a, b = lo - 0.5, hi - 0.5  # the step lines between pixels
    near = lambda v, line: np.abs(v - line) <= slack + 0.5  # noqa: E731
    inside = lambda v: (v >= a - slack - 0.5) & (v <= b + slack + 0.5)  # noqa: E731
    on_side = (inside(ys) & (near(xs, a) | near(xs, b))) | (inside(xs) & (near(ys, a) | near(ys, b)))
    assert on_side.all(), list(zip(ys[~on_side], xs[~on_side], strict=True))[:5]
    span = int(b - a) - 2  # each side is traced along (almost) its whole length
    for line in (a, b):
        assert near(xs, line).sum() >= span and near(ys, line).sum() >= span


def test_canny_outlines_a_square_where_its_sides_are():
    out = P.canny(_square(), 100, 200)
    assert np.array_equal(out[:, :, 0], out[:, :, 1]) and np.array_equal(out[:, :, 0], out[:, :, 2])
    _assert_square_outline(out[:, :, 0], 20, 44)


@pytest.mark.parametrize("step", [10, 50, 255])
def test_canny_thresholds_are_on_the_l1_sobel_gradient(step):
    # A vertical step of height d: the 3x3 Sobel x-derivative there is (1 + 2 + 1) * d = 4d, the y-derivative 0.
    # So with the high threshold just under 4d the step is an edge (one column, the full height), just over it
    # nothing is (OpenCV's rule: strong where the gradient exceeds the high threshold).
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, 16:] = step
    edges = P.canny(img, 0, 4 * step - 1)[:, :, 0]
    cols = np.nonzero(edges.any(axis=0))[0]
    assert cols.tolist() in ([15], [16]) and (edges[:, cols[0]] == 255).all()
    assert P.canny(img, 0, 4 * step + 1).max() == 0


def test_canny_keeps_colour_edges_of_equal_brightness():
    # blue (0, 0, 255) and dark red (97, 0, 0) have the same luma (29): a grayscale Canny sees no edge here, the
    # per-channel one (the strongest channel's gradient, 4 * 255 in blue) does.
    img = np.zeros((32, 32, 3), np.uint8)
    img[:, :16] = (0, 0, 255)
    img[:, 16:] = (97, 0, 0)
    luma = 0.299 * img[..., 0] + 0.587 * img[..., 1] + 0.114 * img[..., 2]
    assert np.ptp(np.round(luma)) == 0
    edges = P.canny(img, 100, 200)[:, :, 0]
    assert np.nonzero(edges.any(axis=0))[0].tolist() in ([15], [16])


def test_canny_at_resolution_keeps_the_square_in_place():
    # at the image's own size the wrapper changes nothing; at twice the size the outline moves to twice the place
    img = _square()
    assert np.array_equal(
        P.at_resolution(P.canny, 64)(img, low_threshold=100, high_threshold=200), P.canny(img)
    )
    big = P.at_resolution(P.canny, 128)(img, low_threshold=100, high_threshold=200)
    assert big.shape == (128, 128, 3)
    _assert_square_outline(big[:, :, 0], 40, 88, slack=2.0)


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


def test_binary_otsu_equals_scikit_image_otsu(photo):
    # A gray photo (R = G = B, so luma is the value itself): Otsu's threshold by scikit-image's implementation;
    # binary is inverted (dark -> white): white exactly where the value is <= the threshold.
    gray = np.round(photo @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)
    t = filters.threshold_otsu(gray)
    out = P.binary(np.dstack([gray] * 3), "otsu")
    assert np.array_equal(out[:, :, 0], np.where(gray > t, 0, 255))


def test_binary_on_known_values():
    # two clusters: any threshold between them separates them; dark -> white
    two = np.array([[40] * 3 + [200] * 5], np.uint8)
    assert P.binary(np.dstack([two] * 3), "otsu")[0, :, 0].tolist() == [255] * 3 + [0] * 5
    ramp = np.arange(256, dtype=np.uint8)[None]
    fixed = P.binary(np.dstack([ramp] * 3), "fixed", 100)[0, :, 0]
    assert fixed.tolist() == [255] * 101 + [0] * 155  # <= 100 white, > 100 black
    # luma of pure red is 0.299 * 255 = 76.2 -> 76 (BT.601, as the reference annotator)
    red = np.zeros((1, 1, 3), np.uint8)
    red[..., 0] = 255
    assert P.binary(red, "fixed", 76)[0, 0, 0] == 255 and P.binary(red, "fixed", 75)[0, 0, 0] == 0
    with pytest.raises(ValueError, match="mode"):
        P.binary(red, "adaptive")
    with pytest.raises(ValueError, match="threshold"):
        P.binary(red, "fixed", 300)


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


def test_color_keeps_an_image_of_flat_blocks(astronaut):
    # An image already made of flat 64 px blocks is its own colour map: each block gets its own colour back.
    rng = np.random.default_rng(3)
    palette = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    blocks = np.repeat(np.repeat(palette, 64, axis=0), 64, axis=1)
    assert np.array_equal(P.color(blocks), blocks)
    # 100 x 150 with blocks of 64: max(1, 100 // 64) x 150 // 64 = 1 x 2 blocks, split at column 75
    halves = np.zeros((100, 150, 3), np.uint8)
    halves[:, :75] = (10, 200, 30)
    halves[:, 75:] = (250, 5, 120)
    assert np.array_equal(P.color(halves), halves)
    # a photo: every 64 x 64 block flat, and its colour within the block's own range of colours
    out = P.color(astronaut)
    cells = out.reshape(8, 64, 8, 64, 3)
    assert (cells == cells[:, :1, :, :1]).all()
    src = astronaut.reshape(8, 64, 8, 64, 3).astype(int)
    assert (cells[:, 0, :, 0] >= src.min(axis=(1, 3))).all() and (
        cells[:, 0, :, 0] <= src.max(axis=(1, 3))
    ).all()
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


def _laplacian(x: np.ndarray) -> np.ndarray:
    """4-neighbour Laplacian of the interior of a 2-D array."""
    return 4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]


def test_tile(photo):
    assert np.array_equal(P.tile(photo, 0, 0.0), photo)
    assert P.tile(photo, 0, 0.0) is not photo
    soft = P.tile(photo, 3)
    # detail removed: much less high-frequency energy than the photo
    lap = lambda x: np.abs(_laplacian(x.astype(np.float32).mean(axis=2))).mean()  # noqa: E731
    assert lap(soft) < 0.5 * lap(photo)
    # A linear ramp has no detail to remove: it comes back, borders aside, moved by (2**levels - 1) / 2 = 3.5 px
    # (each INTER_AREA-halving / pyrUp level shifts by half a pixel of its scale, as in the reference annotator).
    cols = np.arange(128, dtype=np.float64)
    ramp = np.broadcast_to((2 * cols)[None, :, None], (96, 128, 3)).astype(np.uint8)
    want = 2 * (cols + 3.5)
    assert np.abs(P.tile(ramp, 3)[8:-8, 8:-8].astype(float) - want[8:-8][None, :, None]).max() <= 1.0
    with pytest.raises(ValueError, match="pyramid_levels"):
        P.tile(photo, 9)
    with pytest.raises(ValueError, match="blur_sigma"):
        P.tile(photo, 1, float("inf"))


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
    def minus_one(image: np.ndarray, value: float) -> np.ndarray:
        return np.full(image.shape, value, np.float32)

    out = P.run_batched(minus_one, torch.rand(2, 4, 4, 3), value=-1.0)
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


def _gauss(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur by SciPy, not by the OpenCV call the implementation makes: the same kernel (4 sigma radius,
    mirrored border) computed independently, so the results agree to float rounding, not bit for bit."""
    return ndimage.gaussian_filter(x, (sigma, sigma, 0), mode="mirror", truncate=4.0)


def test_lineart_standard_equals_the_reference_formula(photo):
    # sd-webui-controlnet's lineart_standard, written plainly
    x = photo.astype(np.float32)
    intensity = np.min(_gauss(x, 6.0) - x, axis=2).clip(0, 255)
    intensity /= max(16, np.median(intensity[intensity > 8]))
    intensity *= 127
    ref = intensity.clip(0, 255).astype(np.uint8)
    diff = np.abs(P.lineart_standard(photo)[:, :, 0].astype(int) - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # float rounding of two blur implementations


def test_scribble_equals_the_reference_formula(photo):
    # sd-webui-controlnet's scribble_xdog, written plainly
    x = photo.astype(np.float32)
    dog = (255 - np.min(_gauss(x, 5.0) - _gauss(x, 0.5), axis=2)).clip(0, 255).astype(np.uint8)
    ref = np.where(2 * (255 - dog.astype(np.int32)) > 32, 255, 0)
    assert (P.scribble(photo, 32)[:, :, 0] != ref).mean() < 1e-3


def test_threshold_equals_the_reference_formula(photo):
    ref = np.where(photo.min(axis=2) > 127, 255, 0)
    assert np.array_equal(P.threshold(photo, 127)[:, :, 0], ref)
    assert np.array_equal(P.threshold(photo, 126.5)[:, :, 0], np.where(photo.min(axis=2) > 126.5, 255, 0))
