"""ControlNet core: the model, its detection from checkpoints, and loading (arXiv 2302.05543).

Pure torch; never imports ComfyUI.
"""

from .config import ControlNetConfig, preset
from .errors import ControlNetError
from .loading import detect_config, load_controlnet
from .model import ControlNet, build_controlnet

__all__ = [
    "ControlNet",
    "ControlNetConfig",
    "ControlNetError",
    "build_controlnet",
    "detect_config",
    "load_controlnet",
    "preset",
]
