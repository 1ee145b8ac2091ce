"""Every UI-format workflow in a real headless chromium on the real ComfyUI frontend, with the pack loaded.

One driver run (tests/browser/driver.mjs, fixture `browser_run`) does the browser work; these tests assert on the
numbers and lists it returns. Screenshots: .artifacts/browser/<workflow>-loaded.png, -run.png, -from-png.png,
layer-scale-drag.png, kind-badge-loader.png, kind-badge-hint.png; the whole result: .artifacts/browser/driver-result.json.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from browser_helpers import KIND_CLASSIC, KIND_MISSING, KIND_WORKFLOW, api_twin, ui_workflows

WORKFLOWS = ui_workflows()
NAMES = [p.stem for p in WORKFLOWS] or ["<none>"]
OUR_NODES = {
    "ControlStackLoadControlNet",
    "ControlStackApplyHint",
    "ControlStackControlScale",
    "ControlStackUnionType",
    "ControlStackSampler",
}


def record(browser_run: dict[str, Any], name: str, *, clean: bool = True) -> dict[str, Any]:
    """The driver's record of one workflow; with ``clean``, fail on a driver error anywhere in it."""
    for rec in browser_run["workflows"]:
        if rec["name"] == name:
            if clean:
                assert "error" not in rec, f"driver error on {name}:\n{rec['error']}"
            return rec
    raise AssertionError(f"no driver record for {name}")


def test_ui_workflows_exist() -> None:
    assert WORKFLOWS, (
        "no UI-format workflows/*.json (generate them: node scripts/export_ui_workflows.mjs --url ...)"
    )
    for ui in WORKFLOWS:
        data = json.loads(ui.read_text())
        assert "nodes" in data and "links" in data, f"{ui.name} is not UI format"
        assert api_twin(ui) is not None, f"{ui.name} has no API twin in workflows/api/"


def test_frontend_and_extension_start(browser_run: dict[str, Any]) -> None:
    start = browser_run["startup"]
    assert start["extension"], "web/controlstack.js did not load (window.ControlStackWeb missing)"
    assert OUR_NODES <= set(start["controlstack_types"]), start["controlstack_types"]
    assert start["page_errors"] == []
    ours = [e for e in start["console_errors"] if "controlstack" in e.lower()]
    assert ours == [], ours


@pytest.mark.parametrize("name", NAMES)
def test_workflow_loads_by_drop(browser_run: dict[str, Any], name: str) -> None:
    rec = record(browser_run, name, clean=False)  # a later failure (the run) is the run test's business
    assert rec.get("loaded"), f"{name}: graph not replaced after the drop event {rec.get('error', '')}"
    assert rec["missing_node_types"] == []
    assert rec["dialogs"] == [], rec["dialogs"]
    assert rec["console_errors"] == []
    assert rec["page_errors"] == []
    assert rec["nodes"] == len(json.loads((WORKFLOWS[NAMES.index(name)]).read_text())["nodes"])


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_matches_api_twin(browser_run: dict[str, Any], name: str) -> None:
    rec = record(browser_run, name, clean=False)
    assert rec.get("api_diffs") == [], (
        "graphToPrompt() of the UI file differs from its API twin:\n"
        + "\n".join(rec.get("api_diffs") or ["(no API twin compared)"])
    )


@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_from_run_button(browser_run: dict[str, Any], name: str) -> None:
    if name in browser_run["skipped_runs"]:
        pytest.skip(browser_run["skipped_runs"][name])
    rec = record(browser_run, name)
    assert rec.get("queued"), f"{name} was not queued"
    assert rec.get("prompt_id"), rec.get("error") or rec.get("node_errors")
    assert rec["completed"] and rec["status"] == "success", f"{name}: {rec['status']} {rec.get('messages')}"
    assert rec["output_images"] >= 1
    assert rec["run_console_errors"] == []
    assert rec["run_page_errors"] == []
    assert rec["dialogs_after_run"] == []
    shown = rec["node_images"]
    for node_id, n in shown.items():
        if n["type"] == "ControlStackSampler":
            assert n["imgs"] >= 1, f"control report not shown on Sampler {node_id}: {n}"
        if n["type"] == "ControlStackApplyHint":
            assert n["hint_event_images"] >= 1, f"no controlstack.hint_preview for ApplyHint {node_id}"
            assert n["imgs"] >= 1, f"hint preview not shown on ApplyHint {node_id}: {n}"


def test_stack_colours(browser_run: dict[str, Any]) -> None:
    """ApplyHint nodes are numbered 1, 2, ... along the MODEL chain and coloured by that position."""
    seen = False
    for rec in browser_run["workflows"]:
        hints = [n for n in (rec.get("node_images") or {}).values() if n["type"] == "ControlStackApplyHint"]
        if len(hints) < 2:
            continue
        seen = True
        idx = sorted(n["stack_index"] for n in hints)
        assert idx == list(range(1, len(hints) + 1)), idx
        assert len({n["color"] for n in hints}) == len(hints), hints
    if not seen:
        pytest.skip("no run workflow stacks two ApplyHint nodes")


