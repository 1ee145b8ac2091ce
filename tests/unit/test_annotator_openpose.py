"""OpenPose body + hand + face against controlnet_aux 0.0.10 (scripts/annotator_refs/openpose.py).

Everything here is BIT-IDENTICAL to the reference (max gray-level difference 0, keypoint dicts equal as floats):
the networks (same ops, so rel err 0), the resizes (the same OpenCV calls), the decoding, the drawing.

Random weights find few people, so the decoding and the hand / face stages are driven by a FIXTURE: a stand-in
body network whose output is hand-made heat maps and PAFs of two people at known joints; both detectors get the
same network outputs. Hand and face stand-ins are cheap data-dependent nets (pooled pixels through a random 1x1
conv) with the real output layout, because the real networks at the reference's fixed sizes (hand crops at
184..736 px, faces at 384 px) cost seconds per crop on a CPU; the real networks are compared raw on small inputs.
"""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from controlstack.preprocessors.annotators import openpose as op
from controlstack.preprocessors.annotators.common import AnnotatorFileError, read_state_dict
from controlstack.preprocessors.annotators.openpose_draw import HAND_EDGE_COLORS, draw_pose_keypoints
from torch import nn

pytestmark = pytest.mark.unit

warnings.filterwarnings("ignore", category=DeprecationWarning)
refs = pytest.importorskip("annotator_refs.openpose")
from numerics import rel_err  # noqa: E402

torch.set_num_threads(2)

H, W = 256, 384  # the fixture frame
# Two people, 18 joints (OpenPose order) in image pixels: nose, neck, R shoulder/elbow/wrist, L shoulder/elbow/
# wrist, R hip/knee/ankle, L hip/knee/ankle, R eye, L eye, R ear, L ear.
_SKELETON = np.array(
    [(0, 30), (0, 55), (-25, 55), (-35, 90), (-40, 125), (25, 55), (35, 90), (40, 125), (-15, 130), (-18, 175),
     (-20, 220), (15, 130), (18, 175), (20, 220), (-6, 24), (6, 24), (-13, 28), (13, 28)], dtype=np.float64,
)  # fmt: skip


def _people(shift: float = 0.0) -> list[np.ndarray]:
    first = _SKELETON + (110 + shift, 10)
    second = _SKELETON.copy()
    second[6], second[7] = (45, 40), (50, 10)  # left arm raised
    return [first, second + (280 - shift, 12)]


def _fixture_maps(
    people: list[np.ndarray], grid_h: int, grid_w: int, in_h: int
) -> tuple[np.ndarray, np.ndarray]:
    """Heat maps (19) and PAFs (38) on the body net's output grid for these people: a Gaussian blob per joint,
    background = 1 - max, and per limb its unit vector in a band along the segment."""
    to_cell = (in_h / H) / 8.0  # image px -> input px (the 184 px resize) -> output cell (stride 8)
    gy, gx = np.mgrid[0:grid_h, 0:grid_w].astype(np.float64)
    heat = np.zeros((19, grid_h, grid_w))
    paf = np.zeros((38, grid_h, grid_w))
    for joints in people:
        cells = joints * to_cell - 3.5 / 8
        for j, (cx, cy) in enumerate(cells):
            heat[j] = np.maximum(heat[j], np.exp(-((gx - cx) ** 2 + (gy - cy) ** 2) / (2 * 0.8**2)))
        for (a, b), (ix, iy) in zip(op._LIMBS, op._PAF_IDX, strict=True):
            pa, pb = cells[a - 1], cells[b - 1]
            length = max(np.linalg.norm(pb - pa), 1e-6)
            u = (pb - pa) / length
            along = (gx - pa[0]) * u[0] + (gy - pa[1]) * u[1]
            across = np.abs((gx - pa[0]) * u[1] - (gy - pa[1]) * u[0])
            band = (along >= -0.7) & (along <= length + 0.7) & (across <= 1.0)
            paf[ix - 19][band], paf[iy - 19][band] = u[0], u[1]
    heat[18] = 1 - heat[:18].max(0)
    return paf.astype(np.float32), heat.astype(np.float32)


