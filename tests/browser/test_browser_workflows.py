"""Every UI-format workflow in a real headless chromium on the real ComfyUI frontend, with the pack loaded.

One driver run (tests/browser/driver.mjs, fixture `browser_run`) does the browser work; these tests assert on the
numbers and lists it returns. Screenshots: .artifacts/browser/<workflow>-loaded.png, -run.png, -from-png.png,
layer-scale-drag.png, kind-badge-loader.png, kind-badge-hint.png, modes-*.png; the whole result:
.artifacts/browser/driver-result.json. The last section covers Nodes 2.0 and subgraphs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import host
import pytest
from browser_helpers import (
    BROWSER_RUNS,
    KIND_CLASSIC,
    KIND_MISSING,
    KIND_WORKFLOW,
    MODES_DECAY,
    MODES_WORKFLOW,
    REPO,
    api_twin,
    ui_workflows,
)
from controlstack.controlnet.stack import PROMPT_DECAY

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


def test_ui_and_api_workflows_pair_one_to_one() -> None:
    """Every shipped API workflow has a UI twin and the other way round.

    What a twin holds (node types, widget values, links) is test_ui_workflow_matches_api_twin's job, through the
    real frontend's graphToPrompt; that test only sees UI files, so an API workflow without a UI twin would never
    reach the browser. This is the check that would catch it."""
    api = {p.stem for p in (Path(__file__).resolve().parents[2] / "workflows" / "api").glob("*.json")}
    ui = {p.stem for p in WORKFLOWS}
    assert api, "no API workflows in workflows/api/"
    assert api == ui, (
        f"API only: {sorted(api - ui)}; UI only: {sorted(ui - api)} (node scripts/export_ui_workflows.mjs)"
    )
    for path in WORKFLOWS:
        data = json.loads(path.read_text())
        assert data.get("nodes") and "links" in data, f"{path.name} is not UI format"
        assert api_twin(path) is not None


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


def _node_types(name: str) -> set[str]:
    return {n["type"] for n in json.loads(WORKFLOWS[NAMES.index(name)].read_text())["nodes"]}


def test_browser_runs_cover_every_node_type(browser_run: dict[str, Any]) -> None:
    """Only BROWSER_RUNS (and MODES_WORKFLOW, twice) are queued from the page. Each other UI file equals its API
    twin (test_ui_workflow_matches_api_twin) and the twins run in tests/host; what a run adds in the page is the
    display of its results, so every ControlStack node and image output of a runnable workflow is queued here."""
    queued = set().union(*(_node_types(n) for n in (*BROWSER_RUNS, MODES_WORKFLOW)))
    for name in NAMES:
        if name in browser_run["skipped_runs"]:  # its models are not on this host
            continue
        shown = {
            t for t in _node_types(name) if t.startswith("ControlStack") or t in ("PreviewImage", "SaveImage")
        }
        assert shown <= queued, f"{name}: {sorted(shown - queued)} never queued in the browser"


@pytest.mark.parametrize("name", BROWSER_RUNS)
def test_workflow_runs_from_run_button(browser_run: dict[str, Any], name: str) -> None:
    assert name not in browser_run["skipped_runs"], browser_run["skipped_runs"][name]
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
    # presets redraw the bars: "prompt is more important" -> PROMPT_DECAY ** (12 - i), the widgets follow
    expected = [PROMPT_DECAY ** (12 - i) for i in range(13)]
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


# ---------------------------------------------------------------------------------------------------------------
# Nodes 2.0 and subgraphs (driver step "modes"): MODES_WORKFLOW with its second ApplyHint + ControlScale moved into
# a subgraph, run once on the classic canvas and once in Nodes 2.0 (Vue nodes, setting Comfy.VueNodes.Enabled),
# where the ControlScale definition is served with prompt decay MODES_DECAY: the numbers show where the extension
# takes the layer names and the decay from. Screenshots: modes-{classic,vue}-{root,subgraph}.png, modes-vue-drag.png.
# ---------------------------------------------------------------------------------------------------------------

RENDERERS = ("classic", "vue")
BAR = (0x4F, 0xA3, 0xE0)  # in_xx bars (web/controlstack.js drawChart)
MIDDLE_BAR = (0xC5, 0x86, 0xC0)


def modes(browser_run: dict[str, Any], renderer: str) -> dict[str, Any]:
    m = browser_run.get("modes")
    assert m is not None, "driver ran no modes step"
    assert "error" not in m, m["error"]
    rec = m[renderer]
    assert "error" not in rec, rec["error"]
    return rec


def server_schema(server: host.ComfyServer) -> dict[str, Any]:
    spec = server.object_info()["ControlStackControlScale"]["input"]["required"]
    return spec["mode"][1]["controlstack"]


def api_inputs(node_id: str) -> dict[str, Any]:
    return json.loads((REPO / "workflows" / "api" / f"{MODES_WORKFLOW}.json").read_text())[node_id]["inputs"]


def near(rgb: list[int] | None, want: tuple[int, int, int], tol: int = 6) -> bool:
    return rgb is not None and all(abs(a - b) <= tol for a, b in zip(rgb, want, strict=True))


def test_layer_names_and_decay_come_from_the_node_definition(
    browser_run: dict[str, Any], browser_server: host.ComfyServer
) -> None:
    schema = server_schema(browser_server)
    classic, vue = modes(browser_run, "classic"), modes(browser_run, "vue")
    assert classic["scale_schema"] == {"layers": schema["layers"], "promptDecay": schema["prompt_decay"]}
    # The page that was served another decay uses it: for the preset and for the bars.
    assert vue["scale_schema"] == {"layers": schema["layers"], "promptDecay": MODES_DECAY}
    n = len(schema["layers"])
    assert vue["edit"]["preset"]["values"] == pytest.approx(
        [MODES_DECAY ** (n - 1 - i) for i in range(n)], abs=6e-3
    )
    # ... and the JS repeats neither (one home: nodes/controlnet_nodes.py, controlnet/stack.py).
    js = (REPO / "web" / "controlstack.js").read_text()
    assert str(schema["prompt_decay"]) not in js
    assert not re.search(r"[\"'`]in_\d\d[\"'`]", js), "a layer name is spelled out in web/controlstack.js"


@pytest.mark.parametrize("renderer", RENDERERS)
def test_chart_draws_on_root_and_in_subgraph(browser_run: dict[str, Any], renderer: str) -> None:
    rec = modes(browser_run, renderer)
    assert rec["vue_nodes_mode"] is (renderer == "vue")
    decay = rec["scale_schema"]["promptDecay"]
    layers = rec["scale_schema"]["layers"]
    n = len(layers)
    ids = rec["ids"]
    assert ids["subgraph_node"] is not None and ids["inner"]["scale"] is not None, ids
    expect = {
        # the root ControlScale is in "prompt is more important": the bars show the preset
        "root_chart": [decay ** (n - 1 - i) for i in range(n)],
        # the one in the subgraph is "custom": the bars show its widgets, as saved in the workflow
        "subgraph_chart": [api_inputs("13")[name] for name in layers],
    }
    assert api_inputs("13")["mode"] == "custom" and api_inputs("12")["mode"] == "prompt is more important"
    for key, values in expect.items():
        chart = rec[key]
        assert "error" not in chart, chart
        assert chart["draws"] >= 1, f"{renderer} {key}: the chart was never drawn"
        assert chart["names"] == layers
        assert chart["values"] == pytest.approx(values, abs=6e-3), key
        if renderer == "vue":
            assert chart["element"], "Nodes 2.0: no <canvas> for the chart in the node's element"
        # the pixels at the bar centres carry the bar colours: really drawn where the page shows the node
        assert near(chart["pixel_middle"], MIDDLE_BAR), (key, chart)
        assert near(chart["pixel_in_11"], BAR), (key, chart)


@pytest.mark.parametrize("renderer", RENDERERS)
def test_hint_preview_on_root_and_in_subgraph(browser_run: dict[str, Any], renderer: str) -> None:
    rec = modes(browser_run, renderer)
    run = rec["run"]
    assert run.get("prompt_id"), run
    assert run["status"] == "success", run
    # the prompt the page sent names the inner nodes "<subgraph node>:<id>" (the host's UNIQUE_ID)
    sub = rec["subgraph_preview"]
    assert sub["execution_id"] == f"{rec['ids']['subgraph_node']}:{rec['ids']['inner']['hint']}"
    assert sub["execution_id"] in rec["prompt_ids"], rec["prompt_ids"]
    assert sub["found_by_execution_id"]
    for key in ("root_preview", "subgraph_preview"):
        p = rec[key]
        assert p["hint_event_images"] >= 1, f"{renderer} {key}: no controlstack.hint_preview for it: {p}"
        assert p["stored_images"] >= 1, f"{renderer} {key}: not in the frontend's output store: {p}"
        assert p["shown"] >= 1, f"{renderer} {key}: no loaded preview image on the node: {p}"
    assert rec["console_errors"] == [], rec["console_errors"]
    assert rec["page_errors"] == [], rec["page_errors"]


def test_nodes2_drag_and_edits(browser_run: dict[str, Any]) -> None:
    """Nodes 2.0: a mouse drag on the chart's own canvas sets the layer and switches to custom; the preset rewrites
    the widgets; a widget edit (Nodes 2.0 passes the value only) that leaves the preset switches to custom."""
    rec = modes(browser_run, "vue")
    d = rec["drag"]
    assert str(d["hit"]["element"]).startswith("canvas"), f"the press did not land on the chart: {d}"
    assert abs(d["value"] - d["target"]) <= 0.05, d
    assert d["mode"] == "custom" and d["prompt_mode"] == "custom", d
    assert abs(d["prompt_value"] - d["target"]) <= 0.05, d
    e = rec["edit"]
    n = len(e["preset"]["values"])
    # soft weights, base 0.5, flipped: the shallowest layer keeps 1.0, layer i gets 0.5 ** i
    assert e["soft"]["mode"] == "soft weights"
    assert e["soft"]["values"] == pytest.approx([0.5**i for i in range(n)], abs=6e-3), e["soft"]  # 0.01 steps
    preset = [MODES_DECAY ** (n - 1 - i) for i in range(n)]
    assert e["preset"]["mode"] == "prompt is more important"
    after = e["after_edit"]
    assert after["mode"] == "custom", e
    i5 = rec["scale_schema"]["layers"].index("in_05")
    assert after["values"][i5] == pytest.approx(0.3)
    assert [v for i, v in enumerate(after["values"]) if i != i5] == pytest.approx(
        [v for i, v in enumerate(preset) if i != i5], abs=6e-3
    )
    # the chart redrew on its own canvas after the edits
    assert rec["chart_after_edit"]["draws"] > rec["root_chart"]["draws"]
    assert rec["chart_after_edit"]["values"] == pytest.approx(after["values"], abs=6e-3)


def _canonical(prompt: dict[str, Any]) -> list[str]:
    """An API graph without its node ids: each node as its class and inputs, links replaced by the source node's
    own canonical form (so two graphs that differ only in ids compare equal)."""

    def sig(nid: str, seen: tuple = ()) -> str:
        node = prompt[nid]
        parts = []
        for name, value in sorted(node["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt and nid not in seen:
                parts.append(f"{name}=<{sig(str(value[0]), (*seen, nid))}>[{value[1]}]")
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                parts.append(f"{name}={float(value)!r}")  # the page writes 0 where Python writes 0.0
            else:
                parts.append(f"{name}={json.dumps(value)}")
        return f"{node['class_type']}({', '.join(parts)})"

    return sorted(sig(nid) for nid in prompt)


def test_convert_menu_command_rewrites_the_open_graph_and_undo_restores_it(
    browser_run: dict[str, Any],
) -> None:
    """The menu command on a graph of built-in nodes: the graph then equals the CLI's conversion of the same graph
    (node ids aside), the command is in the menu's command store, and one undo gives back the original."""
    from controlstack.convert import convert_api

    rec = browser_run["convert"]
    assert "error" not in rec, rec.get("error")
    assert rec["registered"] is True
    assert rec["applied"] and len(rec["report"]["converted"]) == 1 and not rec["report"]["unchanged"], rec[
        "report"
    ]
    expected = convert_api(rec["before"]).prompt
    assert _canonical(rec["after"]) == _canonical(expected)
    assert not any(n["class_type"].startswith("ControlNet") for n in rec["after"].values())
    assert rec["restored"] == rec["before"]


