"""The CUDA-graph cache's policy (controlnet/graphs.py) on the CPU, with a stand-in capture: warm-up on first sight,
capture on the second, replay after; one graph per layout key; capture failure turns graphs off; and the stack's
use of it (what it keys on, when it stays out, the report measured inside the step, and the steady state: graphs and
their buffers kept across runs of one stack, dropped when the stack or its weights' placement change)."""

from __future__ import annotations

import logging

import pytest
import torch
from cn_helpers import SD1_SLOTS, random_inputs, randomize_, rel_err, tiny_controlnet
from controlstack.controlnet import build_controlnet
from controlstack.controlnet.graphs import StepGraphs, graph_key, placement_of
from controlstack.controlnet.report import StackRecorder
from controlstack.controlnet.schedule import Keyframe, Schedule
from controlstack.controlnet.stack import COND, UNCOND, ResidualStack, StackEntry
from controlstack.controlnet.t2i_adapter import T2IAdapterConfig, build_t2i_adapter

pytestmark = pytest.mark.unit


class StandInCapture:
    """Captures like CUDA graphs do (inputs copied into static buffers, the step "recorded" on them) and counts.
    A replay calls the recorded step on the static inputs: it reads what the capturing run's caches point at (for
    the stack: the graph cache's kept buffers), as a replayed CUDA graph reads the addresses it was captured with."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.captured: list[tuple] = []
        self.replays = 0

    def __call__(self, compute, inputs):
        if self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        capture = self

        class Step:
            def __init__(self) -> None:
                self.static = [None if t is None else t.clone() for t in inputs]
                self.compute = compute

            def replay(self, *new):
                capture.replays += 1
                for s, n in zip(self.static, new, strict=True):
                    if s is not None:
                        s.copy_(n)
                return self.compute(*self.static)

        self.captured.append(tuple(t.shape if t is not None else None for t in inputs))
        return Step()


class TapeCapture:
    """A stand-in that replays like a CUDA graph: capture records every aten op of the step (under a dispatch mode)
    with the very tensors it read and wrote; replay runs the same ops on the same tensors, copying each result into
    the tensor recorded for it. No Python of the stack runs at replay: what the step read from a per-run cache is
    read again from that tensor, so a buffer the stack forgot to refresh shows up as wrong numbers. A host sync
    (`.item()`) in the step fails the capture, as it does on CUDA.

    `leaves(step)`: the storages the step read that it did not make (inputs, weights, cached tensors), so a test can
    check that each of them is held for the graph's life (static inputs, weights, kept buffers): on a GPU a replay
    reads freed memory otherwise."""

    def __init__(self) -> None:
        self.steps: list = []
        self.replays = 0

    @property
    def captured(self) -> list:
        return self.steps

    def __call__(self, compute, inputs):
        from torch.utils._python_dispatch import TorchDispatchMode

        ops: list = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    raise RuntimeError("CUDA graph capture: a host sync (.item()) inside the step")
                out = func(*args, **(kwargs or {}))
                ops.append((func, args, kwargs or {}, out))
                return out

        static = tuple(None if t is None else t.clone() for t in inputs)
        with Record():
            out = compute(*static)
        capture = self

        class Step:
            def __init__(self) -> None:
                self.static, self.ops, self.out = static, ops, out

            def replay(self, *new):
                capture.replays += 1
                for s, n in zip(self.static, new, strict=True):
                    if s is not None:
                        s.copy_(n)
                for func, args, kwargs, recorded in self.ops:
                    result = func(*args, **kwargs)
                    pairs = (
                        zip(recorded, result, strict=True)
                        if isinstance(recorded, (tuple, list))
                        else [(recorded, result)]
                    )
                    for old, fresh in pairs:
                        if isinstance(old, torch.Tensor) and fresh is not old:
                            old.copy_(fresh)
                return self.out

        step = Step()
        self.steps.append(step)
        return step

    @staticmethod
    def leaves(step) -> list[torch.Tensor]:
        made = set()
        out = []
        for _, args, kwargs, result in step.ops:
            for a in [*args, *kwargs.values()]:
                for t in a if isinstance(a, (tuple, list)) else [a]:
                    if isinstance(t, torch.Tensor) and id(t) not in made:
                        out.append(t)
            for t in result if isinstance(result, (tuple, list)) else [result]:
                if isinstance(t, torch.Tensor):
                    made.add(id(t))
        return out


def assert_replays_read_only_held_tensors(capture: TapeCapture, graphs: StepGraphs, modules) -> None:
    """Every tensor a captured step reads and did not make is a static input, a weight or a kept buffer."""
    held = {t.untyped_storage().data_ptr() for t in graphs._kept.values()}
    for m in modules:
        held |= {t.untyped_storage().data_ptr() for t in (*m.parameters(), *m.buffers())}
    for step in capture.steps:
        allowed = held | {t.untyped_storage().data_ptr() for t in step.static if t is not None}
        stray = [
            tuple(t.shape) for t in capture.leaves(step) if t.untyped_storage().data_ptr() not in allowed
        ]
        assert not stray, f"a replay would read tensors nobody holds: {stray}"


class Eager:
    """The eager step: a known function of the inputs, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x, t, c, y):
        self.calls += 1
        return [x * 2.0, None, x.sum() + t.sum() + c.sum()]


