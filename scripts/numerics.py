"""How tests and benchmarks compare tensors: one definition of the relative error they assert on and report.

Test- and bench-facing only (the pack never imports it): tests/conftest.py puts scripts/ on ``sys.path``, the
benchmarks add it themselves.
"""

from __future__ import annotations

import torch


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (Frobenius norms), computed in float64 so that the comparison itself adds no fp32/fp16
    rounding. ``b`` is the reference; a zero reference gives inf (or nan when ``a`` is zero too)."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()
