"""The host boots with the pack, and the harness runs built-in graphs on the random test models.

The built-in graphs prove the harness and the random files independently of our nodes: the checkpoint is
loaded by CheckpointLoaderSimple as SD1.5, and a random ControlNet file loads in ComfyUI's own
ControlNetLoader + ControlNetApplyAdvanced.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import host
import numpy as np
import pytest
from PIL import Image

DESIGN = host.REPO / "docs" / "design.md"
EXPECTED_NODES = {
    "ControlStackLoadControlNet",
    "ControlStackApplyHint",
    "ControlStackControlScale",
    "ControlStackSampler",
}
HINT_NAME = "controlstack_test_hint.png"


def design_node_ids() -> set[str]:
    """Node ids of the table in docs/design.md (templated rows such as ControlStack<Name>... skipped)."""
    ids = set()
    for line in DESIGN.read_text().splitlines():
        m = re.match(r"\|\s*(ControlStack\w+)\s*\|", line)
        if m:
            ids.add(m.group(1))
    return ids


def test_pack_imports(comfy_server: host.ComfyServer) -> None:
    assert not comfy_server.import_failed(), "ComfyUI logged IMPORT FAILED for the pack:\n" + "\n".join(
        line for line in comfy_server.log_text().splitlines() if "controlstack" in line.lower()
    )


def test_design_node_ids_registered(comfy_server: host.ComfyServer) -> None:
    ids = design_node_ids()
    assert EXPECTED_NODES <= ids, f"docs/design.md node table lost rows: {EXPECTED_NODES - ids}"
    info = comfy_server.object_info()
    missing = sorted(ids - info.keys())
    assert not missing, f"node ids of docs/design.md missing from /object_info: {missing}"


def txt2img(seed: int = 1, control: dict[str, Any] | None = None) -> dict[str, Any]:
    """128x128, 2-step SD1.5 graph of built-in nodes; with ``control`` adds ControlNetLoader +
    ControlNetApplyAdvanced (keys: name, image, strength)."""
    g: dict[str, Any] = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": host.CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a house by a lake", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "seed": seed,
                "steps": 2,
                "cfg": 7.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {
            "class_type": "SaveImage",
            "inputs": {"images": ["6", 0], "filename_prefix": "controlstack_boot"},
        },
    }
    if control:
        g["10"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": control["name"]}}
        g["11"] = {"class_type": "LoadImage", "inputs": {"image": control["image"]}}
        g["12"] = {
            "class_type": "ControlNetApplyAdvanced",
            "inputs": {
                "positive": ["2", 0],
                "negative": ["3", 0],
                "control_net": ["10", 0],
                "image": ["11", 0],
                "strength": control.get("strength", 1.0),
                "start_percent": 0.0,
                "end_percent": 1.0,
                "vae": ["1", 2],
            },
        }
        g["5"]["inputs"]["positive"] = ["12", 0]
        g["5"]["inputs"]["negative"] = ["12", 1]
    return g


@pytest.fixture(scope="module")
def hint_image(comfy_server: host.ComfyServer) -> str:
    """A 128x128 line drawing in BASE/input; returns its name for LoadImage."""
    img = np.zeros((128, 128, 3), np.uint8)
    img[20:108, 30:34] = 255
    img[20:24, 30:100] = 255
    img[60:64, 10:120] = 255
    path = comfy_server.base_dir / "input" / HINT_NAME
    Image.fromarray(img).save(path)
    return HINT_NAME


def _load(paths: list[Path]) -> np.ndarray:
    assert len(paths) == 1 and paths[0].is_file(), paths
    return np.asarray(Image.open(paths[0]).convert("RGB"), dtype=np.float32)


def test_builtin_txt2img_runs(comfy_server: host.ComfyServer) -> None:
    entry = comfy_server.run(txt2img(seed=1), timeout=600)
    img = _load(comfy_server.output_images(entry))
    assert img.shape == (128, 128, 3)


def test_builtin_controlnet_loads_random_file(comfy_server: host.ComfyServer, hint_image: str) -> None:
    plain = _load(comfy_server.output_images(comfy_server.run(txt2img(seed=2), timeout=600)))
    control = {"name": "controlstack_random_sd15_canny.safetensors", "image": hint_image, "strength": 1.0}
    entry = comfy_server.run(txt2img(seed=2, control=control), timeout=600)
    controlled = _load(comfy_server.output_images(entry))
    assert controlled.shape == plain.shape
    # every weight is random, zero convs included: the ControlNet must change the image
    assert np.abs(controlled - plain).mean() > 1.0


def test_validation_error_carries_node_errors(comfy_server: host.ComfyServer) -> None:
    bad = txt2img()
    bad["1"]["inputs"]["ckpt_name"] = "no_such_model.safetensors"
    with pytest.raises(host.PromptRejected) as e:
        comfy_server.queue(bad)
    assert "1" in e.value.node_errors
    assert "no_such_model" in str(e.value)


def test_a_partly_valid_prompt_is_rejected_and_nothing_of_it_runs(comfy_server: host.ComfyServer) -> None:
    # ComfyUI queues the outputs that validate and drops the others (200 with node_errors); the client must not
    # report that as a run, or a workflow test with one broken output would pass on the outputs that still ran.
    graph = txt2img(seed=3)
    graph["20"] = {"class_type": "LoadImage", "inputs": {"image": "no_such_hint.png"}}
    graph["21"] = {"class_type": "PreviewImage", "inputs": {"images": ["20", 0]}}
    with pytest.raises(host.PromptRejected) as e:
        comfy_server.queue(graph)
    assert set(e.value.node_errors) == {"20"}, e.value.node_errors  # keyed by the node that failed
    assert "no_such_hint.png" in str(e.value)
    assert e.value.prompt_id
    # the valid part was taken back: deleted from the queue, or interrupted if it had started; it saved nothing
    entry = comfy_server.run(txt2img(seed=4), timeout=600)
    assert len(comfy_server.output_images(entry)) == 1
    taken_back = comfy_server.get(f"/history/{e.value.prompt_id}", timeout=60).json().get(e.value.prompt_id)
    assert taken_back is None or not taken_back.get("outputs"), taken_back
