"""python -m controlstack.convert IN.json OUT.json: convert a workflow's built-in ControlNet nodes to ControlStack
(UI or API format).

Prints the report (what was converted, what was left unchanged and why). Exit code 0 when the file was written,
2 when it cannot be read or is not a workflow.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .ui_format import convert_ui
from .workflow import convert_api


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m controlstack.convert", description=__doc__.splitlines()[0]
    )
    parser.add_argument("input", type=Path, help="workflow JSON, UI format (a saved workflow) or API format")
    parser.add_argument("output", type=Path, help="where to write the converted workflow")
    args = parser.parse_args(argv)
    try:
        graph = json.loads(args.input.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"cannot read {args.input}: {e}", file=sys.stderr)
        return 2
    if isinstance(graph, dict) and isinstance(graph.get("nodes"), list):
        converted, result = convert_ui(graph)
    elif (
        isinstance(graph, dict)
        and graph
        and all(isinstance(n, dict) and "class_type" in n for n in graph.values())
    ):
        result = convert_api(graph)
        converted = result.prompt
    else:
        print(
            f"{args.input} is not a ComfyUI workflow: expected the UI format (nodes, links) or the API format "
            "(node id -> {class_type, inputs})",
            file=sys.stderr,
        )
        return 2
    args.output.write_text(json.dumps(converted, indent=2) + "\n", encoding="utf-8")
    print(result.report.text())
    print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
