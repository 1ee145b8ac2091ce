"""Fitting a hint (or a mask) to the generation size: the three resize modes and pixel-perfect resolution.

This is the ONE implementation of the resize modes: the preprocessor nodes, ApplyHint and the patcher all call
it. It is pure torch, so it runs on whatever device the tensors live on (no round trip through numpy/OpenCV on
the GPU), and it follows sd-webui-controlnet's ``detectmap_proc`` semantics:

- ``"just resize"``: stretch to ``width x height``, aspect ratio not kept.
- ``"crop and resize"``: scale by ``k = max(height / H, width / W)`` (the image covers the target), then
  crop the centre.
- ``"resize and fill"``: scale by ``k = min(height / H, width / W)`` (the image fits inside), centre it and
  fill the rest with the per-channel median of the ORIGINAL image's border pixels (so a photo on a white
  background is padded with white, an edge map on black with black).
- ``BUILTIN_RESIZE``: what ComfyUI's built-in ControlNet does to a hint (``comfy.utils.common_upscale`` with
  ``"nearest-exact"`` and ``crop="center"``): crop the centre to the target's aspect ratio, then nearest-neighbour
  resize. Converted built-in workflows use it, so they render the same image.

Interpolation: bicubic when both axes are upscaled (sharper, like the reference's ``INTER_CUBIC``), clamped to
the input's value range (always) so cubic overshoot cannot push a [0, 1] image (or an inpaint hint holding -1) out of
range; anti-aliased bilinear otherwise (the torch counterpart of ``INTER_AREA``: a plain bilinear downscale
aliases thin edge-map lines away).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..controlnet.checks import check_int

BUILTIN_RESIZE = "crop and resize (nearest, as built-in)"
RESIZE_MODES: tuple[str, ...] = ("just resize", "crop and resize", "resize and fill", BUILTIN_RESIZE)

# ComfyUI's own MAX_RESOLUTION; a bigger target is a typo, not a request, and would allocate gigabytes.
MAX_SIZE = 16384

__all__ = [
    "BUILTIN_RESIZE",
    "RESIZE_MODES",
    "MAX_SIZE",
    "fit_image",
    "fit_mask",
    "pixel_perfect_resolution",
    "scaled_size",
]


def _check_mode(mode: str) -> None:
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode: expected one of {RESIZE_MODES}, got {mode!r}")


def _check_size(name: str, value: int) -> int:
    return check_int(name, value, 1, MAX_SIZE)


def _round(x: float) -> int:
    # np.round (half to even) is what the reference uses (``safeint``), so sizes match it exactly.
    return int(np.round(x))


def scaled_size(h: int, w: int, height: int, width: int, mode: str) -> tuple[int, int]:
    """Size (h, w) the image is scaled to before cropping / padding, for the given mode.

    For "crop and resize" the result is at least (height, width); for "resize and fill" at most; for
    "just resize" exactly (height, width).
    """
    _check_mode(mode)
    if mode in ("just resize", BUILTIN_RESIZE):
        return height, width
    k0, k1 = height / h, width / w
    if mode == "crop and resize":
        k = max(k0, k1)
        # max() guards against float rounding landing one pixel short of the target.
        return max(height, _round(h * k)), max(width, _round(w * k))
    k = min(k0, k1)
    return max(1, min(height, _round(h * k))), max(1, min(width, _round(w * k)))


def _interpolate(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize a B x C x H x W tensor; see the module docstring for the choice of filter."""
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    orig_dtype = x.dtype
    # Half precision interpolation is missing or inexact on some backends (CPU antialias); float32 is exact
    # enough for 8-bit images and costs nothing next to the diffusion model.
    if orig_dtype not in (torch.float32, torch.float64):
        x = x.float()
    lo, hi = x.amin(), x.amax()
    if height >= h and width >= w:
        y = F.interpolate(x, size=(height, width), mode="bicubic", align_corners=False)
    else:
        y = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False, antialias=True)
    # Clamp to the input's range: removes cubic overshoot and float error (an all-ones mask stays exactly 1).
    y = torch.maximum(torch.minimum(y, hi), lo)
    return y.to(orig_dtype)


def _border_median(x: torch.Tensor) -> torch.Tensor:
    """Per image, per channel median of the border pixels of a B x C x H x W tensor -> B x C x 1 x 1."""
    borders = torch.cat([x[:, :, 0, :], x[:, :, -1, :], x[:, :, :, 0], x[:, :, :, -1]], dim=2)
    # quantile(0.5) averages the two middle values like np.median (torch.median takes the lower one).
    med = torch.quantile(borders.float(), 0.5, dim=2)
    return med.to(x.dtype)[:, :, None, None]


