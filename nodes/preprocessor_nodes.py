"""Preprocessor nodes: IMAGE batch -> hint IMAGE batch, one node per ``preprocessors`` function.

Thin adapters: the inputs, a description, and one call into ``preprocessors.batch.run_preprocessor``. The only
host API used is ``comfy.utils.ProgressBar``, imported lazily so this module imports without ComfyUI (unit tests
check INPUT_TYPES).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..preprocessors import (
    BINARY_MODES,
    RESIZE_MODES,
    binary,
    canny,
    color,
    invert,
    lineart_standard,
    scribble,
    shuffle,
    threshold,
    tile,
)
from ..preprocessors.batch import run_preprocessor
from ..preprocessors.inpaint_hint import run_inpaint
from ..preprocessors.resize import MAX_SIZE

CATEGORY = "ControlStack/preprocessors"


def _progress(total: int) -> Callable[[int], None] | None:
    """The host's progress bar over the batch, or None outside ComfyUI."""
    try:
        import comfy.utils  # lazy: keeps this module importable without the host
    except ImportError:
        return None
    return comfy.utils.ProgressBar(total).update


def _common_inputs() -> dict:
    return {
        "image": ("IMAGE", {"tooltip": "Image batch to make hints from (every frame is processed)."}),
        "resolution": (
            "INT",
            {
                "default": 512,
                "min": 64,
                "max": MAX_SIZE,
                "step": 64,
                "tooltip": "Short side of the hint in pixels (the image is scaled so its short side is this). "
                "Ignored when pixel_perfect is on.",
            },
        ),
        "pixel_perfect": (
            "BOOLEAN",
            {
                "default": False,
                "tooltip": "Pick the resolution that maps the image 1:1 onto target_width x target_height "
                "for resize_mode, so the hint is never resampled again.",
            },
        ),
        "target_width": (
            "INT",
            {
                "default": 512,
                "min": 8,  # the frontend snaps to min + k * step: min 1 would turn 128 into 129
                "max": MAX_SIZE,
                "step": 8,
                "tooltip": "Generation width (pixel_perfect).",
            },
        ),
        "target_height": (
            "INT",
            {
                "default": 512,
                "min": 8,  # the frontend snaps to min + k * step: min 1 would turn 128 into 129
                "max": MAX_SIZE,
                "step": 8,
                "tooltip": "Generation height (pixel_perfect).",
            },
        ),
    }


def _optional_inputs() -> dict:
    return {
        "resize_mode": (
            list(RESIZE_MODES),
            {
                "default": "crop and resize",
                "tooltip": "How the hint will be fitted to the target (used by pixel_perfect only): crop and "
                "resize covers the target, resize and fill fits inside it.",
            },
        )
    }


