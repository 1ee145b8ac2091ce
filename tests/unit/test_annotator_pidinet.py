"""PiDiNet annotator (preprocessors/annotators/pidinet.py) against controlnet_aux 0.0.10's PidiNetDetector."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from annotator_refs.frames import photo, shapes, to_images, to_uint8
from annotator_refs.hed import published_state_dict as hed_state_dict
from annotator_refs.pidinet import published_state_dict, reference_detect, reference_network
from controlstack.preprocessors.annotators import pidinet
from controlstack.preprocessors.annotators.common import AnnotatorFileError, read_state_dict
from numerics import rel_err

pytestmark = pytest.mark.unit

OPTIONS = [
    {},
    {"safe": True},
    {"scribble": True},
    {"apply_filter": True},
    {"safe": True, "scribble": True},
]


@pytest.fixture(scope="module")
def published() -> dict:
    return published_state_dict(0)


@pytest.fixture(scope="module")
def net(published, tmp_path_factory) -> pidinet.PiDiNetNetwork:
    # The published layout, {"state_dict": {"module." + key: tensor}}, through a real file and the pack's loader.
    path = tmp_path_factory.mktemp("pidinet") / "table5_pidinet.pth"
    torch.save(published, path)
    return pidinet.build(read_state_dict(str(path)), path.name)


def test_published_layout(published):
    assert set(published) == {"epoch", "state_dict"}
    assert all(k.startswith("module.") for k in published["state_dict"])
    assert "module.block2_1.shortcut.weight" in published["state_dict"]


def test_network_matches_reference(published, net):
    """The fused edge map equals the reference pidinet()'s last output (relative error <= 1e-4; it is exact:
    the same difference kernels in the same arithmetic)."""
    x = torch.from_numpy(photo()[:, :, ::-1].copy()).float().permute(2, 0, 1)[None] / 255.0
    with torch.no_grad():
        expected = reference_network(published)(x)[-1]
        ours = net(x)
    assert ours.shape == expected.shape == (1, 1, 64, 128)
    assert rel_err(ours, expected) <= 1e-4
    assert expected.std().item() > 0.05  # not saturated: the test can see a wrong op


@pytest.mark.parametrize("op", ["cd", "ad", "rd"])
def test_each_difference_op_matches_reference(op):
    """Each pixel-difference conv against the reference's createConvFunc on its own (depthwise, as in blocks)."""
    from controlnet_aux.pidi.model import createConvFunc

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 16, 24, generator=g)
    conv = pidinet.PixelDifferenceConv(op, 6, 6, groups=6)
    conv.weight.data = torch.randn(6, 1, 3, 3, generator=g)
    expected = createConvFunc(op)(x, conv.weight, None, 1, 1, 1, 6)
    assert rel_err(conv(x).detach(), expected) <= 1e-6


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(o) or "default")
def test_hint_bit_identical_to_reference(published, net, options):
    """On the CPU the hint is bit-identical to PidiNetDetector's (max gray-level difference 0) in every mode, and
    not degenerate."""
    image = photo()
    expected = reference_detect(published, [image], **options)[0]
    ours = to_uint8(pidinet.detect(net, to_images(image), **options)[0])
    assert ours.shape == expected.shape == (64, 128, 3)
    assert np.abs(ours.astype(int) - expected).max() == 0
    assert expected.std() / 255.0 > 0.02


def test_batch_equals_single_frames(net):
    """Three different frames in one batched forward give the three single-frame hints, to within 1 gray level
    on at most 0.1% of the pixels: oneDNN may pick another conv kernel for a batch, whose float32 rounding can
    move a level boundary (measured here: HED exact, PiDiNet 1 pixel of 3 x 8192 off by 1)."""
    frames = [photo(), shapes(), photo()[::-1].copy()]
    batch = pidinet.detect(net, to_images(*frames))
    assert batch.shape == (3, 64, 128, 3) and batch.dtype == torch.float32
    singles = torch.cat([pidinet.detect(net, to_images(frame)) for frame in frames])
    levels = (to_uint8(batch).astype(int), to_uint8(singles).astype(int))
    assert np.abs(levels[0] - levels[1]).max() <= 1
    assert (levels[0] != levels[1]).mean() <= 1e-3
    assert not torch.equal(batch[0], batch[1])


def test_wrong_file_is_refused(tmp_path):
    for name, sd in (
        ("other.pth", {f"conv{i}.weight": torch.randn(8, 3, 3, 3) for i in range(3)}),
        ("ControlNetHED.pth", hed_state_dict(1)),
    ):
        path = tmp_path / name
        torch.save(sd, path)
        with pytest.raises(
            AnnotatorFileError, match=rf"{name}: not a PiDiNet file \(expected table5_pidinet\.pth\)"
        ):
            pidinet.build(read_state_dict(str(path)), name)


def test_partial_file_is_refused(published, tmp_path):
    inner = published["state_dict"]
    partial = {
        "state_dict": {k: v for k, v in inner.items() if ".attentions." not in k and "classifier" not in k}
    }
    path = tmp_path / "table5_pidinet.pth"
    torch.save(partial, path)
    with pytest.raises(
        AnnotatorFileError, match=r"table5_pidinet\.pth: not a PiDiNet file.*missing.*attentions"
    ):
        pidinet.build(read_state_dict(str(path)), path.name)
    # The converted layout (rd kernels as 5x5 vanilla convs) is another network: refused by shape.
    converted = {k.removeprefix("module."): v for k, v in inner.items()}
    converted["block1_2.conv1.weight"] = torch.zeros(60, 1, 5, 5)
    with pytest.raises(AnnotatorFileError, match=r"block1_2\.conv1\.weight: \(60, 1, 5, 5\)"):
        pidinet.build(converted, "table5_pidinet.pth")


@pytest.mark.parametrize("option", ["safe", "scribble", "apply_filter"])
@pytest.mark.parametrize("bad", [1, "yes", None])
def test_bad_option_raises(net, option, bad):
    with pytest.raises(ValueError, match=rf"^{option}: expected True or False"):
        pidinet.detect(net, to_images(shapes(64, 64)), **{option: bad})
