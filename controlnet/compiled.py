"""Opt-in `torch.compile` of the control modules' forwards (the patcher turns it on with CONTROLSTACK_COMPILE=1).

One `CompiledForwards` belongs to one stack (the patcher keeps it beside the stack's CUDA graphs) and outlives its
sampling runs: each module is wrapped once, and torch's compile cache, guarded on the module and the input shapes,
makes the first call of a shape compile and every later call (later steps, later runs) reuse it. On CUDA the
compiled kernels run inside the stack's CUDA graphs like eager ones: the first sight of a layout (the graphs' eager
warm-up) is where compiling happens, never inside a capture.

Compiling is an optimisation: a module whose compile fails (no C/C++ compiler or Triton for the backend, an
unsupported op) is logged once and runs eagerly from then on; errors about the inputs themselves are the module's
own and pass through unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from .errors import ControlNetError

log = logging.getLogger(__name__)


class CompiledForwards:
    """The compiled forward of each control module of a stack; `call(module, ...)` runs it."""

    def __init__(self, backend: str | Callable = "inductor") -> None:
        """`backend`: torch.compile's backend ("inductor" by default; tests pass a counting stand-in)."""
        self.backend = backend
        self._compiled: dict[int, tuple[torch.nn.Module, Callable]] = {}
        self._failed: set[int] = set()

    def __deepcopy__(self, memo: dict) -> CompiledForwards:
        return CompiledForwards(self.backend)  # host options are deep-copied at times; compiled code is not

    def call(self, module: torch.nn.Module, *args, **kwargs):
        """`module(*args, **kwargs)` through its compiled forward (eagerly once its compile has failed)."""
        if id(module) in self._failed:
            return module(*args, **kwargs)
        hit = self._compiled.get(id(module))
        if hit is None or hit[0] is not module:
            hit = (module, torch.compile(module, backend=self.backend, dynamic=False))
            self._compiled[id(module)] = hit
        try:
            return hit[1](*args, **kwargs)
        except ControlNetError:
            raise
        except Exception as err:  # a failed compile must never fail a render
            name = getattr(module, "name", type(module).__name__)
            log.warning("ControlStack: torch.compile of %s failed, running it eagerly: %s", name, err)
            self._failed.add(id(module))
            return module(*args, **kwargs)
