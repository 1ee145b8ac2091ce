"""Paths shared by the browser tests and their conftest (a plain module: `conftest` is not importable by name)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The kind-badge check (driver step "kinds"): a workflow whose Load ControlNet holds a T2I-Adapter, a classic
# ControlNet on the host to switch to, and a file name the host lacks.
KIND_WORKFLOW = "controlstack_sd15_t2i_depth"
KIND_CLASSIC = "controlstack_random_sd15_canny.safetensors"
KIND_MISSING = "controlstack_no_such_file.safetensors"


def ui_workflows() -> list[Path]:
    """Top-level workflows/*.json: the UI-format (drag-and-drop) files."""
    return sorted((REPO / "workflows").glob("*.json"))


def api_twin(ui: Path) -> Path | None:
    p = ui.parent / "api" / ui.name
    return p if p.is_file() else None
