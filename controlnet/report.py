"""The control report: how strongly each stacked ControlNet pushed on each layer at each step.

The stack measures what each entry applied (`layer_magnitudes`: mean |applied residual| per layer, a small float32
tensor on the device) inside the step it computes, so a step replayed from a CUDA graph measures it too, and hands it
to the run's observer. `StackRecorder` is that observer (`ResidualStack.begin_run(..., observer=recorder)`): it keeps
the magnitudes of every UNet call on the device (no per-step host sync) and the strength each entry was applied with
(strength x its schedule); `table()` returns the first as per-entry (layers x steps) arrays and `strengths()` the
second as per-entry rows, for rendering.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def layer_magnitudes(applied: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """Mean |value| of each layer's applied residual (or LLLite term), as one float32 vector on their device; a slot
    a kind does not use (T2I-Adapters feed 4 of the 13) reads 0. Device ops only: it can run inside a CUDA graph."""
    first = next(r for r in applied if r is not None)
    zero = first.new_zeros((), dtype=torch.float32)
    return torch.stack([zero if r is None else r.detach().abs().float().mean() for r in applied])


class StackRecorder:
    """Collects mean |residual| per layer, per entry, per noise level (one column per distinct sigma)."""

    def __init__(self, num_entries: int) -> None:
        self.num_entries = num_entries
        self.sigmas: list[float | None] = []
        self._cells: dict[tuple[int, int], torch.Tensor] = {}
        self._strengths: dict[tuple[int, int], float] = {}

    def __call__(self, idx: int, sigma: float | None, stats: torch.Tensor, strength: float = 1.0) -> None:
        """One entry at one UNet call: its `layer_magnitudes` (a tensor the recorder may keep) and applied strength."""
        if not self.sigmas or self.sigmas[-1] != sigma:
            self.sigmas.append(sigma)
        col = len(self.sigmas) - 1
        prev = self._cells.get((idx, col))
        # Samplers that call the model twice per step (Heun, DPM2) land in the same column: keep the larger.
        self._cells[(idx, col)] = stats if prev is None else torch.maximum(prev, stats)
        self._strengths[(idx, col)] = max(strength, self._strengths.get((idx, col), 0.0))

    def table(self, num_layers: Sequence[int]) -> list[torch.Tensor]:
        """One (layers x steps) float tensor per entry, zeros where the entry did not run."""
        steps = max(len(self.sigmas), 1)
        out = [torch.zeros(n, steps) for n in num_layers]
        for (idx, col), stats in self._cells.items():
            out[idx][:, col] = stats.cpu()
        return out

    def strengths(self) -> list[list[float]]:
        """Per entry, the strength it was applied with at each step (strength x schedule; 0 where it did not run)."""
        steps = max(len(self.sigmas), 1)
        out = [[0.0] * steps for _ in range(self.num_entries)]
        for (idx, col), value in self._strengths.items():
            out[idx][col] = value
        return out
