"""Control over time and frames: strength schedules over sampling progress and per-frame strengths.

- A `Schedule` is a strength curve over sampling progress made of keyframes (percent -> strength). Each keyframe
  says how the curve goes on to the next keyframe (`INTERPOLATIONS`): "hold" keeps its strength until the next
  keyframe takes over, the others move towards the next keyframe's strength along an easing curve. Before the first
  keyframe the curve is 1.0 (as if there were no schedule). A keyframe may guarantee a number of steps: it stays the
  current keyframe for at least that many steps once it takes effect, even if later keyframes' percents have passed
  (Advanced-ControlNet's `guarantee_steps`).
- A `ScheduleCursor` walks one schedule through one sampling run, one noise level at a time. Keyframes take effect
  at the first step whose noise level is at or below the level of their percent (the same mapping the host uses for
  start / end percents), so a hold schedule of 1.0 inside and 0.0 outside is the window start..end.
- `FrameStrengths` are per-latent strengths for a batch (video frames): ranges of frames, each from one strength to
  another along the same easing curves; frames no range names get `other_frames`.

Pure python (no torch, no host). The run (controlnet/stack.py) multiplies every residual by the scheduled value on
top of strength, mode and layer scales, and every batch row by its frame's strength.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .checks import check_int, finite_float
from .errors import ControlNetError

INTERPOLATIONS = ("hold", "linear", "ease-in", "ease-out", "ease-in-out")
"""How a keyframe goes on to the next one. The easing curves are Advanced-ControlNet's (quadratic in / out, cosine
in-out), so converted graphs keep their shapes."""

MAX_STRENGTH = 10.0
"""The largest strength a keyframe takes (ApplyHint's strength input has the same range)."""


def ease(interpolation: str, t: float) -> float:
    """The fraction of the way from one value to the next at position t in [0, 1] of the span ("hold": 0)."""
    if interpolation == "linear":
        return t
    if interpolation == "ease-in":
        return t * t
    if interpolation == "ease-out":
        return 1.0 - (1.0 - t) ** 2
    if interpolation == "ease-in-out":
        return (1.0 - math.cos(math.pi * t)) / 2.0
    if interpolation == "hold":
        return 0.0
    raise ControlNetError(f"interpolation: expected one of {INTERPOLATIONS}, got {interpolation!r}")


def _check_interpolation(where: str, interpolation: object) -> str:
    if interpolation not in INTERPOLATIONS:
        raise ControlNetError(
            f"{where}interpolation: expected one of {INTERPOLATIONS}, got {interpolation!r}"
        )
    return str(interpolation)


def _prefix(where: str) -> str:
    return f"{where}: " if where else ""


@dataclass(frozen=True)
class Keyframe:
    """From `percent` of sampling progress on, the strength multiplier is `strength` (then `interpolation` to the
    next keyframe). `guarantee_steps`: the keyframe stays current for at least that many steps."""

    percent: float
    strength: float
    interpolation: str = "hold"
    guarantee_steps: int = 0
    where: str = field(default="", compare=False)
    """Names the node that made it, in errors."""

    def __post_init__(self) -> None:
        p = _prefix(self.where)
        finite_float(p + "percent", self.percent, 0.0, 1.0)
        finite_float(p + "strength", self.strength, 0.0, MAX_STRENGTH)
        _check_interpolation(p, self.interpolation)
        check_int(p + "guarantee_steps", self.guarantee_steps, 0, 10000)


@dataclass(frozen=True)
class Schedule:
    """Keyframes in order of percent (a chain of Strength Keyframe nodes)."""

    keyframes: tuple[Keyframe, ...]

    def __post_init__(self) -> None:
        if not self.keyframes:
            raise ControlNetError("schedule: expected at least one keyframe")
        for prev, kf in zip(self.keyframes, self.keyframes[1:], strict=False):
            if kf.percent < prev.percent:
                raise ControlNetError(
                    f"{_prefix(kf.where)}percent {kf.percent:g} comes before the previous keyframe's {prev.percent:g}"
                    f"{f' ({prev.where})' if prev.where else ''}: chain keyframes in order of sampling progress"
                )

    def then(self, keyframe: Keyframe) -> Schedule:
        """This schedule with one more keyframe at its end."""
        return Schedule((*self.keyframes, keyframe))

    @property
    def constant(self) -> float | None:
        """The strength of a schedule that never changes (one value from the first step on), else None."""
        first = self.keyframes[0]
        if first.percent == 0.0 and all(k.strength == first.strength for k in self.keyframes):
            return first.strength
        return None

    def value(self, index: int, percent: float) -> float:
        """The strength when keyframe `index` is current (-1: none yet) at sampling progress `percent`."""
        if index < 0:
            return 1.0
        kf = self.keyframes[index]
        if kf.interpolation == "hold" or index + 1 >= len(self.keyframes):
            return kf.strength
        nxt = self.keyframes[index + 1]
        span = nxt.percent - kf.percent
        t = 1.0 if span <= 0 else min(max((percent - kf.percent) / span, 0.0), 1.0)
        return kf.strength + (nxt.strength - kf.strength) * ease(kf.interpolation, t)

    def sampled(self, steps: int) -> list[float]:
        """The curve at `steps` evenly spaced points of progress 0..1 (no guaranteed steps): for docs and charts."""
        return [
            self.value(self._index_at(i / max(steps - 1, 1)), i / max(steps - 1, 1)) for i in range(steps)
        ]

    def _index_at(self, percent: float) -> int:
        index = -1
        for i, kf in enumerate(self.keyframes):
            if kf.percent <= percent:
                index = i
        return index


def percent_of(sigma: float, percent_to_sigma: Callable[[float], float], iterations: int = 48) -> float:
    """The sampling progress of noise level `sigma`: the inverse of the host's (decreasing) `percent_to_sigma`,
    by bisection, so it works for any model sampling the host has. 48 halvings: ~4e-15."""
    lo, hi = 0.0, 1.0
    if sigma >= percent_to_sigma(0.0):
        return 0.0
    if sigma <= percent_to_sigma(1.0):
        return 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2.0
        if percent_to_sigma(mid) > sigma:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


class ScheduleCursor:
    """One schedule walked through one sampling run: `at(sigma)` is the strength at a UNet call of that noise level.

    Stateful like the sampler: a new noise level is a new step (several UNet calls of one step -- cond / uncond
    batches, context windows -- share one value); guaranteed steps count steps. Keyframes are never revisited.
    """

    def __init__(self, schedule: Schedule, percent_to_sigma: Callable[[float], float]) -> None:
        self.schedule = schedule
        self._percent_to_sigma = percent_to_sigma
        self._levels = [float(percent_to_sigma(k.percent)) for k in schedule.keyframes]
        self._index = -1
        self._used = 0
        self._sigma: float | None = None
        self._first_sigma: float | None = None
        self.value = 1.0 if schedule.constant is None else schedule.constant

    def _guarantee(self, index: int) -> int:
        # A keyframe that took effect before this run's first step (a second pass, denoise < 1) guarantees nothing.
        if index < 0 or self._first_sigma is None or self._levels[index] > self._first_sigma:
            return 0
        return self.schedule.keyframes[index].guarantee_steps

    def at(self, sigma: float | None) -> float:
        if sigma is None or sigma == self._sigma:
            return self.value
        self._sigma = sigma
        if self._first_sigma is None:
            self._first_sigma = sigma
        if self._index < 0 or self._used >= self._guarantee(self._index):
            for i in range(self._index + 1, len(self._levels)):
                if self._levels[i] < sigma:
                    break
                self._index, self._used = i, 0
                if self._guarantee(i) > 0:
                    break
        self._used += 1
        kf = self.schedule.keyframes[self._index] if self._index >= 0 else None
        percent = 0.0
        if kf is not None and kf.interpolation != "hold":
            percent = percent_of(sigma, self._percent_to_sigma)
        self.value = self.schedule.value(self._index, percent)
        return self.value


@dataclass(frozen=True)
class FrameRange:
    """Frames `first`..`last` (inclusive; negative counts from the end: -1 is the last frame) go from
    `strength_from` to `strength_to` along `interpolation` ("hold": all at `strength_from`)."""

    first: int
    last: int
    strength_from: float
    strength_to: float
    interpolation: str = "linear"
    where: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        p = _prefix(self.where)
        check_int(p + "first_frame", self.first, -100000, 100000)
        check_int(p + "last_frame", self.last, -100000, 100000)
        finite_float(p + "strength_from", self.strength_from, 0.0, MAX_STRENGTH)
        finite_float(p + "strength_to", self.strength_to, 0.0, MAX_STRENGTH)
        _check_interpolation(p, self.interpolation)
        if self.first >= 0 and self.last >= 0 and self.first > self.last:
            raise ControlNetError(f"{p}first_frame ({self.first}) must not be after last_frame ({self.last})")


@dataclass(frozen=True)
class FrameStrengths:
    """Per-latent strengths of a batch: ranges applied in order (a later range overrides an earlier one where they
    overlap), `other_frames` for the frames no range names."""

    ranges: tuple[FrameRange, ...]
    other_frames: float = 1.0

    def __post_init__(self) -> None:
        if not self.ranges:
            raise ControlNetError("frame strengths: expected at least one frame range")
        finite_float("other_frames", self.other_frames, 0.0, MAX_STRENGTH)

    def then(self, frame_range: FrameRange, other_frames: float) -> FrameStrengths:
        return FrameStrengths((*self.ranges, frame_range), other_frames)

    def resolve(self, frames: int, what: str = "frame strengths") -> list[float]:
        """One strength per latent of a batch of `frames`. A range that names a frame the batch does not have is an
        error (the keyframes were made for another batch)."""
        out = [self.other_frames] * frames
        for r in self.ranges:
            first = r.first + frames if r.first < 0 else r.first
            last = r.last + frames if r.last < 0 else r.last
            if not (0 <= first < frames and 0 <= last < frames) or first > last:
                raise ControlNetError(
                    f"{_prefix(r.where) or what + ': '}frames {r.first}..{r.last} do not fit a batch of {frames} "
                    f"latent(s) (frames 0..{frames - 1}, or -{frames}..-1 from the end)"
                )
            for i in range(first, last + 1):
                t = 0.0 if last == first else (i - first) / (last - first)
                out[i] = r.strength_from + (r.strength_to - r.strength_from) * ease(r.interpolation, t)
        return out


def frame_rows(strengths: Sequence[float], frames: Sequence[int] | None, chunks: int) -> list[float]:
    """Per-row multipliers of one UNet call: each chunk (cond / uncond) holds the latents `frames` (None: all of
    `strengths`, in order), so every chunk gets the same per-frame values."""
    per_chunk = list(strengths) if frames is None else [strengths[f] for f in frames]
    return per_chunk * chunks
