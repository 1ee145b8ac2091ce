"""Inpaint hint: the image with masked pixels set to -1 (what the inpaint ControlNet was trained on).

Unlike every other preprocessor this returns FLOAT (H x W x 3 float32: [0, 1] outside the mask, exactly -1.0
inside), because -1 is outside the 8-bit range. A hint made here must not be clamped to [0, 1] downstream.
"""

from __future__ import annotations

import numpy as np
import torch

from .common import check_image

__all__ = ["inpaint", "inpaint_tensor"]


def inpaint(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 image + H x W mask (float 0..1 or bool) -> H x W x 3 float32 hint, -1 where mask > 0.5."""
    image = check_image(image)
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[:, :, 0]
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask: expected shape {image.shape[:2]} (the image's H x W), got {mask.shape}")
    out = image.astype(np.float32) / 255.0
    out[mask.astype(np.float32) > 0.5] = -1.0
    return out


def inpaint_tensor(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Batch form on ComfyUI tensors: IMAGE B x H x W x C in [0, 1], MASK B x H x W (or 1 x H x W, broadcast).

    The mask must already match the image's H x W (the node fits it with ``resize.fit_mask`` first).
    Returns a new B x H x W x 3 float tensor with -1 where mask > 0.5, on the images' device.
    """
    if images.ndim != 4 or 0 in images.shape:
        raise ValueError(
            f"images: expected a non-empty B x H x W x C tensor, got shape {tuple(images.shape)}"
        )
    if masks.ndim == 2:
        masks = masks[None]
    if masks.ndim != 3 or masks.shape[1:] != images.shape[1:3] or masks.shape[0] not in (1, images.shape[0]):
        raise ValueError(
            f"masks: expected (1 or {images.shape[0]}) x {images.shape[1]} x {images.shape[2]}, got {tuple(masks.shape)}"
        )
    if not torch.isfinite(images).all():
        raise ValueError("images: expected finite values in [0, 1], found NaN or Inf")
    out = images[..., :3].clamp(0, 1).to(torch.float32, copy=True)
    if out.shape[-1] == 1:
        out = out.expand(-1, -1, -1, 3).clone()
    out[(masks.to(out.device) > 0.5).expand(out.shape[0], -1, -1)] = -1.0
    return out
