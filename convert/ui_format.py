"""The converter on UI-format workflows (the drag-and-drop JSON: nodes, links, groups, subgraphs).

The rules are convert/workflow.py's, on an API view of the root graph read from the UI file: links resolved through
Reroute nodes, bypassed nodes (passed through by type) and PrimitiveNode widgets, muted nodes left out, the widget
values of the built-in ControlNet nodes by name. The result is written back into the UI JSON: new nodes next to the
ones they replace (positions, groups and everything else kept), links rewired, the replaced nodes removed.

Each subgraph definition (``definitions.subgraphs``) is converted on its own, like the root graph: a sampler and the
ControlNet nodes in front of it inside one subgraph convert there (for every instance of it, which all run the same
inner graph). The subgraph's boundary is a node the rules do not convert -- its inputs node (-10) gives values from
outside, its outputs node (-20) reads values that go out -- so control that crosses it (an apply node whose
conditioning leaves the subgraph, a sampler in the root graph behind a subgraph) is left unchanged and named.
"""

from __future__ import annotations

import copy
from typing import Any

from .workflow import (
    ACN_LATENT_KEYFRAME,
    ACN_LAYER_WEIGHTS,
    ACN_TIMESTEP_KEYFRAME,
    APPLY_BOTH,
    APPLY_POSITIVE,
    APPLY_SINGLE,
    CS_APPLY,
    CS_FRAMES,
    CS_KEYFRAME,
    CS_LOAD,
    CS_SCALE,
    CS_UNION,
    LAYER_NAMES,
    LOADERS,
    UNION_TYPE,
    Conversion,
    convert_api,
)

BUILTIN_WIDGETS = {
    **{kind: (file_input,) for kind, (_, file_input) in LOADERS.items()},
    **{kind: ("strength", "start_percent", "end_percent") for kind in (*APPLY_BOTH, *APPLY_SINGLE)},
    APPLY_POSITIVE: ("strength",),
    UNION_TYPE: ("type",),
    ACN_TIMESTEP_KEYFRAME: (
        "start_percent",
        "strength",
        "null_latent_kf_strength",
        "inherit_missing",
        "guarantee_steps",
    ),
    ACN_LATENT_KEYFRAME: ("batch_index", "strength"),
    "ACN_ScaledSoftControlNetWeights": ("base_multiplier", "uncond_multiplier"),
    "ScaledSoftControlNetWeights": ("base_multiplier", "flip_weights", "uncond_multiplier"),
    **{
        kind: (*(f"output_{i}" for i in range(len(LAYER_NAMES) - 1)), "middle_0", "uncond_multiplier")
        for kind in ACN_LAYER_WEIGHTS
    },
}
"""widgets_values order of the nodes the converter reads (their INPUT_TYPES order: ComfyUI 0.3.75's built-in nodes,
Advanced-ControlNet 1.5.6's loaders, apply nodes, Timestep / Latent Keyframe and weights nodes)."""

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
    CS_FRAMES: {
        "inputs": (("previous", "CS_FRAME_STRENGTHS"),),
        "widgets": (
            "first_frame",
            "last_frame",
            "strength_from",
            "strength_to",
            "interpolation",
            "other_frames",
        ),
        "outputs": (("frame_strengths", "CS_FRAME_STRENGTHS"),),
    },
    CS_KEYFRAME: {
        "inputs": (("previous", "CS_SCHEDULE"),),
        "widgets": ("percent", "strength", "interpolation", "guarantee_steps"),
        "outputs": (("schedule", "CS_SCHEDULE"),),
    },
}
"""The link inputs, widget order and outputs of the ControlStack nodes the converter writes (their INPUT_TYPES;
the browser test loads a converted file and checks graphToPrompt() against the API conversion)."""

MUTED, BYPASSED = 2, 4
FRONTEND_ONLY = {"Reroute", "PrimitiveNode", "Note", "MarkdownNote"}
SUBGRAPH_INPUT, SUBGRAPH_OUTPUT = -10, -20
"""The ids of a subgraph's boundary nodes in the frontend's format (links from / to them carry these ids)."""
BOUNDARY_TITLES = {SUBGRAPH_INPUT: "the subgraph's inputs", SUBGRAPH_OUTPUT: "the subgraph's outputs"}


