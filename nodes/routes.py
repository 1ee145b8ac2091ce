"""HTTP routes of the pack (the frontend's only server calls besides ComfyUI's own).

GET /controlstack/describe?name=<file in models/controlnet> -> {"kind", "kind_name", "family"}: the kind of a control
file, read from its tensor names and shapes (no weights), so Load ControlNet shows a badge as soon as a file is picked.
"""

from __future__ import annotations

import sys

import folder_paths
from aiohttp import web

from ..controlnet import ControlNetError
from ..controlnet.kinds import describe_file

FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "": ""}


def register() -> None:
    """Add the routes to the running ComfyUI server. Outside a server (tests importing the nodes next to ComfyUI's
    modules) there is none, and ComfyUI's `server` module is not imported just for that."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None:
        instance.routes.get("/controlstack/describe")(describe)


async def describe(request: web.Request) -> web.Response:
    name = request.query.get("name", "")
    path = folder_paths.get_full_path("controlnet", name) if name else None
    if path is None:  # 200, not 404: a shared workflow naming a file this host lacks is normal, not an error
        return web.json_response(
            {"kind": "missing", "kind_name": "", "error": f"'{name}' is not in the controlnet models folder"}
        )
    try:
        info = describe_file(path, name)
    except ControlNetError as err:
        return web.json_response({"kind": "unsupported", "kind_name": "not supported", "error": str(err)})
    return web.json_response({**info, "family_name": FAMILY_NAMES.get(info["family"], info["family"])})
