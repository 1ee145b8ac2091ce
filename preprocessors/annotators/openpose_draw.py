"""Drawing OpenPose results, and the POSE_KEYPOINT dicts ComfyUI pose nodes exchange.

The drawing is ``controlnet_aux.open_pose.draw_poses`` (util.draw_bodypose / draw_handpose / draw_facepose) with
the same OpenCV calls on the same values, so the image is bit-identical to the reference's. The value types
matter for that: body coordinates are float64, hand and face coordinates float32 (as the reference produces
them), because ``int(x * W)`` truncates and float32 and float64 products can straddle an integer.

The dict format is comfyui_controlnet_aux's ``encode_poses_as_dict`` (Fannovel16/comfyui_controlnet_aux,
src/custom_controlnet_aux/open_pose/__init__.py): per person ``pose_keypoints_2d`` (18 points),
``face_keypoints_2d``, ``hand_left_keypoints_2d``, ``hand_right_keypoints_2d`` as flat ``[x, y, c, ...]`` lists
with x, y NORMALISED to [0, 1] by the canvas width / height, ``c = 1.0`` for a point and ``[0.0, 0.0, 0.0]`` for
a missing one, ``None`` for an absent hand or face; plus ``canvas_height`` and ``canvas_width`` in pixels. Its
decoder (``decode_json_as_poses``) treats ``c < 1.0`` as missing; so does :func:`poses_from_dict`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import cv2
import numpy as np
import torch

__all__ = [
    "reframe_pose_dict",
    "Keypoint",
    "Pose",
    "draw_poses",
    "poses_to_dict",
    "poses_from_dict",
    "draw_pose_keypoints",
    "HAND_EDGE_COLORS",
]


class Keypoint(NamedTuple):
    """A point in normalised image coordinates (x / W, y / H)."""

    x: float
    y: float


class Pose(NamedTuple):
    """One person: 18 body points (None where not found) and, when detected, 21-point hands and the face points."""

    body: list[Keypoint | None]
    left_hand: list[Keypoint] | None
    right_hand: list[Keypoint] | None
    face: list[Keypoint] | None


# The reference's eps: a hand / face point at x or y <= 0.01 px is "not found" (the detector stores -1 / W).
_EPS = 0.01
_STICK_WIDTH = 4
_BODY_LIMBS = (
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11),
    (2, 12), (12, 13), (13, 14), (2, 1), (1, 15), (15, 17), (1, 16), (16, 18),
)  # fmt: skip
_BODY_COLORS = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)  # fmt: skip
_HAND_EDGES = (
    (0, 1), (1, 2), (2, 3), (3, 4), (0, 5), (5, 6), (6, 7), (7, 8), (0, 9), (9, 10),
    (10, 11), (11, 12), (0, 13), (13, 14), (14, 15), (15, 16), (0, 17), (17, 18), (18, 19), (19, 20),
)  # fmt: skip


def _hsv_to_rgb_full(h: np.ndarray) -> np.ndarray:
    """``matplotlib.colors.hsv_to_rgb([h, 1, 1])`` (the reference's edge colours), without matplotlib: the same
    float64 formula (sector ``i = int(6 h)``, ``f = 6 h - i``) so the colours OpenCV rounds are the same."""
    s = v = np.ones_like(h)
    i = (h * 6.0).astype(int)
    f = (h * 6.0) - i
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    table = {0: (v, t, p), 1: (q, v, p), 2: (p, v, t), 3: (p, q, v), 4: (t, p, v), 5: (v, p, q)}
    rgb = np.empty(h.shape + (3,))
    for sector, (r, g, b) in table.items():
        idx = i % 6 == sector if sector == 0 else i == sector
        rgb[idx] = np.stack([r[idx], g[idx], b[idx]], axis=-1)
    return rgb


# Edge ie gets hue ie / 20, times 255 (floats: cv2.line rounds them).
HAND_EDGE_COLORS: tuple[tuple[float, float, float], ...] = tuple(
    tuple(float(c) for c in rgb)
    for rgb in _hsv_to_rgb_full(np.arange(len(_HAND_EDGES)) / float(len(_HAND_EDGES))) * 255
)


def _draw_body(canvas: np.ndarray, keypoints: Sequence[Keypoint | None]) -> None:
    H, W = canvas.shape[:2]
    for (a, b), color in zip(_BODY_LIMBS, _BODY_COLORS[: len(_BODY_LIMBS)], strict=True):
        k1, k2 = keypoints[a - 1], keypoints[b - 1]
        if k1 is None or k2 is None:
            continue
        # The reference's (swapped) names: Y holds x, X holds y.
        Y = np.array([k1.x, k2.x]) * float(W)
        X = np.array([k1.y, k2.y]) * float(H)
        mX, mY = np.mean(X), np.mean(Y)
        length = ((X[0] - X[1]) ** 2 + (Y[0] - Y[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(X[0] - X[1], Y[0] - Y[1]))
        polygon = cv2.ellipse2Poly((int(mY), int(mX)), (int(length / 2), _STICK_WIDTH), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, [int(float(c) * 0.6) for c in color])
    for keypoint, color in zip(keypoints, _BODY_COLORS, strict=True):
        if keypoint is None:
            continue
        cv2.circle(canvas, (int(keypoint.x * W), int(keypoint.y * H)), 4, color, thickness=-1)


def _draw_hand(canvas: np.ndarray, keypoints: Sequence[Keypoint | None] | None) -> None:
    if not keypoints:
        return
    H, W = canvas.shape[:2]
    for (e1, e2), color in zip(_HAND_EDGES, HAND_EDGE_COLORS, strict=True):
        k1, k2 = keypoints[e1], keypoints[e2]
        if k1 is None or k2 is None:
            continue
        x1, y1, x2, y2 = int(k1.x * W), int(k1.y * H), int(k2.x * W), int(k2.y * H)
        if x1 > _EPS and y1 > _EPS and x2 > _EPS and y2 > _EPS:
            cv2.line(canvas, (x1, y1), (x2, y2), color, thickness=2)
    for keypoint in keypoints:
        # The reference has no None check here (its hands never hold None); points from a dict may.
        if keypoint is None:
            continue
        x, y = int(keypoint.x * W), int(keypoint.y * H)
        if x > _EPS and y > _EPS:
            cv2.circle(canvas, (x, y), 4, (0, 0, 255), thickness=-1)


def _draw_face(canvas: np.ndarray, keypoints: Sequence[Keypoint | None] | None) -> None:
    if not keypoints:
        return
    H, W = canvas.shape[:2]
    for keypoint in keypoints:
        if keypoint is None:
            continue
        x, y = int(keypoint.x * W), int(keypoint.y * H)
        if x > _EPS and y > _EPS:
            cv2.circle(canvas, (x, y), 3, (255, 255, 255), thickness=-1)


def draw_poses(
    poses: Sequence[Pose],
    height: int,
    width: int,
    draw_body: bool = True,
    draw_hand: bool = True,
    draw_face: bool = True,
) -> np.ndarray:
    """The reference's ``draw_poses``: an H x W x 3 uint8 RGB canvas, black, each person drawn in turn."""
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for pose in poses:
        if draw_body:
            _draw_body(canvas, pose.body)
        if draw_hand:
            _draw_hand(canvas, pose.left_hand)
            _draw_hand(canvas, pose.right_hand)
        if draw_face:
            _draw_face(canvas, pose.face)
    return canvas


def _compress(keypoints: Sequence[Keypoint | None] | None) -> list[float] | None:
    if not keypoints:
        return None
    out: list[float] = []
    for k in keypoints:
        out.extend((float(k.x), float(k.y), 1.0) if k is not None else (0.0, 0.0, 0.0))
    return out


def poses_to_dict(poses: Sequence[Pose], height: int, width: int) -> dict[str, Any]:
    """One frame's POSE_KEYPOINT dict, exactly as comfyui_controlnet_aux's ``encode_poses_as_dict`` writes it."""
    return {
        "people": [
            {
                "pose_keypoints_2d": _compress(p.body),
                "face_keypoints_2d": _compress(p.face),
                "hand_left_keypoints_2d": _compress(p.left_hand),
                "hand_right_keypoints_2d": _compress(p.right_hand),
            }
            for p in poses
        ],
        "canvas_height": height,
        "canvas_width": width,
    }


def reframe_pose_dict(pose_dict: dict[str, Any], height: int, width: int) -> dict[str, Any]:
    """The same keypoints on a canvas of ``height`` x ``width`` sharing the top-left corner (the padded frame a
    network saw cut back to the frame the user sees): coordinates are rescaled so each point keeps its pixel
    position. Points that lay in the cut-off padding keep their place, outside [0, 1]."""
    old_h, old_w = int(pose_dict["canvas_height"]), int(pose_dict["canvas_width"])
    if height <= 0 or width <= 0:
        raise ValueError(f"pose keypoint dict: canvas {width} x {height} is empty")
    sx, sy = old_w / width, old_h / height

    def scaled(numbers: list[float] | None) -> list[float] | None:
        if not numbers:
            return numbers
        out = list(numbers)
        for i in range(0, len(out) - 2, 3):
            if out[i + 2] > 0:
                out[i], out[i + 1] = float(out[i]) * sx, float(out[i + 1]) * sy
        return out

    people = [
        {k: scaled(v) if k.endswith("_2d") else v for k, v in p.items()} for p in pose_dict.get("people", [])
    ]
    return {**pose_dict, "people": people, "canvas_height": height, "canvas_width": width}


def _decompress(numbers: Sequence[float] | None, dtype: type) -> list[Keypoint | None] | None:
    if not numbers:
        return None
    if len(numbers) % 3:
        raise ValueError(f"keypoint list of length {len(numbers)} is not x, y, c triples")
    return [
        Keypoint(dtype(numbers[i]), dtype(numbers[i + 1])) if numbers[i + 2] >= 1.0 else None
        for i in range(0, len(numbers), 3)
    ]


def poses_from_dict(pose_dict: dict[str, Any]) -> tuple[list[Pose], int, int]:
    """The poses, canvas height and width of a POSE_KEYPOINT dict (missing points, ``c < 1``, become None).

    Body coordinates come back as float64 and hand / face coordinates as float32, the types the detector made
    them in, so a dict of ours draws bit-identically to the image it was detected with (float32 -> float is exact).
    """
    try:
        height, width = int(pose_dict["canvas_height"]), int(pose_dict["canvas_width"])
    except (KeyError, TypeError, ValueError):
        raise ValueError("pose keypoint dict: expected canvas_height and canvas_width") from None
    if height <= 0 or width <= 0:
        raise ValueError(f"pose keypoint dict: canvas {width} x {height} is empty")
    poses = []
    for person in pose_dict.get("people", []):
        body = _decompress(person.get("pose_keypoints_2d"), np.float64) or [None] * 18
        if len(body) < 18:
            body = body + [None] * (18 - len(body))
        poses.append(
            Pose(
                body=body[:18],
                left_hand=_decompress(person.get("hand_left_keypoints_2d"), np.float32),
                right_hand=_decompress(person.get("hand_right_keypoints_2d"), np.float32),
                face=_decompress(person.get("face_keypoints_2d"), np.float32),
            )
        )
    return poses, height, width


def draw_pose_keypoints(
    pose_dicts: Sequence[dict[str, Any]],
    *,
    draw_body: bool = True,
    draw_hand: bool = True,
    draw_face: bool = True,
) -> torch.Tensor:
    """Render POSE_KEYPOINT dicts (one per frame, all the same canvas size) as B x H x W x 3 float32 [0, 1] on the
    CPU: the pose image the detector returns for them."""
    if not pose_dicts:
        raise ValueError("pose_dicts: expected at least one frame")
    frames = []
    size = None
    for d in pose_dicts:
        poses, height, width = poses_from_dict(d)
        if size is not None and (height, width) != size:
            raise ValueError(
                f"pose_dicts: canvases differ in size ({size[1]} x {size[0]} and {width} x {height})"
            )
        size = (height, width)
        frames.append(draw_poses(poses, height, width, draw_body, draw_hand, draw_face))
    return torch.from_numpy(np.stack(frames)).float() / 255.0
