"""The control report's recorder (controlnet/report.py): known residuals in, the exact table numbers out."""

from __future__ import annotations

import pytest
import torch
from cn_helpers import random_inputs, tiny_controlnet
from controlstack.controlnet.report import StackRecorder, layer_magnitudes
from controlstack.controlnet.stack import ResidualStack, StackEntry

pytestmark = pytest.mark.unit


def const(value: float, shape=(2, 3, 4, 4)) -> torch.Tensor:
    """A residual whose mean |.| is |value|, with mixed signs so abs() matters: half +value, half -value."""
    t = torch.full(shape, abs(value))
    t.view(-1)[::2] *= -1
    return t


def test_table_has_one_column_per_noise_level_and_exact_means():
    rec = StackRecorder(num_entries=2)
    # step 1 (sigma 14.6): entry 0 on three layers (the middle one unused by its kind), entry 1 on two
    rec(0, 14.6, layer_magnitudes([const(1.0), None, const(-3.0)]))
    rec(1, 14.6, layer_magnitudes([const(0.5), const(0.25)]))
    # step 2 (sigma 7.0): entry 0 only
    rec(0, 7.0, layer_magnitudes([const(2.0), const(4.0), const(0.5)]))
    # a second model call at sigma 7.0 (Heun, DPM2): same column, the larger value per layer
    rec(0, 7.0, layer_magnitudes([const(1.0), const(6.0), const(0.25)]))
    # step 3 (sigma 1.5): entry 1 only, half the rows zero (e.g. uncond rows in "ControlNet is more important")
    r = const(0.8)
    r[:1] = 0
    rec(1, 1.5, layer_magnitudes([r, const(0.1)]))

    assert rec.sigmas == [14.6, 7.0, 1.5]
    t0, t1 = rec.table([3, 2])
    assert t0.shape == (3, 3) and t1.shape == (2, 3)
    assert t0.tolist() == [[1.0, 2.0, 0.0], [0.0, 6.0, 0.0], [3.0, 0.5, 0.0]]
    assert t1[:, 0].tolist() == [0.5, 0.25] and t1[:, 1].tolist() == [0.0, 0.0]
    assert t1[:, 2].tolist() == pytest.approx([0.4, 0.1])


def test_lllite_cells_and_an_empty_run():
    rec = StackRecorder(num_entries=1)
    # LLLite hands per-slot scalars (the largest mean |term| per layer), None where no module sits
    rec(0, None, layer_magnitudes([None, torch.tensor(0.125), None, torch.tensor(-0.5)]))
    (table,) = rec.table([4])
    assert table[:, 0].tolist() == [0.0, 0.125, 0.0, 0.5]
    (empty,) = StackRecorder(num_entries=1).table([4])
    assert empty.shape == (4, 1) and not empty.any(), "no step recorded: one zero column"


def test_a_run_with_the_recorder_records_the_applied_residuals():
    """The recorder as a run's observer: each cell is mean |strength x layer scale x ControlNet residual|."""
    cn = tiny_controlnet("sd1", seed=41)
    x, hint, t, ctx, _ = random_inputs(cn, batch=1, seed=42)
    entries = [StackEntry(cn, hint, strength=0.5, mode="prompt"), StackEntry(cn, hint, end_percent=0.5)]
    rec = StackRecorder(len(entries))
    run = ResidualStack(entries).begin_run(lambda p: 1.0 - p, observer=rec)
    run.control(x, t, ctx, sigma=0.9)  # both entries
    run.control(x, t, ctx, sigma=0.2)  # the second is outside its window
    run.end()
    plain = cn(x, hint, t, ctx)
    n = cn.num_residuals
    first, second = rec.table([n, n])
    for i, r in enumerate(plain):
        mean = float(r.abs().mean())
        assert mean > 0
        assert first[i, 0].item() == pytest.approx(0.5 * 0.825 ** (n - 1 - i) * mean, rel=1e-5)
        assert first[i, 1].item() == pytest.approx(first[i, 0].item(), rel=1e-6)
        assert second[i, 0].item() == pytest.approx(mean, rel=1e-5)
        assert second[i, 1].item() == 0.0
