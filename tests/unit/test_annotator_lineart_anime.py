"""Anime line-art annotator (preprocessors/annotators/lineart_anime.py) against controlnet_aux 0.0.10's
LineartAnimeDetector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from annotator_refs.frames import photo, shapes, to_images, to_uint8
from annotator_refs.lineart_anime import published_state_dict, reference_detect, reference_network
from controlstack.preprocessors.annotators import lineart_anime
from controlstack.preprocessors.annotators.common import AnnotatorFileError, read_state_dict
from numerics import rel_err

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return published_state_dict(0)


@pytest.fixture(scope="module")
def net(weights, tmp_path_factory) -> lineart_anime.AnimeLineartNetwork:
    # Through a real file in the published format (module.-prefixed bare state dict), read by the pack's loader,
    # which strips the DataParallel prefix.
    path = tmp_path_factory.mktemp("lineart_anime") / "netG.pth"
    torch.save(weights, path)
    return lineart_anime.build(read_state_dict(str(path)), path.name)


def test_published_layout_is_prefixed(weights):
    assert all(k.startswith("module.model.model.") for k in weights)


def test_network_matches_reference(weights, net):
    """The raw U-Net output equals the reference UnetGenerator's (relative error <= 1e-4), at 256 x 256."""
    x = torch.from_numpy(photo(256, 256)).float().permute(2, 0, 1)[None] / 127.5 - 1.0
    with torch.no_grad():
        expected = reference_network(weights)(x)
        ours = net(x)
    assert ours.shape == expected.shape == (1, 1, 256, 256)
    assert rel_err(ours, expected) <= 1e-4


@pytest.mark.parametrize("size", [(64, 128), (256, 256)], ids=["resized-to-256", "already-256"])
def test_hint_bit_identical_to_reference(weights, net, size):
    """On the CPU the hint is bit-identical to LineartAnimeDetector's (max gray-level difference 0), both for a
    frame the reference resizes to 256 x 256 and back (bicubic both ways) and for one that is already a multiple
    of 256, and not degenerate (the random weights give a hint with real variation)."""
    image = photo(*size)
    expected = reference_detect(weights, [image])[0]
    ours = to_uint8(lineart_anime.detect(net, to_images(image))[0])
    assert ours.shape == expected.shape == (*size, 3)
    assert np.abs(ours.astype(int) - expected).max() == 0
    assert expected.std() / 255.0 > 0.02


def test_batch_equals_single_frames(net):
    """Three different frames in one batched forward give the three single-frame hints, to within 1 gray level
    on at most 0.1% of the pixels (oneDNN may pick another conv kernel for a batch, whose float32 rounding can
    move a truncation boundary)."""
    frames = [photo(), shapes(), photo()[::-1].copy()]
    batch = lineart_anime.detect(net, to_images(*frames))
    assert batch.shape == (3, 64, 128, 3) and batch.dtype == torch.float32
    singles = torch.cat([lineart_anime.detect(net, to_images(frame)) for frame in frames])
    levels = (to_uint8(batch).astype(int), to_uint8(singles).astype(int))
    assert np.abs(levels[0] - levels[1]).max() <= 1
    assert (levels[0] != levels[1]).mean() <= 1e-3
    assert not torch.equal(batch[0], batch[1])


def test_wrong_file_is_refused(tmp_path):
    other = {f"conv{i}.weight": torch.randn(8, 3, 3, 3) for i in range(3)}
    path = tmp_path / "other.pth"
    torch.save(other, path)
    with pytest.raises(
        AnnotatorFileError, match=r"other\.pth: not a lineart \(anime\) file \(expected netG\.pth\)"
    ):
        lineart_anime.build(read_state_dict(str(path)), path.name)


def test_partial_file_is_refused(weights, tmp_path):
    outermost = "module.model.model.3."
    partial = {k: v for k, v in weights.items() if not k.startswith(outermost)}
    path = tmp_path / "netG.pth"
    torch.save(partial, path)
    with pytest.raises(
        AnnotatorFileError, match=r"netG\.pth: not a lineart \(anime\) file.*missing.*model\.model\.3\."
    ):
        lineart_anime.build(read_state_dict(str(path)), path.name)
    reshaped = read_state_dict(dict(weights, **{"module.model.model.0.weight": torch.zeros(64, 4, 4, 4)}))
    with pytest.raises(
        AnnotatorFileError, match=r"lineart \(anime\) file.*model\.model\.0\.weight: \(64, 4, 4, 4\)"
    ):
        lineart_anime.build(reshaped, "netG.pth")


def test_bad_images_raise(net):
    with pytest.raises(ValueError, match=r"^images: expected B x H x W x 3"):
        lineart_anime.detect(net, torch.zeros(1, 64, 64, 4))
