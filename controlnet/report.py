"""The control report: how strongly each stacked ControlNet pushed on each layer at each step.

`StackRecorder` is a run's observer (`ResidualStack.begin_run(..., observer=recorder)`): it keeps the mean |applied
residual| per layer for every UNet call, on the device (no per-step host sync), and the strength each entry was
applied with (strength x its schedule); `table()` returns the first as per-entry (layers x steps) arrays and
`strengths()` the second as per-entry rows, for rendering.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class StackRecorder:
    """Collects mean |residual| per layer, per entry, per noise level (one column per distinct sigma)."""

    def __init__(self, num_entries: int) -> None:
        self.num_entries = num_entries
        self.sigmas: list[float | None] = []
        self._cells: dict[tuple[int, int], torch.Tensor] = {}
        self._strengths: dict[tuple[int, int], float] = {}

    def __call__(
        self, idx: int, sigma: float | None, applied: Sequence[torch.Tensor | None], strength: float = 1.0
    ) -> None:
        if not self.sigmas or self.sigmas[-1] != sigma:
            self.sigmas.append(sigma)
        col = len(self.sigmas) - 1
        # A slot a kind does not use (T2I-Adapters feed 4 of the 13) reads 0.
        zero = next(r for r in applied if r is not None).new_zeros((), dtype=torch.float32)
        stats = torch.stack([zero if r is None else r.detach().abs().float().mean() for r in applied])
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