class _Preprocessor:
    """Shared shape of every preprocessor node; subclasses set FN, PARAMS and DESCRIPTION."""

    FN: Callable = staticmethod(lambda image: image)
    PARAMS: dict = {}
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("hint",)
    OUTPUT_TOOLTIPS = ("The hint batch (float RGB in [0, 1]), short side = resolution.",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {"required": {**_common_inputs(), **cls.PARAMS}, "optional": _optional_inputs()}

    def run(
        self,
        image: torch.Tensor,
        resolution: int,
        pixel_perfect: bool,
        target_width: int,
        target_height: int,
        resize_mode: str = "crop and resize",
        **params,
    ) -> tuple[torch.Tensor]:
        return (
            run_preprocessor(
                type(self).FN,
                image,
                resolution,
                pixel_perfect,
                target_width,
                target_height,
                resize_mode,
                progress=_progress(len(image)),
                **params,
            ),
        )


def _int(default: int, lo: int, hi: int, tooltip: str, step: int = 1) -> tuple:
    return ("INT", {"default": default, "min": lo, "max": hi, "step": step, "tooltip": tooltip})


def _float(default: float, lo: float, hi: float, tooltip: str, step: float = 0.1) -> tuple:
    return ("FLOAT", {"default": default, "min": lo, "max": hi, "step": step, "tooltip": tooltip})


class ControlStackCannyPreprocessor(_Preprocessor):
    DESCRIPTION = (
        "Canny edge map (OpenCV Canny on the RGB image), white edges on black. For canny ControlNets."
    )
    FN = staticmethod(canny)
    PARAMS = {
        "low_threshold": _int(
            100, 0, 2040, "Weak-edge threshold (L1 Sobel gradient). Must be <= high_threshold."
        ),
        "high_threshold": _int(200, 0, 2040, "Strong-edge threshold; edges start only above this."),
    }


class ControlStackLineartStandardPreprocessor(_Preprocessor):
    DESCRIPTION = (
        "Line art from a difference of Gaussians (sd-webui-controlnet's lineart_standard). No model needed."
    )
    FN = staticmethod(lineart_standard)
    PARAMS = {
        "gaussian_sigma": _float(6.0, 0.1, 100.0, "Blur radius; larger picks up broader, softer lines."),
        "intensity_threshold": _int(8, 0, 255, "Responses above this set the normalisation (median)."),
    }


class ControlStackScribblePreprocessor(_Preprocessor):
    DESCRIPTION = "Bold sketch strokes (XDoG, sd-webui-controlnet's scribble_xdog). For scribble ControlNets."
    FN = staticmethod(scribble)
    PARAMS = {"threshold": _int(32, 0, 255, "Lower keeps fainter strokes.")}


class ControlStackThresholdPreprocessor(_Preprocessor):
    DESCRIPTION = "White where every channel is above the threshold, black elsewhere."
    FN = staticmethod(threshold)
    PARAMS = {"threshold": _int(127, 0, 255, "Brightness (0-255) a pixel must exceed in all channels.")}


class ControlStackBinaryPreprocessor(_Preprocessor):
    DESCRIPTION = "Dark pixels -> white, light -> black (Otsu's automatic threshold, or a fixed one)."
    FN = staticmethod(binary)
    PARAMS = {
        "mode": (list(BINARY_MODES), {"default": "otsu", "tooltip": "otsu: threshold chosen per image."}),
        "threshold": _int(127, 0, 255, "Luma threshold for mode 'fixed' (ignored by otsu)."),
    }


class ControlStackInvertPreprocessor(_Preprocessor):
    DESCRIPTION = (
        "255 - image: turns black-on-white line drawings into the white-on-black lines ControlNets expect."
    )
    FN = staticmethod(invert)


class ControlStackColorPreprocessor(_Preprocessor):
    DESCRIPTION = "Coarse colour block map (the reference 'color' annotator). For colour / t2i-adapter color."
    FN = staticmethod(color)
    PARAMS = {"block_size": _int(64, 1, 1024, "Block size in pixels (64 as the reference).")}


class ControlStackShufflePreprocessor(_Preprocessor):
    DESCRIPTION = "Content shuffle: remap through a smooth random flow (seeded). For the shuffle ControlNet."
    FN = staticmethod(shuffle)
    PARAMS = {
        "seed": _int(0, 0, 0xFFFFFFFFFFFFFFFF, "Same seed, same shuffle; all frames of a batch share it."),
        "f": _int(256, 1, 4096, "Noise cell size in pixels: larger keeps bigger coherent patches."),
    }


class ControlStackTilePreprocessor(_Preprocessor):
    DESCRIPTION = (
        "Detail-stripped image (down-sample + pyramid up-sample, optional blur). For tile ControlNets."
    )
    FN = staticmethod(tile)
    PARAMS = {
        "pyramid_levels": _int(3, 0, 8, "Down-sample by 2^levels; more removes more detail."),
        "blur_sigma": _float(0.0, 0.0, 100.0, "Extra Gaussian blur in pixels (0 = none)."),
    }


class ControlStackInpaintPreprocessor:
    DESCRIPTION = (
        "Inpaint hint: the image with masked pixels set to -1 (what inpaint ControlNets expect). "
        "The output holds -1 values: feed it straight to Apply ControlNet Hint, not to image nodes that clamp."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("hint",)
    OUTPUT_TOOLTIPS = ("Float RGB in [0, 1], -1 where the mask is > 0.5.",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        req = _common_inputs()
        req["mask"] = ("MASK", {"tooltip": "Area to inpaint (> 0.5 = masked); stretched to the image size."})
        return {"required": req, "optional": _optional_inputs()}

    def run(
        self,
        image: torch.Tensor,
        resolution: int,
        pixel_perfect: bool,
        target_width: int,
        target_height: int,
        mask: torch.Tensor,
        resize_mode: str = "crop and resize",
    ) -> tuple[torch.Tensor]:
        return (
            run_inpaint(
                image,
                mask,
                resolution,
                pixel_perfect,
                target_width,
                target_height,
                resize_mode,
                progress=_progress(len(image)),
            ),
        )


_NODES = {
    "ControlStackCannyPreprocessor": (ControlStackCannyPreprocessor, "Canny Edges (ControlStack)"),
    "ControlStackLineartStandardPreprocessor": (
        ControlStackLineartStandardPreprocessor,
        "Lineart Standard (ControlStack)",
    ),
    "ControlStackScribblePreprocessor": (ControlStackScribblePreprocessor, "Scribble XDoG (ControlStack)"),
    "ControlStackThresholdPreprocessor": (ControlStackThresholdPreprocessor, "Threshold (ControlStack)"),
    "ControlStackBinaryPreprocessor": (ControlStackBinaryPreprocessor, "Binary (ControlStack)"),
    "ControlStackInvertPreprocessor": (ControlStackInvertPreprocessor, "Invert (ControlStack)"),
    "ControlStackColorPreprocessor": (ControlStackColorPreprocessor, "Color Palette (ControlStack)"),
    "ControlStackShufflePreprocessor": (ControlStackShufflePreprocessor, "Content Shuffle (ControlStack)"),
    "ControlStackTilePreprocessor": (ControlStackTilePreprocessor, "Tile (ControlStack)"),
    "ControlStackInpaintPreprocessor": (ControlStackInpaintPreprocessor, "Inpaint Hint (ControlStack)"),
}

NODE_CLASS_MAPPINGS = {k: cls for k, (cls, _) in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {k: name for k, (_, name) in _NODES.items()}
