"""Small API-format graphs for host tests, and reading their output latents back."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

CHECKPOINT = "controlstack_random_sd15.safetensors"
_prefixes = itertools.count()


def base_graph(
    hint: str,
    *,
    size: int = 64,
    steps: int = 4,
    seed: int = 7,
    batch: int = 1,
    checkpoint: str = CHECKPOINT,
) -> dict[str, Any]:
    """Checkpoint, prompts, empty latent, a hint LoadImage ("6"), KSampler ("10") on node "1"'s MODEL, SaveLatent."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a house by a lake", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {
            "class_type": "EmptyLatentImage",
            "inputs": {"width": size, "height": size, "batch_size": batch},
        },
        "6": {"class_type": "LoadImage", "inputs": {"image": hint}},
        "10": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "seed": seed,
                "steps": steps,
                "cfg": 6.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "denoise": 1.0,
            },
        },
        "30": {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": _prefix()}},
    }


def _prefix() -> str:
    return f"latents/cs_test_{next(_prefixes)}"


def add_controlstack(g: dict, node: str, cn_file: str, image: list, model: list, **kw: Any) -> list:
    """LoadControlNet + ApplyHint nodes named `node`+"L" / `node`; returns the patched MODEL link."""
    g[node + "L"] = {"class_type": "ControlStackLoadControlNet", "inputs": {"control_net_name": cn_file}}
    inputs = {
        "model": model,
        "control_net": [node + "L", 0],
        "image": image,
        "strength": 1.0,
        "start_percent": 0.0,
        "end_percent": 1.0,
        "resize_mode": "just resize",
    }
    inputs.update(kw)
    g[node] = {"class_type": "ControlStackApplyHint", "inputs": inputs}
    return [node, 0]


def add_builtin(
    g: dict, node: str, cn_file: str, image: list, cond: tuple[list, list], **kw: Any
) -> tuple[list, list]:
    """ComfyUI's own ControlNetLoader + ControlNetApplyAdvanced; returns the (positive, negative) links."""
    g[node + "L"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": cn_file}}
    inputs = {
        "positive": cond[0],
        "negative": cond[1],
        "control_net": [node + "L", 0],
        "image": image,
        "strength": 1.0,
        "start_percent": 0.0,
        "end_percent": 1.0,
    }
    inputs.update(kw)
    g[node] = {"class_type": "ControlNetApplyAdvanced", "inputs": inputs}
    return [node, 0], [node, 1]


def set_sampler(g: dict, model: list | None = None, cond: tuple[list, list] | None = None) -> dict:
    if model is not None:
        g["10"]["inputs"]["model"] = model
    if cond is not None:
        g["10"]["inputs"]["positive"], g["10"]["inputs"]["negative"] = cond
    g["30"]["inputs"]["filename_prefix"] = _prefix()  # a fresh output file for every graph
    return g


def run_latent(server, g: dict, timeout: float = 600) -> torch.Tensor:
    """Run a graph and return the latent its SaveLatent node wrote."""
    entry = server.run(g, timeout=timeout)
    files = entry["outputs"]["30"]["latents"]
    path = Path(server.base_dir) / "output" / files[0]["subfolder"] / files[0]["filename"]
    return load_file(str(path))["latent_tensor"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())
