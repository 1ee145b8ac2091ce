"""ControlStack preprocessors: image -> ControlNet hint, with numpy / OpenCV / torch only (no ComfyUI, no weights).

Per-image functions take an H x W x 3 uint8 RGB array (grayscale and RGBA are accepted and converted, RGBA
composited onto white) and return an H x W x 3 uint8 hint at the same size. ``common.at_resolution`` runs one the
way the reference annotators do, ``batch.run_batched`` / ``batch.run_preprocessor`` over a ComfyUI IMAGE batch,
``inpaint_hint.run_inpaint`` makes the inpaint hint (float, -1 in masked pixels), ``resize`` fits hints to the
generation size, and ``hint.image_to_hint`` turns any IMAGE into the B x 3 x H x W hint a control module reads.
"""

from .batch import default_workers, images_to_uint8, run_batched, run_preprocessor
from .binarize import BINARY_MODES, binary, invert, threshold
from .colors import color, shuffle, shuffle_flow, tile
from .common import (
    at_resolution,
    composite_rgba,
    hwc3,
    output_size,
    pad64,
    resize_image_with_pad,
    resize_short_side_64,
)
from .edges import CANNY_MAX_THRESHOLD, canny, lineart_standard, scribble
from .hint import image_to_hint
from .inpaint_hint import MASKED, run_inpaint
from .resize import BUILTIN_RESIZE, RESIZE_MODES, fit_image, fit_mask, pixel_perfect_resolution

# The image -> uint8 hint functions, by name (benchmarks and tests iterate over these).
PREPROCESSORS = {
    "canny": canny,
    "lineart_standard": lineart_standard,
    "scribble": scribble,
    "threshold": threshold,
    "binary": binary,
    "invert": invert,
    "color": color,
    "shuffle": shuffle,
    "tile": tile,
}

__all__ = [
    "PREPROCESSORS",
    "BUILTIN_RESIZE",
    "RESIZE_MODES",
    "BINARY_MODES",
    "CANNY_MAX_THRESHOLD",
    "MASKED",
    "at_resolution",
    "binary",
    "canny",
    "color",
    "composite_rgba",
    "default_workers",
    "fit_image",
    "fit_mask",
    "hwc3",
    "image_to_hint",
    "images_to_uint8",
    "invert",
    "lineart_standard",
    "output_size",
    "pad64",
    "pixel_perfect_resolution",
    "resize_image_with_pad",
    "resize_short_side_64",
    "run_batched",
    "run_inpaint",
    "run_preprocessor",
    "scribble",
    "shuffle",
    "shuffle_flow",
    "threshold",
    "tile",
]
