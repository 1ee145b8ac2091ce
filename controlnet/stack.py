"""The residual stack: many ControlNets, one summed set of residuals per UNet call.

A stack is an immutable list of `StackEntry` (a ControlNet with its hint, strength, window, per-layer scales, mode and
optional mask). For each UNet call, `ResidualStack.residuals` runs the entries whose window contains the current
noise level and returns one list of residuals (shallow -> deep, middle last) that the frozen UNet adds to its skips.

Entries may hold any kind of control module (the "control-module protocol", docs/design.md): classic ControlNets,
Control-LoRAs (merged into a ControlNet once) and Union models add residuals to the UNet's skips ("output" injection);
T2I-Adapters add features after input blocks ("input" injection, computed once per run); LLLite modifies the inputs of
attention q/k/v ("attention" injection, applied through `attention_patch`). Several entries of one Union model with the
same window, mode, scales and mask run as ONE multi-condition forward (the ProMax path).

Pure torch, no host. A stack holds no per-run state: `begin_run` returns a `StackRun` that holds the run's caches,
its report observer and its CUDA graphs; the ComfyUI patcher (nodes/patcher.py) calls the run's `control` /
`attention_patch` at each UNet call, passing that call's noise level, and `end()` when sampling ends.

What makes it fast (see docs/performance.md):
- each entry's hint is fitted and encoded once per run, not once per step (the hint encoder ignores x, t, context);
- entries outside their window are skipped, not multiplied by zero; strength 0 entries are never called;
- residuals are accumulated in place into one set of buffers;
- on CUDA the whole per-step stack computation is captured once per (shapes, active entries) in a CUDA graph and
  replayed (controlnet/graphs.py): the ControlNet pass is launch-bound, so this is where most of the time goes. The
  patcher keeps one graph cache per stack, so later runs of an unchanged stack replay from their first step; the
  control report is measured inside the captured step, so reporting keeps the fast path.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property, partial

import torch
import torch.nn.functional as F

from .checks import check_window, finite_float
from .compiled import CompiledForwards
from .errors import ControlNetError
from .graphs import StepGraphs, graph_key, placement_of
from .report import layer_magnitudes
from .schedule import FrameStrengths, Schedule, ScheduleCursor, frame_rows

log = logging.getLogger(__name__)

MODES = ("balanced", "prompt", "control")
"""balanced: every row, every layer at strength. prompt: "my prompt is more important" / soft weights, layer i
scaled by base ** (n - 1 - i) (deep layers keep most; flipped: shallow layers keep most). control: "ControlNet is
more important", cond rows only, uncond rows get no residual, so classifier-free guidance amplifies the control."""

PROMPT_DECAY = 0.825
"""The base of "my prompt is more important" (guess mode) and the default of soft weights (A1111's soft injection,
Advanced-ControlNet's Scaled Soft Weights): layer i of 13 gets 0.825 ** (12 - i)."""
MAX_LAYER_SCALE = 2.0
"""The largest per-layer multiplier ControlNet Layer Scales takes (custom mode)."""
LAYER_NAMES = tuple(f"in_{i:02d}" for i in range(12)) + ("middle",)
"""The user-facing names of the layer slots (ControlScale's widgets): SD1.x / SD2.x use all 13, SDXL in_00..in_08
and middle."""

# cond_or_uncond values in ComfyUI's batching: 0 marks a cond chunk, 1 an uncond chunk.
COND, UNCOND = 0, 1

HintFitter = Callable[["StackEntry", str, int, int], torch.Tensor]
"""(entry, "hint" | "mask", height_px, width_px) -> the entry's hint (B x 3 x H x W in [0, 1]) or mask (B x H x W)
fitted to the generation size with the entry's resize mode, so hint and mask stay aligned."""

StepObserver = Callable[[int, "float | None", torch.Tensor, float], None]
"""(entry index, sigma, its `layer_magnitudes` (mean |applied residual| per layer: a float32 tensor on the device that
the observer may keep), its applied strength: strength x schedule) -> None; called for every active entry at every
UNet call (the control report). The magnitudes are computed inside the step, so replayed CUDA graphs report too."""


def mode_scales(
    mode: str, num_residuals: int, base: float = PROMPT_DECAY, flip: bool = False
) -> tuple[float, ...]:
    """Per-residual multipliers that a mode implies (before strength and custom scales). In "prompt" mode (soft
    weights) layer i gets base ** (n - 1 - i), or, flipped, base ** i (the shallow layers keep most)."""
    if mode not in MODES:
        raise ControlNetError(f"control mode: expected one of {MODES}, got {mode!r}")
    if mode == "prompt":
        scales = tuple(base ** float(num_residuals - 1 - i) for i in range(num_residuals))
        return tuple(reversed(scales)) if flip else scales
    return (1.0,) * num_residuals


def kind_of(module: torch.nn.Module) -> str:
    """The control kind of a module ("controlnet", "control_lora", "union", "t2i_adapter", "lllite")."""
    return getattr(module, "kind", "controlnet")


def injection_of(module: torch.nn.Module) -> str:
    """Where a module's outputs go: "output" (skips), "input" (after input blocks) or "attention" (q/k/v inputs)."""
    return getattr(module, "injection", "output")


