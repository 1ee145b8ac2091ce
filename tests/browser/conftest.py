"""Browser-level fixtures: the real host (scripts/host.py) + headless chromium driven by tests/browser/driver.mjs.

The driver runs once per session over every UI-format workflow (load by a real drop event, compare with the API
twin; BROWSER_RUNS queued with the Run button, wait for /history, PNG round trip), then a mouse drag on the
layer-scale widget, the kind badge of Load ControlNet, and MODES_WORKFLOW with one ApplyHint + ControlScale in a
subgraph on the classic canvas and in Nodes 2.0. It prints one JSON document; the tests assert on its fields.
Screenshots land in .artifacts/browser/.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import host
import pytest
from browser_helpers import (
    BROWSER_RUNS,
    KIND_CLASSIC,
    KIND_MISSING,
    KIND_WORKFLOW,
    MODES_DECAY,
    MODES_WORKFLOW,
    api_twin,
    convert_graph,
    convert_template,
    ui_workflows,
)
from controlstack.convert import convert_ui

BROWSER_DIR = Path(__file__).resolve().parent
REPO = host.REPO
ARTIFACTS = REPO / ".artifacts" / "browser"
DRIVER = BROWSER_DIR / "driver.mjs"
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
DRIVER_TIMEOUT_S = 1500


def _playwright_available() -> bool:
    if (REPO / "node_modules" / "playwright-core").is_dir():
        return True
    extra = os.environ.get("PLAYWRIGHT_CORE_DIR")
    return bool(extra) and (Path(extra) / "node_modules" / "playwright-core").is_dir()


def _missing_tools() -> list[str]:
    missing = []
    if shutil.which("node") is None:
        missing.append("node")
    if not CHROMIUM.exists():
        missing.append(str(CHROMIUM))
    if not _playwright_available():
        missing.append("node_modules/playwright-core")
    return missing


@pytest.fixture(scope="module")
def browser_server(request: pytest.FixtureRequest) -> Iterator[host.ComfyServer]:
    """The session's ComfyUI server if a `comfy_server` fixture is visible from here (tests/conftest.py);
    otherwise one started for this module and stopped when its tests are done, so that at most one
    server runs at a time (tests/host's session server starts after this one has stopped)."""
    missing = _missing_tools()
    if missing:
        pytest.fail(f"browser tests need {', '.join(missing)}: run scripts/setup.sh", pytrace=False)
    try:
        server = request.getfixturevalue("comfy_server")
    except pytest.FixtureLookupError:
        server = None
    if server is not None:
        server.upload_inputs(host._workflow_inputs())
        yield server
        return
    comfy_dir = host.resolve_comfy_dir()
    if comfy_dir == host.DEFAULT_COMFY_DIR:
        host.install_host(comfy_dir)
    host.build_models(host.resolve_base_dir(), comfy_dir=comfy_dir)
    # Own temp folder: ComfyUI deletes its temp folder when it starts and stops, so another server on the same
    # base directory (host tests running at the same time) would delete our hint previews and control reports.
    temp_root = Path(tempfile.mkdtemp(prefix="cs-browser-temp-"))
    server = host.ComfyServer(extra_args=["--temp-directory", str(temp_root)])
    try:
        server.start(timeout=180)
    except host.HostError:
        _dump_log(server, "startup")
        shutil.rmtree(temp_root, ignore_errors=True)
        raise
    failed_before = request.session.testsfailed
    try:
        server.upload_inputs(host._workflow_inputs())
        yield server
    finally:
        server.stop()
        shutil.rmtree(temp_root, ignore_errors=True)
        if request.session.testsfailed > failed_before:
            _dump_log(server, "browser")


def _dump_log(server: host.ComfyServer, why: str) -> None:
    if server.log_path.is_file():
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(server.log_path, ARTIFACTS / f"comfyui-{why}-{server.port}.log")


def runnable(server: host.ComfyServer, api: dict[str, Any]) -> tuple[bool, str]:
    """Whether every model / input file the API graph names is on this host (the random test models are
    SD1.5 only, so an SDXL example loads in the browser but cannot run here)."""
    info = server.object_info()
    missing = []
    for node in api.values():
        spec = info.get(node["class_type"], {}).get("input", {})
        for group in ("required", "optional"):
            for name, value in node.get("inputs", {}).items():
                opt = spec.get(group, {}).get(name)
                if not opt or not isinstance(value, str) or not isinstance(opt[0], list):
                    continue
                if (
                    name in ("ckpt_name", "control_net_name", "image", "vae_name", "lora_name")
                    and value not in opt[0]
                ):
                    missing.append(f"{node['class_type']}.{name}={value}")
    return (not missing, ", ".join(missing))


@pytest.fixture(scope="module")
def browser_run(browser_server: host.ComfyServer) -> dict[str, Any]:
    """Run the driver once over every UI workflow; returns its JSON result (plus `runnable` per workflow)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    workflows = []
    skipped: dict[str, str] = {}
    for ui in ui_workflows():
        api = api_twin(ui)
        wf = {"name": ui.stem, "ui": str(ui), "api": str(api) if api else None}
        workflows.append(wf)
        if api:
            ok, why = runnable(browser_server, json.loads(api.read_text()))
            if not ok:
                skipped[ui.stem] = f"not runnable on this host (missing {why})"
    # Queue BROWSER_RUNS only (they must be runnable here); every workflow is loaded, compared and screenshotted.
    not_queued = {wf["name"] for wf in workflows} - set(BROWSER_RUNS)
    job = {
        "url": browser_server.url,
        "artifact_dir": str(ARTIFACTS),
        "workflows": workflows,
        "run": True,
        "skip_run": sorted(not_queued | set(skipped)),
        "run_timeout_s": 420,
        "png_roundtrip": True,
        "drag": True,
    }
    if KIND_WORKFLOW in {wf["name"] for wf in workflows}:
        # Load ControlNet's kind badge: a T2I-Adapter workflow, then the combo switched to these files.
        job["kinds"] = {"workflow": KIND_WORKFLOW, "classic": KIND_CLASSIC, "missing": KIND_MISSING}
    # the converter's menu command on a graph of built-in nodes (browser_helpers.CONVERT_GRAPH)
    template = convert_template()
    job["convert"] = {"api": convert_graph(), "ui": template, "ui_converted": convert_ui(template)[0]}
    if MODES_WORKFLOW in {wf["name"] for wf in workflows}:
        # Last: classic then Nodes 2.0, one ApplyHint + ControlScale in a subgraph, one run each.
        job["modes"] = {"workflow": MODES_WORKFLOW, "decay": MODES_DECAY, "seed": 101}
    t0 = time.perf_counter()
    # Own process group: on a timeout the driver and the chromium it started go down together.
    proc = subprocess.Popen(
        ["node", str(DRIVER)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(REPO),
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(json.dumps(job), timeout=DRIVER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            stdout, stderr = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
        (ARTIFACTS / "driver-stderr.txt").write_text(stderr or "")
        pytest.fail(f"driver timed out after {DRIVER_TIMEOUT_S} s:\n{(stderr or '')[-4000:]}", pytrace=False)
    wall = time.perf_counter() - t0
    (ARTIFACTS / "driver-stderr.txt").write_text(stderr)
    if proc.returncode != 0 or not stdout.strip():
        pytest.fail(f"driver failed (rc {proc.returncode}):\n{stderr[-4000:]}", pytrace=False)
    result = json.loads(stdout.strip().splitlines()[-1])
    result["wall_s"] = round(wall, 1)
    result["skipped_runs"] = skipped
    (ARTIFACTS / "driver-result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nbrowser driver: {wall:.1f} s for {len(workflows)} workflow(s)", file=sys.stderr)
    return result
