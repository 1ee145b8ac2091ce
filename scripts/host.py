"""The host harness: install a real ComfyUI, build random test models, run a server, run workflows.

Library (used by tests/host, tests/browser, bench/ and scripts/) and CLI::

    python scripts/host.py install                 # ComfyUI 0.3.75 into .host/comfyui (+ its requirements)
    python scripts/host.py models                  # random SD1.5 checkpoint + 3 ControlNets into BASE/models
    python scripts/host.py control-files --family sd15|sdxl   # random T2I / Control-LoRA / Union / LLLite files
    python scripts/host.py serve [--port P]        # a server with the pack loaded, until Ctrl-C
    python scripts/host.py run WORKFLOW_API_JSON [--out DIR]

``--comfy-dir`` / ``CONTROLSTACK_COMFY_DIR`` point at an existing ComfyUI checkout instead of .host/comfyui,
``--base-dir`` / ``CONTROLSTACK_BASE_DIR`` at an existing ComfyUI base directory (models/, input/, output/ …)
instead of .host/base, and ``--python`` / ``CONTROLSTACK_COMFY_PYTHON`` at the interpreter that runs it.

This file is the CLI and the one import (``import host``) for every caller; the work is done by its siblings, one
job each: host_install.py (folders, ``HostError``, installing ComfyUI), host_models.py (the random models),
host_client.py (the HTTP client, ``PromptRejected`` / ``PromptFailed``), host_server.py (``ComfyServer``).
Stdlib + requests only.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from host_client import ComfyClient, PromptFailed, PromptRejected
from host_install import (
    COMFY_VERSION,
    DEFAULT_BASE_DIR,
    DEFAULT_COMFY_DIR,
    HOST_WHEEL,
    MODEL_DIRS,
    PACK_NAME,
    REPO,
    HostError,
    env_path,
    install_host,
    log,
    prepare_base,
    resolve_base_dir,
    resolve_comfy_dir,
    resolve_python,
)
from host_models import (
    CHECKPOINT,
    CIRCLES_CHECKPOINT,
    CIRCLES_CONTROLNET,
    CONTROL_FILES,
    CONTROLNETS,
    MODEL_SEEDS,
    RANDOM_MODELS_VERSION,
    SDXL_BASE_DIR,
    SDXL_SERVER_ARGS,
    build_control_files,
    build_models,
    build_sdxl_models,
)
from host_server import ComfyServer, free_port

__all__ = [
    "CHECKPOINT",
    "CIRCLES_CHECKPOINT",
    "CIRCLES_CONTROLNET",
    "COMFY_VERSION",
    "CONTROLNETS",
    "CONTROL_FILES",
    "DEFAULT_BASE_DIR",
    "DEFAULT_COMFY_DIR",
    "HOST_WHEEL",
    "MODEL_DIRS",
    "MODEL_SEEDS",
    "PACK_NAME",
    "RANDOM_MODELS_VERSION",
    "REPO",
    "SDXL_BASE_DIR",
    "SDXL_SERVER_ARGS",
    "WORKFLOW_INPUTS",
    "ComfyClient",
    "ComfyServer",
    "HostError",
    "PromptFailed",
    "PromptRejected",
    "build_control_files",
    "build_models",
    "build_sdxl_models",
    "env_path",
    "free_port",
    "install_host",
    "log",
    "main",
    "prepare_base",
    "resolve_base_dir",
    "resolve_comfy_dir",
    "resolve_python",
]

WORKFLOW_INPUTS = REPO / "workflows" / "inputs"


def _workflow_inputs() -> list[Path]:
    if not WORKFLOW_INPUTS.is_dir():
        return []
    return sorted(p for p in WORKFLOW_INPUTS.iterdir() if p.is_file() and not p.name.startswith("."))


def cmd_run(args: argparse.Namespace) -> int:
    workflow = Path(args.workflow).resolve()
    try:
        prompt = json.loads(workflow.read_text())
    except (OSError, ValueError) as e:
        raise HostError(f"cannot read API-format workflow {workflow}: {e}") from e
    if not isinstance(prompt, dict) or "nodes" in prompt:
        raise HostError(f"{workflow} is not an API-format workflow (export it with 'Export (API)')")
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    random_models = resolve_base_dir(args.base_dir) == DEFAULT_BASE_DIR
    with ComfyServer(args.comfy_dir, args.base_dir, args.port, python=args.python) as server:
        if server.import_failed():
            raise HostError(f"ComfyUI could not import the ControlStack pack; see {server.log_path}")
        server.upload_inputs(_workflow_inputs())
        t0 = time.perf_counter()
        entry = server.run(prompt, timeout=args.timeout)
        seconds = time.perf_counter() - t0
        written = []
        for src in server.output_images(entry):
            dst = out_dir / src.name
            shutil.copyfile(src, dst)
            written.append(dst)
    nodes = sorted({str(n.get("class_type")) for n in prompt.values() if isinstance(n, dict)})
    print(f"workflow: {_rel(workflow)}")
    print(f"nodes:    {', '.join(nodes)}")
    print(f"server:   start-up {server.start_seconds:.1f} s, workflow {seconds:.1f} s (CPU)")
    print(f"images:   {len(written)} written")
    for p in written:
        print(f"  {_rel(p)}")
    uses = {n.get("inputs", {}).get("ckpt_name") for n in prompt.values() if isinstance(n, dict)}
    if random_models and CIRCLES_CHECKPOINT in uses:
        print(
            "model:    the circles demo model (trained by scripts/circles_model.py; tests/host/test_circles.py "
            "measures that the circle follows the hint)"
        )
    elif random_models:
        print(
            "WARNING: these models are random test weights (scripts/make_random_models.py), so the images are "
            "noise. Point --base-dir (CONTROLSTACK_BASE_DIR) at a ComfyUI folder with real models for real images."
        )
    return 0


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="host.py", description="ControlStack's ComfyUI host harness")
    p.add_argument(
        "--comfy-dir", default=None, help="ComfyUI folder (env CONTROLSTACK_COMFY_DIR; default .host/comfyui)"
    )
    p.add_argument(
        "--base-dir", default=None, help="ComfyUI base dir (env CONTROLSTACK_BASE_DIR; default .host/base)"
    )
    p.add_argument("--python", default=None, help="python that runs ComfyUI (env CONTROLSTACK_COMFY_PYTHON)")
    p.add_argument("-q", "--quiet", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help="install ComfyUI 0.3.75 and its requirements")
    sub.add_parser("models", help="build the random SD1.5 checkpoint and ControlNets")
    cf = sub.add_parser(
        "control-files",
        help="build random T2I-Adapter / Control-LoRA / Union / LLLite files (default base: .host/base for sd15, "
        ".host/base_sdxl for sdxl)",
    )
    cf.add_argument("--family", choices=("sd15", "sdxl"), required=True)
    s = sub.add_parser("serve", help="run a server with the pack until Ctrl-C")
    s.add_argument("--port", type=int, default=8188)
    r = sub.add_parser("run", help="run an API-format workflow headless and copy its images")
    r.add_argument("workflow")
    r.add_argument("--out", default=str(REPO / "output"))
    r.add_argument("--port", type=int, default=None)
    r.add_argument("--timeout", type=float, default=900)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="[host] %(message)s")
    try:
        if args.cmd == "install":
            print(install_host(args.comfy_dir, python=args.python))
        elif args.cmd == "models":
            for key, path in build_models(
                args.base_dir, comfy_dir=args.comfy_dir, python=args.python
            ).items():
                print(f"{key}: {path}")
        elif args.cmd == "control-files":
            default_base = SDXL_BASE_DIR if args.family == "sdxl" else DEFAULT_BASE_DIR
            base_dir = env_path(args.base_dir, "CONTROLSTACK_BASE_DIR", default_base)
            for key, path in build_control_files(
                base_dir, args.family, comfy_dir=args.comfy_dir, python=args.python
            ).items():
                print(f"{key}: {path}")
        elif args.cmd == "serve":
            server = ComfyServer(args.comfy_dir, args.base_dir, args.port, python=args.python)
            with server:
                print(f"ComfyUI with ControlStack at {server.url} (log {server.log_path}); Ctrl-C stops it")
                if server.import_failed():
                    print(f"WARNING: the pack failed to import, see {server.log_path}")
                try:
                    while server.running:
                        time.sleep(1)
                except KeyboardInterrupt:
                    pass
        elif args.cmd == "run":
            return cmd_run(args)
    except HostError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
