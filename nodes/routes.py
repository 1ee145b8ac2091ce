"""HTTP routes of the pack (the frontend's only server calls besides ComfyUI's own).

GET /controlstack/describe?name=<file in models/controlnet> -> {"kind", "kind_name", "family"}: the kind of a control
file, read from its tensor names and shapes (no weights), so Load ControlNet shows a badge as soon as a file is picked.
POST /controlstack/convert {"workflow": <UI workflow>} -> {"workflow", "report", "text"}: the workflow converter
(convert/ui_format.py, subgraphs included) for the frontend's "Convert ControlNet nodes to ControlStack" command,
which loads the answer into the open workflow as one undoable change (web/convert.js). {"prompt": <API graph>} ->
{"prompt", "report", "text", "placed_near", "removed"}: the same rules on an API graph (convert/workflow.py).
"""

from __future__ import annotations

import sys

import folder_paths
from aiohttp import web

from ..controlnet import ControlNetError
from ..controlnet.kinds import describe_file
from ..convert import convert_api, convert_ui

FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL", "": ""}


def register() -> None:
    """Add the routes to the running ComfyUI server. Outside a server (tests importing the nodes next to ComfyUI's
    modules) there is none, and ComfyUI's `server` module is not imported just for that."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is not None:
        instance.routes.get("/controlstack/describe")(describe)
        instance.routes.post("/controlstack/convert")(convert)


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


async def convert(request: web.Request) -> web.Response:
    try:
        body = await request.json()
    except ValueError as err:
        return web.json_response({"error": f"body: expected JSON, got {err}"}, status=400)
    workflow = body.get("workflow") if isinstance(body, dict) else None
    if workflow is not None:
        if not isinstance(workflow, dict) or not isinstance(workflow.get("nodes"), list):
            return web.json_response(
                {
                    "error": "workflow: expected a UI-format workflow (nodes, links), as app.graph.serialize() gives"
                },
                status=400,
            )
        try:
            converted, result = convert_ui(workflow)
        except (KeyError, IndexError, TypeError, ValueError) as err:  # a hand-edited or truncated file
            return web.json_response(
                {"error": f"workflow: not a workflow the converter can read ({type(err).__name__}: {err})"},
                status=400,
            )
        return web.json_response(
            {"workflow": converted, "report": result.report.as_dict(), "text": result.report.text()}
        )
    prompt = body.get("prompt") if isinstance(body, dict) else None
    if not isinstance(prompt, dict) or not all(
        isinstance(n, dict) and "class_type" in n for n in prompt.values()
    ):
        return web.json_response(
            {
                "error": 'expected {"workflow": <UI-format workflow>} or {"prompt": <API-format graph '
                "(node id -> {class_type, inputs})>}"
            },
            status=400,
        )
    result = convert_api(prompt)
    return web.json_response(
        {
            "prompt": result.prompt,
            "report": result.report.as_dict(),
            "text": result.report.text(),
            "placed_near": result.placed_near,
            "removed": result.removed,
        }
    )
