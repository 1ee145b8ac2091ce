"""Paths shared by the browser tests and their conftest (a plain module: `conftest` is not importable by name)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The kind-badge check (driver step "kinds"): a workflow whose Load ControlNet holds a T2I-Adapter, a classic
# ControlNet on the host to switch to, and a file name the host lacks.
KIND_WORKFLOW = "controlstack_sd15_t2i_depth"
KIND_CLASSIC = "controlstack_random_sd15_canny.safetensors"
KIND_MISSING = "controlstack_no_such_file.safetensors"

# Sampling is nearly all of the browser tests' time, so only these workflows are queued from the Run button. Every
# other UI file is loaded and checked equal to its API twin, and the twins run in tests/host/test_workflows.py;
# test_browser_runs_cover_every_node_type keeps this set covering every node type that shows something after a run.
BROWSER_RUNS = (
    "controlstack_sd15_canny_plus_scribble",
    "controlstack_sd15_schedule_fade",  # Strength Keyframe
    "controlstack_sd15_frame_keyframes",  # Frame Strengths, a 16-latent batch
    "controlstack_sd15_depth_pose_from_photo",  # the weight-based annotators (Depth Anything v2, OpenPose)
)
# Nodes 2.0 and subgraphs (driver step "modes"): this workflow runs once per renderer with one ApplyHint and its
# ControlScale moved into a subgraph; the Nodes 2.0 page gets ControlScale's prompt decay replaced by MODES_DECAY
# (the extension must take it from the node definition).
MODES_WORKFLOW = "controlstack_sd15_scale_modes"
MODES_DECAY = 0.5


def ui_workflows() -> list[Path]:
    """Top-level workflows/*.json: the UI-format (drag-and-drop) files."""
    return sorted((REPO / "workflows").glob("*.json"))


def api_twin(ui: Path) -> Path | None:
    p = ui.parent / "api" / ui.name
    return p if p.is_file() else None


def convert_graph() -> dict:
    """A graph of built-in ControlNet nodes for the converter's menu command: a ControlNetApplyAdvanced (both
    prompts) then a positive-only ControlNetApply (so one ControlNet reaches the cond rows only), on the host's
    random SD1.5 models."""
    loader = {"class_type": "ControlNetLoader"}
    return {
        "1": {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": "controlstack_random_sd15.safetensors"},
        },
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a house", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {**loader, "inputs": {"control_net_name": "controlstack_random_sd15_canny.safetensors"}},
        "6": {"class_type": "LoadImage", "inputs": {"image": "controlstack_canny_hint.png"}},
        "7": {
            "class_type": "ControlNetApplyAdvanced",
            "inputs": {
                "positive": ["2", 0],
                "negative": ["3", 0],
                "control_net": ["5", 0],
                "image": ["6", 0],
                "strength": 0.8,
                "start_percent": 0.0,
                "end_percent": 0.7,
            },
        },
        "8": {**loader, "inputs": {"control_net_name": "controlstack_random_sd15_scribble.safetensors"}},
        "9": {
            "class_type": "ControlNetApply",
            "inputs": {"conditioning": ["7", 0], "control_net": ["8", 0], "image": ["6", 0], "strength": 0.6},
        },
        "10": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "seed": 5,
                "steps": 2,
                "cfg": 6.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["9", 0],
                "negative": ["7", 1],
                "latent_image": ["4", 0],
                "denoise": 1.0,
            },
        },
        "11": {"class_type": "VAEDecode", "inputs": {"samples": ["10", 0], "vae": ["1", 2]}},
        "12": {"class_type": "SaveImage", "inputs": {"images": ["11", 0], "filename_prefix": "cs_convert"}},
    }


CONVERT_TEMPLATE = "controlnet_example"
"""ComfyUI's own ControlNet example template (UI format), dropped on the page for the converter's menu command."""


def convert_template() -> dict:
    import importlib.util
    import json

    spec = importlib.util.find_spec("comfyui_workflow_templates_media_image")
    assert spec and spec.origin, "ComfyUI's workflow templates are not installed"
    return json.loads((Path(spec.origin).parent / "templates" / f"{CONVERT_TEMPLATE}.json").read_text())
