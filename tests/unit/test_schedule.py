"""Control over time and frames (controlnet/schedule.py and its use by the stack): easing curves at known points,
keyframes, guaranteed steps, per-frame strengths, context windows, soft weights -- on random weights."""

from __future__ import annotations

import math

import pytest
import torch
from cn_helpers import random_inputs, rel_err, tiny_controlnet
from controlstack.controlnet import ControlNetError
from controlstack.controlnet.graphs import StepGraphs
from controlstack.controlnet.schedule import (
    FrameRange,
    FrameStrengths,
    Keyframe,
    Schedule,
    ScheduleCursor,
    ease,
    percent_of,
)
from controlstack.controlnet.stack import COND, UNCOND, ResidualStack, StackEntry, Window, mode_scales
from test_graphs import TapeCapture

pytestmark = pytest.mark.unit


def linear(p: float) -> float:
    """The test schedule: sigma falls from 1 to 0 over the run (percent p has noise level 1 - p)."""
    return 1.0 - p


def curved(p: float) -> float:
    """A non-linear, decreasing schedule like a real model's (huge at 0, 0 at 1)."""
    return 999999999.9 if p <= 0 else 0.0 if p >= 1 else 14.6 * (1.0 - p) ** 3


def walk(schedule: Schedule, percents, percent_to_sigma=linear) -> list[float]:
    cursor = ScheduleCursor(schedule, percent_to_sigma)
    return [cursor.at(percent_to_sigma(p)) for p in percents]


@pytest.fixture(scope="module")
def cn():
    return tiny_controlnet("sd1", seed=61)


# -- the maths -------------------------------------------------------------------------------------------------


def test_easing_curves_at_known_points():
    assert [ease("linear", t) for t in (0.0, 0.25, 1.0)] == [0.0, 0.25, 1.0]
    assert ease("ease-in", 0.5) == 0.25 and ease("ease-in", 1.0) == 1.0
    assert ease("ease-out", 0.5) == 0.75 and ease("ease-out", 0.0) == 0.0
    assert ease("ease-in-out", 0.5) == pytest.approx(0.5)
    assert ease("ease-in-out", 0.25) == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    assert ease("hold", 0.9) == 0.0
    with pytest.raises(ControlNetError, match="interpolation: expected one of"):
        ease("cubic", 0.5)


@pytest.mark.parametrize(
    ("interpolation", "at_0_3"),
    [("hold", 1.0), ("linear", 0.5), ("ease-in", 0.75), ("ease-out", 0.25), ("ease-in-out", 0.5)],
)
def test_each_interpolation_between_two_keyframes(interpolation, at_0_3):
    """1.0 at 0 going to 0.0 at 0.6: halfway (0.3) each curve is at its known point, 0 from 0.6 on."""
    schedule = Schedule((Keyframe(0.0, 1.0, interpolation), Keyframe(0.6, 0.0)))
    got = walk(schedule, [0.0, 0.3, 0.6, 0.9])
    assert got[0] == pytest.approx(1.0) and got[2:] == [0.0, 0.0]
    assert got[1] == pytest.approx(at_0_3, abs=1e-9)


def test_interpolation_is_in_sampling_progress_on_a_curved_schedule():
    """The fraction is the progress of the noise level (the host's percent_to_sigma inverted), not of sigma."""
    schedule = Schedule((Keyframe(0.2, 0.0, "linear"), Keyframe(0.8, 1.0)))
    got = walk(schedule, [0.1, 0.35, 0.5, 0.95], curved)
    assert got == pytest.approx([1.0, 0.25, 0.5, 1.0], abs=1e-9)  # 1.0 before the first keyframe
    assert percent_of(curved(0.37), curved) == pytest.approx(0.37, abs=1e-12)


def test_hold_keyframes_take_effect_at_their_level_and_the_first_is_preceded_by_one():
    schedule = Schedule((Keyframe(0.25, 0.5), Keyframe(0.5, 2.0), Keyframe(0.5, 3.0), Keyframe(0.75, 0.0)))
    # two keyframes at one percent: the later one wins
    assert walk(schedule, [0.0, 0.2, 0.25, 0.4, 0.5, 0.7, 0.75, 1.0]) == [1, 1, 0.5, 0.5, 3.0, 3.0, 0, 0]


