"""Every shipped API-format workflow runs through a real ComfyUI server's /prompt and writes its images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
API = sorted((REPO / "workflows" / "api").glob("*.json"))
SDXL_MARKER = "controlstack_random_sdxl"
"""Every random SDXL file (checkpoint, ControlNet, T2I, Control-LoRA, Union, LLLite) has this in its name."""


def test_workflows_exist_for_every_issue_scenario():
    names = {p.stem for p in API}
    assert {
        "controlstack_sd15_single",
        "controlstack_sd15_stack_windows",
        "controlstack_sd15_scale_modes",
        "controlstack_sdxl",
        "controlstack_sd15_canny_from_photo",
        "controlstack_sd15_canny_plus_scribble",
        "controlstack_sd15_t2i_depth",
        "controlstack_sdxl_union_promax",
        "controlstack_sdxl_control_lora",
        "controlstack_sdxl_lllite",
    } <= names


@pytest.mark.parametrize("path", API, ids=[p.stem for p in API])
def test_workflow_matches_object_info(comfy_server, path):
    """Every node type and every input of the workflow exists in the host's /object_info (SDXL included)."""
    info = comfy_server.object_info()
    graph = json.loads(path.read_text())
    for node_id, node in graph.items():
        assert node["class_type"] in info, f"{path.name}: node {node_id} type {node['class_type']} missing"
        spec = info[node["class_type"]]["input"]
        known = {**spec.get("required", {}), **spec.get("optional", {})}
        for name in node["inputs"]:
            assert name in known, f"{path.name}: node {node_id} ({node['class_type']}) has no input {name!r}"


def _needs_sdxl(graph: dict) -> bool:
    return any(
        SDXL_MARKER in v for node in graph.values() for v in node["inputs"].values() if isinstance(v, str)
    )


@pytest.mark.parametrize("path", API, ids=[p.stem for p in API])
def test_workflow_runs_and_writes_images(request, comfy_server, path):
    graph = json.loads(path.read_text())
    server = request.getfixturevalue("sdxl_host") if _needs_sdxl(graph) else comfy_server
    server.upload_inputs(sorted((REPO / "workflows" / "inputs").glob("*.png")))
    entry = server.run(graph, timeout=900)
    images = server.output_images(entry)
    saved = [p for p in images if "output" in p.parts]
    assert saved, f"{path.name} wrote no images"
    for image in images:
        assert image.is_file()
        pixels = np.asarray(Image.open(image))
        assert pixels.size and pixels.std() > 0, f"{image} is blank"
    reports = [p for p in images if "report" in p.name]
    if any(node["class_type"] == "ControlStackSampler" for node in graph.values()):
        assert reports, f"{path.name}: the control report was not written"
