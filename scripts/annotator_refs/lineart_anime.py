"""Reference side of the anime line-art annotator: controlnet_aux 0.0.10's UnetGenerator and
LineartAnimeDetector.

Test/bench code only (imports controlnet_aux). ``netG.pth`` (Anime2Sketch) is a bare state dict of a
``DataParallel``-wrapped ``UnetGenerator(3, 1, 8, 64)``: every key is ``module.`` + the U-Net's own key
(``module.model.model.0.weight`` ...); the reference loads it with ``torch.load`` and replaces ``module.``.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn

__all__ = ["published_state_dict", "reference_network", "reference_detect"]


def _model() -> nn.Module:
    from controlnet_aux.lineart_anime import UnetGenerator

    # As LineartAnimeDetector.from_pretrained builds it.
    norm = functools.partial(nn.InstanceNorm2d, affine=False, track_running_stats=False)
    with torch.device("meta"):
        return UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False)


def published_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights in the layout of ``netG.pth``: ``module.`` + the reference UnetGenerator's keys, in
    its order and shapes.

    The InstanceNorms renormalise every inner level, so only the outermost convs' scales matter: He-normal
    elsewhere, the final transposed conv sized for tanh inputs of std ~1 (lines neither all 0 nor all 255).
    """
    model = _model()
    # A stride-2 4x4 transposed conv's output pixel sums in_channels x 2 x 2 taps (weight: in x out x 4 x 4).
    transposed = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.ConvTranspose2d)}
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, ref in model.state_dict().items():
        noise = torch.randn(ref.shape, generator=g)
        fan_in = ref.shape[0] * 4 if key in transposed else math.prod(ref.shape[1:])
        if key == "model.model.3.weight":  # the outermost transposed conv, into the tanh
            value = noise * (1.5 / math.sqrt(fan_in))
        elif key.endswith(".weight"):
            value = noise * math.sqrt(2.0 / fan_in)
        else:
            value = 0.1 * noise
        out[f"module.{key}"] = value.contiguous()
    return out


def reference_network(sd: dict[str, torch.Tensor]) -> nn.Module:
    """The reference UnetGenerator holding ``sd`` (``module.`` prefixed or not), loaded strictly, eval, as
    LineartAnimeDetector.from_pretrained does."""
    net = _model()
    net.load_state_dict({k.replace("module.", ""): v for k, v in sd.items()}, strict=True, assign=True)
    return net.eval()


def reference_detect(sd: dict[str, torch.Tensor], images_uint8: list[np.ndarray]) -> list[np.ndarray]:
    """LineartAnimeDetector around ``sd`` on each H x W x 3 uint8 RGB frame (H, W multiples of 64), at the frame's
    own size (detect_resolution = image_resolution = short side: the reference's resize_image calls are then
    copies; its own resize to multiples of 256 and back is not, unless the frame already is one)."""
    from controlnet_aux.lineart_anime import LineartAnimeDetector

    detector = LineartAnimeDetector(reference_network(sd))
    out = []
    for image in images_uint8:
        h, w = image.shape[:2]
        assert h % 64 == 0 and w % 64 == 0, f"frame {h}x{w}: the reference would resize it"
        res = min(h, w)
        hint = detector(image, detect_resolution=res, image_resolution=res, output_type="np")
        assert hint.shape == (h, w, 3) and hint.dtype == np.uint8, hint.shape
        out.append(hint)
    return out
