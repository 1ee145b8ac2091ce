"""Two-tone hints: threshold, binary (Otsu or fixed) and invert.

All take an H x W x 3 uint8 RGB image (gray / RGBA accepted) and return H x W x 3 uint8 with values 0 / 255
(invert: any values). Use them to turn a user's drawing into the white-on-black strokes the scribble / lineart
ControlNets expect.
"""

from __future__ import annotations

import cv2
import numpy as np

from .common import channel_min, check_image, check_threshold

__all__ = ["threshold", "binary", "invert", "BINARY_MODES"]

BINARY_MODES: tuple[str, ...] = ("otsu", "fixed")


def threshold(image: np.ndarray, threshold: float = 127) -> np.ndarray:
    """sd-webui-controlnet's "threshold": white where EVERY channel is above ``threshold`` (0..255), else black.

    The per-pixel minimum over channels means a pixel counts as bright only if it is bright in all of them.
    """
    image = check_image(image)
    thr = check_threshold("threshold", threshold, 0, 255)
    # THRESH_BINARY is exactly "> thr -> 255, else 0", in one vectorised pass.
    _, out = cv2.threshold(channel_min(image), thr, 255, cv2.THRESH_BINARY)
    return cv2.cvtColor(out, cv2.COLOR_GRAY2RGB)


def binary(image: np.ndarray, mode: str = "otsu", threshold: float = 127) -> np.ndarray:
    """sd-webui-controlnet's "binary": dark pixels -> white, light -> black (THRESH_BINARY_INV on luma).

    The inversion is deliberate: a dark pencil drawing on white paper becomes white strokes on black.
    ``mode="otsu"`` picks the threshold per image (Otsu's method, ``threshold`` ignored); ``"fixed"`` uses
    ``threshold`` (0..255): pixels with luma > threshold become black.
    """
    image = check_image(image)
    if mode not in BINARY_MODES:
        raise ValueError(f"mode: expected one of {BINARY_MODES}, got {mode!r}")
    thr = check_threshold("threshold", threshold, 0, 255)
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if mode == "otsu":
        _, out = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    else:
        _, out = cv2.threshold(gray, thr, 255, cv2.THRESH_BINARY_INV)
    return cv2.cvtColor(out, cv2.COLOR_GRAY2RGB)


def invert(image: np.ndarray) -> np.ndarray:
    """255 - image: for line drawings made as black lines on white ("invert (from white bg & black line)")."""
    image = check_image(image)
    return cv2.bitwise_not(image)
