"""ComfyUI node classes. Filled by the node modules; see nodes/registry.py."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