def inputs(batch: int = 2, size: int = 4, dtype=torch.float32):
    g = torch.Generator().manual_seed(batch * 100 + size)
    return (
        torch.randn(batch, 4, size, size, generator=g, dtype=dtype),
        torch.full((batch,), 500.0),
        torch.randn(batch, 7, 8, generator=g),
        None,
    )


def key_of(ins, groups=((0,),), chunks=(UNCOND, COND), out_dtype=torch.float32):
    return graph_key(groups, chunks, out_dtype, *ins)


def test_warm_up_then_capture_then_replay():
    capture, eager = StandInCapture(), Eager()
    graphs = StepGraphs(capture, device_types=("cpu",))
    ins = inputs()
    key = key_of(ins)
    first = graphs.step(key, eager, ins)
    assert (eager.calls, len(capture.captured), capture.replays) == (1, 0, 0), "first sight: eager warm-up"
    second = graphs.step(key, eager, ins)
    assert (len(capture.captured), capture.replays) == (1, 1), "second sight: captured, then replayed"
    calls = eager.calls
    new = (ins[0] + 1.0, ins[1] - 1.0, ins[2], None)
    third = graphs.step(key, eager, new)
    assert capture.replays == 2 and len(capture.captured) == 1 and len(graphs) == 1
    assert eager.calls == calls + 1  # the stand-in replays by calling the recorded step on its static inputs
    assert torch.equal(first[0], second[0]) and torch.equal(third[0], new[0] * 2.0)
    assert float(third[2]) == pytest.approx(float(new[0].sum() + new[1].sum() + new[2].sum()), rel=1e-6)


@pytest.mark.parametrize(
    "change",
    ["groups", "chunks", "out_dtype", "x shape", "x dtype", "context shape", "y", "device"],
)
def test_each_part_of_the_layout_is_its_own_graph(change):
    """A layout differing in any keyed part is a new layout: warm-up first, its own graph after."""
    ins = inputs()
    base = key_of(ins)
    x, t, c, y = ins
    other = {
        "groups": lambda: key_of(ins, groups=((0, 1),)),
        "chunks": lambda: key_of(ins, chunks=(COND, UNCOND)),
        "out_dtype": lambda: key_of(ins, out_dtype=torch.float16),
        "x shape": lambda: key_of(inputs(size=6)),
        "x dtype": lambda: key_of((x.double(), t, c, y)),
        "context shape": lambda: key_of((x, t, c[:, :5], y)),
        "y": lambda: key_of((x, t, c, torch.zeros(2, 3))),
        "device": lambda: key_of((x.to("meta"), t, c, y)),
    }[change]()
    assert other != base and hash(other) != hash(base)
    capture, eager = StandInCapture(), Eager()
    graphs = StepGraphs(capture, device_types=("cpu",))
    graphs.step(base, eager, ins)
    graphs.step(base, eager, ins)  # base captured
    graphs.step(other, eager, ins)
    assert len(capture.captured) == 1, "a new layout starts with a warm-up"
    graphs.step(other, eager, ins)
    assert len(capture.captured) == 2 and len(graphs) == 2


