"""IMAGE -> control hint: the one conversion from a ComfyUI IMAGE batch to what a control module reads.

A control hint is B x 3 x H x W float32, RGB. Its values live in [-1, 1]: [0, 1] is the picture (edges, depth,
pose...), and an inpaint hint (``inpaint_hint``) marks masked pixels with ``MASKED`` (-1), which the inpaint
ControlNet was trained on. So only values no hint can hold are clamped: above 1 (e.g. an upscaler's overshoot) and
below -1. Clamping to [0, 1] instead would turn every masked pixel into black, silently (ComfyUI's built-in
ControlNet does not clamp at all; these bounds change nothing for any hint a preprocessor makes).
"""

from __future__ import annotations

import torch

from ..controlnet.errors import ControlNetError
from .common import composite_rgba
from .inpaint_hint import MASKED

__all__ = ["HINT_RANGE", "NO_CONTROL", "image_to_hint"]

HINT_RANGE = (MASKED, 1.0)
"""The values a hint may hold; anything outside is clamped into it."""
NO_CONTROL = 0.0
"""The background transparent RGBA hint pixels are composited onto: black, which carries no control signal."""


def image_to_hint(image: torch.Tensor) -> torch.Tensor:
    """IMAGE B x H x W x C (C = 1, 3 or 4, float) -> B x 3 x H x W float32 hint on the same device.

    Grayscale is repeated to RGB; RGBA is composited onto ``NO_CONTROL`` by its alpha (the one RGBA rule,
    ``common.composite_rgba``); values are clamped to ``HINT_RANGE``, so an inpaint hint's -1 reaches the control
    module unchanged. NaN / inf are refused: no clamp makes them a meaningful hint.
    """
    if not isinstance(image, torch.Tensor):
        raise ControlNetError(f"image: expected a hint IMAGE tensor, got {type(image).__name__}")
    if image.ndim != 4 or image.shape[-1] not in (1, 3, 4) or 0 in image.shape:
        raise ControlNetError(
            f"image: expected a hint IMAGE of B x H x W x 1, 3 or 4 channels, got shape {tuple(image.shape)}"
        )
    if not image.is_floating_point():
        raise ControlNetError(f"image: expected a float IMAGE (values in [0, 1]), got {image.dtype}")
    if not torch.isfinite(image).all():
        raise ControlNetError("image: the hint contains NaN or infinite values")
    x = image.float()
    if x.shape[-1] == 1:
        x = x.expand(-1, -1, -1, 3)
    elif x.shape[-1] == 4:
        x = composite_rgba(x[..., :3], x[..., 3:].clamp(0, 1), NO_CONTROL)
    return x.movedim(-1, 1).clamp(*HINT_RANGE).contiguous()
