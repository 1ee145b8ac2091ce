"""python -m controlstack.convert IN.json OUT.json: convert a workflow's built-in ControlNet nodes to ControlStack.

Prints the report (what was converted, what was left unchanged and why). Exit code 0 when the file was written,
2 when it cannot be read or is not a workflow.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .workflow import convert_api


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m controlstack.convert", description=__doc__.splitlines()[0]
    )
    parser.add_argument("input", type=Path, help="workflow JSON (API format: ComfyUI's 'Export (API)')")
    parser.add_argument("output", type=Path, help="where to write the converted workflow")
    args = parser.parse_args(argv)
    try:
        graph = json.loads(args.input.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        print(f"cannot read {args.input}: {e}", file=sys.stderr)
        return 2
    if not isinstance(graph, dict) or "nodes" in graph:
        print(
            f"{args.input} is a UI-format workflow: open it in ComfyUI and use the menu command 'Convert ControlNet "
            "nodes to ControlStack', or convert its 'Export (API)' file here",
            file=sys.stderr,
        )
        return 2
    if not all(isinstance(n, dict) and "class_type" in n for n in graph.values()):
        print(f"{args.input} is not an API-format workflow (every node needs a class_type)", file=sys.stderr)
        return 2
    result = convert_api(graph)
    args.output.write_text(json.dumps(result.prompt, indent=2) + "\n", encoding="utf-8")
    print(result.report.text())
    print(f"written: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