def test_capture_failure_turns_graphs_off(caplog):
    capture, eager = StandInCapture(fail=True), Eager()
    graphs = StepGraphs(capture, device_types=("cpu",))
    ins = inputs()
    key = key_of(ins)
    graphs.step(key, eager, ins)
    with caplog.at_level(logging.WARNING, logger="controlstack.controlnet.graphs"):
        out = graphs.step(key, eager, ins)  # the capture fails: eager result, never an exception
    assert torch.equal(out[0], ins[0] * 2.0)
    assert "CUDA graph capture failed" in caplog.text and "stream is capturing" in caplog.text
    assert not graphs.enabled and not graphs.covers(torch.device("cpu")) and len(graphs) == 0
    capture.fail = False
    for _ in range(3):
        graphs.step(key, eager, ins)
    assert capture.captured == [] and eager.calls == 5, "no further capture tries"


def test_clear_forgets_graphs_and_what_was_seen():
    capture, eager = StandInCapture(), Eager()
    graphs = StepGraphs(capture, device_types=("cpu",))
    ins = inputs()
    key = key_of(ins)
    graphs.step(key, eager, ins)
    graphs.step(key, eager, ins)
    graphs.clear()
    assert len(graphs) == 0
    graphs.step(key, eager, ins)
    assert len(capture.captured) == 1, "after clear(), a layout is warmed up again before capture"
    graphs.step(key, eager, ins)
    assert len(capture.captured) == 2


def test_devices_covered():
    assert StepGraphs(StandInCapture()).covers(torch.device("cuda", 0))
    assert not StepGraphs(StandInCapture()).covers(torch.device("cpu"))
    assert StepGraphs(StandInCapture(), device_types=("cpu",)).covers(torch.device("cpu"))


@pytest.fixture(scope="module")
def cn():
    return tiny_controlnet("sd1", seed=31)


def test_the_stack_keys_its_steps_and_replays_equal_numbers(cn):
    """Through a stack run: warm-up, capture, replay over three steps give the eager numbers; a step with another
    set of active entries is another layout."""
    x, hint, t, ctx, _ = random_inputs(cn, batch=2, seed=32)
    entries = [StackEntry(cn, hint[:1], strength=0.7), StackEntry(cn, hint[1:], end_percent=0.5)]
    capture = StandInCapture()
    run = ResidualStack(entries).begin_run(
        lambda p: 1.0 - p, graphs=StepGraphs(capture, device_types=("cpu",))
    )
    eager = ResidualStack(entries).begin_run(lambda p: 1.0 - p, use_cuda_graphs=False)
    for step in range(3):
        xs = x + step
        got = run.residuals(xs, t, ctx, sigma=0.3, cond_or_uncond=(UNCOND, COND))  # only entry 0
        want = eager.residuals(xs, t, ctx, sigma=0.3, cond_or_uncond=(UNCOND, COND))
        for g, w in zip(got, want, strict=True):
            assert w.abs().mean() > 0 and rel_err(g, w) < 1e-6
    assert len(capture.captured) == 1 and capture.replays == 2
    run.residuals(x, t, ctx, sigma=0.9, cond_or_uncond=(UNCOND, COND))  # both entries: a new layout
    assert len(capture.captured) == 1, "first sight of (0, 1): eager"
    run.residuals(x, t, ctx, sigma=0.9, cond_or_uncond=(UNCOND, COND))
    assert len(capture.captured) == 2
    run.end()
    eager.end()


def test_the_stack_keeps_graphs_off_when_turned_off(cn):
    x, hint, t, ctx, _ = random_inputs(cn, batch=1, seed=33)
    stack = ResidualStack([StackEntry(cn, hint)])
    capture = StandInCapture()
    run = stack.begin_run(
        lambda p: 1.0 - p, graphs=StepGraphs(capture, device_types=("cpu",)), use_cuda_graphs=False
    )
    for _ in range(2):  # the second sight would capture
        run.residuals(x, t, ctx)
    assert capture.captured == [] and capture.replays == 0
    run.end()


