"""The CUDA-graph cache of the residual stack: when to capture a stack step, when to replay it, when to give up.

One stack step (every active ControlNet forward, scales, masks, the sum) is launch-bound on a big GPU, so on CUDA it
is captured once per layout in a CUDA graph and replayed. `StepGraphs` holds the policy, which is device-free and
tested on the CPU with a stand-in capture (tests/unit/test_graphs.py):

- a layout (`graph_key`: groups of active entries, shapes, dtypes, device, cond/uncond chunks) runs eagerly the
  first time it is seen (the warm-up that also fills the run's hint caches, which capture must not do);
- the second time it is captured (`capture(compute, inputs)`) and replayed; later times it is replayed;
- a capture that fails turns graphs off for the rest of the cache's life (logged once): capture is an optimisation
  and must never fail a render.

Lifetime (the steady state): a cache belongs to one stack and outlives its sampling runs, so the second and later
runs of an unchanged stack (the usual "Queue" with a new seed) replay from their first step, with no warm-up and no
capture. What a captured step reads must then outlive a run too:

- `keep(key, tensor)` gives every per-run tensor a graph reads (encoded hints, masks, per-row multipliers, T2I
  features) one buffer per key for the cache's life: a later run's value is copied into it, so replay reads the new
  run's numbers at the old address;
- `bind(owner, placement)` starts each run: a different owner (stack) or weight placement (any weight's device,
  address, dtype or shape: the host moved, offloaded or recast a ControlNet) drops every graph and buffer, since a
  replay would read the old addresses; a placement of None (some weight is not on the step's device: partially
  loaded, run layer by layer by the host) means no graphs for the run, never a stale replay;
- one run at a time (`acquire` / `release`): a second run of the same stack while one is in progress runs eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Protocol

import torch

log = logging.getLogger(__name__)

StepInputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"]
"""(x, timesteps, context, y) of one stack step."""

StepCompute = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"], list]
"""The eager step: (x, timesteps, context, y) -> the flat list of summed slot tensors (None where nothing is added)."""


class CapturedStep(Protocol):
    def replay(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None
    ) -> list:
        """Run the captured step on new inputs of the captured layout; returns the (static) slot tensors."""
        ...


Capture = Callable[[StepCompute, StepInputs], CapturedStep]
"""(the eager step, example inputs) -> a replayable step. Raises when the step cannot be captured."""


def graph_key(
    groups: Hashable,
    chunks: Sequence[int],
    out_dtype: torch.dtype,
    x: torch.Tensor,
    timesteps: torch.Tensor,
    context: torch.Tensor,
    y: torch.Tensor | None,
) -> tuple:
    """Everything a captured step is specialised to, apart from the stack and its weights: which forwards run
    (groups of entry indices), the cond/uncond layout, and the shapes / dtypes / device of every input."""
    return (
        groups,
        tuple(chunks),
        out_dtype,
        tuple(x.shape),
        x.dtype,
        x.device,
        tuple(timesteps.shape),
        tuple(context.shape),
        context.dtype,
        None if y is None else (tuple(y.shape), y.dtype),
    )


Placement = tuple
"""Where every weight of a stack's modules sits: (device, ((address, dtype, shape) per tensor)) (`placement_of`)."""


def placement_of(modules: Iterable[torch.nn.Module], device: torch.device) -> Placement | None:
    """The placement of the modules' weights, or None when any of them is not on `device` (the host keeps part of
    a model elsewhere and moves or casts it per layer: addresses that a replay would read change under it)."""
    out = []
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            if t.device != device:
                return None
            out.append((t.data_ptr(), t.dtype, tuple(t.shape)))
    return (device, tuple(out))


