"""Opt-in torch.compile of the stack's forwards (controlnet/compiled.py), on the CPU with a counting backend (the
real default, inductor, takes about a minute per shape here): compiled once per module and shape, reused by later
steps and later runs, the eager numbers, and a failed compile falls back to eager with a warning."""

from __future__ import annotations

import logging

import pytest
import torch
from cn_helpers import random_inputs, rel_err, tiny_controlnet
from controlstack.controlnet import ControlNetError
from controlstack.controlnet.compiled import CompiledForwards
from controlstack.controlnet.stack import COND, UNCOND, ResidualStack, StackEntry

pytestmark = pytest.mark.unit


class CountingBackend:
    """A torch.compile backend that runs the captured FX graph as is and counts compiles."""

    def __init__(self, fail: bool = False) -> None:
        self.compiles = 0
        self.fail = fail

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        if self.fail:
            raise RuntimeError("no C++ compiler found")
        return gm.forward


def steps(stack, compiled, x, t, ctx, sigmas=(0.9, 0.6, 0.3)):
    """Residuals of a run with `compiled` and of a plain eager run, step by step."""
    fast = stack.begin_run(lambda p: 1.0 - p, use_cuda_graphs=False, compiled=compiled)
    eager = stack.begin_run(lambda p: 1.0 - p, use_cuda_graphs=False)
    out = []
    for i, sigma in enumerate(sigmas):
        got = fast.residuals(x + i, t, ctx, sigma=sigma, cond_or_uncond=(UNCOND, COND))
        want = eager.residuals(x + i, t, ctx, sigma=sigma, cond_or_uncond=(UNCOND, COND))
        out.append((got, want))
    fast.end()
    eager.end()
    return out


def test_compiled_once_per_module_and_shape_across_runs():
    torch._dynamo.reset()
    a, b = tiny_controlnet("sd1", seed=51), tiny_controlnet("sd1", seed=52)
    x, hint, t, ctx, _ = random_inputs(a, batch=2, seed=53)
    stack = ResidualStack([StackEntry(a, hint[:1], strength=0.7), StackEntry(b, hint[1:], mode="control")])
    backend = CountingBackend()
    compiled = CompiledForwards(backend)
    counts = []
    for _ in range(2):  # two sampling runs of the same stack
        for got, want in steps(stack, compiled, x, t, ctx):
            for g, w in zip(got, want, strict=True):
                assert w.abs().mean() > 0 and rel_err(g, w) < 1e-6
        counts.append(backend.compiles)
    # torch inlines nn.Module weights as graph inputs: two ControlNets of one layout may share one compiled graph
    assert counts[0] in (1, 2) and counts[1] == counts[0], (
        "compiled in run 1, reused by every later step and run"
    )
    x2, hint2, t2, ctx2, _ = random_inputs(a, batch=2, latent=12, seed=54)  # another latent size
    steps(ResidualStack([StackEntry(a, hint2[:1])]), compiled, x2, t2, ctx2)
    assert backend.compiles > counts[1], "a new shape compiles again"


def test_a_failed_compile_runs_eagerly_with_a_warning(caplog):
    torch._dynamo.reset()
    cn = tiny_controlnet("sd1", seed=55)
    x, hint, t, ctx, _ = random_inputs(cn, batch=2, seed=56)
    backend = CountingBackend(fail=True)
    compiled = CompiledForwards(backend)
    with caplog.at_level(logging.WARNING, logger="controlstack.controlnet.compiled"):
        out = steps(ResidualStack([StackEntry(cn, hint[:1])]), compiled, x, t, ctx)
    for got, want in out:
        for g, w in zip(got, want, strict=True):
            assert rel_err(g, w) < 1e-6
    assert caplog.text.count("torch.compile of") == 1 and "no C++ compiler" in caplog.text
    assert backend.compiles == 1, "no second try"


def test_input_errors_are_the_modules_own():
    compiled = CompiledForwards(CountingBackend())

    class Strict(torch.nn.Module):
        def forward(self, x):
            raise ControlNetError("hint: expected 3 channels")

    with pytest.raises(ControlNetError, match="expected 3 channels"):
        compiled.call(Strict(), torch.zeros(1))