def _builtin_fit(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """ComfyUI's ``common_upscale(x, width, height, "nearest-exact", "center")``, step for step (Python's round
    included), so a hint fitted here equals the built-in's bit for bit."""
    old_h, old_w = x.shape[-2:]
    old_aspect, new_aspect = old_w / old_h, width / height
    left = top = 0
    if old_aspect > new_aspect:
        left = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        top = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    cropped = x.narrow(-2, top, old_h - top * 2).narrow(-1, left, old_w - left * 2)
    return F.interpolate(cropped, size=(height, width), mode="nearest-exact")


def _fit_bchw(x: torch.Tensor, width: int, height: int, mode: str) -> torch.Tensor:
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    if mode == BUILTIN_RESIZE:
        return _builtin_fit(x, width, height)
    nh, nw = scaled_size(h, w, height, width, mode)
    if mode == "just resize":
        return _interpolate(x, height, width)
    if mode == "crop and resize":
        y = _interpolate(x, nh, nw)
        top, left = (nh - height) // 2, (nw - width) // 2
        return y[:, :, top : top + height, left : left + width]
    # resize and fill
    fill = _border_median(x)
    y = _interpolate(x, nh, nw)
    out = fill.expand(x.shape[0], x.shape[1], height, width).clone()
    top, left = (height - nh) // 2, (width - nw) // 2
    out[:, :, top : top + nh, left : left + nw] = y
    return out


def fit_image(images: torch.Tensor, width: int, height: int, mode: str) -> torch.Tensor:
    """Fit a ComfyUI IMAGE batch (B x H x W x C, float) to ``width x height`` with a resize mode.

    Returns B x height x width x C on the same device and dtype. When the size already matches, ``images``
    itself is returned (no copy). Raises ValueError for an empty batch, a bad shape, size or mode.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected a B x H x W x C tensor, got {shape}")
    if 0 in images.shape:
        raise ValueError(
            f"images: expected a non-empty batch with H, W, C >= 1, got shape {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise ValueError(f"images: expected a float tensor, got {images.dtype}")
    width, height = _check_size("width", width), _check_size("height", height)
    _check_mode(mode)
    if images.shape[1:3] == (height, width):
        return images
    # Contiguous NCHW: torch's CPU resampling kernels run ~1.5x faster on it than on the channels-last view
    # that movedim gives, and the copy costs a fraction of the resampling.
    y = _fit_bchw(images.movedim(-1, 1).contiguous(), width, height, mode)
    return y.movedim(1, -1).contiguous()


def fit_mask(masks: torch.Tensor, width: int, height: int, mode: str) -> torch.Tensor:
    """Fit a ComfyUI MASK (B x H x W, or a single H x W) to ``width x height`` with a resize mode.

    Same geometry as :func:`fit_image`, so a mask stays aligned with its hint. "resize and fill" pads with the
    median border value like images do: an all-ones mask stays all ones, an all-zeros one all zeros.
    Returns B x height x width (a 2-D mask gets a batch dimension of 1).
    """
    if not isinstance(masks, torch.Tensor) or masks.ndim not in (2, 3):
        shape = tuple(masks.shape) if isinstance(masks, torch.Tensor) else type(masks).__name__
        raise ValueError(f"masks: expected a B x H x W (or H x W) tensor, got {shape}")
    if masks.ndim == 2:
        masks = masks[None]
    if 0 in masks.shape:
        raise ValueError(f"masks: expected a non-empty batch with H, W >= 1, got shape {tuple(masks.shape)}")
    if not masks.is_floating_point():
        masks = masks.float()
    return fit_image(masks[..., None], width, height, mode)[..., 0]


def pixel_perfect_resolution(image_h: int, image_w: int, target_h: int, target_w: int, mode: str) -> int:
    """Preprocessor resolution that maps the image 1:1 onto the target size (sd-webui-controlnet's formula).

    The preprocessors scale the image's SHORT side to ``resolution``; choosing
    ``round(k * min(image_h, image_w))`` with ``k = max(target_h / image_h, target_w / image_w)`` ("just
    resize", "crop and resize") or ``min(...)`` ("resize and fill") makes the hint come out at the size the
    resize mode will scale it to anyway, so it is computed once at full detail and never resampled again.
    """
    image_h, image_w = _check_size("image_h", image_h), _check_size("image_w", image_w)
    target_h, target_w = _check_size("target_h", target_h), _check_size("target_w", target_w)
    _check_mode(mode)
    k0, k1 = target_h / image_h, target_w / image_w
    k = min(k0, k1) if mode == "resize and fill" else max(k0, k1)
    return max(1, _round(k * min(image_h, image_w)))