class FixtureBody(nn.Module):
    """A body 'network' returning fixture maps, the frame read from the input's top-left pixel (gray 60 + 50 i)."""

    kind = "body"

    def __init__(self, shifts: list[float]) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.shifts = shifts

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for sample in x:
            frame = round(((float(sample[0, 0, 0]) + 0.5) * 256 - 60) / 50)
            out.append(
                _fixture_maps(_people(self.shifts[frame]), x.shape[2] // 8, x.shape[3] // 8, x.shape[2])
            )
        return tuple(torch.from_numpy(np.stack(o)) for o in zip(*out, strict=True))


class CheapKeypointNet(nn.Module):
    """Hand / face stand-in: the real layout (maps at stride 8) from 8x8-pooled pixels, a seeded 1x1 conv and a
    smooth position term, so the maps vary with the crop and have blobs above the 0.05 thresholds."""

    def __init__(self, kind: str, maps: int, seed: int) -> None:
        super().__init__()
        self.kind = kind
        g = torch.Generator().manual_seed(seed)
        self.proj = nn.Conv2d(3, maps, 1)
        self.proj.weight.data = torch.randn(maps, 3, 1, 1, generator=g)
        self.proj.bias.data = 0.1 * torch.randn(maps, generator=g)
        self.phase = nn.Parameter(6 * torch.rand(maps, 2, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(F.avg_pool2d(x, 8))
        yy = torch.linspace(0, 3, h.shape[2])[None, None, :, None]
        xx = torch.linspace(0, 3, h.shape[3])[None, None, None, :]
        wave = torch.sin(xx + self.phase[None, :, 0, None, None]) * torch.cos(
            yy + self.phase[None, :, 1, None, None]
        )
        return torch.relu(0.3 * h + 0.4 * wave)


def _frame(index: int, shift: float = 0.0) -> np.ndarray:
    """A fixture frame (RGB uint8): gradient + noise, the people drawn as sticks, the frame id at the top left."""
    rng = np.random.default_rng(index)
    yy, xx = np.mgrid[0:H, 0:W]
    img = np.stack([xx * 200 / W, yy * 200 / H, 100 + 50 * np.sin(xx / 17.0)], -1) + rng.normal(
        0, 8, (H, W, 3)
    )
    img = np.clip(img, 0, 255).astype(np.uint8)
    for joints in _people(shift):
        for a, b in op._LIMBS[:17]:
            p, q = joints[a - 1].astype(int), joints[b - 1].astype(int)
            cv2.line(img, (int(p[0]), int(p[1])), (int(q[0]), int(q[1])), (230, 200, 180), 5)
    img[:24, :24] = 60 + 50 * index
    return img


def _images(frames: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(frames)).float() / 255


def _u8(images: torch.Tensor) -> np.ndarray:
    return (images.numpy() * 255).round().astype(np.uint8)


@pytest.fixture(scope="module")
def body_sd() -> dict[str, torch.Tensor]:
    return refs.published_state_dict(0, "body")


@pytest.fixture(scope="module")
def fixture_nets() -> tuple[FixtureBody, CheapKeypointNet, CheapKeypointNet]:
    return FixtureBody([0.0, 6.0, -9.0]), CheapKeypointNet("hand", 22, 1), CheapKeypointNet("face", 71, 2)


# ---------------------------------------------------------------- 1. the networks


@pytest.mark.parametrize("network", ["body", "hand", "face"])
def test_network_parity_from_published_file(tmp_path, body_sd, network: str) -> None:
    sd = body_sd if network == "body" else refs.published_state_dict(0, network)
    name = op.FILES[("body", "hand", "face").index(network)]
    if network == "face":  # one through a real file (the smallest: the body file is 200 MB)
        torch.save(sd, tmp_path / name)
        ours = op.build(read_state_dict(str(tmp_path / name)), name)
    else:
        ours = op.build(read_state_dict(sd), name)
    assert ours.kind == network
    ref = refs.reference_network(sd, network)
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(3)) - 0.5
    with torch.inference_mode():
        got, want = ours(x), ref(x)
    if network == "face":
        want = want[-1]
    pairs = list(zip(got, want, strict=True)) if network == "body" else [(got, want)]
    for a, b in pairs:
        assert b.std() > 0.02  # not degenerate
        assert rel_err(a, b) <= 1e-4


def test_gaussian_filter_matches_scipy_bit_for_bit() -> None:
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    for shape in [(64, 96), (7, 5), (128, 128)]:
        m = rng.standard_normal(shape) * rng.random(shape)
        assert np.array_equal(op.gaussian_filter_like_scipy(m, 3.0), gaussian_filter(m, sigma=3))
    stack = rng.standard_normal((40, 30, 4))
    ours = op.gaussian_filter_like_scipy(stack, 3.0)
    assert all(np.array_equal(ours[:, :, c], gaussian_filter(stack[:, :, c], sigma=3)) for c in range(4))


def test_labels_in_skimage_order() -> None:
    from skimage.measure import label

    rng = np.random.default_rng(1)
    for _ in range(20):
        binary = np.ascontiguousarray(rng.random((40, 40)) > 0.6, dtype=np.uint8)
        assert np.array_equal(op._label_raster_order(binary), label(binary, connectivity=2))


def test_hand_colors_match_matplotlib_formula() -> None:
    refs._ensure_matplotlib()  # the real matplotlib where installed, else the reference-side transcription
    import matplotlib

    want = [tuple(matplotlib.colors.hsv_to_rgb([i / 20.0, 1.0, 1.0]) * 255) for i in range(20)]
    assert [tuple(c) for c in HAND_EDGE_COLORS] == [tuple(float(v) for v in c) for c in want]


# ---------------------------------------------------------------- 2. decoding on the same heat maps / PAFs


def test_decoding_equals_reference_on_fixture_people(fixture_nets) -> None:
    """Same network outputs (two known people) into both: candidates and subsets equal exactly, and the people
    found are the fixture's, each joint within 4 px."""
    body = fixture_nets[0]
    frame = _frame(0)
    bgr = np.ascontiguousarray(frame[:, :, ::-1])
    ((candidate, subset),) = op.detect_bodies(body, [bgr])
    ref_candidate, ref_subset = refs.reference_detector(body).body_estimation(bgr)
    assert np.array_equal(candidate, ref_candidate) and np.array_equal(subset, ref_subset)
    assert len(subset) == 2 and (subset[:, 19] == 18).all()
    found = sorted((candidate[person[:18].astype(int), :2] for person in subset), key=lambda p: p[0, 0])
    for got, want in zip(found, _people(0.0), strict=True):
        assert np.abs(got - want).max() <= 4


# ---------------------------------------------------------------- 3. the full detector


@pytest.mark.parametrize("include", [(True, False, False), (False, True, True)])
def test_pipeline_on_fixture_equals_reference(fixture_nets, include) -> None:
    """Bodies, hands and faces, drawn and as dicts, bit-identical to OpenposeDetector on the same nets."""
    body, hand, face = fixture_nets
    include_body, include_hand, include_face = include
    frame = _frame(1, 6.0)
    image, dicts = op.detect_pose(
        body, hand, face, _images([frame]),
        include_body=include_body, include_hand=include_hand, include_face=include_face,
    )  # fmt: skip
    ref_images, ref_dicts = refs.reference_detect(
        {"body": body, "hand": hand, "face": face}, [frame],
        include_body=include_body, include_hand=include_hand, include_face=include_face,
    )  # fmt: skip
    got = _u8(image[0])
    assert np.abs(got.astype(int) - ref_images[0]).max() == 0
    assert dicts == ref_dicts
    people = dicts[0]["people"]
    assert len(people) == 2
    if include_hand:
        assert all(p["hand_left_keypoints_2d"] and p["hand_right_keypoints_2d"] for p in people)
    if include_face:
        assert all(p["face_keypoints_2d"] for p in people)
    assert got.std() / 255 > 0.02
    # Round trip: the dicts draw the detected image again.
    redrawn = draw_pose_keypoints(
        dicts, draw_body=include_body, draw_hand=include_hand, draw_face=include_face
    )
    assert torch.equal(redrawn, image)


def test_pipeline_random_weights_equals_reference(body_sd) -> None:
    """The real body network (random weights) end to end on a shapes image."""
    sd = body_sd
    body = op.build(sd, "body_pose_model.pth")
    rng = np.random.default_rng(0)
    img = np.zeros((64, 64, 3), np.uint8)
    for _ in range(8):
        center = tuple(int(v) for v in rng.integers(0, 64, 2))
        cv2.circle(img, center, int(rng.integers(5, 25)), tuple(int(v) for v in rng.integers(0, 255, 3)), -1)
    image, dicts = op.detect_pose(body, None, None, _images([img]))
    ref_images, ref_dicts = refs.reference_detect({"body": sd}, [img])
    assert np.abs(_u8(image[0]).astype(int) - ref_images[0]).max() == 0
    assert dicts == ref_dicts and len(dicts[0]["people"]) >= 1


def test_dict_format(fixture_nets) -> None:
    _, dicts = op.detect_pose(fixture_nets[0], None, None, _images([_frame(0)]))
    assert dicts[0]["canvas_height"] == H and dicts[0]["canvas_width"] == W
    person = dicts[0]["people"][0]
    assert person["hand_left_keypoints_2d"] is None and person["face_keypoints_2d"] is None
    points = np.array(person["pose_keypoints_2d"]).reshape(18, 3)
    assert (points[:, 2] == 1.0).all() and (points[:, :2] > 0).all() and (points[:, :2] < 1).all()


def test_batch_equals_single_calls(fixture_nets, monkeypatch) -> None:
    # One hand scale instead of four: batching does not depend on it, and each scale costs ~1 s per hand on a CPU.
    monkeypatch.setattr(op, "_HAND_SCALES", (0.5,))
    body, hand, face = fixture_nets
    frames = [_frame(0), _frame(1, 6.0), _frame(2, -9.0)]
    batch, batch_dicts = op.detect_pose(
        body, hand, face, _images(frames), include_hand=True, include_face=True
    )
    for i, f in enumerate(frames):
        single, single_dicts = op.detect_pose(
            body, hand, face, _images([f]), include_hand=True, include_face=True
        )
        assert torch.equal(batch[i : i + 1], single) and batch_dicts[i] == single_dicts[0]
    assert not torch.equal(batch[0], batch[1])


# ---------------------------------------------------------------- 4. files and options


def test_wrong_and_partial_files_refused(tmp_path, body_sd) -> None:
    hand = refs.published_state_dict(0, "hand")
    with pytest.raises(AnnotatorFileError, match=r"junk\.pth: not an OpenPose file"):
        op.build({"conv.weight": torch.zeros(4, 3, 3, 3), "conv.bias": torch.zeros(4)}, "junk.pth")
    partial = dict(list(body_sd.items())[:-6])
    torch.save(partial, tmp_path / "body_pose_model.pth")
    with pytest.raises(AnnotatorFileError, match=r"body_pose_model\.pth: not an OpenPose body file.*missing"):
        op.build(read_state_dict(str(tmp_path / "body_pose_model.pth")), "body_pose_model.pth")
    wrong = dict(hand, **{"conv6_2_CPM.weight": torch.zeros(30, 512, 1, 1)})
    with pytest.raises(AnnotatorFileError, match=r"hand_pose_model\.pth: not an OpenPose file"):
        op.build(wrong, "hand_pose_model.pth")
    hand.pop("conv1_1.bias")
    with pytest.raises(
        AnnotatorFileError, match=r"not an OpenPose hand file \(expected hand_pose_model\.pth\)"
    ):
        op.build(hand, "hand_pose_model.pth")


def test_bad_options_refused(fixture_nets) -> None:
    body, hand, face = fixture_nets
    images = _images([_frame(0)])
    for option in ("include_body", "include_hand", "include_face"):
        with pytest.raises(ValueError, match=option):
            op.detect_pose(body, hand, face, images, **{option: "yes"})
    with pytest.raises(ValueError, match="hand"):
        op.detect_pose(body, None, face, images, include_hand=True)
    with pytest.raises(ValueError, match="face"):
        op.detect_pose(body, hand, hand, images, include_face=True)
    with pytest.raises(ValueError, match="body"):
        op.detect_pose(hand, hand, face, images)


def test_reframed_dict_keeps_pixel_positions_and_redraws_the_cropped_pose(fixture_nets) -> None:
    """The node cuts the 64-padding off: the keypoints move to the smaller canvas at the same pixel positions
    (within float rounding), missing points stay missing, and drawing them differs from the padded drawing
    cropped by at most a one-pixel shift of some points (so only a few pixels)."""
    from controlstack.preprocessors.annotators.openpose_draw import reframe_pose_dict

    body, hand, face = fixture_nets
    image, dicts = op.detect_pose(
        body, hand, face, _images([_frame(1, 6.0)]), include_hand=True, include_face=True
    )
    h, w = H - 10, W - 7
    reframed = reframe_pose_dict(dicts[0], h, w)
    assert (reframed["canvas_height"], reframed["canvas_width"]) == (h, w)
    assert reframe_pose_dict(dicts[0], H, W) == dicts[0]
    for before, after in zip(dicts[0]["people"], reframed["people"], strict=True):
        for key in ("pose_keypoints_2d", "hand_left_keypoints_2d", "face_keypoints_2d"):
            old, new = np.array(before[key]).reshape(-1, 3), np.array(after[key]).reshape(-1, 3)
            assert (old[:, 2] == new[:, 2]).all()
            present = old[:, 2] > 0
            assert present.any()
            np.testing.assert_allclose(new[present, 0] * w, old[present, 0] * W, atol=1e-6)
            np.testing.assert_allclose(new[present, 1] * h, old[present, 1] * H, atol=1e-6)
            assert (new[~present, :2] == 0).all()
    drawn = draw_pose_keypoints([reframed])[0]
    cropped = image[0, :h, :w].cpu()
    assert drawn.shape == cropped.shape
    assert (drawn != cropped).any(-1).float().mean() < 0.02
    with pytest.raises(ValueError, match="canvas 0 x 5 is empty"):
        reframe_pose_dict(dicts[0], 5, 0)
