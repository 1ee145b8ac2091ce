"""The template browser lists the pack's UI-format workflows (GET /workflow_templates: workflows/*.json, top
level only) and serves each file unchanged. Needs only HTTP, no browser."""

from __future__ import annotations

import json
from typing import Any

import host
from browser_helpers import ui_workflows


def test_workflow_templates_list_top_level_ui_files(browser_server: host.ComfyServer) -> None:
    listing: dict[str, Any] = browser_server.get("/workflow_templates").json()
    assert host.PACK_NAME in listing, f"pack not in /workflow_templates: {sorted(listing)}"
    names = sorted(listing[host.PACK_NAME])
    expected = sorted(p.stem for p in ui_workflows())
    assert names == expected, "the template browser must list exactly the top-level workflows/*.json"
    assert expected, "no UI-format workflows at workflows/*.json"


def test_workflow_templates_serve_the_files(browser_server: host.ComfyServer) -> None:
    for ui in ui_workflows():
        r = browser_server.get(f"/api/workflow_templates/{host.PACK_NAME}/{ui.name}")
        assert r.status_code == 200, f"{ui.name}: HTTP {r.status_code}"
        served = json.loads(r.content)
        assert served == json.loads(ui.read_text())
        assert "nodes" in served and "links" in served, (
            f"{ui.name} is not UI format (API files go to workflows/api/)"
        )
