"""The CUDA-graph cache's policy (controlnet/graphs.py) on the CPU, with a stand-in capture: warm-up on first sight,
capture on the second, replay after; one graph per layout key; capture failure turns graphs off; and the stack's
use of it (what it keys on, when it stays out)."""

from __future__ import annotations

import logging

import pytest
import torch
from cn_helpers import random_inputs, rel_err, tiny_controlnet
from controlstack.controlnet.graphs import StepGraphs, graph_key
from controlstack.controlnet.stack import COND, UNCOND, ResidualStack, StackEntry

pytestmark = pytest.mark.unit


class StandInCapture:
    """Captures like CUDA graphs do (inputs copied into static buffers, the step "recorded" on them) and counts."""

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


def test_the_stack_keeps_graphs_off_for_the_report_and_when_turned_off(cn):
    x, hint, t, ctx, _ = random_inputs(cn, batch=1, seed=33)
    stack = ResidualStack([StackEntry(cn, hint)])
    for kwargs in ({"observer": lambda *call: None}, {"use_cuda_graphs": False}):
        capture = StandInCapture()
        run = stack.begin_run(lambda p: 1.0 - p, graphs=StepGraphs(capture, device_types=("cpu",)), **kwargs)
        for _ in range(2):  # the second sight would capture
            run.residuals(x, t, ctx)
        assert capture.captured == [] and capture.replays == 0, kwargs
        run.end()
