"""Reference side of the MiDaS DPT-Hybrid annotator: controlnet_aux 0.0.10's network and MidasDetector.

Test/bench code only (imports controlnet_aux, hence timm). The reference builds its backbone with
``timm.create_model("vit_base_resnet50_384")``; timm 1.x no longer registers that name but maps it (with a
deprecation warning) to ``vit_base_r50_s16_384.orig_in21k_ft_in1k``, the same R50 + ViT-B/16 hybrid, so the
reference builds unchanged. Networks are built on the meta device and then take the given tensors
(``load_state_dict(assign=True)``): no random init of 123M parameters, nothing downloaded.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

__all__ = ["published_state_dict", "reference_network", "reference_detect", "reference_detect_all"]


def _meta_model() -> nn.Module:
    from controlnet_aux.midas.midas.dpt_depth import DPTDepthModel

    # As controlnet_aux.midas.api.load_model("dpt_hybrid") builds it, without loading a file.
    with torch.device("meta"):
        return DPTDepthModel(path=None, backbone="vitb_rn50_384", non_negative=True)


def published_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random weights under the key names and shapes of ``dpt_hybrid-midas-501f0c75.pt`` (the
    reference's ``DPTDepthModel.state_dict()``, which loads that file strictly; no prefix).

    Scaled for a non-degenerate forward: weights ~ N(0, 1/fan_in) (the ResNet's convs are standardised anyway),
    norm scales ~ 1 +- 0.1, small biases, position embeddings large enough that a wrong resize shows, and a
    zero-mean last conv with a positive bias so the final ReLU (non-negative depth) keeps most pixels.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, ref in _meta_model().state_dict().items():
        shape = ref.shape
        noise = torch.randn(shape, generator=g)
        if key.endswith(("cls_token", "pos_embed")):
            value = 0.5 * noise
        elif ref.ndim >= 2:
            fan_in = math.prod(shape[1:])
            # ConvTranspose has none here; every >= 2-D tensor is an (out, in, ...) conv / linear weight.
            value = noise / math.sqrt(fan_in)
        elif key.endswith(".weight"):
            value = 1.0 + 0.1 * noise
        else:
            value = 0.05 * noise
        out[key] = value.contiguous()
    # The depth is ReLU(w . f + b) with f >= 0 (post-ReLU features): the sign of sum(w) would decide for all
    # pixels at once (a seed giving an all-zero map). Zero-mean weights and a bias about two output standard
    # deviations up leave the map mostly positive and varying.
    w = out["scratch.output_conv.4.weight"]
    out["scratch.output_conv.4.weight"] = w - w.mean()
    out["scratch.output_conv.4.bias"] = out["scratch.output_conv.4.bias"] + 2.5
    return out


def reference_network(sd: dict[str, torch.Tensor]) -> nn.Module:
    """The reference ``DPTDepthModel`` (vitb_rn50_384, non_negative) holding ``sd``, loaded strictly, in eval."""
    model = _meta_model()
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


def _detector(sd: dict[str, torch.Tensor]):
    from controlnet_aux.midas import MidasDetector
    from controlnet_aux.midas.api import MiDaSInference, disabled_train

    # MiDaSInference.__init__ would load (or download) a file; this is its body around our network instead.
    inference = MiDaSInference.__new__(MiDaSInference)
    nn.Module.__init__(inference)
    inference.model = reference_network(sd)
    inference.model.train = disabled_train
    return MidasDetector(inference)


def reference_detect_all(
    sd: dict[str, torch.Tensor],
    images_uint8: list[np.ndarray],
    a: float = np.pi * 2.0,
    bg_threshold: float = 0.1,
) -> dict[str, list[np.ndarray]]:
    """Both hints of MidasDetector (``depth_and_normal=True``: one forward per frame) on H x W x 3 uint8 frames,
    at the input size: detect_resolution = image_resolution = the short side, so for 64-multiple sizes both
    ``resize_image`` calls are same-size ``cv2.resize`` (a copy).

    Returns {"depth": [...], "normal": [...], "input": [...], "raw": [...]}: the hints, and per frame the
    1 x 3 x H x W tensor the detector fed its network and the 1 x H x W inverse depth it got back (so a test can
    check the network on the very same forward, without running the reference twice).
    """
    detector = _detector(sd)
    result: dict[str, list] = {"depth": [], "normal": [], "input": [], "raw": []}

    def record(module: nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        result["input"].append(args[0].detach().clone())
        result["raw"].append(output.detach().clone())

    detector.model.model.register_forward_hook(record)
    for image in images_uint8:
        side = min(image.shape[:2])
        depth, normal = detector(
            image,
            a=a,
            bg_th=bg_threshold,
            depth_and_normal=True,
            detect_resolution=side,
            image_resolution=side,
            output_type="np",
        )
        assert depth.shape == image.shape and normal.shape == image.shape, "the reference resized the frame"
        result["depth"].append(depth)
        result["normal"].append(normal)
    return result


def reference_detect(
    sd: dict[str, torch.Tensor],
    images_uint8: list[np.ndarray],
    mode: str = "depth",
    a: float = np.pi * 2.0,
    bg_threshold: float = 0.1,
) -> list[np.ndarray]:
    """MidasDetector's ``mode`` hint ("depth" or "normal") of each frame, H x W x 3 uint8."""
    return reference_detect_all(sd, images_uint8, a=a, bg_threshold=bg_threshold)[mode]
