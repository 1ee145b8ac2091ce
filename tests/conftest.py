"""Shared pytest set-up: scripts/ on sys.path (for ``import host``) and one marker per test level.

Tests are marked by folder: tests/unit -> ``unit``, tests/train -> ``train``, tests/host -> ``host``, tests/browser -> ``browser``,
so ``pytest -m host`` runs one level alone.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SCRIPTS = REPO / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

LEVELS = ("unit", "train", "host", "browser")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        try:
            rel = Path(str(item.path)).resolve().relative_to(TESTS)
        except ValueError:
            continue
        level = rel.parts[0] if len(rel.parts) > 1 else None
        if level in LEVELS:
            item.add_marker(getattr(pytest.mark, level))
