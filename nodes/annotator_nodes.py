"""Weight-based annotator nodes: IMAGE batch -> hint batch through a network read from the user's files.

Thin: the file combos and options here; finding files in ``annotator_files``, holding the network under the host's
model management in ``patcher.HostAnnotator``, the work in ``preprocessors.annotators``. Each node keeps the networks
it loaded on its own instance (the host keeps one instance per graph node between prompts), keyed by the file's path,
size and modification time, so a replaced file is read again and nothing lives in module globals.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

from ..preprocessors.annotators import (
    depth_anything,
    hed,
    lineart,
    lineart_anime,
    midas,
    mlsd,
    openpose,
    pidinet,
)
from ..preprocessors.annotators.common import AnnotatorFileError, read_state_dict
from ..preprocessors.annotators.openpose_draw import draw_pose_keypoints, reframe_pose_dict
from ..preprocessors.annotators.run import run_annotator
from ..preprocessors.batch import node_resolution
from . import patcher
from .annotator_files import choices, resolve
from .preprocessor_nodes import _common_inputs, _float, _optional_inputs, _progress

CATEGORY = "ControlStack/preprocessors"
POSE_KEYPOINT = "POSE_KEYPOINT"
"""The pose type other ComfyUI pose nodes (comfyui_controlnet_aux, pose editors) pass around: a list of OpenPose
JSON dicts, one per frame."""


def _file_input(module: ModuleType, default: str | None = None, what: str = "") -> tuple:
    files = choices(module.FILES)
    return (
        files,
        {
            "default": default or module.FILES[0],
            "tooltip": f"{module.NETWORK} weights{what} ({', '.join(module.FILES)}; {module.LICENSE}) from "
            f"models/annotators or comfyui_controlnet_aux's folders. Published at {module.SOURCE}. "
            "Nothing is downloaded.",
        },
    )


def _bool(default: bool, tooltip: str) -> tuple:
    return ("BOOLEAN", {"default": default, "tooltip": tooltip})


class _AnnotatorNode:
    """Shared shape: FILES maps each file input to its network module; PARAMS are the options; ``detect`` runs."""

    FILES: dict[str, ModuleType] = {}
    PARAMS: dict = {}
    CATEGORY = CATEGORY
    RETURN_TYPES: tuple = ("IMAGE",)
    RETURN_NAMES: tuple = ("hint",)
    FUNCTION = "run"

    def __init__(self) -> None:
        self._loaded: dict[str, tuple[tuple, patcher.HostAnnotator]] = {}

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        files = {option: _file_input(module) for option, module in cls.FILES.items()}
        return {"required": {**_common_inputs(), **files, **cls.PARAMS}, "optional": _optional_inputs()}

    @classmethod
    def IS_CHANGED(cls, **inputs) -> str:
        """Size and modification time of each file: a file replaced under the same name runs the node again."""
        stamps = []
        for option, module in cls.FILES.items():
            value = inputs.get(option)
            try:
                st = os.stat(resolve(option, module.NETWORK, value, module.SOURCE)) if value else None
                stamps.append(f"{st.st_size}:{st.st_mtime_ns}" if st else "?")
            except (AnnotatorFileError, OSError):
                stamps.append("missing")  # run() reports it with the folders searched
        return "|".join(stamps)

    def needed(self, params: dict) -> list[str]:
        """The file inputs this run needs (OpenPose reads the hand and face files only when asked to)."""
        return list(self.FILES)

    def network(self, option: str, value: str) -> patcher.HostAnnotator:
        module = self.FILES[option]
        path = resolve(option, module.NETWORK, value, module.SOURCE)
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        cached = self._loaded.get(option)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            net = module.build(read_state_dict(path, value), value)
        except AnnotatorFileError as e:
            raise AnnotatorFileError(f"{option}: {e}") from e
        host = patcher.HostAnnotator(net, value)
        self._loaded[option] = (key, host)
        return host

    def detect(self, nets: dict[str, torch.nn.Module], x: torch.Tensor, **params) -> Any:
        raise NotImplementedError

    def outputs(self, hint: torch.Tensor, extras: list, params: dict) -> tuple:
        return (hint,)

    def run(
        self,
        image: torch.Tensor,
        resolution: int,
        pixel_perfect: bool,
        target_width: int,
        target_height: int,
        resize_mode: str = "crop and resize",
        **params,
    ) -> tuple:
        resolution = node_resolution(
            image, resolution, pixel_perfect, target_width, target_height, resize_mode
        )
        files = {option: params.pop(option) for option in self.FILES}
        hosts = {option: self.network(option, files[option]) for option in self.needed(params)}
        nets = {option: host.on_device() for option, host in hosts.items()}
        device = next(iter(hosts.values())).device
        detect: Callable = lambda x: self.detect(nets, x, **params)  # noqa: E731
        hint, extras = run_annotator(detect, image, resolution, device=device, progress=_progress(len(image)))
        return self.outputs(hint, extras, params)


class ControlStackHEDPreprocessor(_AnnotatorNode):
    DESCRIPTION = "HED soft edges (ControlNetHED.pth, the Apache-2.0 retrain), or HED scribbles. For softedge / scribble ControlNets."
    FILES = {"model": hed}
    PARAMS = {
        "safe": _bool(
            False, "Quantise the edge map into steps (the reference 'safe' mode): fewer stray tones."
        ),
        "scribble": _bool(
            False, "Thin, binarised strokes (the reference HED scribble) instead of soft edges."
        ),
    }

    def detect(self, nets, x, **params):
        return hed.detect(nets["model"], x, **params)


class ControlStackPiDiNetPreprocessor(_AnnotatorNode):
    DESCRIPTION = "PiDiNet soft edges (table5_pidinet.pth; research-only weights), or PiDiNet scribbles."
    FILES = {"model": pidinet}
    PARAMS = {
        "safe": _bool(True, "Quantise the edge map into steps (the reference 'safe' mode)."),
        "scribble": _bool(False, "Thin, binarised strokes (the reference PiDiNet scribble)."),
        "apply_filter": _bool(False, "Binarise the edge probability at 0.5 (the reference apply_filter)."),
    }

    def detect(self, nets, x, **params):
        return pidinet.detect(nets["model"], x, **params)


class ControlStackLineartPreprocessor(_AnnotatorNode):
    DESCRIPTION = (
        "Realistic line art (sk_model.pth; sk_model2.pth for the coarse variant). For lineart ControlNets."
    )
    FILES = {"model": lineart}

    def detect(self, nets, x, **params):
        return lineart.detect(nets["model"], x, **params)


class ControlStackAnimeLineartPreprocessor(_AnnotatorNode):
    DESCRIPTION = "Anime line art (netG.pth). For the lineart_anime ControlNet."
    FILES = {"model": lineart_anime}

    def detect(self, nets, x, **params):
        return lineart_anime.detect(nets["model"], x, **params)


class ControlStackMLSDPreprocessor(_AnnotatorNode):
    DESCRIPTION = "Straight lines (M-LSD, mlsd_large_512_fp32.pth). For the mlsd ControlNet."
    FILES = {"model": mlsd}
    PARAMS = {
        "score_threshold": _float(
            0.1, 0.01, 2.0, "Minimum line centre score (the reference thr_v); higher keeps fewer lines.", 0.01
        ),
        "distance_threshold": _float(
            0.1,
            0.0,
            20.0,
            "Minimum segment length, in pixels of the network's half-size output map (the reference thr_d).",
            0.01,
        ),
    }

    def detect(self, nets, x, **params):
        return mlsd.detect(nets["model"], x, **params)


class ControlStackMiDaSPreprocessor(_AnnotatorNode):
    DESCRIPTION = (
        "MiDaS DPT-Hybrid depth (dpt_hybrid-midas-501f0c75.pt), or the ControlNet 1.0 normal map from it."
    )
    FILES = {"model": midas}
    PARAMS = {
        "mode": (
            ["depth", "normal"],
            {"default": "depth", "tooltip": "depth map, or normals from it (ControlNet 1.0)."},
        ),
        "a": _float(6.28, 0.0, 20.0, "Normal mode: depth gradient scale (the reference 2π).", 0.01),
        "bg_threshold": _float(0.1, 0.0, 1.0, "Normal mode: depth below this is flat background.", 0.01),
    }

    def detect(self, nets, x, **params):
        return midas.detect(nets["model"], x, **params)


class ControlStackDepthAnythingV2Preprocessor(_AnnotatorNode):
    DESCRIPTION = (
        "Depth Anything v2 relative depth (depth_anything_v2_vits/vitb/vitl.pth). For depth ControlNets."
    )
    FILES = {"model": depth_anything}
    PARAMS = {
        "input_size": (
            "INT",
            {
                "default": 518,
                "min": depth_anything.INPUT_SIZE_RANGE[0],
                "max": depth_anything.INPUT_SIZE_RANGE[1],
                "step": 14,
                "tooltip": "Short side the network sees (a multiple of 14; 518 as trained). Larger: finer "
                "detail, about quadratically slower.",
            },
        ),
    }

    def detect(self, nets, x, **params):
        return depth_anything.detect(nets["model"], x, **params)


class ControlStackOpenPosePreprocessor(_AnnotatorNode):
    DESCRIPTION = (
        "OpenPose body, hands and face (body_pose_model.pth, hand_pose_model.pth, facenet.pth; CMU non-commercial "
        "weights): the pose image drawn as the reference draws it, and the keypoints as POSE_KEYPOINT."
    )
    FILES = {"body_model": openpose, "hand_model": openpose, "face_model": openpose}
    PARAMS = {
        "include_body": _bool(True, "Detect and draw the body skeleton."),
        "include_hand": _bool(False, "Detect and draw hands (reads hand_model)."),
        "include_face": _bool(False, "Detect and draw face points (reads face_model)."),
    }
    RETURN_TYPES = ("IMAGE", POSE_KEYPOINT)
    RETURN_NAMES = ("hint", "pose_keypoint")
    _DEFAULTS = {
        "body_model": "body_pose_model.pth",
        "hand_model": "hand_pose_model.pth",
        "face_model": "facenet.pth",
    }

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        types = super().INPUT_TYPES()
        for option, default in cls._DEFAULTS.items():
            types["required"][option] = _file_input(openpose, default, f" for {option.split('_')[0]}")
        return types

    def needed(self, params: dict) -> list[str]:
        wanted = {
            "body_model": True,
            "hand_model": params["include_hand"],
            "face_model": params["include_face"],
        }
        return [option for option, on in wanted.items() if on]

    def detect(self, nets, x, **params):
        return openpose.detect_pose(
            nets["body_model"], nets.get("hand_model"), nets.get("face_model"), x, **params
        )

    def outputs(self, hint, extras, params):
        # The network saw the frame edge-padded to 64s; the keypoints are re-expressed on the unpadded frame the
        # user sees, and the pose image is drawn from them, so the image and POSE_KEYPOINT always agree exactly.
        h, w = int(hint.shape[1]), int(hint.shape[2])
        dicts = [reframe_pose_dict(d, h, w) for d in extras]
        image = draw_pose_keypoints(
            dicts,
            draw_body=params["include_body"],
            draw_hand=params["include_hand"],
            draw_face=params["include_face"],
        )
        return (image, dicts)


class ControlStackDrawPoseKeypoints:
    DESCRIPTION = (
        "Draw POSE_KEYPOINT dicts (from OpenPose, a pose editor or a saved JSON) as the OpenPose pose image, "
        "one frame per dict, on each dict's canvas size."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("pose_image",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "pose_keypoint": (
                    POSE_KEYPOINT,
                    {"tooltip": "A list of OpenPose JSON dicts, one per frame."},
                ),
                "draw_body": _bool(True, "Draw the body skeletons."),
                "draw_hand": _bool(True, "Draw the hands."),
                "draw_face": _bool(True, "Draw the face points."),
            }
        }

    def run(self, pose_keypoint, draw_body: bool, draw_hand: bool, draw_face: bool) -> tuple:
        dicts = [pose_keypoint] if isinstance(pose_keypoint, dict) else list(pose_keypoint)
        try:
            image = draw_pose_keypoints(dicts, draw_body=draw_body, draw_hand=draw_hand, draw_face=draw_face)
        except ValueError as e:
            raise ValueError(f"pose_keypoint: {e}") from e
        return (image,)


_NODES = {
    "ControlStackHEDPreprocessor": (ControlStackHEDPreprocessor, "HED Soft Edges (ControlStack)"),
    "ControlStackPiDiNetPreprocessor": (ControlStackPiDiNetPreprocessor, "PiDiNet Soft Edges (ControlStack)"),
    "ControlStackLineartPreprocessor": (ControlStackLineartPreprocessor, "Lineart Realistic (ControlStack)"),
    "ControlStackAnimeLineartPreprocessor": (
        ControlStackAnimeLineartPreprocessor,
        "Lineart Anime (ControlStack)",
    ),
    "ControlStackMLSDPreprocessor": (ControlStackMLSDPreprocessor, "M-LSD Lines (ControlStack)"),
    "ControlStackMiDaSPreprocessor": (ControlStackMiDaSPreprocessor, "MiDaS Depth / Normal (ControlStack)"),
    "ControlStackDepthAnythingV2Preprocessor": (
        ControlStackDepthAnythingV2Preprocessor,
        "Depth Anything v2 (ControlStack)",
    ),
    "ControlStackOpenPosePreprocessor": (ControlStackOpenPosePreprocessor, "OpenPose (ControlStack)"),
    "ControlStackDrawPoseKeypoints": (ControlStackDrawPoseKeypoints, "Draw Pose Keypoints (ControlStack)"),
}

NODE_CLASS_MAPPINGS = {k: cls for k, (cls, _) in _NODES.items()}
NODE_DISPLAY_NAME_MAPPINGS = {k: name for k, (_, name) in _NODES.items()}