class StepGraphs:
    """Capture-on-second-sight cache of stack steps, keyed by `graph_key`, with the buffers its graphs read."""

    def __init__(self, capture: Capture | None = None, device_types: Sequence[str] = ("cuda",)) -> None:
        """`capture` defaults to a real CUDA capture; `device_types` are the devices whose steps it can capture
        (tests pass a stand-in capture and ("cpu",))."""
        self._given_capture = capture
        self._capture = capture or CudaCapture()
        self._device_types = tuple(device_types)
        self.enabled = True
        self._graphs: dict[tuple, CapturedStep] = {}
        self._seen: set[tuple] = set()
        self._kept: dict[Hashable, torch.Tensor] = {}
        self._owner: object | None = None
        self._placement: Placement | None = None
        self.in_use = False

    def __deepcopy__(self, memo: dict) -> StepGraphs:
        # Host options are deep-copied at times; graphs and buffers are not copyable: the copy starts empty.
        return StepGraphs(self._given_capture, self._device_types)

    def acquire(self) -> bool:
        """Take the cache for one run; False when another run holds it (that run then goes without graphs)."""
        if self.in_use:
            return False
        self.in_use = True
        return True

    def release(self) -> None:
        self.in_use = False

    def bind(self, owner: object, placement: Placement | None) -> bool:
        """Start a run of `owner` with its weights at `placement`; whether the run may use graphs. A new owner or
        placement drops what was captured for the old one; None (weights off the device) drops it too. Call once
        per run, before its first step."""
        if placement is None or owner is not self._owner or placement != self._placement:
            if self._graphs or self._kept:
                log.debug("ControlStack: the stack or its weights changed; dropping its CUDA graphs")
            self.clear()
            self._owner, self._placement = owner, placement
        # Captured steps stay; what was seen does not: a layout first met in this run warms up in this run (its
        # eager pass fills this run's caches), so nothing is fitted or copied from the host inside a capture.
        self._seen.clear()
        return self.enabled and placement is not None

    def keep(self, key: Hashable, tensor: torch.Tensor) -> torch.Tensor:
        """The buffer for `key` that captured steps read, holding `tensor`'s values: the first tensor kept under a
        key becomes its buffer, later ones are copied into it (same key, same layout: the key names the shapes)."""
        if not self.enabled or tensor.device.type not in self._device_types:
            return tensor
        buffer = self._kept.get(key)
        if buffer is None or buffer.shape != tensor.shape or buffer.dtype != tensor.dtype:
            self._kept[key] = tensor
            return tensor
        if buffer is not tensor:
            buffer.copy_(tensor)
        return buffer

    def __len__(self) -> int:
        return len(self._graphs)

    def covers(self, device: torch.device) -> bool:
        """Whether steps on `device` go through the cache (False once capture has failed)."""
        return self.enabled and device.type in self._device_types

    def step(self, key: tuple, compute: StepCompute, inputs: StepInputs) -> list:
        """The slots of one step: replayed, captured then replayed, or computed eagerly."""
        if not self.enabled:
            return compute(*inputs)
        graph = self._graphs.get(key)
        if graph is not None:
            return graph.replay(*inputs)
        if key not in self._seen:  # first sight: eager warm-up (fills per-run caches outside capture)
            self._seen.add(key)
            return compute(*inputs)
        try:
            graph = self._capture(compute, inputs)
        except Exception as err:  # capture is an optimisation; never fail a render for it
            log.warning("ControlStack: CUDA graph capture failed, running eagerly: %s", err)
            self.enabled = False
            self.clear()
            return compute(*inputs)
        self._graphs[key] = graph
        return graph.replay(*inputs)

    def clear(self) -> None:
        """Drop every captured step, what was seen and every kept buffer: the next sight of a layout is a warm-up."""
        self._graphs.clear()
        self._seen.clear()
        self._kept.clear()


class CudaCapture:
    """Captures a step in a `torch.cuda.CUDAGraph`. Every graph of one cache shares one memory pool and one set of
    static input buffers per input layout: steps replay one at a time, each copying its inputs in first."""

    def __init__(self) -> None:
        self._pool = None
        self._inputs: dict[tuple, torch.Tensor] = {}

    def __call__(self, compute: StepCompute, inputs: StepInputs) -> CapturedStep:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return _CudaStep(compute, tuple(self._static(i, t) for i, t in enumerate(inputs)), self._pool)

    def _static(self, slot: int, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        key = (slot, tuple(t.shape), t.dtype, t.device)
        buffer = self._inputs.get(key)
        if buffer is None:
            buffer = self._inputs[key] = t.clone()
        else:
            buffer.copy_(t)
        return buffer


class _CudaStep:
    """One captured step. Inputs are copied into static buffers, the graph replays every kernel of every active
    ControlNet, and the summed residuals land in static output buffers, which the UNet reads before the next step
    overwrites them."""

    def __init__(self, compute: StepCompute, inputs: StepInputs, pool) -> None:
        self.x, self.t, self.context, self.y = (
            inputs  # the capture's shared static buffers, holding these inputs
        )
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as capture requires
            compute(self.x, self.t, self.context, self.y)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = compute(self.x, self.t, self.context, self.y)

    def replay(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None
    ) -> list:
        self.x.copy_(x)
        self.t.copy_(timesteps)
        self.context.copy_(context)
        if self.y is not None and y is not None:
            self.y.copy_(y)
        self.graph.replay()
        return self.out