def _link_list(link: list | dict) -> list:
    """A link as [id, origin, origin slot, target, target slot, type] (the root graph's list form; subgraphs and
    the newer schema write objects)."""
    if isinstance(link, dict):
        keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
        return [link.get(k) for k in keys]
    return list(link)


class UIGraph:
    """Index of one graph of a UI-format workflow: the root graph or one subgraph definition."""

    def __init__(self, graph: dict, subgraph_names: dict[str, str] | None = None) -> None:
        self.graph = graph
        self.subgraph_names = subgraph_names or {}
        """subgraph definition id -> its name (the node type of the definition's instances)"""
        self.nodes = {int(n["id"]): n for n in graph.get("nodes", [])}
        raw = graph.get("links") or []
        self.object_links = bool(raw) and isinstance(raw[0], dict)
        self.links = {int(_link_list(link)[0]): _link_list(link) for link in raw}
        self.extra = {int(link["id"]): link for link in raw if isinstance(link, dict)}
        """object-form links as read (their other keys, e.g. a reroute's parentId, are written back)"""

    def origin(self, link_id: int | None) -> tuple[int, int] | None:
        """The real (node, output slot) a link comes from: through Reroutes and bypassed nodes."""
        seen = set()
        while link_id is not None and link_id in self.links and link_id not in seen:
            seen.add(link_id)
            _, origin, slot, *_ = self.links[link_id]
            if int(origin) == SUBGRAPH_INPUT:
                return SUBGRAPH_INPUT, int(slot)
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

    def _value(self, link_id: int | None) -> Any:
        src = self.origin(link_id)
        if src is None:
            return None
        if src[0] != SUBGRAPH_INPUT and self.nodes[src[0]]["type"] == "PrimitiveNode":
            return (self.nodes[src[0]].get("widgets_values") or [None])[0]
        return [str(src[0]), src[1]]

    def api_view(self) -> dict[str, dict]:
        """The graph as an API graph: every executable node, its links, the built-in ControlNet widgets. In a
        subgraph the boundary nodes are in it too (-10 gives the subgraph's inputs, -20 reads its outputs), so the
        rules see what comes from and goes out of the subgraph as nodes they do not convert."""
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
                value = self._value(inp.get("link"))
                if value is not None:
                    inputs[inp["name"]] = value
            view[str(nid)] = {"class_type": node["type"], "inputs": inputs}
            title = node.get("title")
            if node["type"] in self.subgraph_names:
                title = title or f"subgraph {self.subgraph_names[node['type']]!r}"
            if title:
                view[str(nid)]["_meta"] = {"title": title}
        if "inputNode" in self.graph or "outputNode" in self.graph:
            outputs = {
                f"output {link[4]}": self._value(link_id)
                for link_id, link in self.links.items()
                if int(link[3]) == SUBGRAPH_OUTPUT
            }
            for nid, inputs in ((SUBGRAPH_INPUT, {}), (SUBGRAPH_OUTPUT, outputs)):
                view[str(nid)] = {
                    "class_type": "Subgraph boundary",
                    "inputs": {k: v for k, v in inputs.items() if v is not None},
                    "_meta": {"title": BOUNDARY_TITLES[nid]},
                }
        return view


class _Ids:
    """New node and link ids, unique over the whole workflow (the frontend keeps one id space for the root graph
    and its subgraphs)."""

    def __init__(self, ui: dict, graphs: list[dict]) -> None:
        nodes = [int(ui.get("last_node_id") or 0)]
        links = [int(ui.get("last_link_id") or 0)]
        for g in graphs:
            state = g.get("state") or {}
            nodes += [int(state.get("lastNodeId") or 0), *(int(n["id"]) for n in g.get("nodes", []))]
            links += [
                int(state.get("lastLinkId") or 0),
                *(int(_link_list(x)[0]) for x in g.get("links") or []),
            ]
        self.node, self.link = max(nodes) + 1, max(links) + 1

    def write(self, ui: dict, graphs: list[dict]) -> None:
        ui["last_node_id"], ui["last_link_id"] = self.node - 1, self.link - 1
        for g in graphs:
            if isinstance(g.get("state"), dict):
                g["state"]["lastNodeId"], g["state"]["lastLinkId"] = self.node - 1, self.link - 1


