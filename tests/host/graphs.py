"""Small API-format graphs for host tests, and reading their output latents back."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import host
import numpy as np
import torch
from numerics import rel_err as rel_err  # one home (scripts/numerics.py); re-exported for the tests
from PIL import Image
from safetensors.torch import load_file

CHECKPOINT = host.CHECKPOINT
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
    return entry_latent(server, server.run(g, timeout=timeout))


def entry_latent(server, entry: dict[str, Any]) -> torch.Tensor:
    """The latent that the SaveLatent node ("30") of a finished prompt wrote, from its /history entry."""
    files = entry["outputs"]["30"]["latents"]
    path = Path(server.base_dir) / "output" / files[0]["subfolder"] / files[0]["filename"]
    return load_file(str(path))["latent_tensor"]


def status_message(entry: dict[str, Any], event: str) -> dict[str, Any] | None:
    """The data of the last `event` message (execution_start, execution_cached, execution_interrupted...) in a
    /history entry, or None."""
    found = None
    for name, data in entry.get("status", {}).get("messages", []):
        if name == event:
            found = data
    return found


SD15_CONTROLNETS = host.CONTROLNETS
"""The random SD1.5 ControlNets that the session's models fixture builds (host.build_models)."""


def write_hint_images(server, names: Sequence[str], seed: int, size: int = 64) -> None:
    """Seeded random RGB hints of size x size in BASE/input, one per name (LoadImage reads them)."""
    rng = np.random.default_rng(seed)
    for name in names:
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(Path(server.base_dir) / "input" / name)


def stacked_graph(
    hints: Sequence[str],
    strengths: Sequence[float],
    *,
    size: int = 64,
    steps: int = 1,
    seed: int = 7,
    cfg: float = 6.0,
) -> dict[str, Any]:
    """base_graph with one ControlStack ApplyHint per hint, all stacked on one MODEL: hint i goes through
    SD15_CONTROLNETS[i] with strengths[i] (nodes "7", "8", "9"; extra hints are LoadImage "16", "17")."""
    if not 1 <= len(hints) <= len(SD15_CONTROLNETS) or len(strengths) != len(hints):
        raise ValueError(
            f"want 1..{len(SD15_CONTROLNETS)} hints with one strength each, got {hints}, {strengths}"
        )
    g = base_graph(hints[0], size=size, steps=steps, seed=seed)
    g["10"]["inputs"]["cfg"] = cfg
    model = ["1", 0]
    for i, (hint, strength) in enumerate(zip(hints, strengths, strict=True)):
        image = ["6", 0]
        if i:
            g[str(15 + i)] = {"class_type": "LoadImage", "inputs": {"image": hint}}
            image = [str(15 + i), 0]
        model = add_controlstack(g, str(7 + i), SD15_CONTROLNETS[i], image, model, strength=strength)
    return set_sampler(g, model=model)


DIFFERENCE_FILE = "cs_test_difference.safetensors"


def difference_file(server, host_models: dict[str, Path]) -> str:
    """A "difference" ControlNet (the canny file minus the base UNet, with a "difference" key) in
    BASE/models/controlnet, built once; returns its name. Loaded with the base MODEL it equals the canny file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = Path(server.base_dir) / "models" / "controlnet" / DIFFERENCE_FILE
    if not path.is_file():
        canny = load_file(str(host_models["canny"]))
        diff = {}
        with safe_open(str(host_models["checkpoint"]), "pt") as ckpt:
            base_keys = set(ckpt.keys())
            for key, value in canny.items():
                base_key = "model.diffusion_model." + key.removeprefix("control_model.")
                base = ckpt.get_tensor(base_key).float() if base_key in base_keys else None
                subtract = base is not None and base.shape == value.shape
                diff[key] = value.float() - base if subtract else value.float()
        diff["difference"] = torch.zeros(1)
        save_file(diff, str(path))
    return DIFFERENCE_FILE