def test_output_png_restores_graph(browser_run: dict[str, Any]) -> None:
    rt = next((r["png_roundtrip"] for r in browser_run["workflows"] if r.get("png_roundtrip")), None)
    assert rt is not None, "no output PNG to drop back in"
    assert rt["loaded"]
    assert rt["diffs"] == [], "graph from the PNG's metadata differs:\n" + "\n".join(rt["diffs"])


def test_layer_scale_drag(browser_run: dict[str, Any]) -> None:
    d = browser_run["drag"]
    assert "error" not in d, d.get("error")
    name, target = d["widget"], d["target"]
    assert abs(d["after_value"] - target) <= 0.05, d
    assert d["after_mode"] == "custom"
    assert d["prompt_after"]["mode"] == "custom"
    assert abs(d["prompt_after"][name] - target) <= 0.05
    assert d["prompt_after"][name] != d["prompt_before"][name]
    # presets redraw the bars: "prompt is more important" -> 0.825 ** (12 - i), the widgets follow
    expected = [0.825 ** (12 - i) for i in range(13)]
    assert all(abs(v - e) <= 0.006 for v, e in zip(d["preset_values"], expected, strict=True)), d[
        "preset_values"
    ]
    tops = d["preset_bar_tops"]
    assert all(a >= b - 1e-6 for a, b in zip(tops, tops[1:], strict=False)), (
        f"bars not rising shallow -> deep: {tops}"
    )
    assert d["preset_prompt"]["mode"] == "prompt is more important"


def test_load_controlnet_kind_badge(browser_run: dict[str, Any]) -> None:
    """Load ControlNet on a T2I-Adapter file: csKind from GET /controlstack/describe, the kind's colours, a readable
    badge; ApplyHint finds that loader; the route answers for a classic ControlNet and (200, no console error)
    for a file the host lacks; picking another file in the combo refreshes the kind."""
    assert KIND_WORKFLOW in NAMES, f"workflows/{KIND_WORKFLOW}.json is shipped and must be tested"
    k = browser_run.get("kinds")
    assert k is not None, "driver ran no kinds step"
    assert "error" not in k, k["error"]
    t2i = k["kind_colors"]["t2i_adapter"]
    first = k["initial"]
    assert first["value"] == "controlstack_random_sd15_t2i_depth.safetensors", first
    assert first["cs_kind"]["kind"] == "t2i_adapter", first
    assert first["cs_kind"]["kind_name"] == "T2I-Adapter", first
    assert first["cs_kind"]["family_name"] == "SD1.x", first
    assert first["badge"] == "T2I-Adapter · SD1.x"
    assert [first["color"], first["bgcolor"]] == t2i
    assert k["hint_ids"], "no ApplyHint in the workflow"
    assert all(src == k["loader_id"] for src in k["source_loaders"].values()), k["source_loaders"]

    classic = k["describe"][KIND_CLASSIC]
    assert classic["status"] == 200
    assert {key: classic["body"][key] for key in ("kind", "kind_name", "family_name")} == {
        "kind": "controlnet",
        "kind_name": "ControlNet",
        "family_name": "SD1.x",
    }, classic
    missing = k["describe"][KIND_MISSING]
    assert missing["status"] == 200, missing
    assert missing["body"]["kind"] == "missing" and missing["body"]["kind_name"] == "", missing
    assert missing["via_extension"]["kind"] == "missing", missing
    assert k["console_errors"] == [], k["console_errors"]
    assert k["page_errors"] == [], k["page_errors"]

    # the combo's callback: another file -> its kind and colours; a missing file -> no badge, no kind colour
    changed = k["after_change"]
    cn, gone = changed[KIND_CLASSIC], changed[KIND_MISSING]
    assert cn["cs_kind"]["kind"] == "controlnet" and cn["badge"] == "ControlNet · SD1.x", cn
    assert [cn["color"], cn["bgcolor"]] == k["kind_colors"]["controlnet"], cn
    assert gone["cs_kind"]["kind"] == "missing" and gone["badge"] == "", gone
    assert gone["color"] is None and gone["bgcolor"] is None, gone
    back = changed[first["value"]]
    assert back["cs_kind"]["kind"] == "t2i_adapter" and [back["color"], back["bgcolor"]] == t2i

    # the badge as drawn: whole text, inside the node (it covers the end of a long title)
    for view, text in ((k["loader_view"], "T2I-Adapter · SD1.x"), (k.get("hint_view"), "#1 · T2I-Adapter")):
        assert view and view["screenshot"], view
        badge = view["badge"]
        assert badge and badge["text"] == text, view
        assert badge["text_width"] <= badge["max_text_width"], f"badge squeezed: {view}"
        assert view["title_left"] <= badge["left"] and badge["right"] <= view["size"][0], view
