"""Every number input of every node, checked where the node runs: finite, an int where an int is declared, within
the declared min / max.

Why here and not only in the host: ComfyUI 0.3.75 validates a widget value with ``val < min`` / ``val > max``, and
NaN fails both comparisons, so ``strength = NaN`` in an API prompt passes its validation and would render silently;
a value that arrives through a link (a primitive or math node) is not range-checked by the host at all. So every
registered node class is wrapped (``checked_nodes``, in nodes/__init__.py) to check the INT / FLOAT inputs it
declares in ``INPUT_TYPES`` before its function runs: one rule for all nodes, the declaration as the one home of
each range. The rules themselves are ``controlnet.checks`` (shared with the stack and the preprocessors).

Imports no host module (unit tests load it without ComfyUI).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from ..controlnet.checks import check_int, check_window, finite_float

__all__ = ["check_int", "check_node_inputs", "check_window", "checked", "checked_nodes", "finite_float"]

N = TypeVar("N", bound=type)

_NUMBER_TYPES = ("INT", "FLOAT")
_specs: dict[type, dict[str, tuple[str, dict]]] = {}


def number_inputs(cls: type) -> dict[str, tuple[str, dict]]:
    """name -> ("INT" | "FLOAT", options) of every number input ``cls`` declares (required and optional).

    Read once per class: ranges are constants, while INPUT_TYPES itself may list files (cheap, but not free).
    """
    specs = _specs.get(cls)
    if specs is None:
        declared = cls.INPUT_TYPES()
        specs = {
            name: (spec[0], dict(spec[1]) if len(spec) > 1 else {})
            for section in ("required", "optional")
            for name, spec in declared.get(section, {}).items()
            if isinstance(spec, (tuple, list)) and spec and spec[0] in _NUMBER_TYPES
        }
        _specs[cls] = specs
    return specs


def check_node_inputs(cls: type, values: Mapping[str, Any]) -> None:
    """Check every INT / FLOAT input of ``cls`` present in ``values`` against its declaration.

    FLOAT: a finite number within [min, max]; INT: an int within [min, max]. Raises ``ControlNetError`` naming the
    input. Inputs the node does not declare as numbers are left alone.
    """
    specs = number_inputs(cls)
    for name, value in values.items():
        spec = specs.get(name)
        if spec is None:
            continue
        kind, options = spec
        check = finite_float if kind == "FLOAT" else check_int
        check(name, value, options.get("min"), options.get("max"))


def checked(cls: N) -> N:
    """Wrap ``cls.FUNCTION`` so that every call checks the node's number inputs first (idempotent)."""
    name = cls.FUNCTION
    fn: Callable = getattr(cls, name)
    if getattr(fn, "_controlstack_checked", False):
        return cls
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def run(self, *args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(self, *args, **kwargs).arguments
        values: dict[str, Any] = {}
        for param, value in bound.items():
            if signature.parameters[param].kind is inspect.Parameter.VAR_KEYWORD:
                values.update(value)  # e.g. a preprocessor node's **params
            else:
                values[param] = value
        check_node_inputs(cls, values)
        return fn(self, *args, **kwargs)

    run._controlstack_checked = True  # type: ignore[attr-defined]
    setattr(cls, name, run)
    return cls


def checked_nodes(mapping: Mapping[str, N]) -> dict[str, N]:
    """``checked`` applied to every class of a NODE_CLASS_MAPPINGS; returns the mapping as a dict."""
    return {node_id: checked(cls) for node_id, cls in mapping.items()}
