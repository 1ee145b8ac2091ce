"""Through a real ComfyUI server: an inpaint hint reaches the ControlNet exactly, non-finite numbers are refused with
the input's name, and a ControlNet file replaced on disk is loaded again.

fp32 on the CPU, 64x64 pixels, 1-2 steps, seeded random weights (zero convs too): a hint that were clamped, a NaN that
were accepted or a file served from the cache changes the numbers these tests compare.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from graphs import (
    SD15_CONTROLNETS,
    add_builtin,
    add_controlstack,
    base_graph,
    rel_err,
    run_latent,
    set_sampler,
)
from host import PromptFailed
from PIL import Image
from safetensors.torch import load_file, save_file

CANNY = SD15_CONTROLNETS[0]
PHOTO = "cs_hardening_photo.png"


@pytest.fixture(scope="module")
def photo(comfy_server, host_models) -> str:
    rng = np.random.default_rng(14)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        Path(comfy_server.base_dir) / "input" / PHOTO
    )
    return PHOTO


def _inpaint_graph(photo: str) -> dict:
    """photo -> Inpaint Hint (ControlStack) node "21", masked where the photo's red channel is above 0.5."""
    g = base_graph(photo, steps=1)
    g["20"] = {"class_type": "ImageToMask", "inputs": {"image": ["6", 0], "channel": "red"}}
    g["21"] = {
        "class_type": "ControlStackInpaintPreprocessor",
        "inputs": {
            "image": ["6", 0],
            "mask": ["20", 0],
            "resolution": 64,
            "pixel_perfect": False,
            "target_width": 64,
            "target_height": 64,
        },
    }
    return g


def test_inpaint_hint_reaches_the_controlnet_exactly(comfy_server, photo):
    """photo -> inpaint hint -> ApplyHint equals the built-in ControlNetApplyAdvanced (which does not clamp) with the
    same hint, and differs from the same graph with the hint clamped to [0, 1] (what ApplyHint used to do)."""
    g = _inpaint_graph(photo)
    cond = add_builtin(g, "7", CANNY, ["21", 0], (["2", 0], ["3", 0]))
    builtin = run_latent(comfy_server, set_sampler(g, cond=cond))

    g = _inpaint_graph(photo)
    ours = run_latent(
        comfy_server, set_sampler(g, model=add_controlstack(g, "7", CANNY, ["21", 0], ["1", 0]))
    )

    g = _inpaint_graph(photo)
    # ImageBlend at factor 0 returns image1 clamped to [0, 1]: the -1 (masked) pixels become 0.
    g["22"] = {
        "class_type": "ImageBlend",
        "inputs": {"image1": ["21", 0], "image2": ["21", 0], "blend_factor": 0.0, "blend_mode": "normal"},
    }
    clamped = run_latent(
        comfy_server, set_sampler(g, model=add_controlstack(g, "7", CANNY, ["22", 0], ["1", 0]))
    )

    err, clamp_err = rel_err(ours, builtin), rel_err(clamped, builtin)
    print(f"inpaint hint: ours vs built-in {err:.3e}; hint clamped to [0, 1] vs built-in {clamp_err:.3e}")
    assert clamp_err > 1e-3, "clamping the -1s must change the result for this test to mean anything"
    assert err <= 1e-4


def _post_raw(server, prompt: dict) -> str:
    """POST a prompt as Python's json writes it: NaN stays NaN (requests' json= refuses it; ComfyUI reads it)."""
    body = json.dumps({"prompt": prompt})
    assert "NaN" in body
    r = requests.post(
        server.url + "/prompt", data=body, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert r.status_code == 200, f"ComfyUI 0.3.75's validation lets NaN through; got {r.status_code} {r.text}"
    return r.json()["prompt_id"]


def _with_nan(photo: str, where: str) -> tuple[dict, str]:
    g = base_graph(photo, steps=1)
    kw: dict = {}
    image = ["6", 0]
    if where == "strength":
        kw["strength"] = float("nan")
    elif where == "in_05":  # a layer scale, through ControlNet Layer Scales
        layers = {f"in_{i:02d}": 1.0 for i in range(12)} | {"middle": 1.0, "in_05": float("nan")}
        g["12"] = {"class_type": "ControlStackControlScale", "inputs": {"mode": "custom", **layers}}
        kw["scales"] = ["12", 0]
    else:  # a preprocessor's float parameter
        g["13"] = {
            "class_type": "ControlStackLineartStandardPreprocessor",
            "inputs": {
                "image": ["6", 0],
                "resolution": 64,
                "pixel_perfect": False,
                "target_width": 64,
                "target_height": 64,
                "gaussian_sigma": float("nan"),
                "intensity_threshold": 8,
            },
        }
        image = ["13", 0]
    return set_sampler(g, model=add_controlstack(g, "7", CANNY, image, ["1", 0], **kw)), where


@pytest.mark.parametrize("where", ["strength", "in_05", "gaussian_sigma"])
def test_nan_inputs_are_refused_naming_the_input(comfy_server, photo, where):
    prompt, name = _with_nan(photo, where)
    with pytest.raises(PromptFailed, match=f"{name}: expected a finite number, got nan") as info:
        comfy_server.wait(_post_raw(comfy_server, prompt), timeout=300)
    print(f"{where} = NaN: {str(info.value).splitlines()[0]}")
    # The server keeps serving: a good prompt right after (a fresh seed, so the cache cannot answer it).
    latent = run_latent(comfy_server, base_graph(photo, steps=1, seed=1400 + len(where)))
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()


def test_replaced_controlnet_file_is_loaded_again(comfy_server, photo, host_models):
    """The same prompt twice; between the runs the file under its name is replaced by another ControlNet. The second
    run must give that ControlNet's result, not the cached one (IS_CHANGED from the file's size and mtime)."""
    cn_dir = Path(comfy_server.base_dir) / "models" / "controlnet"
    tag = uuid.uuid4().hex[:8]
    name, other = f"cs_test_swap_{tag}.safetensors", f"cs_test_swap_{tag}_other.safetensors"
    target, partial = cn_dir / name, cn_dir / (name + ".partial")
    # The other ControlNet: canny with its output convs negated. (The random canny / depth / scribble files hold
    # the same tensors: their generator seeds differ only above the 32 bits torch's CPU generator keeps.)
    tensors = load_file(str(host_models["canny"]))
    save_file(
        {k: -v if ("zero_convs" in k or "middle_block_out" in k) else v for k, v in tensors.items()},
        str(cn_dir / other),
    )
    del tensors

    def graph(cn_file: str) -> dict:
        g = base_graph(photo, steps=1, seed=1414)
        return set_sampler(g, model=add_controlstack(g, "7", cn_file, ["6", 0], ["1", 0]))

    try:
        shutil.copyfile(host_models["canny"], target)
        g = graph(name)
        before = run_latent(comfy_server, g)
        # Replace it the way a download or a copy does: write elsewhere, then rename over the name (a new file, a new
        # mtime, the same size).
        shutil.copyfile(cn_dir / other, partial)
        os.replace(partial, target)
        after = run_latent(comfy_server, set_sampler(g))  # the same graph; only SaveLatent's prefix is new
        expected = run_latent(comfy_server, graph(other))
    finally:
        for path in (target, partial, cn_dir / other):
            path.unlink(missing_ok=True)
    change, err = rel_err(after, before), rel_err(after, expected)
    print(f"replaced file: second run vs first {change:.3e}, vs the new file's own result {err:.3e}")
    assert change > 1e-3, "the second run was served from the cache (the old file's result)"
    assert err <= 1e-6
