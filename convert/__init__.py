"""Convert shared ControlNet workflows (built-in nodes) into ControlStack workflows: convert/workflow.py."""

from .workflow import Conversion, Report, convert_api

__all__ = ["Conversion", "Report", "convert_api"]
