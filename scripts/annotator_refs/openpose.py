"""Reference side of the OpenPose annotator: controlnet_aux 0.0.10's networks, Body / Hand / Face and
OpenposeDetector, around given weights (never from_pretrained; nothing downloaded).

Test/bench code only. Two details of the reference environment:

- The published ``body_pose_model.pth`` / ``hand_pose_model.pth`` hold bare layer names (``conv1_1.weight``);
  the reference wraps its layers in blocks (``model0.conv1_1.weight``) and maps a file onto them with
  ``util.transfer`` (drop the first name component). :func:`published_state_dict` therefore writes the bare names,
  and :func:`reference_network` loads them through ``util.transfer`` as ``Body.__init__`` does. ``facenet.pth``
  is flat in the reference too (its names load as they are).
- ``util.draw_handpose`` imports matplotlib for ``matplotlib.colors.hsv_to_rgb``. Where matplotlib is not
  installed (it is no test dependency), :func:`_ensure_matplotlib` puts a stand-in module holding a transcription
  of matplotlib 3.11's ``hsv_to_rgb`` (float32-or-wider arithmetic, sector ``i = int(6 h)``) in ``sys.modules``;
  the real one is used where present.
"""

from __future__ import annotations

import math
import sys
import types
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = [
    "published_state_dict",
    "reference_network",
    "reference_detector",
    "reference_detect",
    "reference_pose_dict",
]


def _ensure_matplotlib() -> None:
    try:
        import matplotlib.colors  # noqa: F401

        return
    except ImportError:
        pass

    def hsv_to_rgb(hsv: Any) -> np.ndarray:
        # matplotlib/colors.py (3.11) hsv_to_rgb, transcribed.
        hsv = np.asarray(hsv)
        in_shape = hsv.shape
        hsv = np.asarray(hsv, dtype=np.promote_types(hsv.dtype, np.float32))
        if hsv.ndim == 1:
            hsv = np.expand_dims(hsv, axis=0)
        h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
        r, g, b = np.empty_like(h), np.empty_like(h), np.empty_like(h)
        i = (h * 6.0).astype(int)
        f = (h * 6.0) - i
        p = v * (1.0 - s)
        q = v * (1.0 - s * f)
        t = v * (1.0 - s * (1.0 - f))
        for idx, (rr, gg, bb) in (
            (i % 6 == 0, (v, t, p)), (i == 1, (q, v, p)), (i == 2, (p, v, t)),
            (i == 3, (p, q, v)), (i == 4, (t, p, v)), (i == 5, (v, p, q)),
        ):  # fmt: skip
            r[idx], g[idx], b[idx] = rr[idx], gg[idx], bb[idx]
        idx = s == 0
        r[idx], g[idx], b[idx] = v[idx], v[idx], v[idx]
        return np.stack([r, g, b], axis=-1).reshape(in_shape)

    module = types.ModuleType("matplotlib")
    module.colors = types.SimpleNamespace(hsv_to_rgb=hsv_to_rgb)
    sys.modules["matplotlib"] = module


def _meta_model(network: str) -> nn.Module:
    from controlnet_aux.open_pose.face import FaceNet
    from controlnet_aux.open_pose.model import bodypose_model, handpose_model

    cls = {"body": bodypose_model, "hand": handpose_model, "face": FaceNet}[network]
    with torch.device("meta"):
        return cls()


def _published_key(network: str, key: str) -> str:
    # util.transfer reads model key "model0.conv1_1.weight" from file key "conv1_1.weight".
    return key if network == "face" else ".".join(key.split(".")[1:])


def published_state_dict(seed: int = 0, network: str = "body") -> dict[str, torch.Tensor]:
    """Seeded random weights in the layout of ``body_pose_model.pth`` / ``hand_pose_model.pth`` / ``facenet.pth``
    (``network`` = "body" / "hand" / "face"): bare layer names, the reference's shapes.

    Convs ~ He-normal (sqrt(2 / fan_in), so ReLU activations neither vanish nor explode through ~20 layers),
    biases ~ N(0, 0.05)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, ref in _meta_model(network).state_dict().items():
        noise = torch.randn(ref.shape, generator=g)
        if ref.ndim == 4:
            value = noise * math.sqrt(2.0 / math.prod(ref.shape[1:]))
        else:
            value = 0.05 * noise
        out[_published_key(network, key)] = value.contiguous()
    return out


def reference_network(sd: Mapping[str, torch.Tensor], network: str) -> nn.Module:
    """The reference network (bodypose_model / handpose_model / FaceNet) holding published-layout ``sd``, loaded
    as the reference's Body / Hand / Face load a file (util.transfer for body and hand), strictly, in eval."""
    from controlnet_aux.open_pose import util

    model = _meta_model(network)
    weights = util.transfer(model, dict(sd)) if network != "face" else dict(sd)
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


