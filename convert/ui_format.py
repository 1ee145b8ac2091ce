"""The converter on UI-format workflows (the drag-and-drop JSON: nodes, links, groups, subgraphs).

The rules are convert/workflow.py's, on an API view of the root graph read from the UI file: links resolved through
Reroute nodes, bypassed nodes (passed through by type) and PrimitiveNode widgets, muted nodes left out, the widget
values of the built-in ControlNet nodes by name. The result is written back into the UI JSON: new nodes next to the
ones they replace (positions, groups and everything else kept), links rewired, the replaced nodes removed. Nodes
inside subgraphs are not converted (they are reported when they hold ControlNet nodes).
"""

from __future__ import annotations

import copy
from typing import Any

from .workflow import (
    ADVANCED_CONTROLNET,
    APPLY_ADVANCED,
    APPLY_POSITIVE,
    CS_APPLY,
    CS_LOAD,
    CS_SCALE,
    CS_UNION,
    LAYER_NAMES,
    UNION_TYPE,
    Conversion,
    convert_api,
)

BUILTIN_WIDGETS = {
    "ControlNetLoader": ("control_net_name",),
    "DiffControlNetLoader": ("control_net_name",),
    APPLY_POSITIVE: ("strength",),
    APPLY_ADVANCED: ("strength", "start_percent", "end_percent"),
    UNION_TYPE: ("type",),
}
"""widgets_values order of the built-in nodes the converter reads (their INPUT_TYPES order in ComfyUI 0.3.75)."""

CS_NODES: dict[str, dict[str, Any]] = {
    CS_LOAD: {
        "inputs": (("model", "MODEL"),),
        "widgets": ("control_net_name",),
        "outputs": (("control_net", "CS_CONTROLNET"),),
    },
    CS_UNION: {
        "inputs": (("control_net", "CS_CONTROLNET"),),
        "widgets": ("control_type", "fusion"),
        "outputs": (("control_net", "CS_CONTROLNET"),),
    },
    CS_APPLY: {
        "inputs": (
            ("model", "MODEL"),
            ("control_net", "CS_CONTROLNET"),
            ("image", "IMAGE"),
            ("mask", "MASK"),
            ("scales", "CS_SCALES"),
            ("schedule", "CS_SCHEDULE"),
            ("frame_strengths", "CS_FRAME_STRENGTHS"),
        ),
        "widgets": ("strength", "start_percent", "end_percent", "resize_mode"),
        "outputs": (("MODEL", "MODEL"),),
    },
    CS_SCALE: {
        "inputs": (),
        "widgets": ("mode", *LAYER_NAMES, "base_multiplier", "flip_weights", "uncond_multiplier"),
        "outputs": (("scales", "CS_SCALES"),),
    },
}
"""The link inputs, widget order and outputs of the ControlStack nodes the converter writes (their INPUT_TYPES;
the browser test loads a converted file and checks graphToPrompt() against the API conversion)."""

MUTED, BYPASSED = 2, 4
FRONTEND_ONLY = {"Reroute", "PrimitiveNode", "Note", "MarkdownNote"}


class UIGraph:
    """Index of a UI-format root graph."""

    def __init__(self, ui: dict) -> None:
        self.ui = ui
        self.nodes = {int(n["id"]): n for n in ui.get("nodes", [])}
        self.links = {int(link[0]): link for link in ui.get("links", [])}

    def origin(self, link_id: int | None) -> tuple[int, int] | None:
        """The real (node, output slot) a link comes from: through Reroutes and bypassed nodes."""
        seen = set()
        while link_id is not None and link_id in self.links and link_id not in seen:
            seen.add(link_id)
            _, origin, slot, *_ = self.links[link_id]
            node = self.nodes.get(int(origin))
            if node is None:
                return None
            if node["type"] == "Reroute":
                link_id = (node.get("inputs") or [{}])[0].get("link")
                continue
            if node.get("mode") == BYPASSED:
                out_type = (
                    (node.get("outputs") or [])[slot].get("type")
                    if slot < len(node.get("outputs") or [])
                    else None
                )
                same = [
                    i
                    for i in node.get("inputs", [])
                    if i.get("type") == out_type and i.get("link") is not None
                ]
                link_id = same[0]["link"] if same else None
                continue
            if node.get("mode") == MUTED:
                return None
            return int(origin), int(slot)
        return None

    def api_view(self) -> dict[str, dict]:
        """The root graph as an API graph: every executable node, its links, the built-in ControlNet widgets."""
        view: dict[str, dict] = {}
        for nid, node in self.nodes.items():
            if node["type"] in FRONTEND_ONLY or node.get("mode") in (MUTED, BYPASSED):
                continue
            inputs: dict[str, Any] = {}
            for name, value in zip(
                BUILTIN_WIDGETS.get(node["type"], ()), node.get("widgets_values") or [], strict=False
            ):
                inputs[name] = value
            for inp in node.get("inputs", []):
                src = self.origin(inp.get("link"))
                if src is None:
                    continue
                source = self.nodes[src[0]]
                if source["type"] == "PrimitiveNode":
                    inputs[inp["name"]] = (source.get("widgets_values") or [None])[0]
                else:
                    inputs[inp["name"]] = [str(src[0]), src[1]]
            view[str(nid)] = {"class_type": node["type"], "inputs": inputs}
            if node.get("title"):
                view[str(nid)]["_meta"] = {"title": node["title"]}
        return view