def test_the_report_is_measured_inside_the_replayed_step(cn):
    """The Sampler's control report on the fast path: the per-layer magnitudes are outputs of the captured step, so
    replayed steps report the same numbers as an eager run, and the residuals are the same as without a report."""
    x, hint, t, ctx, _ = random_inputs(cn, batch=2, seed=34)
    mask = torch.rand(1, 24, 24, generator=torch.Generator().manual_seed(35))
    stack = ResidualStack(
        [StackEntry(cn, hint[:1], strength=0.6, mask=mask), StackEntry(cn, hint[1:], mode="control")]
    )
    fast, slow, silent = StackRecorder(2), StackRecorder(2), StackRecorder(2)
    capture = TapeCapture()
    graphs = StepGraphs(capture, device_types=("cpu",))
    run = stack.begin_run(lambda p: 1.0 - p, graphs=graphs, observer=fast)
    eager = stack.begin_run(lambda p: 1.0 - p, use_cuda_graphs=False, observer=slow)
    plain = stack.begin_run(lambda p: 1.0 - p, use_cuda_graphs=False)
    for step, sigma in enumerate((0.9, 0.7, 0.5, 0.3)):
        xs = x * (1.0 + step)
        got = run.residuals(xs, t * sigma, ctx, sigma=sigma, cond_or_uncond=(UNCOND, COND))
        want = plain.residuals(xs, t * sigma, ctx, sigma=sigma, cond_or_uncond=(UNCOND, COND))
        eager.residuals(xs, t * sigma, ctx, sigma=sigma, cond_or_uncond=(UNCOND, COND))
        for g, w in zip(got, want, strict=True):
            assert w.abs().mean() > 0 and rel_err(g, w) < 1e-6
    assert len(capture.captured) == 1 and capture.replays == 3, "steps 2 (captured), 3 and 4 were replayed"
    for f, e in zip(fast.table([cn.num_residuals] * 2), slow.table([cn.num_residuals] * 2), strict=True):
        assert f.shape == (cn.num_residuals, 4) and e.min() > 0
        assert torch.allclose(f, e, rtol=1e-6, atol=0), "replayed steps report what eager steps do"
    assert_replays_read_only_held_tensors(capture, graphs, [cn])
    assert fast.strengths() == slow.strengths() == [[0.6] * 4, [1.0] * 4]
    assert silent.sigmas == []
    for r in (run, eager, plain):
        r.end()


def test_a_step_with_a_report_is_its_own_graph(cn):
    x, hint, t, ctx, _ = random_inputs(cn, batch=1, seed=36)
    stack = ResidualStack([StackEntry(cn, hint)])
    capture = TapeCapture()
    graphs = StepGraphs(capture, device_types=("cpu",))
    for observer in (None, StackRecorder(1)):
        run = stack.begin_run(lambda p: 1.0 - p, graphs=graphs, observer=observer)
        for _ in range(2):
            run.residuals(x, t, ctx)
        run.end()
    assert len(capture.captured) == 2 and len(graphs) == 2


# -- the steady state: graphs that outlive a run ------------------------------------------------------------------

SIGMAS = (0.9, 0.8, 0.7)


def sample(stack, graphs, x, t, ctx, hint_fitter=None, **kwargs):
    """One run over SIGMAS (x, t changing each step) through `graphs`; its residuals and the eager run's."""
    fast = stack.begin_run(lambda p: 1.0 - p, graphs=graphs, hint_fitter=hint_fitter, **kwargs)
    eager = stack.begin_run(lambda p: 1.0 - p, use_cuda_graphs=False, hint_fitter=hint_fitter, **kwargs)
    out = []
    for step, sigma in enumerate(SIGMAS):
        xs, ts = x + 0.5 * step, t * sigma
        got = fast.residuals(xs, ts, ctx, sigma=sigma, cond_or_uncond=(UNCOND, COND))
        want = eager.residuals(xs, ts, ctx, sigma=sigma, cond_or_uncond=(UNCOND, COND))
        out.append(
            ([g.clone() for g in got], want)
        )  # a replay overwrites the previous step's outputs, as on CUDA
    fast.end()
    eager.end()
    return out


def assert_equal_steps(steps):
    for got, want in steps:
        for g, w in zip(got, want, strict=True):
            assert w.abs().mean() > 0 and rel_err(g, w) < 1e-6