@dataclass(frozen=True, eq=False)
class StackEntry:
    """One control module applied with one hint. Immutable: editing a graph builds a new stack."""

    controlnet: torch.nn.Module
    hint: torch.Tensor
    """B x 3 x H x W, RGB in [0, 1]. Fitted to 8 x latent by the run's hint fitter, or must already be that size."""
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    scales: tuple[float, ...] | None = None
    """Custom per-residual multipliers (shallow -> deep, middle last), applied on top of the mode's."""
    mode: str = "balanced"
    mask: torch.Tensor | None = None
    """B x H x W in [0, 1] (any size: resized to every residual's resolution)."""
    resize_mode: str = "just resize"
    label: str = ""
    """Names the entry in errors and reports (the patcher uses the ApplyHint node id)."""
    union_type: int | None = None
    """Union models only: the control type id of this hint (None: ComfyUI's "auto", no type)."""
    latent_token: bool = True
    """Union models only: True follows the model's reference maths (xinsir / diffusers feed the noisy latent to the
    fusion transformer as a token); False reproduces ComfyUI's built-in Union maths (no such token)."""
    schedule: Schedule | None = None
    """A strength curve over sampling progress, multiplied into every residual at each step (controlnet/schedule.py).
    Steps where it is 0 do not run the entry."""
    frame_strengths: FrameStrengths | None = None
    """Per-latent strengths (video frames): each batch row of the UNet call is multiplied by its frame's strength."""
    uncond_multiplier: float = 1.0
    """Multiplies the uncond rows (soft weights' uncond multiplier); "control" mode makes it 0."""
    soft_base: float = PROMPT_DECAY
    """"prompt" mode's base: layer i x soft_base ** (n - 1 - i)."""
    soft_flip: bool = False
    """"prompt" mode reversed: the shallow layers keep most."""

    def __post_init__(self) -> None:
        n = self.controlnet.num_residuals
        if self.scales is not None and len(self.scales) != n:
            raise ControlNetError(
                f"{self.name}: scales: expected {n} values for a {self.controlnet.family} ControlNet, "
                f"got {len(self.scales)}"
            )
        if self.hint.ndim != 4 or self.hint.shape[1] != 3:
            raise ControlNetError(
                f"{self.name}: hint: expected B x 3 x H x W, got shape {tuple(self.hint.shape)}"
            )
        if self.mask is not None and self.mask.ndim != 3:
            raise ControlNetError(
                f"{self.name}: mask: expected B x H x W, got shape {tuple(self.mask.shape)}"
            )
        check_window(self.start_percent, self.end_percent, self.name)
        finite_float(f"{self.name}: strength", self.strength)
        finite_float(f"{self.name}: uncond_multiplier", self.uncond_multiplier, 0.0, 1.0)
        finite_float(f"{self.name}: base_multiplier", self.soft_base, 0.0, 1.0)
        for i, s in enumerate(self.scales or ()):
            finite_float(f"{self.name}: scales[{i}]", s)
        if self.union_type is not None and kind_of(self.controlnet) != "union":
            raise ControlNetError(
                f"{self.name}: a control type ({self.union_type}) only applies to ControlNet Union / ProMax models; "
                f"this is a {kind_of(self.controlnet)}"
            )
        mode_scales(self.mode, n)  # validates the mode

    def __deepcopy__(self, memo: dict) -> StackEntry:
        # ComfyUI deep-copies model options on every clone; an entry is immutable and holds a whole ControlNet.
        return self

    @property
    def name(self) -> str:
        return self.label or getattr(self.controlnet, "name", "") or "ControlNet"

    @property
    def kind(self) -> str:
        return kind_of(self.controlnet)

    @property
    def injection(self) -> str:
        return injection_of(self.controlnet)

    @cached_property
    def unit_scales(self) -> tuple[float, ...]:
        """mode x custom, one multiplier per residual slot (strength not included)."""
        n = self.controlnet.num_residuals
        custom = self.scales or (1.0,) * n
        mode = mode_scales(self.mode, n, self.soft_base, self.soft_flip)
        return tuple(m * c for m, c in zip(mode, custom, strict=True))

    @cached_property
    def layer_scales(self) -> tuple[float, ...]:
        """strength x mode x custom, one multiplier per residual (computed once: entries are immutable)."""
        return tuple(self.strength * s for s in self.unit_scales)

    def fuses_with(self, other: StackEntry) -> bool:
        """True when both are hints of one Union model that can share one multi-condition forward."""
        return (
            self.kind == "union"
            and other.controlnet is self.controlnet
            and self.union_type is not None
            and other.union_type is not None
            and self._fusion_key() == other._fusion_key()
            and _same_mask(self.mask, other.mask)
            and self.resize_mode == other.resize_mode
        )

    def _fusion_key(self) -> tuple:
        """What hints of one Union forward must share: window, scales, schedules, row multipliers."""
        return (
            self.start_percent,
            self.end_percent,
            self.unit_scales,
            self.mode,
            self.latent_token,
            self.schedule,
            self.frame_strengths,
            self.uncond_multiplier,
        )


