"""The CUDA-graph cache of the residual stack: when to capture a stack step, when to replay it, when to give up.

One stack step (every active ControlNet forward, scales, masks, the sum) is launch-bound on a big GPU, so on CUDA it
is captured once per layout in a CUDA graph and replayed. `StepGraphs` holds the policy, which is device-free and
tested on the CPU with a stand-in capture (tests/unit/test_graphs.py):

- a layout (`graph_key`: groups of active entries, shapes, dtypes, device, cond/uncond chunks) runs eagerly the
  first time it is seen (the warm-up that also fills the run's hint caches, which capture must not do);
- the second time it is captured (`capture(compute, inputs)`) and replayed; later times it is replayed;
- a capture that fails turns graphs off for the rest of the cache's life (logged once): capture is an optimisation
  and must never fail a render.

Lifetime today: one sampling run (the stack's `StackRun` owns one and drops it at `end()`), because a captured step
reads the run's encoded hints from the run's caches. To keep graphs across runs later, the owner keeps a `StepGraphs`
across runs and calls `clear()` when what a graph closes over changes (the stack, device placement, weights); the
key already names everything that is not fixed by those.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable, Sequence
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


class StepGraphs:
    """Capture-on-second-sight cache of stack steps, keyed by `graph_key`."""

    def __init__(self, capture: Capture | None = None, device_types: Sequence[str] = ("cuda",)) -> None:
        """`capture` defaults to a real CUDA capture; `device_types` are the devices whose steps it can capture
        (tests pass a stand-in capture and ("cpu",))."""
        self._capture = capture or CudaCapture()
        self._device_types = tuple(device_types)
        self.enabled = True
        self._graphs: dict[tuple, CapturedStep] = {}
        self._seen: set[tuple] = set()

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
        """Drop every captured step (and what was seen): the next sight of a layout is a warm-up again."""
        self._graphs.clear()
        self._seen.clear()


class CudaCapture:
    """Captures a step in a `torch.cuda.CUDAGraph`; every graph of one cache shares one memory pool."""

    def __init__(self) -> None:
        self._pool = None

    def __call__(self, compute: StepCompute, inputs: StepInputs) -> CapturedStep:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return _CudaStep(compute, inputs, self._pool)


class _CudaStep:
    """One captured step. Inputs are copied into static buffers, the graph replays every kernel of every active
    ControlNet, and the summed residuals land in static output buffers, which the UNet reads before the next step
    overwrites them."""

    def __init__(self, compute: StepCompute, inputs: StepInputs, pool) -> None:
        x, timesteps, context, y = inputs
        self.x, self.t, self.context = x.clone(), timesteps.clone(), context.clone()
        self.y = None if y is None else y.clone()
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
