"""ComfyUI node registration: every node class of the pack, keyed by its unique `ControlStack...` id."""

from . import annotator_files, routes
from .annotator_nodes import NODE_CLASS_MAPPINGS as _ANNOTATOR_NODES
from .annotator_nodes import NODE_DISPLAY_NAME_MAPPINGS as _ANNOTATOR_NAMES
from .controlnet_nodes import NODE_CLASS_MAPPINGS as _CONTROLNET_NODES
from .controlnet_nodes import NODE_DISPLAY_NAME_MAPPINGS as _CONTROLNET_NAMES
from .inputs import checked_nodes
from .preprocessor_nodes import NODE_CLASS_MAPPINGS as _PREPROCESSOR_NODES
from .preprocessor_nodes import NODE_DISPLAY_NAME_MAPPINGS as _PREPROCESSOR_NAMES
from .schedule_nodes import NODE_CLASS_MAPPINGS as _SCHEDULE_NODES
from .schedule_nodes import NODE_DISPLAY_NAME_MAPPINGS as _SCHEDULE_NAMES

routes.register()
annotator_files.register_folder()

# Every node checks its INT / FLOAT inputs against their declaration before it runs (NaN included): nodes/inputs.py.
NODE_CLASS_MAPPINGS: dict = checked_nodes(
    {**_CONTROLNET_NODES, **_SCHEDULE_NODES, **_PREPROCESSOR_NODES, **_ANNOTATOR_NODES}
)
NODE_DISPLAY_NAME_MAPPINGS: dict = {
    **_CONTROLNET_NAMES,
    **_SCHEDULE_NAMES,
    **_PREPROCESSOR_NAMES,
    **_ANNOTATOR_NAMES,
}
