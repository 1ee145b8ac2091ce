"""Test frames the annotator parity tests share: the repo's photo and a drawn scene, and the IMAGE <-> uint8 steps.

Small sizes (64 x 128 by default) keep the reference runs fast; the drawn scene has edges of every orientation, a
filled and an outlined shape and a gradient, so edge and line networks get real structure on random weights.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

PHOTO = Path(__file__).resolve().parents[2] / "workflows" / "inputs" / "controlstack_photo.png"


def photo(height: int = 64, width: int = 128) -> np.ndarray:
    """The repo's photo as an RGB uint8 frame of the given size."""
    rgb = cv2.cvtColor(cv2.imread(str(PHOTO)), cv2.COLOR_BGR2RGB)
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)


def shapes(height: int = 64, width: int = 128) -> np.ndarray:
    """A drawn scene: gradient background, filled and outlined shapes, a line (edges of every orientation)."""
    ramp = np.linspace(40, 200, width, dtype=np.float32)[None, :, None]
    image = np.broadcast_to(ramp, (height, width, 3)).astype(np.uint8).copy()
    cv2.circle(image, (width // 3, height // 2), height // 4, (220, 60, 40), -1)
    cv2.rectangle(image, (width // 2, height // 5), (width - 20, height - 25), (30, 120, 230), 3)
    cv2.line(image, (5, height - 5), (width - 5, 10), (250, 250, 90), 2)
    return image


def to_images(*frames: np.ndarray) -> torch.Tensor:
    """uint8 RGB frames -> a B x H x W x 3 float [0, 1] IMAGE batch."""
    return torch.from_numpy(np.stack(frames)).float() / 255.0


def to_uint8(hint: torch.Tensor) -> np.ndarray:
    """A float [0, 1] hint (CPU) -> uint8 levels, rounded, as the reference's outputs are compared."""
    return (hint.numpy() * 255.0).round().astype(np.uint8)
