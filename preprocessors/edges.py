"""Edge and line hints: Canny, lineart-standard (difference of Gaussians) and scribble (XDoG).

All take an H x W x 3 uint8 RGB image (gray / RGBA accepted, see ``common.hwc3``) and return an H x W x 3 uint8
hint with white lines on black, which is what the canny / lineart / scribble ControlNets were trained on.
"""

from __future__ import annotations

import cv2
import numpy as np

from .common import channel_min, check_image, check_threshold

__all__ = ["canny", "lineart_standard", "scribble", "CANNY_MAX_THRESHOLD"]

# With the default 3x3 Sobel and L1 gradient, |dx| + |dy| of an 8-bit image is at most 2 * 4 * 255 = 2040, so
# any threshold above it gives an empty map. Larger values are refused as typos rather than silently clamped.
CANNY_MAX_THRESHOLD = 2040.0


def _gray_to_rgb(x: np.ndarray) -> np.ndarray:
    # cvtColor is ~30x faster than np.repeat for this (one SIMD pass).
    return cv2.cvtColor(x, cv2.COLOR_GRAY2RGB)


def canny(image: np.ndarray, low_threshold: float = 100, high_threshold: float = 200) -> np.ndarray:
    """Canny edges, exactly ``cv2.Canny(image, low, high)`` on the RGB image (as sd-webui-controlnet).

    OpenCV's Canny on 3 channels takes, per pixel, the channel with the strongest gradient, so colour edges
    between regions of equal brightness are kept (a grayscale conversion would lose them).
    Thresholds are on the L1 Sobel gradient, 0..2040; ``low_threshold <= high_threshold`` is required (OpenCV
    would swap them silently, which hides a mistake in the node's inputs).
    """
    image = check_image(image)
    low = check_threshold("low_threshold", low_threshold, 0, CANNY_MAX_THRESHOLD)
    high = check_threshold("high_threshold", high_threshold, 0, CANNY_MAX_THRESHOLD)
    if low > high:
        raise ValueError(f"low_threshold: expected <= high_threshold ({high}), got {low}")
    return _gray_to_rgb(cv2.Canny(image, low, high))


def lineart_standard(
    image: np.ndarray, gaussian_sigma: float = 6.0, intensity_threshold: float = 8
) -> np.ndarray:
    """sd-webui-controlnet's "lineart_standard": a difference of Gaussians, normalised by its median.

    ``g - x`` is positive where a pixel is darker than its blurred surroundings (a drawn line); the minimum
    over channels keeps lines dark in every channel. Dividing by the median of the clearly-nonzero responses
    (those above ``intensity_threshold``; at least 16) makes line strength independent of the photo's contrast.
    """
    image = check_image(image)
    sigma = check_threshold("gaussian_sigma", gaussian_sigma, 0.1, 100.0)
    thr = check_threshold("intensity_threshold", intensity_threshold, 0, 255)
    x = image.astype(np.float32)
    g = cv2.GaussianBlur(x, (0, 0), sigma)
    intensity = channel_min(cv2.subtract(g, x)).clip(0, 255)
    strong = intensity[intensity > thr]
    # A flat image has no strong responses; the reference would take the median of nothing (NaN).
    scale = max(16.0, float(np.median(strong))) if strong.size else 16.0
    # Divide, then multiply, in float32 like the reference, so the result is bit-identical to it.
    intensity /= np.float64(scale)
    intensity *= 127
    return _gray_to_rgb(intensity.clip(0, 255).astype(np.uint8))


def scribble(image: np.ndarray, threshold: float = 32) -> np.ndarray:
    """sd-webui-controlnet's "scribble_xdog": a thresholded difference of Gaussians (sigma 0.5 and 5).

    Gives the bold, sketch-like strokes the scribble ControlNets expect. Lower ``threshold`` (0..255) keeps
    fainter lines.
    """
    image = check_image(image)
    thr = check_threshold("threshold", threshold, 0, 255)
    x = image.astype(np.float32)
    g1 = cv2.GaussianBlur(x, (0, 0), 0.5)
    g2 = cv2.GaussianBlur(x, (0, 0), 5.0)
    # Reference: dog = uint8(clip(255 - min(g2 - g1))); stroke where 2 * (255 - dog) > thr.
    dog = (255 - channel_min(cv2.subtract(g2, g1))).clip(0, 255).astype(np.uint8)
    mask = 2 * (255 - dog.astype(np.int32)) > thr
    return _gray_to_rgb(mask.astype(np.uint8) * 255)
