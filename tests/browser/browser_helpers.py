"""Paths shared by the browser tests and their conftest (a plain module: `conftest` is not importable by name)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def ui_workflows() -> list[Path]:
    """Top-level workflows/*.json: the UI-format (drag-and-drop) files."""
    return sorted((REPO / "workflows").glob("*.json"))


def api_twin(ui: Path) -> Path | None:
    p = ui.parent / "api" / ui.name
    return p if p.is_file() else None