def test_a_later_run_of_the_same_stack_replays_from_its_first_step(cn):
    """Run 1 warms up, captures and replays; run 2 of the same stack (new x, t every step) replays every step, with
    the eager numbers: no warm-up, no capture."""
    x, hint, t, ctx, _ = random_inputs(cn, batch=2, seed=37)
    mask = torch.rand(1, 24, 24, generator=torch.Generator().manual_seed(38))
    stack = ResidualStack(
        [StackEntry(cn, hint[:1], strength=0.7, mask=mask), StackEntry(cn, hint[1:], mode="control")]
    )
    capture = TapeCapture()
    graphs = StepGraphs(capture, device_types=("cpu",))
    assert_equal_steps(sample(stack, graphs, x, t, ctx))
    assert (len(capture.captured), capture.replays) == (1, 2) and not graphs.in_use
    assert_equal_steps(sample(stack, graphs, x * 2.0, t, ctx))
    assert (len(capture.captured), capture.replays) == (1, 5), "run 2: three replays, nothing captured"
    assert_replays_read_only_held_tensors(capture, graphs, [cn])


def test_a_later_run_replays_with_its_own_hints(cn):
    """A replayed step reads the run's hints from buffers kept across runs: run 2's hint fitter (the previews are
    sent each run) gives other hints, and the replayed steps use them."""
    x, hint, t, ctx, _ = random_inputs(cn, batch=2, seed=39)
    other = torch.rand(hint[:1].shape, generator=torch.Generator().manual_seed(40))
    stack = ResidualStack([StackEntry(cn, hint[:1])])
    capture = TapeCapture()
    graphs = StepGraphs(capture, device_types=("cpu",))
    fitted = []
    first = sample(stack, graphs, x, t, ctx, lambda e, kind, h, w: fitted.append(1) or hint[:1])
    second = sample(stack, graphs, x, t, ctx, lambda e, kind, h, w: fitted.append(2) or other)
    assert_equal_steps(second)
    assert capture.replays == 2 + 3 and len(capture.captured) == 1
    assert fitted.count(2) == 2, "run 2 fitted its hint (its fast and its eager run once each)"
    assert rel_err(second[0][0][0], first[0][0][0]) > 1e-3, "the hints differ: the comparison can fail"
    assert_replays_read_only_held_tensors(capture, graphs, [cn])


def test_a_new_stack_or_moved_weights_drop_the_graphs():
    cn = tiny_controlnet("sd1", seed=41)
    x, hint, t, ctx, _ = random_inputs(cn, batch=2, seed=42)
    capture = TapeCapture()
    graphs = StepGraphs(capture, device_types=("cpu",))
    stack = ResidualStack([StackEntry(cn, hint[:1])])
    sample(stack, graphs, x, t, ctx)
    assert len(capture.captured) == 1
    # another stack (an edited graph) with the same layout: its own graphs, after its own warm-up
    edited = stack.replace_entry(0, strength=0.5)
    assert_equal_steps(sample(edited, graphs, x, t, ctx))
    assert len(capture.captured) == 2 and capture.replays == 2 + 2
    # the host moved a weight (offload and reload, a recast): new addresses, so the graphs are captured again
    weight = next(cn.parameters())
    weight.data = weight.data.clone()
    assert_equal_steps(sample(edited, graphs, x, t, ctx))
    assert len(capture.captured) == 3 and capture.replays == 2 + 2 + 2, "warm-up, capture, replay again"
    # weights not on the step's device (the host runs part of the model layer by layer): no graphs, no replay
    assert placement_of([cn], torch.device("meta")) is None
    assert placement_of([cn], torch.device("cpu")) is not None
    assert not graphs.bind(edited, None) and len(graphs) == 0


def test_a_second_run_while_one_holds_the_graphs_runs_eagerly(cn):
    x, hint, t, ctx, _ = random_inputs(cn, batch=2, seed=43)
    stack = ResidualStack([StackEntry(cn, hint[:1])])
    capture = TapeCapture()
    graphs = StepGraphs(capture, device_types=("cpu",))
    holder = stack.begin_run(lambda p: 1.0 - p, graphs=graphs)
    assert graphs.in_use
    assert_equal_steps(sample(stack, graphs, x, t, ctx))
    assert capture.captured == [] and graphs.in_use, "the second run ran eagerly and left the holder's cache"
    holder.end()
    assert not graphs.in_use
    sample(stack, graphs, x, t, ctx)
    assert len(capture.captured) == 1