def _subgraph_controlnets(ui: dict) -> list[str]:
    out = []
    for sub in (ui.get("definitions") or {}).get("subgraphs") or []:
        for node in sub.get("nodes", []):
            if node.get("type") in (*BUILTIN_WIDGETS, *ADVANCED_CONTROLNET):
                out.append(
                    f"{node['type']} (node {node.get('id')} in subgraph {sub.get('name') or sub.get('id')!r}): "
                    "nodes inside subgraphs are not converted; convert the subgraph's contents in its own graph"
                )
    return out


def convert_ui(ui: dict) -> tuple[dict, Conversion]:
    """Convert a UI-format workflow; returns the new UI JSON (a copy) and the API-level conversion."""
    ui = copy.deepcopy(ui)
    graph = UIGraph(ui)
    view = graph.api_view()
    first_id = max([int(ui.get("last_node_id") or 0), *graph.nodes], default=0) + 1
    result = convert_api(view, first_new_id=first_id)
    result.report.unchanged += _subgraph_controlnets(ui)
    if not result.report.converted:
        return ui, result
    _write_back(ui, graph, view, result)
    return ui, result


def _write_back(ui: dict, graph: UIGraph, view: dict, result: Conversion) -> None:
    nodes = graph.nodes
    next_link = max([int(ui.get("last_link_id") or 0), *graph.links], default=0) + 1
    removed = {int(n) for n in result.removed}

    def drop_link(link_id: int | None) -> None:
        if link_id is None or link_id not in graph.links:
            return
        _, origin, slot, *_ = graph.links.pop(link_id)
        src = nodes.get(int(origin))
        if src is not None and slot < len(src.get("outputs") or []):
            out = src["outputs"][slot]
            out["links"] = [x for x in (out.get("links") or []) if x != link_id] or None

    # new nodes, placed next to the nodes they replace
    offsets: dict[str, int] = {}
    for nid, spec in result.prompt.items():
        if nid in view:
            continue
        shape = CS_NODES[spec["class_type"]]
        near = nodes.get(int(result.placed_near[nid]))
        k = offsets.get(result.placed_near[nid], 0)
        offsets[result.placed_near[nid]] = k + 1
        pos = [near["pos"][0] + 30 * k, near["pos"][1] + 30 * k] if near else [0, 0]
        nodes[int(nid)] = {
            "id": int(nid),
            "type": spec["class_type"],
            "pos": pos,
            "size": [320, 60 + 24 * (len(shape["inputs"]) + len(shape["widgets"]))],
            "flags": {},
            "order": 0,
            "mode": 0,
            "inputs": [{"name": n, "type": t, "link": None} for n, t in shape["inputs"]],
            "outputs": [{"name": n, "type": t, "links": None} for n, t in shape["outputs"]],
            "title": spec.get("_meta", {}).get("title", spec["class_type"]),
            "properties": {"Node name for S&R": spec["class_type"]},
            "widgets_values": [spec["inputs"].get(w) for w in shape["widgets"]],
        }
    # links: every input of a new node, and every input of an old node the conversion changed
    for nid, spec in result.prompt.items():
        node = nodes[int(nid)]
        for name, value in spec["inputs"].items():
            if not (isinstance(value, list) and len(value) == 2):
                continue
            if nid in view and view[nid]["inputs"].get(name) == value:
                continue
            inp = next((i for i in node.get("inputs", []) if i["name"] == name), None)
            if inp is None:
                continue
            drop_link(inp.get("link"))
            src = nodes[int(value[0])]
            out = src["outputs"][value[1]]
            link_id = next_link
            next_link += 1
            graph.links[link_id] = [
                link_id,
                int(value[0]),
                value[1],
                int(nid),
                node["inputs"].index(inp),
                inp["type"],
            ]
            inp["link"] = link_id
            out["links"] = [*(out.get("links") or []), link_id]
    for nid in removed:
        node = nodes.pop(nid)
        for inp in node.get("inputs", []):
            drop_link(inp.get("link"))
        for out in node.get("outputs", []):
            for link_id in out.get("links") or []:
                link = graph.links.pop(link_id, None)
                target = nodes.get(int(link[3])) if link else None
                if target is not None:
                    for inp in target.get("inputs", []):
                        if inp.get("link") == link_id:
                            inp["link"] = None
    ui["nodes"] = list(nodes.values())
    ui["links"] = list(graph.links.values())
    ui["last_node_id"] = max(nodes, default=0)
    ui["last_link_id"] = max([next_link - 1, *graph.links], default=0)
