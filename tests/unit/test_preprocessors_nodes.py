"""The preprocessor node classes without a host: ids, display names, INPUT_TYPES, and one run each."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import controlstack.preprocessors as P
import pytest
import torch

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _load_nodes_module():
    """Import nodes/preprocessor_nodes.py as ``controlstack.nodes.preprocessor_nodes``.

    Loaded from its file so that the package's nodes/__init__.py (which also imports the host-bound node
    modules, e.g. ``folder_paths``) is not needed: this module itself must import without ComfyUI.
    """
    name = "controlstack.nodes.preprocessor_nodes"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "nodes" / "preprocessor_nodes.py")
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "controlstack.nodes"
    spec.loader.exec_module(module)
    return module


nodes = _load_nodes_module()
COMMON = ("image", "resolution", "pixel_perfect", "target_width", "target_height")


def test_ids_names_and_category():
    assert nodes.NODE_CLASS_MAPPINGS.keys() == nodes.NODE_DISPLAY_NAME_MAPPINGS.keys()
    assert len(nodes.NODE_CLASS_MAPPINGS) == 10
    for node_id, cls in nodes.NODE_CLASS_MAPPINGS.items():
        assert node_id.startswith("ControlStack") and node_id.endswith("Preprocessor")
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id].endswith(" (ControlStack)")
        assert cls.CATEGORY == "ControlStack/preprocessors"
        assert cls.RETURN_TYPES == ("IMAGE",)
        assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 20
        assert callable(getattr(cls, cls.FUNCTION))
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["ControlStackCannyPreprocessor"] == "Canny Edges (ControlStack)"


@pytest.mark.parametrize("node_id", sorted(nodes.NODE_CLASS_MAPPINGS))
def test_input_types_have_common_inputs_and_tooltips(node_id):
    types = nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
    assert tuple(types["required"])[: len(COMMON)] == COMMON
    assert types["optional"]["resize_mode"][0] == list(P.RESIZE_MODES)
    for section in ("required", "optional"):
        for name, spec in types[section].items():
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
            if spec[0] in ("INT", "FLOAT"):
                assert spec[1]["min"] <= spec[1]["default"] <= spec[1]["max"], name


def _defaults(cls) -> dict:
    types = cls.INPUT_TYPES()
    kw = {}
    for name, spec in types["required"].items():
        if name in ("image", "mask"):
            continue
        kw[name] = spec[1]["default"]
    return kw


@pytest.mark.parametrize("node_id", sorted(nodes.NODE_CLASS_MAPPINGS))
def test_each_node_runs_on_a_batch(node_id):
    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    kw = _defaults(cls) | {"resolution": 128}
    if node_id == "ControlStackInpaintPreprocessor":
        kw["mask"] = torch.ones(1, 60, 90)
    (out,) = getattr(cls(), cls.FUNCTION)(image=torch.rand(3, 60, 90, 3), **kw)
    assert out.shape == (3, 128, 192, 3) and out.dtype == torch.float32
    lo = -1.0 if node_id == "ControlStackInpaintPreprocessor" else 0.0
    assert out.min() >= lo and out.max() <= 1.0


def _edge_lines(edges: torch.Tensor) -> tuple[list[int], list[int]]:
    """Rows and columns that hold a long run of edge pixels (the sides of an axis-aligned rectangle)."""
    on = edges[..., 0] > 0.5
    rows = torch.nonzero(on.sum(dim=1) > on.shape[1] // 4).flatten().tolist()
    cols = torch.nonzero(on.sum(dim=0) > on.shape[0] // 4).flatten().tolist()
    return rows, cols


def _near(found: list[int], expected: float, slack: float = 2.0) -> bool:
    return any(abs(v - expected) <= slack for v in found)


@pytest.mark.parametrize(
    ("pixel_perfect", "resize_mode", "size", "scale"),
    [
        (False, "crop and resize", (128, 213), 128 / 300),  # resolution 128: 300 x 500 -> 128 x 213.3
        (True, "resize and fill", (307, 512), 1.024),  # onto 512 x 512: k = min(512/300, 512/500) = 1.024
        (True, "crop and resize", (512, 853), 512 / 300),  # k = max(...) = 1.7067: 500 -> 853.3
    ],
)
def test_canny_node_draws_the_rectangle_where_it_is(pixel_perfect, resize_mode, size, scale):
    # A white rectangle (rows 100..199, cols 150..349) on black, 300 x 500: the hint's edges must be the
    # rectangle's sides scaled by the hand-computed factor, in every frame of the batch.
    img = torch.zeros(2, 300, 500, 3)
    img[:, 100:200, 150:350] = 1.0
    cls = nodes.NODE_CLASS_MAPPINGS["ControlStackCannyPreprocessor"]
    kw = _defaults(cls) | {"resolution": 128, "pixel_perfect": pixel_perfect}
    (out,) = cls().run(image=img, resize_mode=resize_mode, **kw | {"target_width": 512, "target_height": 512})
    assert out.shape == (2, *size, 3)
    assert torch.equal(out[0], out[1])
    assert set(out.unique().tolist()) == {0.0, 1.0}
    rows, cols = _edge_lines(out[0])
    for side in (100, 200):
        assert _near(rows, side * scale - 0.5), (side * scale, rows)
    for side in (150, 350):
        assert _near(cols, side * scale - 0.5), (side * scale, cols)
    assert len(rows) <= 6 and len(cols) <= 6  # the four sides, nothing else


def _run(node_id: str, image: torch.Tensor, **params) -> torch.Tensor:
    """The node at the image's own size (resolution = short side: no resampling)."""
    cls = nodes.NODE_CLASS_MAPPINGS[node_id]
    kw = _defaults(cls) | {"resolution": min(image.shape[1:3])} | params
    (out,) = getattr(cls(), cls.FUNCTION)(image=image, **kw)
    return out


