"""Colour and content hints: colour palette, content shuffle, tile.

All take an H x W x 3 uint8 RGB image (gray / RGBA accepted) and return H x W x 3 uint8 of the same size.
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from .common import check_image, check_int, check_threshold

__all__ = ["color", "shuffle", "shuffle_flow", "tile"]


def color(image: np.ndarray, block_size: int = 64) -> np.ndarray:
    """The reference "color" annotator: a coarse block colour map.

    Downscale by ``block_size`` with INTER_CUBIC (each block's colour, slightly sharpened by the cubic
    kernel), then upscale with INTER_NEAREST so the blocks stay flat. At least one block per side.
    """
    image = check_image(image)
    block_size = check_int("block_size", block_size, 1, 1024)
    h, w = image.shape[:2]
    small = cv2.resize(
        image, (max(1, w // block_size), max(1, h // block_size)), interpolation=cv2.INTER_CUBIC
    )
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_NEAREST)


def _noise_disk(rng: np.random.Generator, h: int, w: int, f: int) -> np.ndarray:
    """Smooth noise in [0, 1] (the reference ``make_noise_disk``): coarse uniform noise, cubic upsampled."""
    noise = rng.uniform(0.0, 1.0, size=(h // f + 2, w // f + 2))
    noise = cv2.resize(noise, (w + 2 * f, h + 2 * f), interpolation=cv2.INTER_CUBIC)[f : f + h, f : f + w]
    noise -= noise.min()
    peak = noise.max()
    # A 1-pixel image gives constant noise; avoid 0/0.
    return noise / peak if peak > 0 else noise


@functools.lru_cache(maxsize=8)
def shuffle_flow(h: int, w: int, seed: int, f: int = 256) -> np.ndarray:
    """The random remap field of :func:`shuffle`: H x W x 2 float32 source coordinates (x, y).

    Cached: a batch (video frames) shuffled with one seed computes it once and every frame gets the same
    shuffle, which keeps the frames consistent. The returned array is shared; do not modify it.
    """
    rng = np.random.default_rng(seed)
    x = _noise_disk(rng, h, w, f) * float(w - 1)
    y = _noise_disk(rng, h, w, f) * float(h - 1)
    flow = np.stack([x, y], axis=2).astype(np.float32)
    flow.setflags(write=False)
    return flow


def shuffle(image: np.ndarray, seed: int = 0, f: int = 256) -> np.ndarray:
    """Content shuffle (the reference ``ContentShuffleDetector``): remap through a smooth random flow field.

    Keeps colours and textures, destroys layout; for the shuffle ControlNet. Deterministic per ``seed``
    (numpy's PCG64; the reference used the unseeded global RNG). ``f`` is the noise cell size in pixels:
    larger = bigger coherent patches.
    """
    image = check_image(image)
    seed = check_int("seed", seed, 0, 2**64 - 1)
    f = check_int("f", f, 1, 4096)
    h, w = image.shape[:2]
    flow = shuffle_flow(h, w, int(seed), int(f))
    return cv2.remap(image, flow, None, cv2.INTER_LINEAR)


def tile(image: np.ndarray, pyramid_levels: int = 3, blur_sigma: float = 0.0) -> np.ndarray:
    """Tile hint: a detail-stripped copy of the image (comfyui_controlnet_aux's TilePreprocessor).

    Downsample by ``2 ** pyramid_levels`` with INTER_AREA, come back up with ``pyramid_levels`` ``pyrUp``
    steps (Gaussian-smoothed, no blockiness), then an optional Gaussian blur of ``blur_sigma`` pixels.
    ``pyramid_levels=0`` with ``blur_sigma=0`` returns a copy of the image.
    """
    image = check_image(image)
    pyramid_levels = check_int("pyramid_levels", pyramid_levels, 0, 8)
    sigma = check_threshold("blur_sigma", blur_sigma, 0, 100)
    h, w = image.shape[:2]
    out = image
    if pyramid_levels:
        f = 2**pyramid_levels
        out = cv2.resize(image, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_AREA)
        for _ in range(pyramid_levels):
            out = cv2.pyrUp(out)
        if out.shape[:2] != (h, w):  # sizes that are not multiples of 2**levels
            out = cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR)
    if sigma > 0:
        out = cv2.GaussianBlur(out, (0, 0), sigma)
    return out.copy() if out is image else out
