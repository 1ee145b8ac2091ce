"""Through a real ComfyUI server (SDXL host): Control-LoRA, Union / ProMax and LLLite equal their references, a
mixed stack equals the built-in chain of its parts, and files of the wrong family are refused by name.

The SDXL host (`sdxl_host`, tests/host/conftest.py) holds a full-size random SDXL checkpoint (UNet stored fp16,
computed fp32 per layer) and the random files of every kind; 64x64 pixels (8x8 latent), 2 steps. The LLLite reference
is a test-side node (tests/host/reference_nodes) applying kohya's formula through ComfyUI's attention-patch hooks.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from controlstack.convert import convert_api
from graphs import add_builtin, add_controlstack, base_graph, rel_err, run_latent, set_sampler
from host import PromptFailed, PromptRejected
from PIL import Image

SDXL = "controlstack_random_sdxl.safetensors"
CONTROL_LORA = "controlstack_random_sdxl_control_lora_rank8.safetensors"
UNION = "controlstack_random_sdxl_union_promax.safetensors"
LLLITE = "controlstack_random_sdxl_lllite.safetensors"
T2I_XL = "controlstack_random_sdxl_t2i_canny_diffusers.safetensors"
T2I_SD15 = "controlstack_random_sd15_t2i_depth.safetensors"


def xl_graph(hint: str) -> dict:
    return base_graph(hint, checkpoint=SDXL, steps=2)


@pytest.fixture(scope="module")
def xl(sdxl_host, comfy_server):
    """Hint images on the SDXL host; the SD1.5 T2I-Adapter linked into its controlnet folder (for the refusal)."""
    base = Path(sdxl_host.base_dir)
    rng = np.random.default_rng(11)
    for name in ("cs_xl_hint_a.png", "cs_xl_hint_b.png"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(base / "input" / name)
    link = base / "models" / "controlnet" / T2I_SD15
    if not link.exists():
        os.symlink(Path(comfy_server.base_dir) / "models" / "controlnet" / T2I_SD15, link)
    return sdxl_host


@pytest.fixture(scope="module")
def unpatched(xl):
    return run_latent(xl, xl_graph("cs_xl_hint_a.png"))


def _compare(xl, unpatched, builtin_graph, ours_graph, what, tol=1e-4):
    builtin = run_latent(xl, builtin_graph)
    ours = run_latent(xl, ours_graph)
    assert rel_err(builtin, unpatched) > 1e-3, (
        f"{what}: the control must change the result for the test to mean anything"
    )
    err = rel_err(ours, builtin)
    print(f"{what}: relative error vs reference {err:.3e}")
    assert err <= tol
    return ours, builtin


def test_control_lora_equals_builtin(xl, unpatched):
    g = xl_graph("cs_xl_hint_a.png")
    cond = add_builtin(g, "7", CONTROL_LORA, ["6", 0], (["2", 0], ["3", 0]), strength=0.9)
    builtin = set_sampler(g, cond=cond)
    g = xl_graph("cs_xl_hint_a.png")
    ours = set_sampler(g, model=add_controlstack(g, "7", CONTROL_LORA, ["6", 0], ["1", 0], strength=0.9))
    _compare(xl, unpatched, builtin, ours, "Control-LoRA")


def _union_ours(g, model, node, union_type, fusion, hint=("6", 0), **kw):
    g[node + "L"] = {"class_type": "ControlStackLoadControlNet", "inputs": {"control_net_name": UNION}}
    g[node + "T"] = {
        "class_type": "ControlStackUnionType",
        "inputs": {"control_net": [node + "L", 0], "control_type": union_type, "fusion": fusion},
    }
    inputs = {
        "model": model,
        "control_net": [node + "T", 0],
        "image": list(hint),
        "strength": 1.0,
        "start_percent": 0.0,
        "end_percent": 1.0,
        "resize_mode": "just resize",
        **kw,
    }
    g[node] = {"class_type": "ControlStackApplyHint", "inputs": inputs}
    return [node, 0]


def test_union_single_hint_equals_builtin(xl, unpatched):
    """One typed hint: ComfyUI's fusion maths equals the built-in. The reference maths (xinsir / diffusers) attend
    over the batch axis, so with the hint broadcast to every row the latent token changes nothing measurable: it
    equals the built-in too (docs/formats.md, "Union fusion")."""
    g = xl_graph("cs_xl_hint_a.png")
    g["7L"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": UNION}}
    g["7T"] = {"class_type": "SetUnionControlNetType", "inputs": {"control_net": ["7L", 0], "type": "depth"}}
    g["7"] = {
        "class_type": "ControlNetApplyAdvanced",
        "inputs": {
            "positive": ["2", 0],
            "negative": ["3", 0],
            "control_net": ["7T", 0],
            "image": ["6", 0],
            "strength": 1.0,
            "start_percent": 0.0,
            "end_percent": 1.0,
        },
    }
    builtin_graph = set_sampler(g, cond=(["7", 0], ["7", 1]))
    g = xl_graph("cs_xl_hint_a.png")
    ours_graph = set_sampler(g, model=_union_ours(g, ["1", 0], "7", "depth", "ComfyUI built-in"))
    _, builtin = _compare(xl, unpatched, builtin_graph, ours_graph, "Union (ComfyUI fusion) vs built-in")
    # the same built-in graph through the workflow converter (SetUnionControlNetType -> Union Type, built-in fusion)
    conversion = convert_api(builtin_graph)
    assert conversion.report.converted and not conversion.report.unchanged, conversion.report.text()
    converted = run_latent(xl, set_sampler(conversion.prompt))
    print(f"Union with a type, converted vs built-in graph: {rel_err(converted, builtin):.3e}")
    assert rel_err(converted, builtin) <= 1e-4
    g = xl_graph("cs_xl_hint_a.png")
    reference = run_latent(xl, set_sampler(g, model=_union_ours(g, ["1", 0], "7", "depth", "reference")))
    token = rel_err(reference, builtin)
    print(
        f"Union, one broadcast hint: reference fusion vs ComfyUI's built-in: relative difference {token:.3e}"
    )
    assert token <= 1e-4


def test_union_two_typed_hints_in_one_forward(xl, unpatched):
    """Two hints of one ProMax model run as one multi-condition forward: they change the result, differ from either
    alone, and here the two fusion maths differ (conditions attend to each other only in ComfyUI's)."""

    def two(fusion):
        g = xl_graph("cs_xl_hint_a.png")
        g["8"] = {"class_type": "LoadImage", "inputs": {"image": "cs_xl_hint_b.png"}}
        model = _union_ours(g, ["1", 0], "7", "depth", fusion)
        model = _union_ours(
            g, model, "9", "canny/lineart/anime_lineart/mlsd", fusion, hint=("8", 0), strength=0.8
        )
        return run_latent(xl, set_sampler(g, model=model))

    both, both_comfy = two("reference"), two("ComfyUI built-in")
    g = xl_graph("cs_xl_hint_a.png")
    depth_only = run_latent(xl, set_sampler(g, model=_union_ours(g, ["1", 0], "7", "depth", "reference")))
    assert rel_err(both, unpatched) > 1e-3 and rel_err(both, depth_only) > 1e-4
    fusion = rel_err(both, both_comfy)
    print(f"Union, two hints: reference vs ComfyUI-style fusion: relative difference {fusion:.3e}")
    assert fusion > 1e-5


def test_lllite_equals_reference_patch(xl, unpatched):
    g = xl_graph("cs_xl_hint_a.png")
    g["7"] = {
        "class_type": "CSTestLLLiteReference",
        "inputs": {"model": ["1", 0], "lllite_name": LLLITE, "image": ["6", 0], "strength": 0.8},
    }
    reference = set_sampler(g, model=["7", 0])
    g = xl_graph("cs_xl_hint_a.png")
    ours = set_sampler(g, model=add_controlstack(g, "7", LLLITE, ["6", 0], ["1", 0], strength=0.8))
    _compare(xl, unpatched, reference, ours, "LLLite vs test-side reference patch")


def test_mixed_stack_equals_builtin_chain(xl, unpatched):
    """Union (auto) + T2I-Adapter + Control-LoRA on one MODEL = the built-in chain of the same three."""
    g = xl_graph("cs_xl_hint_a.png")
    g["8"] = {"class_type": "LoadImage", "inputs": {"image": "cs_xl_hint_b.png"}}
    cond = add_builtin(g, "7", UNION, ["6", 0], (["2", 0], ["3", 0]), strength=0.6)
    cond = add_builtin(g, "9", T2I_XL, ["8", 0], cond, strength=1.2, end_percent=0.6)
    cond = add_builtin(g, "11", CONTROL_LORA, ["6", 0], cond, strength=0.7, start_percent=0.3)
    builtin = set_sampler(g, cond=cond)
    g = xl_graph("cs_xl_hint_a.png")
    g["8"] = {"class_type": "LoadImage", "inputs": {"image": "cs_xl_hint_b.png"}}
    model = add_controlstack(g, "7", UNION, ["6", 0], ["1", 0], strength=0.6)
    model = add_controlstack(g, "9", T2I_XL, ["8", 0], model, strength=1.2, end_percent=0.6)
    model = add_controlstack(g, "11", CONTROL_LORA, ["6", 0], model, strength=0.7, start_percent=0.3)
    _compare(xl, unpatched, builtin, set_sampler(g, model=model), "Union + T2I + Control-LoRA stack")


def test_wrong_family_is_refused_and_the_host_keeps_serving(xl, unpatched):
    g = xl_graph("cs_xl_hint_a.png")
    model = add_controlstack(g, "7", T2I_SD15, ["6", 0], ["1", 0])
    with pytest.raises((PromptFailed, PromptRejected)) as info:
        run_latent(xl, set_sampler(g, model=model))
    assert "SD1.x T2I-Adapter" in str(info.value) and "SDXL" in str(info.value), str(info.value)[:600]
    assert torch.equal(run_latent(xl, xl_graph("cs_xl_hint_a.png")), unpatched)
