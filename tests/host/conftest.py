"""Fixtures for host tests: one real ComfyUI server with the ControlStack pack, shared by the session.

The host (ComfyUI 0.3.75 in .host/comfyui) and the random test models (.host/base/models) are installed on
first use; ``CONTROLSTACK_COMFY_DIR`` / ``CONTROLSTACK_BASE_DIR`` point at an existing ComfyUI and models
instead. On any failed test the server log is copied to .artifacts/.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import host
import pytest
import requests

ARTIFACTS = host.REPO / ".artifacts"
REFERENCE_NODES = Path(__file__).resolve().parent / "reference_nodes"


@pytest.fixture(scope="session")
def host_models() -> dict[str, Path]:
    """Paths of the random SD1.5 checkpoint and ControlNets (keys: checkpoint, canny, depth, scribble)."""
    comfy_dir = host.resolve_comfy_dir()
    if comfy_dir == host.DEFAULT_COMFY_DIR:
        host.install_host(comfy_dir)
    return host.build_models(host.resolve_base_dir(), comfy_dir=comfy_dir)


@pytest.fixture(scope="session")
def comfy_server(request: pytest.FixtureRequest, host_models: dict[str, Path]) -> Iterator[host.ComfyServer]:
    """A started ComfyServer with the pack loaded; stopped at the end of the session."""
    # the test-side reference nodes (LLLite's formula, a context-window handler) load next to the pack
    server = host.ComfyServer(extra_packs=sorted(p for p in REFERENCE_NODES.iterdir() if p.is_dir()))
    failed_before = request.session.testsfailed
    try:
        server.start(timeout=180)
    except host.HostError:
        _dump_log(server, "startup")
        raise
    try:
        yield server
    finally:
        server.stop()
        if request.session.testsfailed > failed_before:
            _dump_log(server, "session")


@pytest.fixture(scope="session")
def sdxl_host(request: pytest.FixtureRequest, comfy_server: host.ComfyServer) -> Iterator[host.ComfyServer]:
    """A second host for SDXL: full-size random SDXL checkpoint and ControlNet plus the random files of every other
    control kind, in their own base directory, UNet weights stored fp16 (SDXL in fp32 would not fit next to the
    SD1.5 host in a CI machine's RAM), with the test-side reference nodes loaded. The SD1.5 host drops its models
    first. Session-scoped: the SDXL test modules (test_workflows' SDXL graphs, test_xl_kinds) share it."""
    requests.post(comfy_server.url + "/free", json={"unload_models": True, "free_memory": True}, timeout=60)
    base = host.build_sdxl_models()
    server = host.ComfyServer(
        base_dir=base,
        extra_args=host.SDXL_SERVER_ARGS,
        extra_packs=sorted(p for p in REFERENCE_NODES.iterdir() if p.is_dir()),
    )
    failed_before = request.session.testsfailed
    server.start(timeout=300)
    try:
        yield server
    finally:
        server.stop()
        if request.session.testsfailed > failed_before:
            _dump_log(server, "sdxl-session")


def _dump_log(server: host.ComfyServer, why: str) -> None:
    if server.log_path.is_file():
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(server.log_path, ARTIFACTS / f"comfyui-{why}-{server.port}.log")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    report = yield
    if report.failed and "comfy_server" in getattr(item, "fixturenames", ()):
        server = item.funcargs.get("comfy_server") if hasattr(item, "funcargs") else None
        if isinstance(server, host.ComfyServer):
            _dump_log(server, "failed")
    return report