def test_guaranteed_steps():
    """A keyframe that guarantees 3 steps stays current for 3 steps although the next one's percent has passed;
    without the guarantee the next one takes over at its percent."""
    percents = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    plain = Schedule((Keyframe(0.0, 1.0), Keyframe(0.2, 0.5), Keyframe(0.3, 0.0)))
    held = Schedule((Keyframe(0.0, 1.0), Keyframe(0.2, 0.5, guarantee_steps=3), Keyframe(0.3, 0.0)))
    assert walk(plain, percents) == [1.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0]
    assert walk(held, percents) == [1.0, 1.0, 0.5, 0.5, 0.5, 0.0, 0.0]
    # a keyframe that took effect before the run's first step (denoise < 1) guarantees nothing
    late = walk(held, [0.25, 0.35, 0.45])
    assert late == [0.5, 0.0, 0.0]
    # several calls of one step (cond / uncond batches, context windows) are one step
    cursor = ScheduleCursor(held, linear)
    values = [cursor.at(linear(p)) for p in (0.0, 0.2, 0.2, 0.2, 0.3, 0.3, 0.4, 0.5)]
    assert values == [1.0, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.0]


def test_constant_schedules_and_samples_for_charts():
    assert Schedule((Keyframe(0.0, 0.4), Keyframe(0.5, 0.4, "linear"))).constant == 0.4
    assert Schedule((Keyframe(0.1, 0.4),)).constant is None  # 1.0 until 0.1
    fade = Schedule((Keyframe(0.0, 1.0, "ease-out"), Keyframe(0.6, 0.0)))
    assert fade.sampled(6) == pytest.approx(
        [1.0, 1 - ease("ease-out", 1 / 3), 1 - ease("ease-out", 2 / 3), 0, 0, 0]
    )


def test_bad_keyframes_name_what_is_wrong():
    with pytest.raises(
        ControlNetError, match=r"node 7: percent 0.3 comes before the previous keyframe's 0.6"
    ):
        Schedule((Keyframe(0.6, 1.0, where="node 6"), Keyframe(0.3, 0.0, where="node 7")))
    with pytest.raises(ControlNetError, match=r"node 3: percent: expected a number in \[0, 1\], got 1.5"):
        Keyframe(1.5, 1.0, where="node 3")
    with pytest.raises(ControlNetError, match=r"percent: expected a finite number"):
        Keyframe(float("nan"), 1.0)
    with pytest.raises(ControlNetError, match=r"strength: expected a number in \[0, 10\]"):
        Keyframe(0.5, -1.0)
    with pytest.raises(ControlNetError, match="interpolation: expected one of"):
        Keyframe(0.5, 1.0, "smooth")
    with pytest.raises(ControlNetError, match="guarantee_steps: expected an int"):
        Keyframe(0.5, 1.0, guarantee_steps=1.5)
    with pytest.raises(ControlNetError, match="at least one keyframe"):
        Schedule(())


def test_frame_strengths_resolve_per_latent():
    """Frames 0-7 at 1.0, fading linearly to 0 by frame 15; a later range overrides; -1 is the last frame."""
    fade = FrameStrengths((FrameRange(0, 7, 1.0, 1.0, "hold"), FrameRange(8, 15, 1.0, 0.0, "linear")))
    got = fade.resolve(16)
    assert got[:8] == [1.0] * 8 and got[15] == 0.0
    assert got[8:] == pytest.approx([1 - k / 7 for k in range(8)])
    tail = FrameStrengths((FrameRange(-2, -1, 0.5, 0.25),), other_frames=0.0)
    assert tail.resolve(4) == [0.0, 0.0, 0.5, 0.25]
    over = tail.then(FrameRange(0, 2, 2.0, 2.0, "hold"), other_frames=0.0)
    assert over.resolve(4) == [2.0, 2.0, 2.0, 0.25]
    with pytest.raises(ControlNetError, match=r"node 9: frames 0..15 do not fit a batch of 8 latent\(s\)"):
        FrameStrengths((FrameRange(0, 15, 1.0, 0.0, where="node 9"),)).resolve(8)
    with pytest.raises(ControlNetError, match=r"first_frame \(5\) must not be after last_frame \(2\)"):
        FrameRange(5, 2, 1.0, 1.0)


# -- in the stack ----------------------------------------------------------------------------------------------


class Counter:
    def __init__(self, module) -> None:
        self.calls = 0
        self.handle = module.register_forward_pre_hook(lambda *_: self._count())

    def _count(self) -> None:
        self.calls += 1


