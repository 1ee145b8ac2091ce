"""MiDaS DPT-Hybrid annotator (depth and ControlNet 1.0 normal) against controlnet_aux 0.0.10's MidasDetector.

Seeded random weights for every tensor of the published layout, written to a real ``.pt`` file and read back.
DPT-Hybrid is ~123M parameters, so the reference runs once (one module fixture: 3 different 64 x 128 frames,
non-square so the 24 x 24 position embeddings are resized to a 4 x 8 grid) and every test reuses its results.
"""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from annotator_refs.midas import published_state_dict, reference_detect_all, reference_network
from controlstack.preprocessors.annotators import midas
from controlstack.preprocessors.annotators.common import AnnotatorFileError, read_state_dict
from numerics import rel_err

pytestmark = pytest.mark.unit

PHOTO = Path(__file__).resolve().parents[2] / "workflows" / "inputs" / "controlstack_photo.png"
H, W = 64, 128
# Non-default options, checked against the reference on one frame.
OTHER_A, OTHER_BG = 2.0, 0.3


def _frames() -> list[np.ndarray]:
    """Three different real-photo frames, H x W x 3 uint8 RGB (crops of the example photo)."""
    photo = cv2.cvtColor(cv2.imread(str(PHOTO)), cv2.COLOR_BGR2RGB)
    crops = (photo[:256], photo[256:], photo[128:384, ::-1])
    return [np.ascontiguousarray(cv2.resize(c, (W, H), interpolation=cv2.INTER_AREA)) for c in crops]


def _to_images(frames: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(frames)).float() / 255.0


def _to_uint8(hint: torch.Tensor) -> np.ndarray:
    return (hint * 255).round().to(torch.uint8).numpy()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    sd = published_state_dict(seed=0)
    path = tmp_path_factory.mktemp("midas") / midas.FILES[0]
    torch.save(sd, path)
    net = midas.build(read_state_dict(path), path.name)
    frames = _frames()
    ref = reference_detect_all(sd, frames)
    ref_other = reference_detect_all(sd, frames[:1], a=OTHER_A, bg_threshold=OTHER_BG)
    images = _to_images(frames)
    with torch.inference_mode():
        raw = net(torch.cat(ref["input"]))
    return {
        "sd": sd,
        "net": net,
        "frames": frames,
        "images": images,
        "ref": ref,
        "ref_other": ref_other,
        "raw": raw,
        "depth": _to_uint8(midas.detect(net, images, mode="depth")),
        "normal": _to_uint8(midas.detect(net, images, mode="normal")),
    }


def test_reference_network_loads_published_keys(run: dict) -> None:
    # Our module's tensor names and shapes are exactly the reference DPTDepthModel's (the file's layout).
    ours = {k: tuple(v.shape) for k, v in run["net"].state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in run["sd"].items()}
    assert len(ours) == 368


def test_position_embedding_resize_matches_reference(run: dict) -> None:
    ref_vit = reference_network(run["sd"]).pretrained.model
    ours = run["net"].pretrained.model
    for grid in ((4, 8), (24, 24), (32, 20)):
        expected = ref_vit._resize_pos_embed(ref_vit.pos_embed, *grid)
        assert torch.equal(ours.resized_pos_embed(*grid), expected), grid
    # At the 384 px training size the resize is the identity.
    assert torch.equal(ours.resized_pos_embed(24, 24), ours.pos_embed)


def test_network_matches_reference(run: dict) -> None:
    """Our batched forward of the 3 frames vs the reference's 3 single forwards: measured 4.4e-6 relative on CPU
    fp32 (oneDNN picks another conv algorithm for batch 3 than for batch 1; single frames are bit-identical,
    see test_single_calls_are_bit_identical); asserted <= 1e-4 relative."""
    expected = torch.cat(run["ref"]["raw"])
    assert run["raw"].shape == expected.shape == (3, H, W)
    assert rel_err(run["raw"], expected) <= 1e-4
    # A degenerate random network (all-zero depth after the final ReLU) could not test anything.
    assert (expected > 0).float().mean() > 0.5
    assert expected.std() > 0.1 * expected.mean()


