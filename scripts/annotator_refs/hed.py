"""Reference side of the HED annotator: controlnet_aux 0.0.10's ControlNetHED_Apache2 and HEDdetector.

Test/bench code only (imports controlnet_aux). ``ControlNetHED.pth`` is a bare state dict (the reference loads the whole file
into the network): no wrapper, no prefix.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = ["published_state_dict", "reference_network", "reference_detect"]


def _model() -> nn.Module:
    from controlnet_aux.hed import ControlNetHED_Apache2

    with torch.device("meta"):
        return ControlNetHED_Apache2()


def published_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights under the key names and shapes of ``ControlNetHED.pth``.

    Scaled for a non-degenerate hint: ``norm`` near a mid-grey pixel (the input is 0..255), He-normal 3x3 convs
    (the ReLU stack neither dies out nor explodes), and projections of std 1 / (25 sqrt(fan-in)) so that
    the mean of the five side outputs spans about -3..3 on a photo: the sigmoid varies, safe/scribble do too.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, ref in _model().state_dict().items():
        noise = torch.randn(ref.shape, generator=g)
        if key == "norm":
            value = 110.0 + 20.0 * noise
        elif key.endswith("projection.weight"):
            value = noise / (25.0 * math.sqrt(ref.shape[1]))
        elif key.endswith("projection.bias"):
            value = 0.3 * noise
        elif key.endswith(".weight"):
            value = noise * math.sqrt(2.0 / math.prod(ref.shape[1:]))
        else:
            value = 0.5 * noise
        out[key] = value.contiguous()
    return out


def reference_network(sd: dict[str, torch.Tensor]) -> nn.Module:
    """The reference ControlNetHED_Apache2 holding ``sd`` (loaded strictly, float, eval), as from_pretrained does."""
    net = _model()
    net.load_state_dict(sd, strict=True, assign=True)
    return net.float().eval()


def reference_detect(
    sd: dict[str, torch.Tensor], images_uint8: list[np.ndarray], **options
) -> list[np.ndarray]:
    """HEDdetector around ``sd`` on each H x W x 3 uint8 RGB frame (H, W multiples of 64), at the frame's own
    size (detect_resolution = image_resolution = short side: the reference's resizes are then copies)."""
    from controlnet_aux.hed import HEDdetector

    detector = HEDdetector(reference_network(sd))
    out = []
    for image in images_uint8:
        h, w = image.shape[:2]
        assert h % 64 == 0 and w % 64 == 0, f"frame {h}x{w}: the reference would resize it"
        res = min(h, w)
        hint = detector(image, detect_resolution=res, image_resolution=res, output_type="np", **options)
        assert hint.shape == (h, w, 3) and hint.dtype == np.uint8, hint.shape
        out.append(hint)
    return out
