"""Realistic line-art annotator (preprocessors/annotators/lineart.py) against controlnet_aux 0.0.10's
LineartDetector."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from annotator_refs.frames import photo, shapes, to_images, to_uint8
from annotator_refs.lineart import published_state_dict, reference_detect, reference_network
from controlstack.preprocessors.annotators import lineart
from controlstack.preprocessors.annotators.common import AnnotatorFileError, read_state_dict
from numerics import rel_err

pytestmark = pytest.mark.unit


def load(weights: dict[str, torch.Tensor], path: Path) -> lineart.LineartNetwork:
    # Through a real file in the published format (a bare state dict pickle), read by the pack's loader.
    torch.save(weights, path)
    return lineart.build(read_state_dict(str(path)), path.name)


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return published_state_dict(0)


@pytest.fixture(scope="module")
def net(weights, tmp_path_factory) -> lineart.LineartNetwork:
    return load(weights, tmp_path_factory.mktemp("lineart") / "sk_model.pth")


def test_network_matches_reference(weights, net):
    """The raw line map equals the reference Generator(3, 1, 3)'s (relative error <= 1e-4)."""
    x = torch.from_numpy(photo()).float().permute(2, 0, 1)[None] / 255.0
    with torch.no_grad():
        expected = reference_network(weights)(x)
        ours = net(x)
    assert ours.shape == expected.shape == (1, 1, 64, 128)
    assert rel_err(ours, expected) <= 1e-4


@pytest.mark.parametrize("coarse", [False, True], ids=["sk_model", "sk_model2-coarse"])
def test_hint_bit_identical_to_reference(weights, net, coarse, tmp_path):
    """On the CPU the hint is bit-identical to LineartDetector's (max gray-level difference 0), for the detailed
    file and for a coarse one (other weights, sk_model2.pth, in the reference's coarse slot), and not
    degenerate (the random weights give a hint with real variation)."""
    if coarse:
        weights = published_state_dict(1)
        net = load(weights, tmp_path / lineart.file_for(True))
    image = photo()
    expected = reference_detect(weights, [image], coarse=coarse)[0]
    ours = to_uint8(lineart.detect(net, to_images(image))[0])
    assert ours.shape == expected.shape == (64, 128, 3)
    assert np.abs(ours.astype(int) - expected).max() == 0
    assert expected.std() / 255.0 > 0.02


def test_batch_equals_single_frames(net):
    """Three different frames in one batched forward give the three single-frame hints, to within 1 gray level
    on at most 0.1% of the pixels (oneDNN may pick another conv kernel for a batch, whose float32 rounding can
    move a truncation boundary)."""
    frames = [photo(), shapes(), photo()[::-1].copy()]
    batch = lineart.detect(net, to_images(*frames))
    assert batch.shape == (3, 64, 128, 3) and batch.dtype == torch.float32
    singles = torch.cat([lineart.detect(net, to_images(frame)) for frame in frames])
    levels = (to_uint8(batch).astype(int), to_uint8(singles).astype(int))
    assert np.abs(levels[0] - levels[1]).max() <= 1
    assert (levels[0] != levels[1]).mean() <= 1e-3
    assert not torch.equal(batch[0], batch[1])


def test_wrong_file_is_refused(tmp_path):
    other = {f"conv{i}.weight": torch.randn(8, 3, 3, 3) for i in range(3)}
    path = tmp_path / "other.pth"
    torch.save(other, path)
    with pytest.raises(
        AnnotatorFileError, match=r"other\.pth: not a lineart file \(expected sk_model\.pth, sk_model2\.pth\)"
    ):
        lineart.build(read_state_dict(str(path)), path.name)


def test_partial_file_is_refused(weights, tmp_path):
    partial = {k: v for k, v in weights.items() if not k.startswith("model4.")}
    path = tmp_path / "sk_model2.pth"
    torch.save(partial, path)
    with pytest.raises(AnnotatorFileError, match=r"sk_model2\.pth: not a lineart file.*missing.*model4\.1\."):
        lineart.build(read_state_dict(str(path)), path.name)
    reshaped = dict(weights, **{"model0.1.weight": torch.zeros(64, 4, 7, 7)})
    with pytest.raises(AnnotatorFileError, match=r"lineart file.*model0\.1\.weight: \(64, 4, 7, 7\)"):
        lineart.build(reshaped, "sk_model.pth")


def test_coarse_picks_the_file():
    assert lineart.file_for(False) == "sk_model.pth"
    assert lineart.file_for(True) == "sk_model2.pth"


@pytest.mark.parametrize("bad", [1, "yes", None])
def test_bad_coarse_raises(bad):
    with pytest.raises(ValueError, match=r"^coarse: expected True or False"):
        lineart.file_for(bad)


def test_bad_images_raise(net):
    with pytest.raises(ValueError, match=r"^images: expected B x H x W x 3"):
        lineart.detect(net, torch.zeros(1, 64, 64, 4))
