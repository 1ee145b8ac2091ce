"""Test-side: a UI-format workflow's root graph as an API prompt, with the widget names from the host's
/object_info (what the frontend's graphToPrompt does for plain graphs: no subgraphs, no group nodes).

Widgets are the INT / FLOAT / STRING / BOOLEAN / COMBO inputs in INPUT_TYPES order (required, then optional);
`control_after_generate` and `image_upload` add one frontend-only value after their widget. Reroutes, bypassed
nodes (passed through by type), PrimitiveNodes and notes are resolved the way convert/ui_format.py reads them.
"""

from __future__ import annotations

from typing import Any

from controlstack.convert.ui_format import BYPASSED, FRONTEND_ONLY, MUTED, UIGraph

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _widgets(spec: dict) -> list[tuple[str, int]]:
    """(widget name, frontend-only values after it) in widgets_values order."""
    out = []
    for group in ("required", "optional"):
        for name, entry in (spec.get("input", {}).get(group) or {}).items():
            kind, opts = entry[0], (entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {})
            if isinstance(kind, list) or kind in WIDGET_TYPES:
                extra = int(bool(opts.get("control_after_generate") or opts.get("image_upload")))
                out.append((name, extra))
    return out


def ui_to_api(ui: dict, object_info: dict[str, Any]) -> dict[str, dict]:
    graph = UIGraph(ui)
    prompt: dict[str, dict] = {}
    for nid, node in graph.nodes.items():
        if node["type"] in FRONTEND_ONLY or node.get("mode") in (MUTED, BYPASSED):
            continue
        if node["type"] not in object_info:
            raise ValueError(f"node {nid}: {node['type']} is not a node type of this host (a subgraph?)")
        inputs: dict[str, Any] = {}
        values = list(node.get("widgets_values") or [])
        i = 0
        for name, extra in _widgets(object_info[node["type"]]):
            if i < len(values):
                inputs[name] = values[i]
            i += 1 + extra
        for inp in node.get("inputs", []):
            src = graph.origin(inp.get("link"))
            if src is None:
                continue
            source = graph.nodes[src[0]]
            if source["type"] == "PrimitiveNode":
                inputs[inp["name"]] = (source.get("widgets_values") or [None])[0]
            else:
                inputs[inp["name"]] = [str(src[0]), src[1]]
        prompt[str(nid)] = {"class_type": node["type"], "inputs": inputs}
    return prompt
