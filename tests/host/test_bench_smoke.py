"""The benchmarks run in their CPU smoke modes (numbers are printed, never asserted on time)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_controlnet_bench_tiny_runs_and_agrees_with_builtin(tmp_path, host_models):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_controlnet.py"), "--tiny", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| sd1 64^2" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    ours = [r for r in rows if r["variant"].startswith("ControlStack")]
    assert {r["n"] for r in ours} == {2}
    for r in ours:  # fp32 on the CPU: the stack equals ComfyUI's built-in path
        assert r["rel_err_vs_builtin"] <= 1e-4, r
    reported = [r for r in ours if r["variant"].endswith("+ report")]
    assert reported and all(r["rel_err_vs_no_report"] == 0.0 for r in reported), "the report changes nothing"


def test_preprocessor_bench_quick_runs():
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_preprocessors.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "canny" in proc.stdout


def test_annotator_bench_quick_runs_against_the_reference():
    """Two of the eight networks (the cheapest; every network's detect is covered by the unit tests), ours and
    the reference's, so the bench's reference wiring cannot rot unnoticed."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "bench_annotators.py"), "--quick", "--only", "pidinet", "mlsd"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith(("| PiDiNet", "| M-LSD"))]
    assert len(rows) == 2 and all(row.count("x |") == 2 for row in rows), proc.stdout
