"""The shared value rules (controlnet.checks), the stack entry that uses them, and the node-input check
(nodes/inputs.py) applied to every preprocessor node. No host: the node modules are loaded from their files."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import numpy as np
import pytest
import torch
from cn_helpers import tiny_controlnet
from controlstack.controlnet import ControlNetError
from controlstack.controlnet.checks import check_int, check_window, finite_float
from controlstack.controlnet.stack import StackEntry

ROOT = pathlib.Path(__file__).resolve().parents[2]
NAN, INF = float("nan"), float("inf")


def _load(module: str):
    """nodes/<module>.py as controlstack.nodes.<module>, without nodes/__init__.py (which needs ComfyUI)."""
    name = f"controlstack.nodes.{module}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "nodes" / f"{module}.py")
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "controlstack.nodes"
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


inputs = _load("inputs")
preprocessor_nodes = _load("preprocessor_nodes")


# ---------------------------------------------------------------- the rules


@pytest.mark.parametrize("bad", [NAN, INF, -INF, np.float32("nan")])
def test_finite_float_refuses_non_finite_naming_the_input(bad):
    with pytest.raises(ControlNetError, match="strength: expected a finite number"):
        finite_float("strength", bad)


def test_finite_float_range_and_types():
    assert finite_float("x", 1) == 1.0 and isinstance(finite_float("x", 1), float)
    assert finite_float("x", np.float32(0.5), 0, 1) == 0.5
    assert (
        finite_float("x", 0.0, 0.0, 1.0) == 0.0 and finite_float("x", 1.0, 0.0, 1.0) == 1.0
    )  # bounds inclusive
    with pytest.raises(ControlNetError, match=r"cfg: expected a number in \[0, 100\], got 100.5"):
        finite_float("cfg", 100.5, 0, 100)
    with pytest.raises(ControlNetError, match=r"x: expected a number in \[-inf, 2\]"):
        finite_float("x", 3, hi=2)
    for bad in (True, "1.0", None, [1.0]):
        with pytest.raises(ControlNetError, match="x: expected a number"):
            finite_float("x", bad)


def test_check_int():
    assert check_int("steps", 3, 1, 10) == 3
    assert check_int("seed", np.uint64(2**63), 0, 2**64 - 1) == 2**63
    for bad in (512.0, NAN, True, "3"):
        with pytest.raises(ControlNetError, match="resolution: expected an int"):
            check_int("resolution", bad, 1, 16384)
    with pytest.raises(ControlNetError, match=r"resolution: expected an int in 1\.\.16384, got 0"):
        check_int("resolution", 0, 1, 16384)
    with pytest.raises(ControlNetError, match=r"f: expected an int in 1\.\., got 0"):
        check_int("f", 0, lo=1)


def test_check_window():
    assert check_window(0.2, 0.2) == (0.2, 0.2)
    assert check_window(0, 1) == (0.0, 1.0)
    with pytest.raises(ControlNetError, match=r"start_percent \(0.7\) must not be after end_percent \(0.3\)"):
        check_window(0.7, 0.3)
    with pytest.raises(ControlNetError, match="^node 5: start_percent: expected a finite number, got nan"):
        check_window(NAN, 0.5, "node 5")
    with pytest.raises(ControlNetError, match="end_percent: expected a number in"):
        check_window(0.0, 1.5)


# ---------------------------------------------------------------- the stack uses them


@pytest.fixture(scope="module")
def cn():
    return tiny_controlnet("sd1", seed=1)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"strength": NAN}, "n7: strength: expected a finite number"),
        ({"strength": -INF}, "n7: strength: expected a finite number"),
        ({"start_percent": NAN}, "n7: start_percent: expected a finite number"),
        ({"start_percent": 0.6, "end_percent": 0.4}, r"n7: start_percent \(0.6\) must not be after"),
        ({"end_percent": 1.2}, "n7: end_percent: expected a number in"),
        ({"scales": "last is NaN"}, r"n7: scales\[6\]: expected a finite number"),  # the tiny net has 7
    ],
)
def test_stack_entry_refuses_bad_numbers(cn, changes, message):
    hint = torch.rand(1, 3, 64, 64)
    StackEntry(cn, hint, label="n7")  # the defaults are fine
    if changes.get("scales") == "last is NaN":
        changes = {"scales": (1.0,) * (cn.num_residuals - 1) + (NAN,)}
    with pytest.raises(ControlNetError, match=message):
        StackEntry(cn, hint, label="n7", **changes)


# ---------------------------------------------------------------- every node input


class _Node:
    FUNCTION = "go"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "image": ("IMAGE",),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0}),
                "steps": ("INT", {"default": 2, "min": 1, "max": 100}),
                "mode": (["a", "b"],),
            },
            "optional": {"offset": ("FLOAT", {"default": 0.0})},  # no range: only finiteness
        }

    def go(self, image, strength, steps, mode, **extra):
        return (image, strength, steps, mode, extra)


def test_checked_node_refuses_bad_numbers_and_passes_good_ones():
    node = inputs.checked(type("Node", (_Node,), {}))()
    assert node.go("img", 2.5, 3, "a") == ("img", 2.5, 3, "a", {})
    assert node.go(image="img", strength=0.0, steps=1, mode="b", offset=-1e9)[4] == {"offset": -1e9}
    with pytest.raises(ControlNetError, match="strength: expected a finite number, got nan"):
        node.go(image="img", strength=NAN, steps=3, mode="a")
    with pytest.raises(ControlNetError, match=r"strength: expected a number in \[0, 10\], got 11"):
        node.go("img", 11.0, 3, "a")
    with pytest.raises(ControlNetError, match="steps: expected an int"):
        node.go("img", 1.0, 2.5, "a")
    with pytest.raises(ControlNetError, match="offset: expected a finite number"):
        node.go("img", 1.0, 2, "a", offset=INF)  # an optional input arriving through **kwargs


def test_checked_is_idempotent():
    cls = type("Node", (_Node,), {})
    once = inputs.checked(cls).go
    assert inputs.checked(cls).go is once


def _number_inputs(cls) -> list[tuple[str, str]]:
    types = cls.INPUT_TYPES()
    return [
        (name, spec[0])
        for section in ("required", "optional")
        for name, spec in types.get(section, {}).items()
        if spec[0] in ("INT", "FLOAT")
    ]


def _defaults(cls) -> dict:
    kw = {}
    for section in ("required", "optional"):
        for name, spec in cls.INPUT_TYPES().get(section, {}).items():
            if name not in ("image", "mask"):
                kw[name] = spec[1]["default"]
    return kw


PREPROCESSORS = inputs.checked_nodes(preprocessor_nodes.NODE_CLASS_MAPPINGS)
CASES = [
    (node_id, name, kind) for node_id, cls in PREPROCESSORS.items() for name, kind in _number_inputs(cls)
]


@pytest.mark.parametrize(("node_id", "name", "kind"), CASES, ids=[f"{n}.{i}" for n, i, _ in CASES])
def test_every_preprocessor_number_input_refuses_nan(node_id, name, kind):
    """Every INT / FLOAT input of every preprocessor node refuses NaN with a message naming it, before any work."""
    cls = PREPROCESSORS[node_id]
    kw = _defaults(cls) | {name: NAN}
    if node_id == "ControlStackInpaintPreprocessor":
        kw["mask"] = torch.ones(1, 8, 8)
    expected = "expected a finite number" if kind == "FLOAT" else "expected an int"
    with pytest.raises(ControlNetError, match=f"^{name}: {expected}"):
        getattr(cls(), cls.FUNCTION)(image=torch.rand(1, 8, 8, 3), **kw)


def test_there_are_float_inputs_to_check():
    kinds = [kind for *_, kind in CASES]
    assert kinds.count("FLOAT") >= 2 and kinds.count("INT") >= 10
