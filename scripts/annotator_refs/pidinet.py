"""Reference side of the PiDiNet annotator: controlnet_aux 0.0.10's pidinet() and PidiNetDetector.

Test/bench code only (imports controlnet_aux). ``table5_pidinet.pth`` is a training checkpoint of a
``DataParallel`` model: ``{"epoch": 19, "state_dict": {"module.<key>": tensor}}`` (checked against the file in
hellozhuo/pidinet's trained_models/table5_pidinet.pth, 2,871,148 bytes; the reference reads
the ``state_dict`` entry of the loaded file and strips ``module.``). The reference's network is the *unconverted*
pidinet (difference ops applied at every forward), which is what is built here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["published_state_dict", "reference_network", "reference_detect"]


def _model() -> nn.Module:
    from controlnet_aux.pidi.model import pidinet

    with torch.device("meta"):
        return pidinet()


def published_state_dict(seed: int = 0) -> dict[str, Any]:
    """Seeded random weights in the layout of ``table5_pidinet.pth``: ``{"epoch": 19, "state_dict": {"module." +
    key: ...}}`` with the reference pidinet()'s key names, order and shapes.

    Scaled for a non-degenerate hint on [0, 1] pixels: He-normal convs (the residual stack grows slowly), the
    depthwise difference kernels larger (a difference of neighbours is small on smooth regions), CSAM masks
    around 0.5, and the 1x1 reductions and the fusion small enough that the final sigmoid is not saturated.
    """
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, ref in _model().state_dict().items():
        noise = torch.randn(ref.shape, generator=g)
        if ref.ndim == 4:
            gain = math.sqrt(2.0 / math.prod(ref.shape[1:]))
            if key == "init_block.weight":
                gain *= 3.0  # pixel differences in [0, 1] are small: lift them to O(1) features
            elif key.startswith("block") and key.endswith(".conv2.weight"):
                gain *= 0.3  # 15 residual blocks: a full-size branch would grow the features ~2x per block
            elif key.startswith("conv_reduces."):
                gain *= 0.5
            elif key == "classifier.weight":
                gain = 0.6
            value = noise * gain
        else:
            value = 0.1 * noise
        sd[key] = value.contiguous()
    return {"epoch": 19, "state_dict": {f"module.{k}": v for k, v in sd.items()}}


def reference_network(sd: dict[str, torch.Tensor]) -> nn.Module:
    """The reference pidinet() holding ``sd`` (the file's dict or its bare state dict, ``module.`` prefixed or not),
    loaded strictly, in eval, as PidiNetDetector.from_pretrained does."""
    if "state_dict" in sd:
        sd = sd["state_dict"]
    net = _model()
    net.load_state_dict({k.replace("module.", ""): v for k, v in sd.items()}, strict=True, assign=True)
    return net.eval()


def reference_detect(sd: dict[str, Any], images_uint8: list[np.ndarray], **options) -> list[np.ndarray]:
    """PidiNetDetector around ``sd`` on each H x W x 3 uint8 RGB frame (H, W multiples of 64), at the frame's own
    size (detect_resolution = image_resolution = short side: the reference's resizes are then copies)."""
    from controlnet_aux.pidi import PidiNetDetector

    detector = PidiNetDetector(reference_network(sd))
    out = []
    for image in images_uint8:
        h, w = image.shape[:2]
        assert h % 64 == 0 and w % 64 == 0, f"frame {h}x{w}: the reference would resize it"
        res = min(h, w)
        hint = detector(image, detect_resolution=res, image_resolution=res, output_type="np", **options)
        assert hint.shape == (h, w, 3) and hint.dtype == np.uint8, hint.shape
        out.append(hint)
    return out