def test_a_constant_schedule_equals_that_strength_bit_for_bit(cn):
    x, hint, t, ctx, _ = random_inputs(cn, batch=2, seed=62)
    for mode in ("balanced", "prompt"):
        plain = ResidualStack([StackEntry(cn, hint, strength=0.37, mode=mode)]).begin_run(linear)
        sched = Schedule((Keyframe(0.0, 0.37),))
        scheduled = ResidualStack([StackEntry(cn, hint, mode=mode, schedule=sched)]).begin_run(linear)
        for sigma in (0.9, 0.5, 0.1):
            a = plain.residuals(x, t, ctx, sigma=sigma, cond_or_uncond=(UNCOND, COND))
            b = scheduled.residuals(x, t, ctx, sigma=sigma, cond_or_uncond=(UNCOND, COND))
            assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True)), (mode, sigma)


def test_a_schedule_scales_each_step_and_zero_steps_do_not_run(cn):
    x, hint, t, ctx, _ = random_inputs(cn, batch=1, seed=63)
    fade = Schedule((Keyframe(0.0, 1.0, "linear"), Keyframe(0.5, 0.0)))
    run = ResidualStack([StackEntry(cn, hint, strength=0.8, schedule=fade)]).begin_run(linear)
    plain = cn(x, hint, t, ctx)
    counter = Counter(cn)
    try:
        got = run.residuals(x, t, ctx, sigma=0.75)  # progress 0.25: half way down the fade
        assert counter.calls == 1
        for g, w in zip(got, plain, strict=True):
            assert rel_err(g, 0.8 * 0.5 * w) < 1e-6
        assert run.scheduled == [pytest.approx(0.5)]
        for sigma in (0.5, 0.4, 0.1):
            assert run.residuals(x, t, ctx, sigma=sigma) is None
        assert counter.calls == 1, "a step whose scheduled strength is 0 does not call the ControlNet"
    finally:
        counter.handle.remove()
        run.end()


def test_the_report_sees_the_applied_strength(cn):
    x, hint, t, ctx, _ = random_inputs(cn, batch=1, seed=64)
    fade = Schedule((Keyframe(0.0, 1.0, "linear"), Keyframe(1.0, 0.0)))
    seen = []
    run = ResidualStack([StackEntry(cn, hint, strength=2.0, schedule=fade)]).begin_run(
        linear, observer=lambda idx, sigma, applied, strength: seen.append(strength)
    )
    for sigma in (0.9, 0.6, 0.3):
        run.residuals(x, t, ctx, sigma=sigma)
    assert seen == pytest.approx([1.8, 1.2, 0.6])
    run.end()


def test_a_changing_schedule_value_never_replays_a_stale_graph(cn):
    """Holds, jumps and a linear stretch: the scheduled value reaches the captured step through a buffer refreshed
    every call, so one graph serves every value, and every replayed step equals the eager run bit for bit (the
    stand-in replays the recorded ops without the stack's Python, as a CUDA graph does)."""
    x, hint, t, ctx, _ = random_inputs(cn, batch=1, seed=65)
    sched = Schedule(
        (Keyframe(0.0, 1.0), Keyframe(0.3, 0.5), Keyframe(0.6, 0.25, "linear"), Keyframe(1.0, 0.0))
    )
    capture = TapeCapture()
    entries = [StackEntry(cn, hint, schedule=sched)]
    graphed = ResidualStack(entries).begin_run(linear, graphs=StepGraphs(capture, device_types=("cpu",)))
    eager = ResidualStack(entries).begin_run(linear, use_cuda_graphs=False)
    seen = set()
    for sigma in (0.95, 0.9, 0.6, 0.5, 0.45, 0.3, 0.2, 0.1):
        g = graphed.residuals(x, t, ctx, sigma=sigma)
        w = eager.residuals(x, t, ctx, sigma=sigma)
        seen.add(graphed.scheduled[0])
        assert all(torch.equal(a, b) for a, b in zip(g, w, strict=True)), sigma
    assert len(seen) >= 4 and len(capture.captured) == 1 and capture.replays == 7
    graphed.end()
    eager.end()