def test_nodes_give_known_values_on_known_images():
    v = torch.tensor([0, 51, 102, 204, 255], dtype=torch.float32) / 255  # exact 8-bit levels
    gray = v.repeat(64, 13)[:, :64, None].expand(64, 64, 3)[None]  # columns cycle through the levels
    col = torch.arange(64) % 5
    # invert: 1 - x on 8-bit levels
    assert torch.allclose(_run("ControlStackInvertPreprocessor", gray), 1 - gray, atol=1e-6)
    # threshold 127 (every channel above it): the levels 204 and 255 are white
    thr = _run("ControlStackThresholdPreprocessor", gray, threshold=127)[0, 0, :, 0]
    assert torch.equal(thr, (col >= 3).float())
    # binary fixed at 102: luma <= 102 -> white
    binary = _run("ControlStackBinaryPreprocessor", gray, mode="fixed", threshold=102)[0, 0, :, 0]
    assert torch.equal(binary, (col <= 2).float())
    # colour palette of an image of flat 64 px blocks: the image itself
    blocks = torch.zeros(1, 64, 128, 3)
    blocks[:, :, :64] = torch.tensor([51, 102, 204]) / 255
    blocks[:, :, 64:] = torch.tensor([255, 0, 102]) / 255
    assert torch.allclose(_run("ControlStackColorPreprocessor", blocks, block_size=64), blocks, atol=1e-6)
    # a flat image has no lines, no edges, no strokes, and stays flat under tile and shuffle
    flat = torch.full((1, 64, 64, 3), 102 / 255)
    for node_id in (
        "ControlStackCannyPreprocessor",
        "ControlStackLineartStandardPreprocessor",
        "ControlStackScribblePreprocessor",
    ):
        assert _run(node_id, flat).max() == 0, node_id
    for node_id in ("ControlStackTilePreprocessor", "ControlStackShufflePreprocessor"):
        assert torch.allclose(_run(node_id, flat), flat, atol=1e-6), node_id
    # inpaint: -1 exactly under the mask (> 0.5), the image elsewhere
    mask = torch.zeros(1, 64, 64)
    mask[:, 10:30, 20:50] = 0.75
    hint = _run("ControlStackInpaintPreprocessor", gray, mask=mask)
    assert (hint[0, 10:30, 20:50] == -1).all()
    keep = mask[0] == 0
    assert torch.allclose(hint[0][keep], gray[0][keep], atol=1e-6)


def test_node_errors_are_value_errors():
    cls = nodes.NODE_CLASS_MAPPINGS["ControlStackCannyPreprocessor"]
    kw = _defaults(cls)
    with pytest.raises(ValueError, match="images"):
        cls().run(image=torch.zeros(0, 64, 64, 3), **kw)
    with pytest.raises(ValueError, match="low_threshold"):
        cls().run(image=torch.rand(1, 64, 64, 3), **(kw | {"low_threshold": 250, "high_threshold": 10}))