class _FaceOutputs(nn.Module):
    """A stand-in face network (as ours, returning the last heat maps) wrapped to return the reference's list."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.net(x)]


def _as_model(net: Mapping[str, torch.Tensor] | nn.Module, network: str) -> nn.Module:
    if isinstance(net, nn.Module):
        return _FaceOutputs(net) if network == "face" else net
    return reference_network(net, network)


def reference_detector(
    body: Mapping[str, torch.Tensor] | nn.Module,
    hand: Mapping[str, torch.Tensor] | nn.Module | None = None,
    face: Mapping[str, torch.Tensor] | nn.Module | None = None,
):
    """controlnet_aux's OpenposeDetector around these networks: published-layout state dicts, or modules with the
    reference networks' call signature (used by tests to feed fixture heat maps; a face module returns the last
    heat maps as a tensor and is wrapped into the reference's list)."""
    _ensure_matplotlib()
    from controlnet_aux.open_pose import OpenposeDetector
    from controlnet_aux.open_pose.body import Body
    from controlnet_aux.open_pose.face import Face, params
    from controlnet_aux.open_pose.hand import Hand

    body_estimation = Body.__new__(Body)
    body_estimation.model = _as_model(body, "body")
    hand_estimation = face_estimation = None
    if hand is not None:
        hand_estimation = Hand.__new__(Hand)
        hand_estimation.model = _as_model(hand, "hand")
    if face is not None:
        # Face.__init__ without torch.load: its defaults, then the network.
        face_estimation = Face.__new__(Face)
        face_estimation.inference_size = params["inference_img_size"]
        face_estimation.sigma = params["gaussian_sigma"]
        face_estimation.threshold = params["heatmap_peak_thresh"]
        face_estimation.model = _as_model(face, "face")
    return OpenposeDetector(body_estimation, hand_estimation, face_estimation)


def reference_pose_dict(poses: Sequence[Any], height: int, width: int) -> dict[str, Any]:
    """comfyui_controlnet_aux's ``encode_poses_as_dict`` (Fannovel16/comfyui_controlnet_aux,
    src/custom_controlnet_aux/open_pose/__init__.py; controlnet_aux 0.0.10 has none) on the reference's poses."""

    def compress(keypoints):
        if not keypoints:
            return None
        return [
            value
            for k in keypoints
            for value in ([float(k.x), float(k.y), 1.0] if k is not None else [0.0, 0.0, 0.0])
        ]

    return {
        "people": [
            {
                "pose_keypoints_2d": compress(p.body.keypoints),
                "face_keypoints_2d": compress(p.face),
                "hand_left_keypoints_2d": compress(p.left_hand),
                "hand_right_keypoints_2d": compress(p.right_hand),
            }
            for p in poses
        ],
        "canvas_height": height,
        "canvas_width": width,
    }


def reference_detect(
    nets: Mapping[str, Mapping[str, torch.Tensor] | nn.Module],
    images_uint8: Sequence[np.ndarray],
    *,
    include_body: bool = True,
    include_hand: bool = False,
    include_face: bool = False,
) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """The reference detector on H x W x 3 uint8 RGB frames: its uint8 pose images at the input size
    (detect_resolution = image_resolution = the short side, an identity resize for 64-multiple sizes) and the
    POSE_KEYPOINT dict of the poses it drew (``detect_poses`` on the same resized input, as ``__call__`` does)."""
    from controlnet_aux.util import HWC3, resize_image

    detector = reference_detector(nets["body"], nets.get("hand"), nets.get("face"))
    images, dicts = [], []
    for frame in images_uint8:
        resolution = min(frame.shape[:2])
        image = detector(
            frame,
            detect_resolution=resolution,
            image_resolution=resolution,
            include_body=include_body,
            include_hand=include_hand,
            include_face=include_face,
            output_type="np",
        )
        resized = resize_image(HWC3(frame), resolution)
        assert resized.shape == frame.shape and (resized == frame).all(), "the reference resized the frame"
        poses = detector.detect_poses(resized, include_hand, include_face)
        images.append(image)
        dicts.append(reference_pose_dict(poses, *frame.shape[:2]))
    return images, dicts