def convert_ui(ui: dict) -> tuple[dict, Conversion]:
    """Convert a UI-format workflow; returns the new UI JSON (a copy) and the conversion of its root graph, whose
    report also covers every subgraph definition (each converted on its own: a sampler and its ControlNet nodes
    inside one subgraph convert there; control that crosses a subgraph's boundary is left unchanged)."""
    ui = copy.deepcopy(ui)
    subgraphs = [s for s in (ui.get("definitions") or {}).get("subgraphs") or [] if isinstance(s, dict)]
    names = {str(s.get("id")): str(s.get("name") or s.get("id")) for s in subgraphs}
    ids = _Ids(ui, [ui, *subgraphs])
    root = _convert_graph(ui, names, ids)
    for sub in subgraphs:
        inner = _convert_graph(sub, names, ids)
        where = f"in subgraph {names[str(sub.get('id'))]!r}: "
        root.report.converted += [where + line for line in inner.report.converted]
        root.report.unchanged += [where + line for line in inner.report.unchanged]
    if root.report.converted:  # an unconverted file comes back as it was, counters included
        ids.write(ui, [ui, *subgraphs])
    return ui, root


def _convert_graph(graph: dict, names: dict[str, str], ids: _Ids) -> Conversion:
    index = UIGraph(graph, names)
    view = index.api_view()
    result = convert_api(view, first_new_id=ids.node)
    if result.report.converted:
        _write_back(index, view, result, ids)
    return result


def _write_back(graph: UIGraph, view: dict, result: Conversion, ids: _Ids) -> None:
    nodes = graph.nodes
    boundary = {SUBGRAPH_INPUT: "inputs", SUBGRAPH_OUTPUT: "outputs"}
    removed = {int(n) for n in result.removed}

    def boundary_slot(node_id: int, slot: int) -> dict:
        return graph.graph[boundary[node_id]][slot]

    def drop_link(link_id: int | None) -> None:
        if link_id is None or link_id not in graph.links:
            return
        _, origin, slot, target, target_slot, _ = graph.links.pop(link_id)
        graph.extra.pop(link_id, None)
        if int(origin) == SUBGRAPH_INPUT:
            slot_info = boundary_slot(SUBGRAPH_INPUT, slot)
            slot_info["linkIds"] = [x for x in slot_info.get("linkIds") or [] if x != link_id]
        src = nodes.get(int(origin))
        if src is not None and slot < len(src.get("outputs") or []):
            out = src["outputs"][slot]
            out["links"] = [x for x in (out.get("links") or []) if x != link_id] or None
        if int(target) == SUBGRAPH_OUTPUT:
            slot_info = boundary_slot(SUBGRAPH_OUTPUT, target_slot)
            slot_info["linkIds"] = [x for x in slot_info.get("linkIds") or [] if x != link_id]

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
        ids.node = max(ids.node, int(nid) + 1)
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
        if int(nid) in boundary:
            continue
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
            link_id = ids.link
            ids.link += 1
            origin = int(value[0])
            graph.links[link_id] = [
                link_id,
                origin,
                value[1],
                int(nid),
                node["inputs"].index(inp),
                inp["type"],
            ]
            inp["link"] = link_id
            if origin == SUBGRAPH_INPUT:
                slot_info = boundary_slot(SUBGRAPH_INPUT, value[1])
                slot_info["linkIds"] = [*(slot_info.get("linkIds") or []), link_id]
            else:
                out = nodes[origin]["outputs"][value[1]]
                out["links"] = [*(out.get("links") or []), link_id]
    for nid in removed:
        node = nodes.pop(nid)
        for inp in node.get("inputs", []):
            drop_link(inp.get("link"))
        for out in node.get("outputs", []):
            for link_id in list(out.get("links") or []):
                link = graph.links.get(link_id)
                target = nodes.get(int(link[3])) if link else None
                drop_link(link_id)
                if target is not None:
                    for inp in target.get("inputs", []):
                        if inp.get("link") == link_id:
                            inp["link"] = None
    graph.graph["nodes"] = list(nodes.values())
    if graph.object_links:
        keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
        graph.graph["links"] = [
            {**graph.extra.get(i, {}), **dict(zip(keys, link, strict=True))}
            for i, link in graph.links.items()
        ]
    else:
        graph.graph["links"] = list(graph.links.values())
