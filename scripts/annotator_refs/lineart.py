"""Reference side of the realistic line-art annotator: controlnet_aux 0.0.10's Generator and LineartDetector.

Test/bench code only (imports controlnet_aux). ``sk_model.pth`` and ``sk_model2.pth`` are bare state dicts of
``Generator(3, 1, 3)`` (the reference loads the whole file into the network with ``load_state_dict``): no wrapper, no prefix, and the
two files share one layout.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = ["published_state_dict", "reference_network", "reference_detect"]


def _model() -> nn.Module:
    from controlnet_aux.lineart import Generator

    with torch.device("meta"):
        return Generator(3, 1, 3)


def published_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights under the key names and shapes of ``sk_model.pth`` / ``sk_model2.pth``.

    Every hidden conv is followed by an InstanceNorm, so only the last conv's scale shapes the hint: it is
    sized for sigmoid logits of std ~1.5 (neither all-black nor all-white lines). The others are He-normal.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, ref in _model().state_dict().items():
        noise = torch.randn(ref.shape, generator=g)
        if key == "model4.1.weight":
            value = noise * (2.5 / math.sqrt(math.prod(ref.shape[1:])))
        elif key == "model4.1.bias":
            value = 0.5 * noise
        elif key.endswith(".weight"):
            value = noise * math.sqrt(2.0 / math.prod(ref.shape[1:]))
        else:
            value = 0.1 * noise
        out[key] = value.contiguous()
    return out


def reference_network(sd: dict[str, torch.Tensor]) -> nn.Module:
    """The reference Generator(3, 1, 3) holding ``sd`` (loaded strictly, eval), as from_pretrained does."""
    net = _model()
    net.load_state_dict(sd, strict=True, assign=True)
    return net.float().eval()


def reference_detect(
    sd: dict[str, torch.Tensor], images_uint8: list[np.ndarray], coarse: bool = False
) -> list[np.ndarray]:
    """LineartDetector around ``sd`` on each H x W x 3 uint8 RGB frame (H, W multiples of 64), at the frame's own
    size (detect_resolution = image_resolution = short side: the reference's resizes are then copies).

    ``sd`` is put in both the detailed and the coarse slot; ``coarse`` picks the slot, as the node picks the file.
    """
    from controlnet_aux.lineart import LineartDetector

    net = reference_network(sd)
    detector = LineartDetector(net, net)
    out = []
    for image in images_uint8:
        h, w = image.shape[:2]
        assert h % 64 == 0 and w % 64 == 0, f"frame {h}x{w}: the reference would resize it"
        res = min(h, w)
        hint = detector(image, coarse=coarse, detect_resolution=res, image_resolution=res, output_type="np")
        assert hint.shape == (h, w, 3) and hint.dtype == np.uint8, hint.shape
        out.append(hint)
    return out
