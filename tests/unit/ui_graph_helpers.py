"""Building UI-format (frontend) workflow nodes for the converter's unit tests."""

from __future__ import annotations


def ui_node(
    nid: int,
    kind: str,
    inputs: list[tuple[str, str, int | None]],
    outputs: list[tuple[str, str, list]],
    widgets: list,
) -> dict:
    """A node as the frontend saves it: `inputs` (name, type, link id), `outputs` (name, type, link ids)."""
    return {
        "id": nid,
        "type": kind,
        "pos": [100 * nid, 50],
        "size": [300, 100],
        "flags": {},
        "order": 0,
        "mode": 0,
        "inputs": [{"name": n, "type": t, "link": link} for n, t, link in inputs],
        "outputs": [{"name": n, "type": t, "links": links or None} for n, t, links in outputs],
        "properties": {"Node name for S&R": kind},
        "widgets_values": widgets,
    }
