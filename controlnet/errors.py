"""The one exception type of the ControlNet layer."""

from __future__ import annotations


class ControlNetError(ValueError):
    """A bad ControlNet file, layout or input.

    Messages name the file (or "state dict") and say what was found versus what was expected, so a
    user reading the ComfyUI error popup knows which file to replace.
    """
