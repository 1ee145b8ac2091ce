"""Reference side of the M-LSD annotator: controlnet_aux 0.0.10's MobileV2_MLSD_Large and MLSDdetector.

Test/bench code only (imports controlnet_aux). ``mlsd_large_512_fp32.pth`` is a bare state dict of
``MobileV2_MLSD_Large`` (the reference loads the whole file into the network, strictly): no wrapper, no
prefix, BatchNorm buffers included.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = ["published_state_dict", "reference_network", "reference_detect"]


def _model() -> nn.Module:
    from controlnet_aux.mlsd.models.mbv2_mlsd_large import MobileV2_MLSD_Large

    with torch.device("meta"):
        return MobileV2_MLSD_Large()


def published_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights under the key names and shapes of ``mlsd_large_512_fp32.pth``.

    He-normal convs; BatchNorm weight ~1, bias and running mean small, running variance in [0.5, 1.5] (all
    positive), ``num_batches_tracked`` a seeded count. The head's 1x1 conv is sized so that the centre
    logits spread over about -2..2 (scores both above and below the thresholds the tests use) and the
    displacements span a few to tens of pixels (lines of many lengths and angles, some beyond the frame).
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, ref in _model().state_dict().items():
        if key.endswith("num_batches_tracked"):
            out[key] = torch.randint(1, 100_000, (), generator=g, dtype=torch.int64)
            continue
        noise = torch.randn(ref.shape, generator=g)
        if key == "block23.conv3.weight":
            # Rows 7 (centre logit) and 8..11 (displacements) are what the line decoder reads; the decoder's
            # ReLU features reaching this conv have an RMS of ~15, hence the small gains.
            gains = torch.full((ref.shape[0], 1, 1, 1), 0.3)
            gains[7], gains[8:12] = 0.2, 0.6
            # Zero-sum rows: the features are all positive, so a row's mean would shift the whole map.
            value = (noise - noise.mean(dim=1, keepdim=True)) * gains / math.sqrt(ref.shape[1])
        elif key == "block23.conv3.bias":
            value = 0.1 * noise
            value[7] = -1.0
        elif key.endswith("running_var"):
            value = 0.5 + torch.rand(ref.shape, generator=g)
        elif key.endswith("running_mean"):
            value = 0.1 * noise
        elif ref.ndim == 4:
            value = noise * math.sqrt(2.0 / math.prod(ref.shape[1:]))
        elif key.endswith(".weight"):  # BatchNorm scale
            value = 1.0 + 0.1 * noise
        else:
            value = 0.1 * noise
        out[key] = value.contiguous()
    return out


def reference_network(sd: dict[str, torch.Tensor]) -> nn.Module:
    """The reference MobileV2_MLSD_Large holding ``sd`` (loaded strictly, eval), as from_pretrained does."""
    net = _model()
    net.load_state_dict(sd, strict=True, assign=True)
    return net.eval()


def reference_detect(
    sd: dict[str, torch.Tensor], images_uint8: list[np.ndarray], thr_v: float = 0.1, thr_d: float = 0.1
) -> list[np.ndarray]:
    """MLSDdetector around ``sd`` on each H x W x 3 uint8 RGB frame (H, W multiples of 64), at the frame's own
    size (detect_resolution = image_resolution = short side: the reference's resizes are then copies, and
    pred_lines runs at [H, W] too)."""
    from controlnet_aux.mlsd import MLSDdetector

    detector = MLSDdetector(reference_network(sd))
    out = []
    for image in images_uint8:
        h, w = image.shape[:2]
        assert h % 64 == 0 and w % 64 == 0, f"frame {h}x{w}: the reference would resize it"
        res = min(h, w)
        hint = detector(
            image, thr_v=thr_v, thr_d=thr_d, detect_resolution=res, image_resolution=res, output_type="np"
        )
        assert hint.shape == (h, w, 3) and hint.dtype == np.uint8, hint.shape
        out.append(hint)
    return out
