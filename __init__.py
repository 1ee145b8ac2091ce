"""ControlStack: a ComfyUI custom-node pack for stacked ControlNets.

ComfyUI imports this folder as a package named after wherever the user cloned it, so everything inside uses
relative imports. Outside ComfyUI (tests, scripts, `import controlstack.controlnet`) the node registration below
is skipped: only the pure layers are needed there.
"""

WEB_DIRECTORY = "./web"

try:  # ComfyUI present: register the nodes
    import comfy  # noqa: F401  (only to tell whether we run inside the host)

    _HOST = True
except ImportError:
    _HOST = False

if _HOST:
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:
    NODE_CLASS_MAPPINGS: dict = {}
    NODE_DISPLAY_NAME_MAPPINGS: dict = {}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