@pytest.mark.parametrize("mode", midas.MODES)
def test_hint_matches_reference(run: dict, mode: str) -> None:
    """Batched detect vs MidasDetector on the same uint8 frames: max gray-level difference <= 1, at a few pixels
    (measured: 1 at 0.03% of depth values, 0.005% of normal values), from the batch-dependent last bits of the
    network output; one frame per call is bit-identical (test_single_calls_are_bit_identical)."""
    ours = run[mode]
    expected = np.stack(run["ref"][mode])
    assert ours.shape == expected.shape == (3, H, W, 3)
    diff = np.abs(ours.astype(int) - expected.astype(int))
    assert diff.max() <= 1
    assert (diff > 0).mean() < 1e-3
    assert (expected / 255.0).std() > 0.02
    if mode == "depth":
        assert (ours[..., 0] == ours[..., 1]).all() and (ours[..., 0] == ours[..., 2]).all()
        assert ours.min() == 0 and ours.max() == 255
    else:
        # Background (normalised depth < 0.1) is the flat normal (z, y, x) = (1, 0, 0) -> (255, 127, 127).
        assert (ours.reshape(-1, 3) == (255, 127, 127)).all(axis=1).any()
        assert ours[..., 1].std() > 5 and ours[..., 2].std() > 5


def test_options_match_reference(run: dict) -> None:
    images = run["images"][:1]
    ours = _to_uint8(midas.detect(run["net"], images, mode="normal", a=OTHER_A, bg_threshold=OTHER_BG))
    expected = run["ref_other"]["normal"][0]
    assert np.abs(ours[0].astype(int) - expected.astype(int)).max() == 0
    # The options change the map (a flatter z and a larger background).
    assert (ours[0] != run["normal"][0]).any()
    # The depth hint does not depend on them.
    assert (run["ref_other"]["depth"][0] == run["ref"]["depth"][0]).all()


def test_single_calls_are_bit_identical(run: dict) -> None:
    """One frame per call: the same conv algorithms as the reference's per-frame forward, max difference 0."""
    for i in range(3):
        single = _to_uint8(midas.detect(run["net"], run["images"][i : i + 1], mode="normal"))
        assert np.array_equal(single[0], run["ref"]["normal"][i]), i
        # Batch of 3 == 3 single calls, up to the batch-dependent last bits (<= 1 level at a few pixels).
        diff = np.abs(single[0].astype(int) - run["normal"][i].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, i
    assert (run["normal"][0] != run["normal"][1]).any()


def test_sobel_matches_opencv() -> None:
    rng = np.random.default_rng(3)
    depth = cv2.GaussianBlur(rng.standard_normal((64, 192)).astype(np.float32) * 40 + 300, (0, 0), 2)
    gx, gy = midas.sobel(torch.from_numpy(depth)[None])
    assert np.array_equal(gx[0].numpy(), cv2.Sobel(depth, cv2.CV_32F, 1, 0, ksize=3))
    assert np.array_equal(gy[0].numpy(), cv2.Sobel(depth, cv2.CV_32F, 0, 1, ksize=3))


def test_wrong_file_is_refused(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    other = {
        "conv1.weight": torch.randn(64, 3, 3, 3, generator=gen),
        "conv1.bias": torch.randn(64, generator=gen),
        "conv2.weight": torch.randn(1, 64, 1, 1, generator=gen),
    }
    path = tmp_path / "ControlNetHED.pth"
    torch.save(other, path)
    with pytest.raises(AnnotatorFileError, match=r"ControlNetHED\.pth.*not a MiDaS DPT-Hybrid file"):
        midas.build(read_state_dict(path), path.name)


def test_truncated_file_is_refused(run: dict, tmp_path: Path) -> None:
    keys = list(run["sd"])
    partial = {k: run["sd"][k] for k in keys[: len(keys) // 3]}
    path = tmp_path / midas.FILES[0]
    torch.save(partial, path)
    with pytest.raises(AnnotatorFileError, match=r"dpt_hybrid-midas-501f0c75\.pt.*MiDaS DPT-Hybrid.*missing"):
        midas.build(read_state_dict(path), path.name)
    wrong_shape = dict(run["sd"])
    wrong_shape["pretrained.model.pos_embed"] = torch.zeros(1, 197, 768)
    with pytest.raises(AnnotatorFileError, match=r"other shapes.*pos_embed"):
        midas.build(wrong_shape, midas.FILES[0])


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("mode", "depth_and_normal"),
        ("mode", None),
        ("a", 0.0),
        ("a", -1.0),
        ("a", math.inf),
        ("a", math.nan),
        ("bg_threshold", -0.01),
        ("bg_threshold", 1.5),
        ("bg_threshold", math.nan),
    ],
)
def test_bad_option_is_refused(run: dict, option: str, value: object) -> None:
    with pytest.raises(ValueError, match=option):
        midas.detect(run["net"], run["images"][:1], **{option: value})


def test_bad_size_is_refused(run: dict) -> None:
    with pytest.raises(ValueError, match="images"):
        midas.detect(run["net"], torch.zeros(1, 64, 80, 3))