def test_frame_strengths_scale_rows_of_both_chunks(cn):
    x, hint, t, ctx, _ = random_inputs(cn, batch=8, seed=66)  # 4 latents x (uncond, cond)
    frames = FrameStrengths((FrameRange(0, 3, 1.0, 0.25, "linear"),))
    run = ResidualStack([StackEntry(cn, hint[:4], frame_strengths=frames)]).begin_run(linear)
    got = run.residuals(x, t, ctx, sigma=0.5, cond_or_uncond=(UNCOND, COND))
    plain = cn(x, hint[:4].repeat(2, 1, 1, 1), t, ctx)
    rows = torch.tensor([1.0, 0.75, 0.5, 0.25] * 2).view(-1, 1, 1, 1)
    for g, w in zip(got, plain, strict=True):
        assert rel_err(g, w * rows) < 1e-6
    with pytest.raises(ControlNetError, match="do not fit a batch of 4"):
        bad = FrameStrengths((FrameRange(0, 7, 1.0, 1.0),))
        ResidualStack([StackEntry(cn, hint[:4], frame_strengths=bad)]).begin_run(linear).residuals(
            x, t, ctx, sigma=0.5, cond_or_uncond=(UNCOND, COND)
        )


def test_a_context_window_gets_the_rows_of_its_frames(cn):
    """A call that holds frames 2, 3, 4 of a 6-frame batch (cond and uncond): the hint, mask and per-frame
    strength rows of exactly those frames, the same as a run on those frames alone."""
    x, hint, t, ctx, _ = random_inputs(cn, batch=6, seed=67)
    mask = torch.rand(6, 16, 16, generator=torch.Generator().manual_seed(68))
    frames = FrameStrengths((FrameRange(0, 5, 0.0, 1.0, "linear"),))
    window = Window((2, 3, 4), total=6)
    xw, tw, cw = x[:3].repeat(2, 1, 1, 1), t[:3].repeat(2), ctx[:3].repeat(2, 1, 1)
    whole = ResidualStack([StackEntry(cn, hint, mask=mask, frame_strengths=frames)]).begin_run(linear)
    got = whole.residuals(xw, tw, cw, sigma=0.5, cond_or_uncond=(UNCOND, COND), window=window)
    alone_frames = FrameStrengths(
        (FrameRange(0, 2, 0.4, 0.8, "linear"),)
    )  # 0.4, 0.6, 0.8 = frames 2..4 of 0..1
    alone = ResidualStack(
        [StackEntry(cn, hint[2:5], mask=mask[2:5], frame_strengths=alone_frames)]
    ).begin_run(linear)
    want = alone.residuals(xw, tw, cw, sigma=0.5, cond_or_uncond=(UNCOND, COND))
    for g, w in zip(got, want, strict=True):
        assert w.abs().mean() > 0
        assert rel_err(g, w) < 1e-6
    # a window protocol without the total: the per-frame hint must cover the frames
    open_window = Window((2, 3, 4))
    again = whole.residuals(xw, tw, cw, sigma=0.5, cond_or_uncond=(UNCOND, COND), window=open_window)
    assert all(torch.equal(a, b) for a, b in zip(again, got, strict=True))
    with pytest.raises(
        ControlNetError, match=r"hint: batch of 4 does not fit the context window \(frames 2..4"
    ):
        short = ResidualStack([StackEntry(cn, hint[:4])]).begin_run(linear)
        short.residuals(xw, tw, cw, sigma=0.5, cond_or_uncond=(UNCOND, COND), window=window)
    with pytest.raises(ControlNetError, match="outside the 4-frame batch"):
        Window((2, 3, 4), total=4)


def test_soft_weights_and_the_uncond_multiplier(cn):
    n = cn.num_residuals
    assert mode_scales("prompt", n) == tuple(0.825 ** (n - 1 - i) for i in range(n))
    assert mode_scales("prompt", n, 0.5) == tuple(0.5 ** (n - 1 - i) for i in range(n))
    assert mode_scales("prompt", n, 0.5, flip=True) == tuple(0.5**i for i in range(n))
    x, hint, t, ctx, _ = random_inputs(cn, batch=2, seed=69)
    entry = StackEntry(cn, hint[:1], mode="prompt", soft_base=0.7, soft_flip=True, uncond_multiplier=0.3)
    got = (
        ResidualStack([entry])
        .begin_run(linear)
        .residuals(x, t, ctx, sigma=0.5, cond_or_uncond=(UNCOND, COND))
    )
    plain = cn(x, hint[:1].expand(2, -1, -1, -1), t, ctx)
    rows = torch.tensor([0.3, 1.0]).view(-1, 1, 1, 1)
    for i, (g, w) in enumerate(zip(got, plain, strict=True)):
        assert rel_err(g, w * 0.7**i * rows) < 1e-6
    with pytest.raises(ControlNetError, match=r"uncond_multiplier: expected a number in \[0, 1\]"):
        StackEntry(cn, hint[:1], uncond_multiplier=1.5)
