"""OpenPose body (18 points), hand (21 points) and face (70 points + background) keypoints, ControlNet's "openpose".

Three CMU networks (Cao et al., "Realtime Multi-Person 2D Pose Estimation using Part Affinity Fields"; Simon et
al., "Hand Keypoint Detection in Single Images using Multiview Bootstrapping"): a VGG-19 front and 6 cascaded
stages of 7x7 convs. Parameters are named as in the PUBLISHED files, which hold bare layer names
(``conv1_1.weight``, ``Mconv7_stage6_L2.bias``): the reference ``controlnet_aux.open_pose`` wraps the layers in
blocks (``model0.conv1_1.weight``) and maps the file onto them with ``util.transfer``; our networks are flat, so
the files load as they are. ``facenet.pth`` already has bare names (FaceNet is flat in the reference too). The
hand and face files share every name and differ in shapes (22 vs 71 heat maps).

Everything around the networks is ``controlnet_aux.open_pose`` 0.0.10, step by step: the body image resized to
184 px high (scale 0.5 of boxsize 368), padded to a multiple of 8 with 128, BGR, ``/256 - 0.5``; heat maps and
PAFs upsampled x8 (Lanczos), cropped, resized back; peaks on a sigma-3 Gaussian blur (SciPy's ``gaussian_filter``
reimplemented bit-exactly in NumPy: :func:`gaussian_filter_like_scipy`); PAF line integrals, greedy limb
matching and person assembly (:func:`decode_body`); hand boxes from wrist/elbow/shoulder, 4 scales, a blurred
crop, the largest connected blob's maximum; face boxes from nose/eyes/ears, a 384 px crop, the maximum of each
bilinearly resized heat map. The resizes are OpenCV's (the reference's), so the maps are bit-identical to its.
The networks run batched: the body over all frames, each hand scale over all hands of all frames, the face over
all faces.

Licence: the OpenPose weights are CMU's, for non-commercial research use only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import AnnotatorFileError, check_state_dict
from .openpose_draw import Keypoint, Pose, draw_poses, poses_to_dict

__all__ = [
    "NETWORK",
    "FILES",
    "SOURCE",
    "LICENSE",
    "BodyPoseNet",
    "HandPoseNet",
    "FacePoseNet",
    "build",
    "detect_pose",
    "decode_body",
    "detect_bodies",
    "gaussian_filter_like_scipy",
]

NETWORK = "OpenPose"
FILES = ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")
SOURCE = "https://huggingface.co/lllyasviel/Annotators"
LICENSE = "CMU OpenPose academic licence (non-commercial research use only)"

# Frames (or crops) per forward: bounds activation memory (a 736 px hand crop is 64 x 736 x 736 at conv1).
_CHUNK = 8

# The VGG-19 front the three networks share up to conv4_2: (name, in, out) of 3x3 convs, or "pool".
_VGG = (
    ("conv1_1", 3, 64), ("conv1_2", 64, 64), "pool",
    ("conv2_1", 64, 128), ("conv2_2", 128, 128), "pool",
    ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256), ("conv3_4", 256, 256), "pool",
    ("conv4_1", 256, 512), ("conv4_2", 512, 512),
)  # fmt: skip


class _Chain(nn.Module):
    """Convs registered under their published names, run in order; ReLU after each unless listed as linear."""

    def _add(self, name: str, cin: int, cout: int, kernel: int) -> str:
        self.add_module(name, nn.Conv2d(cin, cout, kernel, padding=kernel // 2))
        return name

    def _run(
        self, names: Sequence[str], x: torch.Tensor, linear: frozenset[str] = frozenset()
    ) -> torch.Tensor:
        for name in names:
            if name == "pool":
                x = F.max_pool2d(x, 2, 2)
                continue
            x = getattr(self, name)(x)
            if name not in linear:
                x = F.relu(x)
        return x


class BodyPoseNet(_Chain):
    """The body network: VGG front to 128 features, then 6 stages of two branches, PAFs (L1, 38) and heat maps
    (L2, 18 parts + background). Returns (PAFs, heat maps) of the last stage, as the reference's bodypose_model.

    The reference's no-ReLU list names ``Mconv7_stage6_L1`` twice and not ``Mconv7_stage6_L2``, so its final heat
    maps pass a ReLU; so do ours."""

    kind = "body"

    def __init__(self) -> None:
        super().__init__()
        self.front = [self._add(n, i, o, 3) if n != "pool" else "pool" for n, i, o in _vgg(_VGG)]
        self.front += [self._add("conv4_3_CPM", 512, 256, 3), self._add("conv4_4_CPM", 256, 128, 3)]
        self.stages: list[tuple[list[str], list[str]]] = []
        linear = set()
        stage1 = []
        for branch, out in (("L1", 38), ("L2", 19)):
            names = [self._add(f"conv5_{k}_CPM_{branch}", 128, 128, 3) for k in (1, 2, 3)]
            names.append(self._add(f"conv5_4_CPM_{branch}", 128, 512, 1))
            names.append(self._add(f"conv5_5_CPM_{branch}", 512, out, 1))
            linear.add(names[-1])
            stage1.append(names)
        self.stages.append((stage1[0], stage1[1]))
        for s in range(2, 7):
            pair = []
            for branch, out in (("L1", 38), ("L2", 19)):
                names = [self._add(f"Mconv1_stage{s}_{branch}", 185, 128, 7)]
                names += [self._add(f"Mconv{k}_stage{s}_{branch}", 128, 128, 7) for k in (2, 3, 4, 5)]
                names.append(self._add(f"Mconv6_stage{s}_{branch}", 128, 128, 1))
                names.append(self._add(f"Mconv7_stage{s}_{branch}", 128, out, 1))
                if not (s == 6 and branch == "L2"):
                    linear.add(names[-1])
                pair.append(names)
            self.stages.append((pair[0], pair[1]))
        self.linear = frozenset(linear)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self._run(self.front, x)
        h = features
        for paf_names, heat_names in self.stages:
            paf = self._run(paf_names, h, self.linear)
            heat = self._run(heat_names, h, self.linear)
            h = torch.cat([paf, heat, features], 1)
        return paf, heat


def _vgg(spec: Sequence[Any]) -> list[tuple[str, int, int]]:
    return [(s, 0, 0) if s == "pool" else s for s in spec]


class _HandFaceNet(_Chain):
    """Hand and face networks (the reference's handpose_model and FaceNet): VGG front to conv5_3_CPM (128), a 1x1
    stage 1, then 5 stages of 7x7 convs on [previous maps, features]. Returns the last stage's maps."""

    kind = ""
    maps = 0

    def __init__(self) -> None:
        super().__init__()
        front = [self._add(n, i, o, 3) if n != "pool" else "pool" for n, i, o in _vgg(_VGG)]
        front += [self._add(n, 512, 512, 3) for n in ("conv4_3", "conv4_4", "conv5_1", "conv5_2")]
        front.append(self._add("conv5_3_CPM", 512, 128, 3))
        self.front = front
        self.stage1 = [self._add("conv6_1_CPM", 128, 512, 1), self._add("conv6_2_CPM", 512, self.maps, 1)]
        self.stages = []
        for s in range(2, 7):
            names = [self._add(f"Mconv1_stage{s}", 128 + self.maps, 128, 7)]
            names += [self._add(f"Mconv{k}_stage{s}", 128, 128, 7) for k in (2, 3, 4, 5)]
            names += [
                self._add(f"Mconv6_stage{s}", 128, 128, 1),
                self._add(f"Mconv7_stage{s}", 128, self.maps, 1),
            ]
            self.stages.append(names)
        self.linear = frozenset(["conv6_2_CPM"] + [f"Mconv7_stage{s}" for s in range(2, 7)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self._run(self.front, x)
        h = self._run(self.stage1, features, self.linear)
        for names in self.stages:
            h = self._run(names, torch.cat([h, features], 1), self.linear)
        return h


class HandPoseNet(_HandFaceNet):
    """21 hand points + background."""

    kind = "hand"
    maps = 22


class FacePoseNet(_HandFaceNet):
    """70 face points + background (the reference reads peaks from all 71 maps, background included)."""

    kind = "face"
    maps = 71


_KINDS = {"body": (BodyPoseNet, "OpenPose body", FILES[0]), "hand": (HandPoseNet, "OpenPose hand", FILES[1]),
          "face": (FacePoseNet, "OpenPose face", FILES[2])}  # fmt: skip


def _which(sd: Mapping[str, torch.Tensor]) -> str | None:
    """Which network a state dict is, from names the others lack (body: the _L1/_L2 branches) or, for hand vs
    face (same names), the number of heat maps; None when it is none of them."""
    if any(k.endswith(("_L1.weight", "_L2.weight", "_L1.bias", "_L2.bias")) for k in sd):
        return "body"
    for key, dim in (("conv6_2_CPM.weight", 0), ("Mconv7_stage6.weight", 0), ("Mconv1_stage2.weight", 1)):
        if key in sd and sd[key].ndim == 4:
            n = sd[key].shape[dim] - (128 if dim == 1 else 0)
            return {22: "hand", 71: "face"}.get(n)
    return None


def build(sd: Mapping[str, torch.Tensor], name: str) -> BodyPoseNet | HandPoseNet | FacePoseNet:
    """The body, hand or face network holding ``sd`` (from ``common.read_state_dict``), told apart by its
    tensors; ``name`` is the file, for errors. The network's ``kind`` attribute says which ("body", ...)."""
    kind = _which(sd)
    if kind is None:
        raise AnnotatorFileError(f"{name}: not an {NETWORK} file (expected {', '.join(FILES)})")
    cls, network, published = _KINDS[kind]
    net = cls()
    check_state_dict(sd, {k: v.shape for k, v in net.state_dict().items()}, network, name, (published,))
    net.load_state_dict(dict(sd), strict=True)
    return net.eval().requires_grad_(False)


# ---------------------------------------------------------------- the reference's image / map resizing (OpenCV)


def _resize_to(x: np.ndarray, height: float, width: float) -> np.ndarray:
    """util.smart_resize: area when shrinking, Lanczos-4 otherwise; maps of other than 1 or 3 channels are resized
    one channel at a time (as the reference does; the result is H x W x C)."""
    ho, wo = x.shape[:2]
    channels = 1 if x.ndim == 2 else x.shape[2]
    if channels in (1, 3):
        k = float(height + width) / float(ho + wo)
        return cv2.resize(
            x, (int(width), int(height)), interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LANCZOS4
        )
    return np.stack(
        [_resize_to(np.ascontiguousarray(x[:, :, i]), height, width) for i in range(channels)], axis=2
    )


def _resize_by(x: np.ndarray, factor: float) -> np.ndarray:
    """util.smart_resize_k with fx = fy = factor (the target size truncated from ``size * factor``)."""
    return _resize_to(x, x.shape[0] * factor, x.shape[1] * factor)


def _pad_right_down(img: np.ndarray, stride: int = 8, value: int = 128) -> tuple[np.ndarray, int, int]:
    """util.padRightDownCorner: pad bottom and right to multiples of ``stride`` with ``value``."""
    h, w = img.shape[:2]
    pad_down = 0 if h % stride == 0 else stride - h % stride
    pad_right = 0 if w % stride == 0 else stride - w % stride
    padded = np.pad(img, ((0, pad_down), (0, pad_right), (0, 0)), constant_values=value)
    return padded, pad_down, pad_right


def _maps_back(
    out: np.ndarray, padded_shape: tuple[int, int], pads: tuple[int, int], size: tuple[int, int]
) -> np.ndarray:
    """A C x h x w network output as the reference post-processes it: H x W x C, upsampled x8, the padding cut,
    resized to ``size``."""
    maps = _resize_by(np.transpose(out, (1, 2, 0)), 8)
    maps = maps[: padded_shape[0] - pads[0], : padded_shape[1] - pads[1], :]
    return _resize_to(maps, *size)


def gaussian_filter_like_scipy(maps: np.ndarray, sigma: float = 3.0) -> np.ndarray:
    """``scipy.ndimage.gaussian_filter(m, sigma)`` of each H x W slice of an H x W (x C) float64 array, bit-exact.

    SciPy: truncate 4 (radius int(4 sigma + 0.5)), mode 'reflect' (edge sample repeated: numpy 'symmetric'), the
    kernel ``exp(-0.5 / sigma^2 * x^2)`` normalised by its sum, correlated along axis 0 then 1; for a symmetric
    kernel its C loop computes ``w0 * x[i] + sum_{d = r..1} (x[i - d] + x[i + d]) * w_d`` in this order, which
    the NumPy below repeats on whole arrays (elementwise IEEE operations: the same bits)."""
    radius = int(4.0 * float(sigma) + 0.5)
    offsets = np.arange(-radius, radius + 1)
    phi = np.exp(-0.5 / (sigma * sigma) * offsets**2)
    weights = phi / phi.sum()
    out = np.asarray(maps, dtype=np.float64)
    for axis in (0, 1):
        a = np.moveaxis(out, axis, 0)
        n = a.shape[0]
        p = np.pad(a, [(radius, radius)] + [(0, 0)] * (a.ndim - 1), mode="symmetric")
        acc = p[radius : radius + n] * weights[radius]
        for d in range(radius, 0, -1):
            acc = (
                acc + (p[radius - d : radius - d + n] + p[radius + d : radius + d + n]) * weights[radius - d]
            )
        out = np.moveaxis(acc, 0, axis)
    return out


# ---------------------------------------------------------------- body decoding (the reference's Body.__call__)

# Limbs as 1-based part pairs, and the PAF channels (x, y; numbered from 19 as in the reference) of each.
_LIMBS = (
    (2, 3), (2, 6), (3, 4), (4, 5), (6, 7), (7, 8), (2, 9), (9, 10), (10, 11), (2, 12), (12, 13), (13, 14),
    (2, 1), (1, 15), (15, 17), (1, 16), (16, 18), (3, 17), (6, 18),
)  # fmt: skip
_PAF_IDX = (
    (31, 32), (39, 40), (33, 34), (35, 36), (41, 42), (43, 44), (19, 20), (21, 22), (23, 24), (25, 26), (27, 28),
    (29, 30), (47, 48), (49, 50), (53, 54), (51, 52), (55, 56), (37, 38), (45, 46),
)  # fmt: skip
_PEAK_THRESHOLD = 0.1
_PAF_THRESHOLD = 0.05
_PAF_SAMPLES = 10


def _body_peaks(heatmap: np.ndarray) -> list[list[tuple]]:
    """Per part, (x, y, score, id) of each local maximum (>= its 4 neighbours, borders count as 0) of the
    blurred map above 0.1, in row-major order; ids run over all parts; score is the unblurred map there."""
    blurred = gaussian_filter_like_scipy(heatmap[:, :, :18], 3.0)
    zero = np.zeros_like(blurred)
    up, down, left, right = zero.copy(), zero.copy(), zero.copy(), zero
    up[1:] = blurred[:-1]
    down[:-1] = blurred[1:]
    left[:, 1:] = blurred[:, :-1]
    right[:, :-1] = blurred[:, 1:]
    binary = (
        (blurred >= up)
        & (blurred >= down)
        & (blurred >= left)
        & (blurred >= right)
        & (blurred > _PEAK_THRESHOLD)
    )
    all_peaks, counter = [], 0
    for part in range(18):
        ys, xs = np.nonzero(binary[:, :, part])
        scores = heatmap[ys, xs, part]
        all_peaks.append([(xs[i], ys[i], scores[i], counter + i) for i in range(len(xs))])
        counter += len(xs)
    return all_peaks


def _limb_candidates(
    cand_a: list[tuple], cand_b: list[tuple], paf_x: np.ndarray, paf_y: np.ndarray, image_height: int
) -> list[list]:
    """[i, j, score, score + part scores] of each (A_i, B_j) pair passing the reference's two criteria, in its
    (i, j) order: the PAF, sampled at 10 rounded points of the segment, projected on the segment's unit vector,
    above 0.05 at more than 8 points, and its mean plus min(0.5 H / length - 1, 0) positive. Vectorised over
    pairs with the same float64 operations (the sum is sequential, as Python's ``sum``)."""
    ax = np.array([c[0] for c in cand_a], dtype=np.int64)[:, None]
    ay = np.array([c[1] for c in cand_a], dtype=np.int64)[:, None]
    bx = np.array([c[0] for c in cand_b], dtype=np.int64)[None, :]
    by = np.array([c[1] for c in cand_b], dtype=np.int64)[None, :]
    vx, vy = bx - ax, by - ay
    norm = np.maximum(0.001, np.sqrt((vx * vx + vy * vy).astype(np.float64)))
    ux, uy = vx / norm, vy / norm
    # np.linspace(a, b, 10) points; the rounded indices cannot differ from linspace's by an ulp (a + d * i / 9
    # with integer a, d is never within 1/18 of a half-integer).
    t = np.arange(_PAF_SAMPLES) / (_PAF_SAMPLES - 1)
    xs = np.rint(ax[..., None] + (bx - ax)[..., None] * t).astype(np.int64)
    ys = np.rint(ay[..., None] + (by - ay)[..., None] * t).astype(np.int64)
    projected = paf_x[ys, xs] * ux[..., None] + paf_y[ys, xs] * uy[..., None]
    total = projected[..., 0]
    for i in range(1, _PAF_SAMPLES):
        total = total + projected[..., i]
    with_prior = total / _PAF_SAMPLES + np.minimum(0.5 * image_height / norm - 1, 0)
    ok = ((projected > _PAF_THRESHOLD).sum(-1) > 0.8 * _PAF_SAMPLES) & (with_prior > 0)
    return [
        [i, j, with_prior[i, j], with_prior[i, j] + cand_a[i][2] + cand_b[j][2]]
        for i, j in zip(*np.nonzero(ok), strict=True)
    ]


def decode_body(heatmap: np.ndarray, paf: np.ndarray, image_height: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference's keypoint decoding of H x W x 19 heat maps and H x W x 38 PAFs (float64, image size).

    Returns (candidate, subset) as the reference: candidate N x 4 (x, y, score, id) of every peak; subset P x 20,
    per person the candidate index of each of 18 parts (-1 if none), the total score and the part count. People
    with fewer than 4 parts or a mean score under 0.4 are dropped."""
    all_peaks = _body_peaks(heatmap)
    connection_all: list[Any] = []
    special_k = []
    for k, ((part_a, part_b), paf_idx) in enumerate(zip(_LIMBS, _PAF_IDX, strict=True)):
        cand_a, cand_b = all_peaks[part_a - 1], all_peaks[part_b - 1]
        if not cand_a or not cand_b:
            special_k.append(k)
            connection_all.append([])
            continue
        candidates = _limb_candidates(
            cand_a, cand_b, paf[:, :, paf_idx[0] - 19], paf[:, :, paf_idx[1] - 19], image_height
        )
        candidates = sorted(candidates, key=lambda c: c[2], reverse=True)
        connection = np.zeros((0, 5))
        used_a, used_b = set(), set()
        for i, j, s, _ in candidates:
            if i not in used_a and j not in used_b:
                connection = np.vstack([connection, [cand_a[i][3], cand_b[j][3], s, i, j]])
                used_a.add(i)
                used_b.add(j)
                if len(connection) >= min(len(cand_a), len(cand_b)):
                    break
        connection_all.append(connection)

    subset = -1 * np.ones((0, 20))
    candidate = np.array([item for peaks in all_peaks for item in peaks])
    for k in range(len(_PAF_IDX)):
        if k in special_k:
            continue
        part_as, part_bs = connection_all[k][:, 0], connection_all[k][:, 1]
        index_a, index_b = np.array(_LIMBS[k]) - 1
        for i in range(len(connection_all[k])):
            found = 0
            subset_idx = [-1, -1]
            for j in range(len(subset)):
                if subset[j][index_a] == part_as[i] or subset[j][index_b] == part_bs[i]:
                    subset_idx[found] = j
                    found += 1
            if found == 1:
                j = subset_idx[0]
                if subset[j][index_b] != part_bs[i]:
                    subset[j][index_b] = part_bs[i]
                    subset[j][-1] += 1
                    subset[j][-2] += candidate[part_bs[i].astype(int), 2] + connection_all[k][i][2]
            elif found == 2:
                j1, j2 = subset_idx
                membership = ((subset[j1] >= 0).astype(int) + (subset[j2] >= 0).astype(int))[:-2]
                if len(np.nonzero(membership == 2)[0]) == 0:  # disjoint: merge the two
                    subset[j1][:-2] += subset[j2][:-2] + 1
                    subset[j1][-2:] += subset[j2][-2:]
                    subset[j1][-2] += connection_all[k][i][2]
                    subset = np.delete(subset, j2, 0)
                else:
                    subset[j1][index_b] = part_bs[i]
                    subset[j1][-1] += 1
                    subset[j1][-2] += candidate[part_bs[i].astype(int), 2] + connection_all[k][i][2]
            elif not found and k < 17:
                row = -1 * np.ones(20)
                row[index_a] = part_as[i]
                row[index_b] = part_bs[i]
                row[-1] = 2
                row[-2] = sum(candidate[connection_all[k][i, :2].astype(int), 2]) + connection_all[k][i][2]
                subset = np.vstack([subset, row])
    keep = [i for i in range(len(subset)) if not (subset[i][-1] < 4 or subset[i][-2] / subset[i][-1] < 0.4)]
    return candidate, subset[keep]


def _bodies(candidate: np.ndarray, subset: np.ndarray) -> list[list[Keypoint | None]]:
    """Body.format_body_result: per person 18 points in PIXELS (float64), None where missing."""
    return [
        [Keypoint(candidate[c][0], candidate[c][1]) if c != -1 else None for c in person[:18].astype(int)]
        for person in subset
    ]


# ---------------------------------------------------------------- hands and faces (util.handDetect / faceDetect)


def _hand_boxes(body: list[Keypoint | None], height: int, width: int) -> list[tuple[int, int, int, bool]]:
    """util.handDetect: (x, y, w, is_left) square boxes (w >= 20) beyond each wrist, left hand first."""
    arms = []
    for shoulder, elbow, wrist, is_left in ((5, 6, 7, True), (2, 3, 4, False)):
        if all(body[i] is not None for i in (shoulder, elbow, wrist)):
            arms.append((body[shoulder], body[elbow], body[wrist], is_left))
    boxes = []
    for (x1, y1), (x2, y2), (x3, y3), is_left in arms:
        x = x3 + 0.33 * (x3 - x2)
        y = y3 + 0.33 * (y3 - y2)
        wrist_elbow = math.sqrt((x3 - x2) ** 2 + (y3 - y2) ** 2)
        elbow_shoulder = math.sqrt((x2 - x1) ** 2 + (y2 - y1) ** 2)
        w = 1.5 * max(wrist_elbow, 0.9 * elbow_shoulder)
        x -= w / 2
        y -= w / 2
        x = 0 if x < 0 else x
        y = 0 if y < 0 else y
        w1 = width - x if x + w > width else w
        w2 = height - y if y + w > height else w
        w = min(w1, w2)
        if w >= 20:
            boxes.append((int(x), int(y), int(w), is_left))
    return boxes


def _face_box(body: list[Keypoint | None], height: int, width: int) -> tuple[int, int, int] | None:
    """util.faceDetect: (x, y, w) around the nose sized by eyes (x3) and ears (x1.5), or None (w < 20). As in
    the reference, the overflow test uses w (not 2 w), so a box may run off the image (the crop is then cut)."""
    head = body[0]
    sides = [(body[i], f) for i, f in ((14, 3.0), (15, 3.0), (16, 1.5), (17, 1.5))]
    if head is None or all(k is None for k, _ in sides):
        return None
    w = 0.0
    for k, factor in sides:
        if k is not None:
            w = max(w, max(abs(head.x - k.x), abs(head.y - k.y)) * factor)
    x, y = head.x - w, head.y - w
    x = 0 if x < 0 else x
    y = 0 if y < 0 else y
    w1 = width - x if x + w > width else w * 2
    w2 = height - y if y + w > height else w * 2
    w = min(w1, w2)
    return (int(x), int(y), int(w)) if w >= 20 else None


def _net_run(net: nn.Module, batch: np.ndarray) -> list[np.ndarray]:
    """The network on N x C x H x W float32 inputs, chunked, on its device and dtype; float32 outputs on the CPU."""
    param = next(net.parameters())
    outs = []
    for start in range(0, len(batch), _CHUNK):
        x = torch.from_numpy(batch[start : start + _CHUNK]).to(param.device, param.dtype)
        y = net(x)
        outs.append(
            tuple(t.float().cpu().numpy() for t in y) if isinstance(y, tuple) else y.float().cpu().numpy()
        )
    if outs and isinstance(outs[0], tuple):
        return [np.concatenate(parts) for parts in zip(*outs, strict=True)]
    return [np.concatenate(outs)]


def _to_input(img: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 -> 3 x H x W float32 ``/256 - 0.5`` (the reference's normalisation)."""
    return np.transpose(np.float32(img), (2, 0, 1)) / 256 - 0.5


_HAND_SCALES = (0.5, 1.0, 1.5, 2.0)
_HAND_MAP = 128


def _hand_peaks(net: nn.Module, crops: list[np.ndarray]) -> list[np.ndarray]:
    """Hand.__call__ for each BGR crop: 21 (x, y) ints in crop pixels ([0, 0] where no map exceeds 0.05)."""
    if not crops:
        return []
    blurred = [cv2.GaussianBlur(c, (0, 0), 0.8) for c in crops]
    averages = [np.zeros((_HAND_MAP, _HAND_MAP, 22)) for _ in crops]
    for scale in _HAND_SCALES:
        size = scale * 368
        padded = [_pad_right_down(_resize_to(b, size, size)) for b in blurred]
        (out,) = _net_run(net, np.stack([_to_input(p[0]) for p in padded]))
        for avg, o, (img, pad_down, pad_right) in zip(averages, out, padded, strict=True):
            heat = _maps_back(o, img.shape[:2], (pad_down, pad_right), (_HAND_MAP, _HAND_MAP))
            avg += heat / len(_HAND_SCALES)
    results = []
    for crop, avg in zip(crops, averages, strict=True):
        hr, wr = crop.shape[:2]
        blurred_maps = gaussian_filter_like_scipy(avg[:, :, :21], 3.0)
        peaks = []
        for part in range(21):
            binary = np.ascontiguousarray(blurred_maps[:, :, part] > 0.05, dtype=np.uint8)
            if binary.sum() == 0:
                peaks.append([0, 0])
                continue
            labels = _label_raster_order(binary)
            map_ori = avg[:, :, part].copy()
            sums = [np.sum(map_ori[labels == i]) for i in range(1, labels.max() + 1)]
            best = int(np.argmax(sums)) + 1
            map_ori[labels != best] = 0
            flat = int(np.argmax(map_ori))
            y, x = divmod(flat, map_ori.shape[1])
            peaks.append(
                [int(float(x) * float(wr) / float(_HAND_MAP)), int(float(y) * float(hr) / float(_HAND_MAP))]
            )
        results.append(np.array(peaks))
    return results


def _label_raster_order(binary: np.ndarray) -> np.ndarray:
    """8-connected component labels (1..n, 0 background) numbered in raster order of each component's first
    pixel, as ``skimage.measure.label(binary, connectivity=2)`` numbers them (cv2 may number otherwise)."""
    n, labels = cv2.connectedComponents(binary, connectivity=8, ltype=cv2.CV_32S)
    if n <= 2:
        return labels
    flat = labels.ravel()
    first = np.full(n, flat.size)
    np.minimum.at(first, flat, np.arange(flat.size))
    order = np.argsort(first[1:], kind="stable") + 1
    remap = np.zeros(n, dtype=np.int32)
    remap[order] = np.arange(1, n, dtype=np.int32)
    return remap[labels]


_FACE_SIZE = 384


def _face_peaks(net: nn.Module, crops: list[np.ndarray]) -> list[np.ndarray]:
    """Face.__call__ + compute_peaks_from_heatmaps for each BGR crop: per map (71, background included) with a
    value above 0.05, the (x, y) of its first maximum, in crop pixels; maps without one are skipped."""
    if not crops:
        return []
    inputs = np.stack([_to_input(_resize_to(c, _FACE_SIZE, _FACE_SIZE)) for c in crops])
    # The reference feeds uint8 / 256.0 - 0.5 (torch float32): the same values as numpy's float32 / 256 - 0.5.
    (out,) = _net_run(net, inputs)
    results = []
    for crop, maps in zip(crops, out, strict=True):
        h, w = crop.shape[:2]
        heat = F.interpolate(torch.from_numpy(maps[None]), (h, w), mode="bilinear", align_corners=True)[
            0
        ].numpy()
        peaks = []
        for part in range(heat.shape[0]):
            m = heat[part]
            binary = m > 0.05
            if not binary.any():
                continue
            flat = int(np.argmax(np.where(binary, m, -np.inf)))
            y, x = divmod(flat, w)
            peaks.append([x, y])
        results.append(np.array(peaks))
    return results


def _normalise(peaks: np.ndarray, x: int, y: int, height: int, width: int) -> list[Keypoint] | None:
    """The reference's crop -> normalised image coordinates, in float32 (a 0 coordinate becomes -1 / size)."""
    peaks = peaks.astype(np.float32)
    if not (peaks.ndim == 2 and peaks.shape[1] == 2):
        return None
    peaks[:, 0] = np.where(peaks[:, 0] < 1e-6, -1, peaks[:, 0] + x) / float(width)
    peaks[:, 1] = np.where(peaks[:, 1] < 1e-6, -1, peaks[:, 1] + y) / float(height)
    return [Keypoint(p[0], p[1]) for p in peaks]


# ---------------------------------------------------------------- the detector


def _check_net(net: nn.Module | None, kind: str, needed: bool) -> None:
    if needed and (net is None or getattr(net, "kind", None) != kind):
        got = "nothing" if net is None else f"a {getattr(net, 'kind', type(net).__name__)} network"
        raise ValueError(f"{kind}: expected the OpenPose {kind} network ({_KINDS[kind][2]}), got {got}")


def detect_bodies(body: nn.Module, frames_bgr: Sequence[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The reference's ``Body.__call__`` on same-size H x W x 3 uint8 BGR frames, one batched forward: per frame
    (candidate, subset) as :func:`decode_body` returns them (pixel coordinates)."""
    height, width = frames_bgr[0].shape[:2]
    scale = 0.5 * 368 / height
    padded = [_pad_right_down(_resize_by(f, scale)) for f in frames_bgr]
    pafs, heats = _net_run(body, np.stack([_to_input(p[0]) for p in padded]))
    results = []
    for paf_out, heat_out, (img, pad_down, pad_right) in zip(pafs, heats, padded, strict=True):
        heat = _maps_back(heat_out, img.shape[:2], (pad_down, pad_right), (height, width)).astype(np.float64)
        paf = _maps_back(paf_out, img.shape[:2], (pad_down, pad_right), (height, width)).astype(np.float64)
        results.append(decode_body(heat, paf, height))
    return results


def detect_pose(
    body: nn.Module,
    hand: nn.Module | None,
    face: nn.Module | None,
    images: torch.Tensor,
    *,
    include_body: bool = True,
    include_hand: bool = False,
    include_face: bool = False,
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """OpenposeDetector(images) per frame: the pose image (B x H x W x 3 float32 [0, 1] on the images' device)
    and each frame's POSE_KEYPOINT dict (comfyui_controlnet_aux's format, normalised coordinates).

    ``images``: B x H x W x 3 RGB in [0, 1], quantised to uint8 as the reference receives them. Bodies are always
    detected (hands and faces are found from them); ``include_body`` only says whether the body is drawn, as in
    the reference. ``hand`` / ``face`` may be None unless included."""
    for option, value in (
        ("include_body", include_body),
        ("include_hand", include_hand),
        ("include_face", include_face),
    ):
        if not isinstance(value, (bool, np.bool_)):
            raise ValueError(f"{option}: expected True or False, got {value!r}")
    _check_net(body, "body", True)
    _check_net(hand, "hand", include_hand)
    _check_net(face, "face", include_face)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected B x H x W x 3, got {tuple(images.shape)}")
    device = images.device
    frames_rgb = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    frames = [np.ascontiguousarray(f[:, :, ::-1]) for f in frames_rgb]  # the reference works in BGR
    height, width = frames[0].shape[:2]

    with torch.inference_mode():
        people = [_bodies(candidate, subset) for candidate, subset in detect_bodies(body, frames)]

        hand_jobs, face_jobs = [], []  # (frame, person, box...)
        for f, bodies in enumerate(people):
            for p, pts in enumerate(bodies):
                if include_hand:
                    hand_jobs += [(f, p, box) for box in _hand_boxes(pts, height, width)]
                if include_face:
                    box = _face_box(pts, height, width)
                    if box is not None:
                        face_jobs.append((f, p, box))
        hand_peaks = _hand_peaks(hand, [frames[f][y : y + w, x : x + w] for f, _, (x, y, w, _) in hand_jobs])
        face_peaks = _face_peaks(face, [frames[f][y : y + w, x : x + w] for f, _, (x, y, w) in face_jobs])

    hands: dict[tuple[int, int, bool], list[Keypoint] | None] = {}
    for (f, p, (x, y, _, is_left)), peaks in zip(hand_jobs, hand_peaks, strict=True):
        hands[(f, p, is_left)] = _normalise(peaks, x, y, height, width)
    faces = {
        (f, p): _normalise(peaks, x, y, height, width)
        for (f, p, (x, y, _)), peaks in zip(face_jobs, face_peaks, strict=True)
    }

    canvases, dicts = [], []
    for f, bodies in enumerate(people):
        poses = [
            Pose(
                body=[
                    Keypoint(k.x / float(width), k.y / float(height)) if k is not None else None for k in pts
                ],
                left_hand=hands.get((f, p, True)),
                right_hand=hands.get((f, p, False)),
                face=faces.get((f, p)),
            )
            for p, pts in enumerate(bodies)
        ]
        canvases.append(draw_poses(poses, height, width, include_body, include_hand, include_face))
        dicts.append(poses_to_dict(poses, height, width))
    out = torch.from_numpy(np.stack(canvases)).to(device).float() / 255.0
    return out, dicts