def _same_mask(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a is b or (a.shape == b.shape and bool(torch.equal(a, b)))


@dataclass
class StepControl:
    """What one UNet call receives: summed tensors per slot (None where nothing is added)."""

    output: list[torch.Tensor | None]
    """One per input block (shallow -> deep), added to that block's skip connection."""
    input: list[torch.Tensor | None]
    """One per input block, added to h right after that block (T2I-Adapters)."""
    middle: torch.Tensor | None
    """Added to the middle block's output."""


def _slot(injection: str, i: int, n: int) -> int:
    """Index in the flat accumulator: output slots 0..n-2, middle n-1, input slots n..2n-2."""
    if i == n - 1:
        return n - 1
    return i if injection == "output" else n + i


def _map_tensors(obj, fn):
    """Apply `fn` to every tensor of an encoding (a tensor, a list with Nones, or a dict of tensors)."""
    if obj is None:
        return None
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return [_map_tensors(v, fn) for v in obj]


def broadcast_rows(t: torch.Tensor, batch: int, chunks: int, what: str) -> torch.Tensor:
    """Broadcast a per-image tensor (hint, mask) to the UNet batch.

    The UNet batch is `chunks` chunks (cond / uncond) of `batch // chunks` latents each. A tensor of batch 1 goes to
    every row; a tensor of batch `batch // chunks` (one per latent, e.g. video frames) is repeated per chunk.
    Anything else is an error.
    """
    per_chunk = batch // chunks
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    if t.shape[0] == per_chunk:
        return t.repeat(chunks, *([1] * (t.ndim - 1)))
    raise ControlNetError(
        f"{what}: batch of {t.shape[0]} does not fit {per_chunk} latent(s): give 1 (shared) or {per_chunk} (one per latent)"
    )


@dataclass(frozen=True)
class Window:
    """The latents of the whole batch that one UNet call holds, when a video is sampled in context windows
    (AnimateDiff-Evolved's `ad_params["sub_idxs"]`, ComfyUI's `context_window.index_list`): each cond / uncond
    chunk of the call holds `frames`, in that order. `total` is the whole batch's length when the caller says it
    (AnimateDiff-Evolved's `full_length`), else None: per-latent tensors must then cover every index."""

    frames: tuple[int, ...]
    total: int | None = None

    def __post_init__(self) -> None:
        if not self.frames or min(self.frames) < 0:
            raise ControlNetError(f"context window: expected frame indices >= 0, got {list(self.frames)}")
        if self.total is not None and max(self.frames) >= self.total:
            raise ControlNetError(
                f"context window: frame {max(self.frames)} is outside the {self.total}-frame batch"
            )


def window_rows(t: torch.Tensor, batch: int, chunks: int, window: Window | None, what: str) -> torch.Tensor:
    """`broadcast_rows` for one UNet call of a context window: a per-latent tensor (one row per frame of the whole
    batch) gives the rows of the window's frames, repeated per chunk; a tensor of batch 1 goes to every row."""
    if window is None:
        return broadcast_rows(t, batch, chunks, what)
    per_chunk = batch // chunks
    if len(window.frames) != per_chunk:
        raise ControlNetError(
            f"context window: {len(window.frames)} frame indices for a call of {per_chunk} latent(s) per chunk"
        )
    n = t.shape[0]
    if n == 1:
        return t.expand(batch, *t.shape[1:])
    fits = n == window.total if window.total is not None else n > max(window.frames)
    if not fits:
        total = f"the {window.total}-frame batch" if window.total is not None else "every frame of the batch"
        raise ControlNetError(
            f"{what}: batch of {n} does not fit the context window (frames {window.frames[0]}..{window.frames[-1]} "
            f"of {total}): give 1 (shared) or one per frame of the whole batch"
        )
    rows = t[list(window.frames)]
    return rows.repeat(chunks, *([1] * (t.ndim - 1)))


def _needs_run(name: str) -> Callable[..., None]:
    def method(self: ResidualStack, *args, **kwargs) -> None:
        raise RuntimeError(
            f"ControlStack: ResidualStack.{name}() needs a run: run = stack.begin_run(percent_to_sigma, ...), then "
            f"run.{name}(...) at each step and run.end() when sampling ends"
        )

    method.__name__ = name
    return method


class ResidualStack:
    """An immutable list of entries. Evaluating them belongs to a run: `begin_run` returns a `StackRun`.

    A stack object is shared by every clone of a host MODEL and by every sampling run of it, so it holds nothing per
    run: no caches, no report observer, no current noise level.
    """

    def __init__(self, entries: Sequence[StackEntry] = ()) -> None:
        self.entries: tuple[StackEntry, ...] = tuple(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __deepcopy__(self, memo: dict) -> ResidualStack:
        # Immutable: a deep copy (of host options holding a stack) shares the entries and their ControlNets.
        return ResidualStack(self.entries)

    def with_entry(self, entry: StackEntry) -> ResidualStack:
        return ResidualStack((*self.entries, entry))

    def replace_entry(self, index: int, **changes) -> ResidualStack:
        entries = list(self.entries)
        entries[index] = replace(entries[index], **changes)
        return ResidualStack(entries)

    def begin_run(
        self,
        percent_to_sigma: Callable[[float], float],
        hint_fitter: HintFitter | None = None,
        use_cuda_graphs: bool = True,
        observer: StepObserver | None = None,
        graphs: StepGraphs | None = None,
        compiled: CompiledForwards | None = None,
    ) -> StackRun:
        """Start a sampling run: map each window to noise levels; the returned run holds every per-run cache.

        `percent_to_sigma` maps sampling progress (0 = first step, 1 = last) to the noise level the sampler passes
        (the host model's own schedule; tests use `lambda p: 1.0 - p`). `observer` sees every active entry's
        per-layer magnitudes at every step (the control report). `graphs` is a CUDA-graph cache that outlives the
        run (the patcher keeps one per stack; tests pass one with a stand-in capture): the run holds it until
        `end()`, and runs without graphs when another run holds it. Without one, the run makes its own and drops it
        at `end()`. `compiled` runs the residual forwards through torch.compile (controlnet/compiled.py; opt-in,
        kept across runs like the graphs). Free the run with `StackRun.end()` (or use it as a context manager).
        """
        windows = [(percent_to_sigma(e.start_percent), percent_to_sigma(e.end_percent)) for e in self.entries]
        owns_graphs = False
        if not use_cuda_graphs:
            graphs = None
        elif graphs is None:
            graphs, owns_graphs = StepGraphs(), True
        elif not graphs.acquire():
            log.debug("ControlStack: this stack's CUDA graphs are held by another run; this one runs eagerly")
            graphs = None
        cursors = [
            None if e.schedule is None else ScheduleCursor(e.schedule, percent_to_sigma) for e in self.entries
        ]
        return StackRun(self, windows, hint_fitter, graphs, observer, cursors, owns_graphs, compiled)

    # A step needs a run: these fail loudly instead of quietly starting one with a made-up schedule.
    control = _needs_run("control")
    residuals = _needs_run("residuals")
    attention_patch = _needs_run("attention_patch")
    active = _needs_run("active")


class StackRun:
    """One sampling run of a `ResidualStack` (`ResidualStack.begin_run`): the noise-level windows, the hint fitter,
    the report observer, every per-run cache (encoded hints, masks, T2I features, groups) and the CUDA-graph cache.

    Not shared: each sampling run makes its own, so two runs of one stack (two samplers, two MODEL clones) never see
    each other's caches or observer. The noise level of a step is an argument of each call.
    """

    def __init__(
        self,
        stack: ResidualStack,
        sigma_windows: list[tuple[float, float]],
        hint_fitter: HintFitter | None,
        graphs: StepGraphs | None,
        observer: StepObserver | None,
        cursors: Sequence[ScheduleCursor | None] | None = None,
        owns_graphs: bool = True,
        compiled: CompiledForwards | None = None,
    ) -> None:
        self.stack = stack
        self.entries = stack.entries
        self.observer = observer
        self._windows = sigma_windows
        self._hint_fitter = hint_fitter
        self._graphs = graphs
        self._owns_graphs = owns_graphs
        self.compiled = compiled
        """When set, residual forwards run through torch.compile (`ResidualStack.begin_run(compiled=...)`)."""
        self._graphs_bound: bool | None = None
        """Whether this run's steps go through `_graphs` (decided at its first step, once x's device is known)."""
        self._encoded: dict = {}
        self._masks: dict = {}
        self._row_masks: dict = {}
        self._static: dict = {}
        self._groups: dict = {}
        self._step_scales: dict[int, torch.Tensor] = {}
        """This call's strength x schedule x mode x custom per layer of each scheduled entry, in a kept device buffer
        that a replayed step reads (set by `_refresh` before a graph step, emptied after it)."""
        self._cursors = list(cursors or [None] * len(self.entries))
        self.scheduled: list[float] = [1.0] * len(self.entries)
        """Each entry's schedule value at the current noise level (1.0 without a schedule)."""
        self._ended = False

    def end(self) -> None:
        """Free every per-run buffer and hand the graph cache back (or drop it, when the run made its own); the run
        cannot be used afterwards."""
        self._ended = True
        graphs, self._graphs = self._graphs, None
        if graphs is not None and not self._owns_graphs:
            # Its graphs and kept buffers stay for the stack's next run; this run's caches point at those buffers
            # (what a captured step reads) and go with the run object.
            graphs.release()
            return
        if graphs is not None:
            graphs.clear()
        for cache in (self._encoded, self._masks, self._row_masks, self._static, self._groups):
            cache.clear()

    def __enter__(self) -> StackRun:
        return self

    def __exit__(self, *exc) -> None:
        self.end()

    # -- per step -----------------------------------------------------------------------------------------------

    def active(self, sigma: float | None) -> tuple[int, ...]:
        """Indices of the entries that run at noise level `sigma` (all, when None): inside their window, with a
        strength and a scheduled value that are not 0. Advances every schedule to `sigma`."""
        if self._ended:
            raise RuntimeError("ControlStack: this stack run has ended (end() was called); begin a new run")
        out = []
        for i, e in enumerate(self.entries):
            cursor = self._cursors[i]
            if cursor is not None:  # every step, in or out of the window: guaranteed steps count steps
                self.scheduled[i] = cursor.at(sigma)
            if e.strength == 0.0 or self.scheduled[i] == 0.0:
                continue
            hi, lo = self._windows[i]
            # Same test as ComfyUI's built-in: skip when sigma > start level or sigma < end level.
            if sigma is not None and (sigma > hi or sigma < lo):
                continue
            out.append(i)
        return tuple(out)

    def _groups_of(self, active: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        """The residual forwards of one step: one group per forward. Hints of one Union model that can share a
        forward are grouped (ProMax multi-condition); every other entry is a group of its own. LLLite entries are
        left out (they act through `attention_patch`)."""
        hit = self._groups.get(active)
        if hit is not None:
            return hit
        groups: list[list[int]] = []
        for i in active:
            entry = self.entries[i]
            if entry.injection == "attention":
                continue
            for g in groups:
                if self.entries[g[0]].fuses_with(entry):
                    g.append(i)
                    break
            else:
                groups.append([i])
        self._groups[active] = out = tuple(tuple(g) for g in groups)
        return out

    @torch.no_grad()
    def control(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        sigma: float | None = None,
        cond_or_uncond: Sequence[int] = (COND,),
        out_dtype: torch.dtype | None = None,
        window: Window | None = None,
    ) -> StepControl | None:
        """Summed control of the active residual entries for one UNet call, or None when none is active.

        `x` is the UNet input (already scaled for the model), `timesteps` the UNet timesteps, `sigma` the noise level
        of this call (None: every entry is active), `cond_or_uncond` the kind of each of the equal chunks that `x`'s
        batch is made of (ComfyUI batches cond and uncond together), `window` the frames a context-window call holds
        (None: the whole batch).
        """
        active = self.active(sigma)
        if not active:
            return None
        groups = self._groups_of(active)
        if not groups:
            return None
        chunks = tuple(cond_or_uncond)
        if x.shape[0] % len(chunks):
            raise ControlNetError(
                f"batch {x.shape[0]} is not a multiple of its {len(chunks)} cond/uncond chunks"
            )
        dtype = out_dtype or x.dtype

        def compute(x, timesteps, context, y) -> list[torch.Tensor | None]:
            return self._compute(groups, chunks, dtype, x, timesteps, context, y, sigma, window)

        reporting = self.observer is not None
        # Only forwards that depend on x are worth a graph: T2I features are added from per-run buffers.
        dynamic = any(self.entries[g[0]].injection != "input" for g in groups)
        if dynamic and self._use_graphs(x.device):
            self._refresh(groups, x, chunks, window)
            # Scheduled strengths reach a captured step through the scale buffers `_refresh` fills, so a fade is one
            # graph. Only a multi-hint Union group bakes its strengths into the fusion (python floats): its values
            # are part of the key. The window's hint rows are baked in too: the window is part of the key.
            baked = tuple(self.scheduled[i] for g in groups if self._bakes_strengths(g) for i in g)
            key = (graph_key(groups, chunks, dtype, x, timesteps, context, y), baked, window, reporting)
            try:
                slots = self._graphs.step(key, compute, (x, timesteps, context, y))  # type: ignore[union-attr]
            finally:
                self._step_scales = {}
        else:
            slots = compute(x, timesteps, context, y)
        if reporting:
            slots, stats = slots[: -len(groups)], slots[-len(groups) :]
            for group, magnitudes in zip(groups, stats, strict=True):
                for idx in group:  # a copy: a replayed step overwrites its outputs at the next replay
                    strength = self.entries[idx].strength * self.scheduled[idx]
                    self.observer(idx, sigma, magnitudes.clone(), strength)  # type: ignore[misc]
        n = (len(slots) + 1) // 2
        return StepControl(output=list(slots[: n - 1]), input=list(slots[n:]), middle=slots[n - 1])

    def _use_graphs(self, device: torch.device) -> bool:
        """Whether this run's steps go through its graph cache: decided once per run, binding the cache to this
        stack and to where its weights sit now (a moved or partly loaded ControlNet drops or skips the graphs)."""
        graphs = self._graphs
        if graphs is None or not graphs.covers(device):
            return False
        if self._graphs_bound is None:
            modules = {id(e.controlnet): e.controlnet for e in self.entries}.values()
            self._graphs_bound = graphs.bind(self.stack, placement_of(modules, device))
        return self._graphs_bound and graphs.enabled

    def _refresh(
        self,
        groups: tuple[tuple[int, ...], ...],
        x: torch.Tensor,
        chunks: tuple[int, ...],
        window: Window | None,
    ) -> None:
        """Before a step that may be replayed: put this run's encoded hints (fitted, so previews are sent each run)
        and T2I features at the current scheduled value into the kept buffers a replay reads. Cache hits after the
        first step of a run; masks and row multipliers depend on the stack and the layout only, kept as they are."""
        for group in groups:
            lead = self.entries[group[0]]
            dtype = _dtype_of(lead.controlnet)
            if lead.injection == "input":
                self._static_applied(group[0], x, chunks, dtype, window)
                continue
            for idx in group:
                self._encoded_hint(idx, x, chunks, dtype, window)
            if self._cursors[group[0]] is not None and not self._bakes_strengths(group):
                # float32, as the eager multiply by a python float computes: replay and eager agree bit for bit
                scales = torch.tensor(self._scales(group[0]), dtype=torch.float32).to(x.device)
                self._step_scales[group[0]] = self._keep("scales", (group[0], x.device), scales)

    def _bakes_strengths(self, group: tuple[int, ...]) -> bool:
        """Whether a group's forward takes its strengths as python floats (several hints of one Union model go into
        its fusion as per-condition scales), so a captured step is specialised to them."""
        return len(group) > 1

    def _keep(self, cache: str, key: tuple, value):
        """`value` (a tensor, or a list / dict of them) in the graph cache's kept buffers, when this run's steps
        may be replayed: a captured step reads them at their address, in this run and in later ones."""
        graphs = self._graphs
        if graphs is None or not self._graphs_bound:
            return value
        counter = itertools.count()
        return _map_tensors(value, lambda t: graphs.keep((cache, key, next(counter)), t))

    def residuals(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
        **kwargs,
    ) -> list[torch.Tensor] | None:
        """The skip-path view of `control` (shallow -> deep, middle last) for stacks of ControlNet-like entries."""
        step = self.control(x, timesteps, context, y, **kwargs)
        if step is None:
            return None
        if any(t is not None for t in step.input):
            raise ControlNetError(
                "residuals(): this stack has input-path entries (T2I-Adapters); use control()"
            )
        return [*step.output, step.middle]  # type: ignore[list-item]

    def _compute(
        self,
        groups: tuple[tuple[int, ...], ...],
        chunks: tuple[int, ...],
        out_dtype: torch.dtype,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None,
        sigma: float | None,
        window: Window | None = None,
    ) -> list[torch.Tensor | None]:
        """The eager step: run each group's forward, scale, mask, and add into one flat set of slot buffers; when
        the run reports, each group's `layer_magnitudes` follow the slots (inside the step: captured with it)."""
        n = self.entries[groups[0][0]].controlnet.num_residuals
        if any(self.entries[g[0]].controlnet.num_residuals != n for g in groups):
            raise ControlNetError(
                "the stacked control modules have different layer counts: they are for different UNet families"
            )
        out: list[torch.Tensor | None] = [None] * (2 * n - 1)
        stats: list[torch.Tensor] = []
        for group in groups:
            lead = self.entries[group[0]]
            cn = lead.controlnet
            dtype = _dtype_of(cn)
            if lead.injection == "input":
                # T2I-Adapter: features do not depend on x or t; scaled and masked once per run.
                applied, fresh = self._static_applied(group[0], x, chunks, dtype, window), False
            else:
                applied, fresh = self._forward(group, chunks, x, timesteps, context, y, dtype, window), True
            if self.observer is not None:
                stats.append(layer_magnitudes(applied))
            for i, r in enumerate(applied):
                if r is None:
                    continue
                s = _slot(lead.injection, i, n)
                if out[s] is None:
                    # never accumulate into a cached tensor: copy when `r` would be returned as is
                    out[s] = r.to(out_dtype) if fresh or r.dtype != out_dtype else r.clone()
                else:
                    out[s].add_(r)  # type: ignore[union-attr]
        return [*out, *stats]

    def _forward(
        self,
        group: tuple[int, ...],
        chunks: tuple[int, ...],
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None,
        dtype: torch.dtype,
        window: Window | None = None,
    ) -> list[torch.Tensor]:
        """One residual forward (a ControlNet, a Control-LoRA, or a Union model with one or more hints), scaled."""
        lead = self.entries[group[0]]
        cn = lead.controlnet
        args = (x.to(dtype), None, timesteps.to(dtype), context.to(dtype), None if y is None else y.to(dtype))
        encoded = [self._encoded_hint(idx, x, chunks, dtype, window) for idx in group]
        forward = cn if self.compiled is None else partial(self.compiled.call, cn)
        if lead.kind == "union":
            types = [] if lead.union_type is None else [self.entries[i].union_type for i in group]
            res = forward(
                *args,
                encoded_hint=encoded,
                control_types=types,
                condition_scales=[self.entries[i].strength * self.scheduled[i] for i in group],
                latent_token=lead.latent_token,
            )
            # One hint: strength scales the residuals (as ComfyUI and diffusers). Several: the strengths went into
            # the fusion as per-condition scales (diffusers' multi-condition maths), the residuals get mode x custom.
            scales = self._scales(group[0]) if len(group) == 1 else lead.unit_scales
        else:
            res = forward(*args, encoded_hint=encoded[0])
            scales = self._scales(group[0])
        row_mult = self._row_mult(group[0], x, chunks, dtype, window)
        step_scales = None if self._bakes_strengths(group) else self._step_scales.get(group[0])
        applied = []
        for i, r in enumerate(res):
            if getattr(cn, "global_average_pooling", False):
                r = r.mean(dim=(2, 3), keepdim=True).expand_as(r)
            if step_scales is None:
                r = r * scales[i]
            else:  # the same product in float32 (the python-float multiply's op maths), read from the buffer
                r = (r.float() * step_scales[i]).to(r.dtype)
            if lead.mask is not None:
                r = r * self._mask_at(group[0], x, r.shape[-2:], len(chunks), dtype, window)
            if row_mult is not None:
                r = r * row_mult
            applied.append(r)
        return applied

    def _scales(self, idx: int) -> tuple[float, ...]:
        """strength x schedule x mode x custom of one entry at the current step, one multiplier per residual."""
        entry, value = self.entries[idx], self.scheduled[idx]
        if value == 1.0:
            return entry.layer_scales
        # one float per layer, so a constant schedule s equals strength s bit for bit (s x u == u x s)
        return tuple(s * value for s in entry.layer_scales)

    def _static_applied(
        self,
        idx: int,
        x: torch.Tensor,
        chunks: tuple[int, ...],
        dtype: torch.dtype,
        window: Window | None = None,
    ) -> list[torch.Tensor | None]:
        """An x-independent entry's (T2I-Adapter) scaled, masked features for this batch layout, once per run (and
        again when its scheduled value changes; only the latest value is kept)."""
        key = (idx, tuple(x.shape), chunks, x.device, dtype, window)
        value = self.scheduled[idx]
        hit = self._static.get(key)
        if hit is not None and hit[0] == value:
            return hit[1]
        entry = self.entries[idx]
        features = self._encoded_hint(idx, x, chunks, dtype, window)
        row_mult = self._row_mult(idx, x, chunks, dtype, window)
        scales = self._scales(idx)
        applied: list[torch.Tensor | None] = []
        for i, r in enumerate(features):
            if r is not None:
                r = r * scales[i]
                if entry.mask is not None:
                    r = r * self._mask_at(idx, x, r.shape[-2:], len(chunks), dtype, window)
                if row_mult is not None:
                    r = r * row_mult
                r = r.contiguous()
            applied.append(r)
        applied = self._keep("static", key, applied)
        self._static[key] = (value, applied)
        return applied

    # -- LLLite: attention-input patches ------------------------------------------------------------------------

    @torch.no_grad()
    def attention_patch(
        self,
        x: torch.Tensor,
        *,
        sigma: float | None = None,
        cond_or_uncond: Sequence[int] = (COND,),
        window: Window | None = None,
    ) -> AttentionPatch | None:
        """The attention-input patch of the active LLLite entries for one UNet call, or None when none is active.

        Prepares everything that depends only on the run and the batch layout (encoded hints broadcast to the
        batch) before the UNet runs; the returned object is then called from inside the UNet's attention layers.
        """
        entries = [i for i in self.active(sigma) if self.entries[i].injection == "attention"]
        if not entries:
            return None
        chunks = tuple(cond_or_uncond)
        prepared = []
        for idx in entries:
            module = self.entries[idx].controlnet
            dtype = _dtype_of(module)
            cond = self._encoded_hint(idx, x, chunks, dtype, window)
            row_mult = self._row_mult(idx, x, chunks, dtype, window)
            prepared.append((idx, cond, row_mult))
        return AttentionPatch(self, prepared, x, len(chunks), sigma, window)

    # -- per-run caches -----------------------------------------------------------------------------------------

    def _encoded_hint(
        self,
        idx: int,
        x: torch.Tensor,
        chunks: tuple[int, ...],
        dtype: torch.dtype,
        window: Window | None = None,
    ):
        """The entry's hint, fitted and encoded once per run, broadcast to the UNet batch (tensor, list or dict);
        in a context window, the rows of the window's frames."""
        h_px, w_px = x.shape[-2] * 8, x.shape[-1] * 8
        key = (idx, h_px, w_px, x.shape[0], len(chunks), x.device, dtype, window)
        if key in self._encoded:
            return self._encoded[key]
        entry = self.entries[idx]
        base_key = (idx, h_px, w_px, x.device, dtype)
        encoded = self._encoded.get(base_key)
        if encoded is None:
            hint = entry.hint
            if self._hint_fitter is not None:
                hint = self._hint_fitter(entry, "hint", h_px, w_px)
            if hint.shape[-2:] != (h_px, w_px):
                raise ControlNetError(
                    f"{entry.name}: hint: expected {w_px}x{h_px} pixels (8 x the {x.shape[-1]}x{x.shape[-2]} latent), "
                    f"got {hint.shape[-1]}x{hint.shape[-2]}"
                )
            window_rows(
                hint, x.shape[0], len(chunks), window, f"{entry.name}: hint"
            )  # validate the batch early
            encoded = entry.controlnet.encode_hint(hint.to(device=x.device, dtype=dtype))
            self._encoded[base_key] = encoded
        full = _map_tensors(
            encoded,
            lambda t: window_rows(t, x.shape[0], len(chunks), window, f"{entry.name}: hint").contiguous(),
        )
        self._encoded[key] = full = self._keep("hint", key, full)
        return full

    def _mask_at(
        self,
        idx: int,
        x: torch.Tensor,
        size: torch.Size,
        chunks: int,
        dtype: torch.dtype,
        window: Window | None = None,
    ) -> torch.Tensor:
        """The entry's mask fitted like its hint, resized to one residual's resolution, broadcast to the batch."""
        key = (idx, tuple(x.shape), tuple(size), chunks, dtype, x.device, window)
        hit = self._masks.get(key)
        if hit is None:
            entry = self.entries[idx]
            mask = entry.mask
            assert mask is not None
            if self._hint_fitter is not None:
                mask = self._hint_fitter(entry, "mask", x.shape[-2] * 8, x.shape[-1] * 8)
            resized = F.interpolate(
                mask[:, None].to(device=x.device, dtype=torch.float32), size=tuple(size), mode="bilinear"
            )
            hit = window_rows(
                resized.to(dtype), x.shape[0], chunks, window, f"{entry.name}: mask"
            ).contiguous()
            self._masks[key] = hit = self._keep("mask", key, hit)
        return hit

    def _row_mult(
        self, idx: int, x: torch.Tensor, chunks: tuple[int, ...], dtype: torch.dtype, window: Window | None
    ) -> torch.Tensor | None:
        """One multiplier per batch row of a UNet call (B x 1 x 1 x 1), or None when every row is 1: the frame's
        strength (per-frame keyframes) x, on uncond rows, 0 in "control" mode or the uncond multiplier."""
        key = (idx, x.shape[0], chunks, dtype, x.device, window)
        if key in self._row_masks:
            return self._row_masks[key]
        entry = self.entries[idx]
        per_chunk = x.shape[0] // len(chunks)
        uncond = 0.0 if entry.mode == "control" else entry.uncond_multiplier
        frames = [1.0] * per_chunk
        if entry.frame_strengths is not None:
            total = self._frame_count(idx, per_chunk, window)
            strengths = entry.frame_strengths.resolve(total, f"{entry.name}: frame strengths")
            frames = frame_rows(strengths, None if window is None else window.frames, 1)
        rows = [f * (1.0 if c == COND else uncond) for c in chunks for f in frames]
        hit = None
        if any(r != 1.0 for r in rows):
            hit = self._keep("rows", key, torch.tensor(rows, dtype=dtype, device=x.device).view(-1, 1, 1, 1))
        self._row_masks[key] = hit
        return hit

    def _frame_count(self, idx: int, per_chunk: int, window: Window | None) -> int:
        """How many latents the whole batch has: the call's own, the context window's total, or (a window protocol
        that does not say) the entry's per-frame hint, else the highest frame index + 1."""
        if window is None:
            return per_chunk
        if window.total is not None:
            return window.total
        hint_frames = self.entries[idx].hint.shape[0]
        return hint_frames if hint_frames > 1 else max(window.frames) + 1


def _dtype_of(module: torch.nn.Module) -> torch.dtype:
    dtype = getattr(module, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next(module.parameters()).dtype


class AttentionPatch:
    """LLLite's learned terms on the inputs of attention q/k/v for one UNet call (`StackRun.attention_patch`).

    Called by the host's attention layers with where it is (block, transformer index, "attn1" / "attn2") and the
    projection inputs; returns them with every active LLLite entry's term added, scaled by the entry's strength x
    mode x layer scale of the block's slot, its mask (resized to the block's token grid) and, in "control" mode, 0
    on uncond rows.
    """

    def __init__(
        self,
        run: StackRun,
        prepared: list,
        x: torch.Tensor,
        chunks: int,
        sigma: float | None,
        window: Window | None = None,
    ) -> None:
        self.run, self.prepared, self.x, self.chunks, self.sigma = run, prepared, x, chunks, sigma
        self.window = window
        self.observer = run.observer
        self.magnitudes: dict[int, list[torch.Tensor | None]] = {}
        """For the report: per entry, per layer slot, the largest mean |term| added in this UNet call."""

    def _record(self, idx: int, slot: int | None, terms: Sequence[torch.Tensor]) -> None:
        if self.observer is None or slot is None or not terms:
            return
        cells = self.magnitudes.setdefault(idx, [None] * self.run.entries[idx].controlnet.num_residuals)
        value = torch.stack([t.detach().abs().float().mean() for t in terms]).max()
        cells[slot] = value if cells[slot] is None else torch.maximum(cells[slot], value)

    def report(self) -> None:
        """Hand this call's per-slot magnitudes to the run's observer (the control report), once per UNet call."""
        if self.observer is None:
            return
        for idx, cells in self.magnitudes.items():
            if any(c is not None for c in cells):
                strength = self.run.entries[idx].strength * self.run.scheduled[idx]
                self.observer(idx, self.sigma, layer_magnitudes(cells), strength)
        self.magnitudes = {}

    def __call__(
        self,
        attn: str,
        block: tuple[str, int] | None,
        block_index: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        activations_shape: Sequence[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if block is None:
            return q, k, v
        # Every entry's term is computed from the original inputs and the terms are summed, like residuals: two
        # stacked LLLites do not see each other's changes (chaining them as ComfyUI patches would).
        q0, k0, v0 = q, k, v
        for idx, cond, row_mult in self.prepared:
            entry = self.run.entries[idx]
            module = entry.controlnet
            if not module.targets(tuple(block), block_index, attn):
                continue
            n = module.num_residuals
            slot = block[1] if block[0] == "input" else n - 1 if block[0] == "middle" else None
            # Output-block modules (not in kohya's default layout) have no layer slot: strength x mode only.
            scales = self.run._scales(idx)
            value = self.run.scheduled[idx]
            scale = scales[slot] if slot is not None and slot < n else entry.strength * value
            mult: float | torch.Tensor = scale
            if entry.mask is not None and activations_shape is not None:
                h, w = int(activations_shape[-2]), int(activations_shape[-1])
                m = self.run._mask_at(
                    idx, self.x, torch.Size((h, w)), self.chunks, _dtype_of(module), self.window
                )
                mult = m.flatten(2).transpose(1, 2) * scale  # B x (h*w) x 1, the token order of the UNet
            if row_mult is not None:
                mult = row_mult.view(-1, 1, 1) * mult
            new = module.apply(tuple(block), block_index, attn, q0, k0, v0, cond, mult)
            self._record(
                idx,
                slot,
                [out - orig for out, orig in zip(new, (q0, k0, v0), strict=True) if out is not orig],
            )
            # untouched inputs come back as the same objects: keep them (and their identity) as they are
            q, k, v = (
                cur if out is orig else out if cur is orig else cur + (out - orig)
                for cur, out, orig in zip((q, k, v), new, (q0, k0, v0), strict=True)
            )
        return q, k, v
