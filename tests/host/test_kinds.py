"""Through a real ComfyUI server (SD1.5 host): T2I-Adapters equal ComfyUI's built-in T2I path, alone and stacked
with a ControlNet, and every refusal of a file that does not fit is a clear error after which the host keeps serving.

Seeded random weights (every tensor non-zero), fp32 on the CPU, 64x64 pixels (8x8 latent). SDXL kinds (Control-LoRA,
Union, LLLite, the mixed stack) are in test_xl_kinds.py, on the SDXL host.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from graphs import add_builtin, add_controlstack, base_graph, rel_err, run_latent, set_sampler
from host import PromptFailed, PromptRejected
from PIL import Image
from safetensors.torch import save_file

CANNY = "controlstack_random_sd15_canny.safetensors"
T2I_DEPTH = "controlstack_random_sd15_t2i_depth.safetensors"
T2I_SKETCH = "controlstack_random_sd15_t2i_sketch_light.safetensors"


@pytest.fixture(scope="module")
def kinds_files(comfy_server, host_models):
    base = Path(comfy_server.base_dir)
    rng = np.random.default_rng(9)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(
        base / "input" / "cs_kinds_hint.png"
    )
    cn_dir = base / "models" / "controlnet"
    fake = {
        "cs_test_flux_instantx.safetensors": {"controlnet_x_embedder.weight": torch.ones(4, 4)},
        "cs_test_sd3_controlnet.safetensors": {"pos_embed_input.proj.weight": torch.ones(4, 4)},
        "cs_test_ip_adapter.safetensors": {"image_proj.proj.weight": torch.ones(4, 4)},
    }
    for name, tensors in fake.items():
        save_file(tensors, str(cn_dir / name))
    return "cs_kinds_hint.png"


@pytest.fixture(scope="module")
def unpatched(comfy_server, kinds_files):
    return run_latent(comfy_server, base_graph(kinds_files))


@pytest.mark.parametrize("adapter", [T2I_DEPTH, T2I_SKETCH], ids=["full_3ch", "light_1ch"])
def test_t2i_adapter_equals_builtin(comfy_server, kinds_files, unpatched, adapter):
    g = base_graph(kinds_files)
    cond = add_builtin(g, "7", adapter, ["6", 0], (["2", 0], ["3", 0]), strength=0.8)
    builtin = run_latent(comfy_server, set_sampler(g, cond=cond))
    g = base_graph(kinds_files)
    model = add_controlstack(g, "7", adapter, ["6", 0], ["1", 0], strength=0.8)
    ours = run_latent(comfy_server, set_sampler(g, model=model))
    assert rel_err(builtin, unpatched) > 1e-3, (
        "the adapter must change the result for this test to mean anything"
    )
    err = rel_err(ours, builtin)
    print(f"T2I {adapter}: relative error vs built-in {err:.3e}")
    assert err <= 1e-4


def test_t2i_plus_controlnet_equals_builtin_chain(comfy_server, kinds_files, unpatched):
    """A ControlNet (skips) and a T2I-Adapter (input blocks) in one stack = the built-in chain of both."""
    g = base_graph(kinds_files)
    cond = add_builtin(g, "7", CANNY, ["6", 0], (["2", 0], ["3", 0]), strength=0.7)
    cond = add_builtin(g, "8", T2I_DEPTH, ["6", 0], cond, strength=1.1, start_percent=0.25)
    builtin = run_latent(comfy_server, set_sampler(g, cond=cond))
    g = base_graph(kinds_files)
    model = add_controlstack(g, "7", CANNY, ["6", 0], ["1", 0], strength=0.7)
    model = add_controlstack(g, "8", T2I_DEPTH, ["6", 0], model, strength=1.1, start_percent=0.25)
    ours = run_latent(comfy_server, set_sampler(g, model=model))
    err = rel_err(ours, builtin)
    print(f"ControlNet + T2I stack: relative error vs built-in chain {err:.3e}")
    assert rel_err(builtin, unpatched) > 1e-3 and err <= 1e-4


def _expect_failure(server, graph, *needles: str) -> str:
    with pytest.raises((PromptFailed, PromptRejected)) as info:
        run_latent(server, graph)
    message = str(info.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in: {message[:600]}"
    return message


@pytest.mark.parametrize(
    ("file", "needles"),
    [
        ("cs_test_flux_instantx.safetensors", ("Flux ControlNet", "SD1.x / SD2.x / SDXL")),
        ("cs_test_sd3_controlnet.safetensors", ("SD3 ControlNet", "SD1.x / SD2.x / SDXL")),
        ("cs_test_ip_adapter.safetensors", ("IP-Adapter",)),
    ],
)
def test_other_families_are_named_and_the_host_keeps_serving(
    comfy_server, kinds_files, unpatched, file, needles
):
    g = base_graph(kinds_files)
    model = add_controlstack(g, "7", file, ["6", 0], ["1", 0])
    _expect_failure(comfy_server, set_sampler(g, model=model), file, *needles)
    again = run_latent(comfy_server, base_graph(kinds_files))
    assert torch.equal(again, unpatched)


def test_union_type_on_a_classic_controlnet_is_refused(comfy_server, kinds_files, unpatched):
    g = base_graph(kinds_files)
    g["7L"] = {"class_type": "ControlStackLoadControlNet", "inputs": {"control_net_name": CANNY}}
    g["7T"] = {
        "class_type": "ControlStackUnionType",
        "inputs": {"control_net": ["7L", 0], "control_type": "depth"},
    }
    g["7"] = {
        "class_type": "ControlStackApplyHint",
        "inputs": {
            "model": ["1", 0],
            "control_net": ["7T", 0],
            "image": ["6", 0],
            "strength": 1.0,
            "start_percent": 0.0,
            "end_percent": 1.0,
            "resize_mode": "just resize",
        },
    }
    _expect_failure(
        comfy_server, set_sampler(g, model=["7", 0]), "control type only applies to ControlNet Union"
    )
    assert torch.equal(run_latent(comfy_server, base_graph(kinds_files)), unpatched)


INPAINT_CHECKPOINT = "cs_test_random_sd15_inpaint.safetensors"


@pytest.fixture(scope="module")
def inpaint_checkpoint(comfy_server, host_models):
    """The random SD1.5 checkpoint as an inpainting UNet: conv_in takes 9 channels (latent, mask, masked-image
    latent), the layout of sd-v1-5-inpainting; ComfyUI detects it as SD15 with in_channels 9."""
    path = Path(comfy_server.base_dir) / "models" / "checkpoints" / INPAINT_CHECKPOINT
    if not path.is_file():
        from safetensors import safe_open

        tensors = {}
        with safe_open(str(host_models["checkpoint"]), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
        conv_in = tensors["model.diffusion_model.input_blocks.0.0.weight"]
        extra = torch.randn(
            conv_in.shape[0], 5, *conv_in.shape[2:], generator=torch.Generator().manual_seed(5)
        )
        tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat(
            [conv_in, (extra * conv_in.float().std()).to(conv_in.dtype)], dim=1
        )
        tmp = path.with_name(path.name + ".partial")
        save_file(tensors, str(tmp))
        del tensors
        tmp.replace(path)
    return INPAINT_CHECKPOINT


def test_inpainting_unet_accepts_its_family_and_equals_builtin(comfy_server, kinds_files, inpaint_checkpoint):
    """An SD1.5 inpainting UNet (9 input channels) takes SD1.5 ControlNets and T2I-Adapters, as the built-in does."""
    plain = run_latent(comfy_server, base_graph(kinds_files, checkpoint=inpaint_checkpoint))
    g = base_graph(kinds_files, checkpoint=inpaint_checkpoint)
    cond = add_builtin(g, "7", CANNY, ["6", 0], (["2", 0], ["3", 0]), strength=0.8)
    cond = add_builtin(g, "8", T2I_DEPTH, ["6", 0], cond, strength=0.5)
    builtin = run_latent(comfy_server, set_sampler(g, cond=cond))
    g = base_graph(kinds_files, checkpoint=inpaint_checkpoint)
    model = add_controlstack(g, "7", CANNY, ["6", 0], ["1", 0], strength=0.8)
    model = add_controlstack(g, "8", T2I_DEPTH, ["6", 0], model, strength=0.5)
    ours = run_latent(comfy_server, set_sampler(g, model=model))
    err = rel_err(ours, builtin)
    print(f"SD1.5 inpainting UNet, ControlNet + T2I: relative error vs built-in {err:.3e}")
    assert rel_err(builtin, plain) > 1e-3 and err <= 1e-4
