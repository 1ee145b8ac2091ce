"""The one IMAGE -> hint conversion (preprocessors.hint) and the one inpaint hint (preprocessors.inpaint_hint).

Expected values are written out by hand (or by plain per-pixel formulas), not by calling the code under test.
"""

from __future__ import annotations

import controlstack.preprocessors as P
import numpy as np
import pytest
import torch
from controlstack.controlnet import ControlNetError
from controlstack.preprocessors.hint import HINT_RANGE, image_to_hint


def test_rgb_is_moved_to_channels_first_unchanged():
    image = torch.rand(2, 5, 7, 3)
    hint = image_to_hint(image)
    assert hint.shape == (2, 3, 5, 7) and hint.dtype == torch.float32 and hint.is_contiguous()
    for c in range(3):
        assert torch.equal(hint[:, c], image[..., c])


def test_inpaint_minus_one_survives_exactly():
    """The bug this module fixes: ApplyHint clamped to [0, 1], so masked pixels (-1) reached the ControlNet as 0."""
    image = torch.rand(1, 4, 4, 3)
    image[0, 1:3, 1:3] = -1.0
    hint = image_to_hint(image)
    assert int((hint == -1.0).sum()) == 3 * 4  # 4 masked pixels x 3 channels, not one clamped to 0
    assert torch.equal(hint[0, :, 0, 0], image[0, 0, 0])  # the picture itself untouched


def test_only_values_no_hint_can_hold_are_clamped():
    values = torch.tensor([-3.0, -1.0, -0.25, 0.0, 0.5, 1.0, 1.7])
    image = values.view(1, 1, -1, 1).expand(1, 1, -1, 3)
    got = image_to_hint(image)[0, 0, 0]
    assert got.tolist() == [-1.0, -1.0, -0.25, 0.0, 0.5, 1.0, 1.0]
    assert HINT_RANGE == (-1.0, 1.0)


def test_grayscale_is_repeated():
    gray = torch.rand(1, 3, 2, 1)
    hint = image_to_hint(gray)
    assert hint.shape == (1, 3, 3, 2)
    for c in range(3):
        assert torch.equal(hint[0, c], gray[0, ..., 0])


def test_rgba_is_composited_onto_black():
    rgba = torch.tensor([[[[0.8, 0.4, 0.2, 0.25], [0.8, 0.4, 0.2, 0.0], [0.8, 0.4, 0.2, 1.0]]]])
    hint = image_to_hint(rgba)[0, :, 0]
    expected = torch.tensor(
        [[0.2, 0.1, 0.05], [0.0, 0.0, 0.0], [0.8, 0.4, 0.2]]
    ).T  # colour x alpha + 0 x (1 - a)
    assert torch.allclose(hint, expected, atol=1e-7)


def test_the_one_rgba_rule_is_shared_with_the_preprocessors():
    """Preprocessor inputs (uint8, onto white) and hints (float, onto black) composite with the same function."""
    color, alpha = np.array([200.0, 100.0, 0.0]), 0.25
    assert np.allclose(P.composite_rgba(color, alpha, 255.0), [241.25, 216.25, 191.25])  # 0.25 c + 0.75 x 255
    rgba = np.array([[[200, 100, 0, 64]]], np.uint8)  # alpha 64 / 255
    a = 64 / 255
    assert P.hwc3(rgba)[0, 0].tolist() == [round(c * a + 255 * (1 - a)) for c in (200, 100, 0)]


def test_half_precision_in_float32_out():
    image = torch.rand(1, 4, 4, 3).half()
    hint = image_to_hint(image)
    assert hint.dtype == torch.float32 and torch.equal(hint, image.float().movedim(-1, 1))


def test_input_is_not_modified():
    image = torch.full((1, 1, 1, 3), 5.0)
    image_to_hint(image)
    assert (image == 5.0).all()


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (torch.rand(4, 4, 3), "B x H x W x 1, 3 or 4"),
        (torch.rand(1, 4, 4, 2), "B x H x W x 1, 3 or 4"),
        (torch.rand(0, 4, 4, 3), "B x H x W x 1, 3 or 4"),
        (torch.zeros(1, 4, 4, 3, dtype=torch.uint8), "float"),
        (torch.tensor([[[[0.5, float("nan"), 0.5]]]]), "NaN or infinite"),
        (torch.tensor([[[[0.5, float("-inf"), 0.5]]]]), "NaN or infinite"),
        (np.zeros((1, 4, 4, 3), np.float32), "tensor"),
    ],
    ids=["3d", "2ch", "empty", "uint8", "nan", "inf", "numpy"],
)
def test_bad_images_name_the_input(image, message):
    with pytest.raises(ControlNetError, match=f"image: .*{message}"):
        image_to_hint(image)


# ---------------------------------------------------------------- the inpaint hint, end to end


def test_inpaint_hint_marks_the_mask_and_keeps_the_picture():
    """Same size (resolution = short side): the 8-bit picture outside the mask, exactly -1 inside."""
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 256, (2, 64, 96, 3)).astype(np.float32)
    images = torch.from_numpy(pixels / 255.0)
    mask = torch.zeros(1, 64, 96)  # one mask shared by both images
    mask[0, 10:30, 20:50] = 1.0
    mask[0, 40, 5] = 0.5  # not above the threshold: kept
    out = P.run_inpaint(images, mask, 64)
    assert out.shape == (2, 64, 96, 3) and out.dtype == torch.float32
    masked = (mask[0] > 0.5)[None, ..., None].expand_as(out)
    assert (out[masked] == P.MASKED).all() and int(masked.sum()) == 2 * 20 * 30 * 3
    assert torch.allclose(out[~masked], torch.from_numpy(pixels / 255.0)[~masked], rtol=0, atol=1e-7)


def test_inpaint_hint_reaches_the_control_module_with_its_minus_ones():
    """The documented path photo -> inpaint hint -> ApplyHint: every masked pixel arrives as -1, the rest as is."""
    images = torch.rand(1, 64, 64, 3)
    mask = (torch.rand(1, 64, 64) > 0.5).float()
    hint = image_to_hint(P.run_inpaint(images, mask, 64))
    n_masked = int(mask.sum())
    assert 0 < n_masked < 64 * 64
    assert int((hint == -1.0).sum()) == 3 * n_masked
    assert hint.min() == -1.0 and (hint[:, :, mask[0] == 0] >= 0).all()


def test_inpaint_hint_bad_masks():
    images = torch.rand(2, 16, 16, 3)
    with pytest.raises(ValueError, match="mask: expected a batch of 1 or 2"):
        P.run_inpaint(images, torch.zeros(3, 16, 16), 16)
    with pytest.raises(ValueError, match="mask: expected a non-empty"):
        P.run_inpaint(images, torch.zeros(1, 0, 16), 16)
