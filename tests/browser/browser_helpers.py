"""Paths shared by the browser tests and their conftest (a plain module: `conftest` is not importable by name)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The kind-badge check (driver step "kinds"): a workflow whose Load ControlNet holds a T2I-Adapter, a classic
# ControlNet on the host to switch to, and a file name the host lacks.
KIND_WORKFLOW = "controlstack_sd15_t2i_depth"
KIND_CLASSIC = "controlstack_random_sd15_canny.safetensors"
KIND_MISSING = "controlstack_no_such_file.safetensors"

# Sampling is nearly all of the browser tests' time, so only these workflows are queued from the Run button. Every
# other UI file is loaded and checked equal to its API twin, and the twins run in tests/host/test_workflows.py;
# test_browser_runs_cover_every_node_type keeps this set covering every node type that shows something after a run.
BROWSER_RUNS = (
    "controlstack_sd15_canny_plus_scribble",
    "controlstack_sd15_schedule_fade",  # Strength Keyframe
    "controlstack_sd15_frame_keyframes",  # Frame Strengths, a 16-latent batch
)
# Nodes 2.0 and subgraphs (driver step "modes"): this workflow runs once per renderer with one ApplyHint and its
# ControlScale moved into a subgraph; the Nodes 2.0 page gets ControlScale's prompt decay replaced by MODES_DECAY
# (the extension must take it from the node definition).
MODES_WORKFLOW = "controlstack_sd15_scale_modes"
MODES_DECAY = 0.5


def ui_workflows() -> list[Path]:
    """Top-level workflows/*.json: the UI-format (drag-and-drop) files."""
    return sorted((REPO / "workflows").glob("*.json"))


def api_twin(ui: Path) -> Path | None:
    p = ui.parent / "api" / ui.name
    return p if p.is_file() else None