def test_convert_menu_command_on_a_dropped_template_equals_the_cli(browser_run: dict[str, Any]) -> None:
    """ComfyUI's ControlNet example template (UI format) on the page, then the menu command: graphToPrompt() equals
    the API conversion of the original's graphToPrompt(), and so does the CLI's UI conversion of the file loaded
    on the page; undo restores the original."""
    from controlstack.convert import convert_api

    rec = browser_run["convert"]["ui"]
    assert "error" not in rec, rec.get("error")
    assert rec["applied"] and not rec["report"]["unchanged"], rec["report"]
    expected = _canonical(convert_api(rec["before"]).prompt)
    assert _canonical(rec["after"]) == expected
    assert _canonical(rec["cli"]) == expected
    assert rec["restored"] == rec["before"]


def test_convert_menu_command_converts_inside_a_subgraph(browser_run: dict[str, Any]) -> None:
    """The sampler and its ControlNet nodes moved into a subgraph by the frontend, then the menu command: the nodes
    inside the subgraph are converted (the subgraph holds ControlStack nodes only), the flattened graphToPrompt()
    equals the API conversion of the flattened original (node ids aside; the API conversion is render-tested in
    tests/host/test_convert_renders_same.py), the server's answer is the CLI's UI conversion of the same file, and
    undo restores the original."""
    from controlstack.convert import convert_api, convert_ui

    rec = browser_run["convert"]["subgraph"]
    assert "error" not in rec, rec.get("error")
    assert any(":" in nid for nid in rec["before"]), "the sampler runs inside the subgraph"
    assert rec["applied"] and not rec["report"]["unchanged"], rec["report"]
    (line,) = rec["report"]["converted"]
    assert line.startswith("in subgraph "), line
    assert not any(t.startswith("ControlNet") for t in rec["inner_types"]), rec["inner_types"]
    assert "ControlStackApplyHint" in rec["inner_types"], rec["inner_types"]
    assert _canonical(rec["after"]) == _canonical(convert_api(rec["before"]).prompt)
    assert convert_ui(rec["serialized"])[1].report.as_dict() == rec["report"]
    assert rec["restored"] == rec["before"]