def tiny_t2i_stack_parts():
    """A ControlNet with SD1's 13 slots and a T2I-Adapter for it."""
    cn = randomize_(build_controlnet(SD1_SLOTS, name="cn"), seed=44).eval().requires_grad_(False)
    t2i = T2IAdapterConfig(light=False, cin=192, channels=(16, 32, 32, 32), nums_rb=1)
    adapter = randomize_(build_t2i_adapter(t2i, name="t2i"), seed=45).eval().requires_grad_(False)
    return cn, adapter


def test_a_replay_reads_t2i_features_at_the_current_schedule_value():
    """T2I features are per-run buffers scaled by the schedule: they are refreshed at each step's value before a
    replay, so the one graph (captured at 1.0) replayed at 0.4 and at 1.0 again reads the features of its step."""
    cn, adapter = tiny_t2i_stack_parts()
    x, hint, t, ctx, _ = random_inputs(cn, batch=2, seed=46)
    back_and_forth = Schedule((Keyframe(0.0, 1.0), Keyframe(0.3, 0.4), Keyframe(0.6, 1.0)))
    stack = ResidualStack([StackEntry(cn, hint[:1]), StackEntry(adapter, hint[1:], schedule=back_and_forth)])
    capture = TapeCapture()
    graphs = StepGraphs(capture, device_types=("cpu",))
    fast = stack.begin_run(lambda p: 1.0 - p, graphs=graphs)
    eager = stack.begin_run(lambda p: 1.0 - p, use_cuda_graphs=False)
    for sigma in (0.95, 0.9, 0.85, 0.6, 0.55, 0.5, 0.3, 0.25):  # values 1, 1, 1, 0.4, 0.4, 0.4, 1, 1
        got = fast.control(x, t, ctx, sigma=sigma, cond_or_uncond=(UNCOND, COND))
        want = eager.control(x, t, ctx, sigma=sigma, cond_or_uncond=(UNCOND, COND))
        for g, w in zip(got.input, want.input, strict=True):
            assert (g is None and w is None) or (w.abs().mean() > 0 and rel_err(g, w) < 1e-6), sigma
        assert rel_err(got.middle, want.middle) < 1e-6
    assert len(capture.captured) == 1 and capture.replays == 7, (
        "one graph for every value: refreshed, not keyed"
    )
    assert_replays_read_only_held_tensors(capture, graphs, [cn, adapter])
    fast.end()
    eager.end()


def test_a_fade_is_one_graph_and_replays_bit_for_bit():
    """An interpolated schedule changes the strength every step; the strength reaches the captured step through a
    kept scale buffer, so the whole fade is one capture, and (float32 maths either way) each replayed step equals the
    eager step exactly. (A multi-hint Union group takes its strengths as python floats into its fusion: those
    values stay in the key.)"""
    cn = tiny_controlnet("sd1", seed=47)
    x, hint, t, ctx, _ = random_inputs(cn, batch=2, seed=48)
    mask = torch.rand(1, 24, 24, generator=torch.Generator().manual_seed(49))
    fade = Schedule((Keyframe(0.0, 1.0, "linear"), Keyframe(1.0, 0.1)))
    stack = ResidualStack(
        [StackEntry(cn, hint[:1], strength=0.9, mask=mask, schedule=fade), StackEntry(cn, hint[1:])]
    )
    capture = TapeCapture()
    graphs = StepGraphs(capture, device_types=("cpu",))
    fast = stack.begin_run(lambda p: 1.0 - p, graphs=graphs)
    eager = stack.begin_run(lambda p: 1.0 - p, use_cuda_graphs=False)
    values = []
    for step, sigma in enumerate((0.9, 0.75, 0.6, 0.45, 0.3, 0.15)):
        xs = x + step
        got = fast.residuals(xs, t, ctx, sigma=sigma, cond_or_uncond=(UNCOND, COND))
        want = eager.residuals(xs, t, ctx, sigma=sigma, cond_or_uncond=(UNCOND, COND))
        values.append(fast.scheduled[0])
        for g, w in zip(got, want, strict=True):
            assert w.abs().mean() > 0 and torch.equal(g, w), (sigma, rel_err(g, w))
    assert len(set(values)) == 6, "the strength changed every step"
    assert len(capture.captured) == 1 and capture.replays == 5
    assert_replays_read_only_held_tensors(capture, graphs, [cn])
    fast.end()
    eager.end()
