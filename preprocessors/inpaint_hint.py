"""Inpaint hint: the image with masked pixels set to -1 (what the inpaint ControlNet was trained on).

The one implementation of the inpaint hint (sd-webui-controlnet ``inpaint_only``: ``hint[mask > 0.5] = -1``). Unlike
every other preprocessor it returns values outside [0, 1]: the image in [0, 1] outside the mask, exactly ``MASKED``
inside. Such a hint must not be clamped to [0, 1] downstream: ``preprocessors.hint.image_to_hint`` (ApplyHint)
keeps it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .batch import check_images, run_preprocessor
from .resize import fit_mask

__all__ = ["MASKED", "MASK_THRESHOLD", "run_inpaint"]

MASKED = -1.0
"""The value of a masked pixel in an inpaint hint."""
MASK_THRESHOLD = 0.5
"""A pixel is masked where the mask is above this."""


def _identity(image: np.ndarray) -> np.ndarray:
    return image


def run_inpaint(
    images: torch.Tensor,
    masks: torch.Tensor,
    resolution: int,
    pixel_perfect: bool = False,
    target_width: int = 512,
    target_height: int = 512,
    resize_mode: str = "crop and resize",
    *,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """The inpaint hint node: the image batch at ``resolution`` with ``MASKED`` where the (stretched) mask is above
    ``MASK_THRESHOLD``.

    ``images``: IMAGE B x H x W x C in [0, 1]; ``masks``: MASK B x H x W or H x W (a batch of 1 is shared by every
    image). The images go through :func:`~.batch.run_preprocessor` like every other hint (same resizing, RGBA / gray
    handling and checks); the mask is stretched to the hint size with ``fit_mask(..., "just resize")`` and applied
    in place to the fresh output. Returns B x h x w x 3 float32 on the images' device.
    """
    check_images(images)
    if not isinstance(masks, torch.Tensor) or masks.ndim not in (2, 3) or 0 in masks.shape:
        shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"mask: expected a non-empty B x H x W (or H x W) tensor, got {shape}")
    masks = masks[None] if masks.ndim == 2 else masks
    if masks.shape[0] not in (1, images.shape[0]):
        raise ValueError(
            f"mask: expected a batch of 1 or {images.shape[0]} (the image batch), got {masks.shape[0]}"
        )
    hint = run_preprocessor(
        _identity,
        images,
        resolution,
        pixel_perfect,
        target_width,
        target_height,
        resize_mode,
        workers=workers,
        progress=progress,
    )
    th, tw = hint.shape[1:3]
    masked = fit_mask(masks.detach().float().cpu(), tw, th, "just resize").numpy() > MASK_THRESHOLD
    dst = hint.cpu().numpy()  # the fresh float32 buffer run_batched made (shared memory on the CPU)
    np.copyto(dst, np.float32(MASKED), where=masked[..., None])
    return torch.from_numpy(dst).to(images.device)
