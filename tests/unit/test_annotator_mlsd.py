"""M-LSD annotator (preprocessors/annotators/mlsd.py) against controlnet_aux 0.0.10's MLSDdetector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from annotator_refs.frames import photo, shapes, to_images, to_uint8
from annotator_refs.mlsd import published_state_dict, reference_detect, reference_network
from controlstack.preprocessors.annotators import mlsd
from controlstack.preprocessors.annotators.common import AnnotatorFileError, read_state_dict
from numerics import rel_err

pytestmark = pytest.mark.unit


# (our option values, the reference's thr_v / thr_d): the defaults, a higher score bar, a length bar, both.
OPTIONS = [
    ({}, {}),
    ({"score_threshold": 0.5}, {"thr_v": 0.5}),
    ({"distance_threshold": 12.0}, {"thr_d": 12.0}),
    ({"score_threshold": 0.3, "distance_threshold": 5.0}, {"thr_v": 0.3, "thr_d": 5.0}),
]


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return published_state_dict(0)


@pytest.fixture(scope="module")
def net(weights, tmp_path_factory) -> mlsd.MLSDNetwork:
    # Through a real file in the published format (a bare state dict pickle), read by the pack's loader.
    path = tmp_path_factory.mktemp("mlsd") / "mlsd_large_512_fp32.pth"
    torch.save(weights, path)
    return mlsd.build(read_state_dict(str(path)), path.name)


def test_network_matches_reference(weights, net):
    """The raw 9-channel map (centre logit, displacements, ...) at half size equals the reference
    MobileV2_MLSD_Large's (relative error <= 1e-4), on the 4-channel input pred_lines makes."""
    x = mlsd.network_input(to_images(photo()), net)
    assert x.shape == (1, 4, 64, 128) and torch.all(x[:, 3] == 1.0 / 127.5 - 1.0)
    with torch.no_grad():
        expected = reference_network(weights)(x)
        ours = net(x)
    assert ours.shape == expected.shape == (1, 9, 32, 64)
    assert rel_err(ours, expected) <= 1e-4


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o[0]) or "default")
def test_hint_bit_identical_to_reference(weights, net, options):
    """On the CPU the hint is bit-identical to MLSDdetector's (max gray-level difference 0) for each threshold
    setting, and not degenerate (real lines: the random weights give a hint with real variation)."""
    ours_options, reference_options = options
    image = photo()
    expected = reference_detect(weights, [image], **reference_options)[0]
    ours = to_uint8(mlsd.detect(net, to_images(image), **ours_options)[0])
    assert ours.shape == expected.shape == (64, 128, 3)
    assert np.abs(ours.astype(int) - expected).max() == 0
    assert set(np.unique(expected)) == {0, 255}
    assert expected.std() / 255.0 > 0.02


def test_thresholds_remove_lines(net):
    """Raising either threshold keeps a strict subset of the default's line pixels (the options do something)."""
    images = to_images(photo())
    default = mlsd.detect(net, images)
    for option in ({"score_threshold": 0.5}, {"distance_threshold": 12.0}):
        fewer = mlsd.detect(net, images, **option)
        assert torch.all(fewer <= default) and fewer.sum() < default.sum(), option
    assert mlsd.detect(net, images, score_threshold=1.0).sum() == 0


def test_batch_equals_single_frames(net):
    """Three different frames in one batched forward give the three single-frame hints: at most 0.1% of the
    pixels differ (oneDNN may pick another conv kernel for a batch, and a float32 rounding step can move a
    truncated line endpoint by a pixel)."""
    frames = [photo(), shapes(), photo()[::-1].copy()]
    batch = mlsd.detect(net, to_images(*frames))
    assert batch.shape == (3, 64, 128, 3) and batch.dtype == torch.float32
    singles = torch.cat([mlsd.detect(net, to_images(frame)) for frame in frames])
    assert (to_uint8(batch) != to_uint8(singles)).mean() <= 1e-3
    assert not torch.equal(batch[0], batch[1])


def test_wrong_file_is_refused(tmp_path):
    other = {f"conv{i}.weight": torch.randn(8, 3, 3, 3) for i in range(3)}
    path = tmp_path / "other.pth"
    torch.save(other, path)
    with pytest.raises(
        AnnotatorFileError, match=r"other\.pth: not an M-LSD file \(expected mlsd_large_512_fp32\.pth\)"
    ):
        mlsd.build(read_state_dict(str(path)), path.name)


def test_partial_file_is_refused(weights, tmp_path):
    partial = {k: v for k, v in weights.items() if not k.startswith("block23.")}
    path = tmp_path / "mlsd_large_512_fp32.pth"
    torch.save(partial, path)
    with pytest.raises(
        AnnotatorFileError, match=r"mlsd_large_512_fp32\.pth: not an M-LSD file.*missing.*block23\."
    ):
        mlsd.build(read_state_dict(str(path)), path.name)
    # A 3-channel first conv (a plain MobileNetV2 stem) is not M-LSD's RGB + ones input.
    reshaped = dict(weights, **{"backbone.features.0.0.weight": torch.zeros(32, 3, 3, 3)})
    with pytest.raises(
        AnnotatorFileError, match=r"M-LSD file.*backbone\.features\.0\.0\.weight: \(32, 3, 3, 3\)"
    ):
        mlsd.build(reshaped, "mlsd_large_512_fp32.pth")


@pytest.mark.parametrize("option", ["score_threshold", "distance_threshold"])
@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "0.1", None, True])
def test_bad_option_raises(net, option, bad):
    with pytest.raises(ValueError, match=rf"^{option}: expected"):
        mlsd.detect(net, to_images(shapes(64, 64)), **{option: bad})


def test_bad_images_raise(net):
    with pytest.raises(ValueError, match=r"^images: expected B x H x W x 3"):
        mlsd.detect(net, torch.zeros(1, 64, 64, 4))
