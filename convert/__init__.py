"""Convert shared ControlNet workflows (built-in nodes) into ControlStack workflows: convert/workflow.py (the rules, API format),
convert/ui_format.py (UI format)."""

from .ui_format import convert_ui
from .workflow import Conversion, Report, convert_api

__all__ = ["Conversion", "Report", "convert_api", "convert_ui"]
