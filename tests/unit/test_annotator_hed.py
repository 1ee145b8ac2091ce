"""HED annotator (preprocessors/annotators/hed.py) against controlnet_aux 0.0.10's HEDdetector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from annotator_refs.frames import photo, shapes, to_images, to_uint8
from annotator_refs.hed import published_state_dict, reference_detect, reference_network
from controlstack.preprocessors.annotators import hed
from controlstack.preprocessors.annotators.common import AnnotatorFileError, read_state_dict
from numerics import rel_err

pytestmark = pytest.mark.unit

OPTIONS = [{}, {"safe": True}, {"scribble": True}, {"safe": True, "scribble": True}]


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return published_state_dict(0)


@pytest.fixture(scope="module")
def net(weights, tmp_path_factory) -> hed.HEDNetwork:
    # Through a real file in the published format (a bare state dict pickle), read by the pack's loader.
    path = tmp_path_factory.mktemp("hed") / "ControlNetHED.pth"
    torch.save(weights, path)
    return hed.build(read_state_dict(str(path)), path.name)


def test_network_matches_reference(weights, net):
    """Each of the five side projections equals the reference network's (relative error <= 1e-4)."""
    x = torch.from_numpy(photo()).float().permute(2, 0, 1)[None]
    with torch.no_grad():
        expected = reference_network(weights)(x)
        ours = net(x)
    assert len(ours) == len(expected) == 5
    errors = [rel_err(a, b) for a, b in zip(ours, expected, strict=True)]
    assert max(errors) <= 1e-4, errors
    assert all(a.shape == b.shape for a, b in zip(ours, expected, strict=True))


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "default")
def test_hint_bit_identical_to_reference(weights, net, options):
    """On the CPU the hint is bit-identical to HEDdetector's (max gray-level difference 0) in every mode, and not
    degenerate (the random weights give a hint with real variation)."""
    image = photo()
    expected = reference_detect(weights, [image], **options)[0]
    ours = to_uint8(hed.detect(net, to_images(image), **options)[0])
    assert ours.shape == expected.shape == (64, 128, 3)
    assert np.abs(ours.astype(int) - expected).max() == 0
    assert expected.std() / 255.0 > 0.02


def test_device_resize_path_within_one_level(net):
    """The torch resize/mean used on GPUs (cv2's float resize is IPP, an ulp off torch's bilinear) gives levels
    within 1 of the CPU path's (bit-exact) levels."""
    images = to_images(photo(), shapes())
    with torch.inference_mode():
        projections = net(hed.quantised_pixels(images, net))
        exact = hed._mean_edge_cv2(projections, 64, 128)
        device = hed._mean_edge_torch(projections, 64, 128)
    assert (exact - device).abs().max().item() < 1e-5
    levels = [hed.to_levels(1.0 / (1.0 + torch.exp(-m.double()))).int() for m in (exact, device)]
    assert (levels[0] - levels[1]).abs().max().item() <= 1


def test_batch_equals_single_frames(net):
    """Three different frames in one batched forward give the three single-frame hints, to within 1 gray level
    on at most 0.1% of the pixels: oneDNN may pick another conv kernel for a batch, whose float32 rounding can
    move a level boundary (measured here: HED exact, PiDiNet 1 pixel of 3 x 8192 off by 1)."""
    frames = [photo(), shapes(), photo()[::-1].copy()]
    batch = hed.detect(net, to_images(*frames))
    assert batch.shape == (3, 64, 128, 3) and batch.dtype == torch.float32
    singles = torch.cat([hed.detect(net, to_images(frame)) for frame in frames])
    levels = (to_uint8(batch).astype(int), to_uint8(singles).astype(int))
    assert np.abs(levels[0] - levels[1]).max() <= 1
    assert (levels[0] != levels[1]).mean() <= 1e-3
    assert not torch.equal(batch[0], batch[1])


def test_wrong_file_is_refused(tmp_path):
    other = {f"conv{i}.weight": torch.randn(8, 3, 3, 3) for i in range(3)}
    path = tmp_path / "other.pth"
    torch.save(other, path)
    with pytest.raises(
        AnnotatorFileError, match=r"other\.pth: not an HED file \(expected ControlNetHED\.pth\)"
    ):
        hed.build(read_state_dict(str(path)), path.name)


def test_partial_file_is_refused(weights, tmp_path):
    partial = {k: v for k, v in weights.items() if not k.startswith("block5.")}
    path = tmp_path / "ControlNetHED.pth"
    torch.save(partial, path)
    with pytest.raises(AnnotatorFileError, match=r"ControlNetHED\.pth: not an HED file.*missing.*block5\."):
        hed.build(read_state_dict(str(path)), path.name)
    reshaped = dict(weights, norm=torch.zeros(1, 4, 1, 1))
    with pytest.raises(AnnotatorFileError, match=r"HED file.*norm: \(1, 4, 1, 1\)"):
        hed.build(reshaped, "ControlNetHED.pth")


@pytest.mark.parametrize("option", ["safe", "scribble"])
@pytest.mark.parametrize("bad", [1, "yes", None])
def test_bad_option_raises(net, option, bad):
    with pytest.raises(ValueError, match=rf"^{option}: expected True or False"):
        hed.detect(net, to_images(shapes(64, 64)), **{option: bad})
