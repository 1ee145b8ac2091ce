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


def test_canny_node_equals_the_function_and_honours_pixel_perfect():
    cls = nodes.NODE_CLASS_MAPPINGS["ControlStackCannyPreprocessor"]
    images = torch.rand(2, 300, 500, 3)
    kw = _defaults(cls) | {"pixel_perfect": True, "target_width": 512, "target_height": 512}
    (out,) = cls().run(image=images, resize_mode="resize and fill", **kw)
    assert out.shape == (2, 307, 512, 3)
    ref = P.run_preprocessor(P.canny, images, 307, low_threshold=100, high_threshold=200)
    assert torch.equal(out, ref)


def test_node_errors_are_value_errors():
    cls = nodes.NODE_CLASS_MAPPINGS["ControlStackCannyPreprocessor"]
    kw = _defaults(cls)
    with pytest.raises(ValueError, match="images"):
        cls().run(image=torch.zeros(0, 64, 64, 3), **kw)
    with pytest.raises(ValueError, match="low_threshold"):
        cls().run(image=torch.rand(1, 64, 64, 3), **(kw | {"low_threshold": 250, "high_threshold": 10}))
