"""ComfyUI node registration: every node class of the pack, keyed by its unique `ControlStack...` id."""

from .controlnet_nodes import NODE_CLASS_MAPPINGS as _CONTROLNET_NODES
from .controlnet_nodes import NODE_DISPLAY_NAME_MAPPINGS as _CONTROLNET_NAMES

NODE_CLASS_MAPPINGS: dict = {**_CONTROLNET_NODES}
NODE_DISPLAY_NAME_MAPPINGS: dict = {**_CONTROLNET_NAMES}

try:  # the preprocessor nodes land separately; the pack must load without them
    from .preprocessor_nodes import NODE_CLASS_MAPPINGS as _PRE_NODES
    from .preprocessor_nodes import NODE_DISPLAY_NAME_MAPPINGS as _PRE_NAMES
except ImportError:  # pragma: no cover
    _PRE_NODES, _PRE_NAMES = {}, {}
NODE_CLASS_MAPPINGS.update(_PRE_NODES)
NODE_DISPLAY_NAME_MAPPINGS.update(_PRE_NAMES)
