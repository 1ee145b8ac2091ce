"""GPU check of the stack's CUDA graphs (controlnet/graphs.py) with the real capture: replay equals eager.

Not a timing. Over several sampling runs that share one graph cache (as the patcher shares one per stack), with x
and t changing every step, a masked entry and a "control"-mode entry (per-row multipliers), it checks:

1. run 1 warms up, captures and replays; run 2 of the same stack replays from its first step (no capture);
2. every step of every run equals the same stack run eagerly (fp32, relative error <= 1e-6);
3. an edited stack (another mask) gets its own graphs; a ControlNet moved off the GPU and back (new addresses)
   drops and recaptures them; weights off the GPU mean no graphs at all;
4. the control report recorded through replayed steps equals the eager report, and does not change the residuals.

    python bench/check_cuda_graphs.py              # on a CUDA machine; exits 1 on a failed check
    python bench/check_cuda_graphs.py --cpu-dry-run  # the same script on the CPU, with the tests' stand-in capture

Prints one line per check. Host-free: only controlstack.controlnet and the unit tests' tiny random ControlNet.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests" / "unit")]
from cn_helpers import random_inputs, tiny_controlnet  # noqa: E402
from controlstack.controlnet.graphs import CudaCapture, StepGraphs, placement_of  # noqa: E402
from controlstack.controlnet.report import StackRecorder  # noqa: E402
from controlstack.controlnet.stack import COND, UNCOND, ResidualStack, StackEntry  # noqa: E402
from numerics import rel_err  # noqa: E402

SIGMAS = (0.95, 0.8, 0.65, 0.5, 0.35, 0.2)
failures: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"[{'ok' if ok else 'FAIL'}] {what}")
    if not ok:
        failures.append(what)


class CountingCapture:
    """The real capture (or the tests' stand-in), counting captures."""

    def __init__(self, inner) -> None:
        self.inner, self.count = inner, 0

    def __call__(self, compute, inputs):
        self.count += 1
        return self.inner(compute, inputs)


def one_run(stack, graphs, x, t, ctx, observer=None, eager_observer=None) -> float:
    """A run over SIGMAS through `graphs` next to an eager run: the largest relative error of any residual."""
    fast = stack.begin_run(lambda p: 1.0 - p, graphs=graphs, observer=observer)
    eager = stack.begin_run(lambda p: 1.0 - p, use_cuda_graphs=False, observer=eager_observer)
    worst = 0.0
    for step, sigma in enumerate(SIGMAS):
        xs, ts = x * (1.0 + 0.3 * step) + step, t * sigma
        got = fast.residuals(xs, ts, ctx, sigma=sigma, cond_or_uncond=(UNCOND, COND))
        want = eager.residuals(xs, ts, ctx, sigma=sigma, cond_or_uncond=(UNCOND, COND))
        for g, w in zip(got, want, strict=True):
            assert float(w.abs().mean()) > 0
            worst = max(worst, rel_err(g, w))
    fast.end()
    eager.end()
    return worst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--cpu-dry-run", action="store_true", help="run on the CPU with the tests' stand-in capture"
    )
    args = p.parse_args(argv)
    if args.cpu_dry_run:
        from test_graphs import TapeCapture

        device, capture, device_types = torch.device("cpu"), CountingCapture(TapeCapture()), ("cpu",)
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --cpu-dry-run for the CPU version")
            return 2
        torch.backends.cudnn.benchmark = False  # the same kernels in eager and captured steps
        device, capture, device_types = torch.device("cuda"), CountingCapture(CudaCapture()), ("cuda",)
    print(
        f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}"
    )

    cn = tiny_controlnet("sd1", seed=7).to(device)
    x, hint, t, ctx, _ = random_inputs(cn, batch=2, latent=16, seed=8)
    x, hint, t, ctx = (v.to(device) for v in (x, hint, t, ctx))
    g = torch.Generator().manual_seed(9)
    masks = [torch.rand(1, 40, 40, generator=g).to(device) for _ in range(2)]

    def stack_with(mask):
        return ResidualStack(
            [StackEntry(cn, hint[:1], strength=0.8, mask=mask), StackEntry(cn, hint[1:], mode="control")]
        )

    stack = stack_with(masks[0])
    graphs = StepGraphs(capture, device_types=device_types)
    err = one_run(stack, graphs, x, t, ctx)
    check(err <= 1e-6 and capture.count == 1, f"run 1: replay vs eager {err:.2e}, {capture.count} capture")
    err = one_run(stack, graphs, x * 0.5, t, ctx)
    check(err <= 1e-6 and capture.count == 1, f"run 2, same stack: replay vs eager {err:.2e}, no new capture")

    edited = stack_with(masks[1])
    err = one_run(edited, graphs, x, t, ctx)
    check(err <= 1e-6 and capture.count == 2, f"edited stack (another mask): {err:.2e}, its own capture")

    if device.type == "cuda":
        cn.to("cpu")
        check(placement_of([cn], device) is None, "weights off the GPU: no placement, so no graphs")
        cn.to(device)  # back at new addresses
    else:
        weight = next(cn.parameters())
        weight.data = weight.data.clone()  # new addresses, as a reload gives
    err = one_run(edited, graphs, x, t, ctx)
    check(err <= 1e-6 and capture.count == 3, f"moved weights: graphs dropped and recaptured, {err:.2e}")

    fast_report, eager_report = StackRecorder(2), StackRecorder(2)
    before = capture.count
    err = one_run(edited, graphs, x, t, ctx, observer=fast_report, eager_observer=eager_report)
    n = cn.num_residuals
    tables = zip(fast_report.table([n, n]), eager_report.table([n, n]), strict=True)
    report_err = max(rel_err(a, b) for a, b in tables)
    check(
        err <= 1e-6 and report_err <= 1e-6 and capture.count == before + 1,
        f"report on the fast path: residuals {err:.2e}, report vs eager report {report_err:.2e}, "
        f"{capture.count - before} capture (its own graph)",
    )
    print("all checks passed" if not failures else f"{len(failures)} check(s) failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
