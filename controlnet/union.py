"""ControlNet Union / ProMax (xinsir, SDXL): the control-type ids, the one home for their names.

Ids and names are ComfyUI's (``comfy/cldm/control_types.py`` ``UNION_CONTROLNET_TYPES``), which follow
xinsir6/ControlNetPlus: the first six exist in every Union file, ``tile`` and ``repaint`` need the ProMax file
(``task_embedding`` with 8 rows). ComfyUI's "auto" is no type at all (an empty type list), not an id.
"""

from __future__ import annotations

UNION_TYPES: dict[str, int] = {
    "openpose": 0,
    "depth": 1,
    "hed/pidi/scribble/ted": 2,
    "canny/lineart/anime_lineart/mlsd": 3,
    "normal": 4,
    "segment": 5,
    "tile": 6,
    "repaint": 7,
}
UNION_TYPE_NAMES: dict[int, str] = {v: k for k, v in UNION_TYPES.items()}


def union_type_label(type_id: int) -> str:
    """``"tile (6)"``: the name ComfyUI shows with the id, or the bare id when it has no name."""
    name = UNION_TYPE_NAMES.get(type_id)
    return f"{name} ({type_id})" if name is not None else f"control type {type_id}"
