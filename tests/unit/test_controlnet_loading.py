"""Every supported layout / container / storage dtype, written to real files, against diffusers."""

from __future__ import annotations

import pytest
import torch
from cn_helpers import (
    diffusers_residuals,
    diffusers_unet,
    random_inputs,
    rel_err,
    sdxl_cond,
    tiny_controlnet,
    to_diffusers,
    to_diffusers_state_dict,
)
from controlstack.controlnet import ControlNet, detect_config, load_controlnet
from controlstack.controlnet.convert import diffusers_to_ldm
from safetensors.torch import save_file

pytestmark = pytest.mark.unit


def _save(sd: dict[str, torch.Tensor], path) -> None:
    if str(path).endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)


def _layout(cn: ControlNet, layout: str) -> dict[str, torch.Tensor]:
    sd = cn.state_dict()
    if layout == "ldm":
        return dict(sd)
    if layout == "ldm-prefixed":
        return {f"control_model.{k}": v for k, v in sd.items()}
    if layout == "controlldm":  # full ControlLDM v1.0: SD + control; only control_model.* is ours
        full = {f"control_model.{k}": v for k, v in sd.items()}
        full["model.diffusion_model.input_blocks.0.0.weight"] = torch.randn(cn.config.model_channels, 4, 3, 3)
        full["model.diffusion_model.output_blocks.0.0.in_layers.0.weight"] = torch.randn(8)
        full["first_stage_model.encoder.conv_in.weight"] = torch.randn(8, 3, 3, 3)
        full["cond_stage_model.transformer.text_model.final_layer_norm.weight"] = torch.randn(8)
        return full
    if layout == "diffusers":
        return to_diffusers_state_dict(cn)
    raise AssertionError(layout)


def _check(loaded: ControlNet, reference: ControlNet, tol: float) -> float:
    """Loaded model vs diffusers holding the reference (fp32) weights; returns the worst relative error."""
    assert loaded.config == reference.config and loaded.family == reference.family
    x, hint, t, ctx, y = random_inputs(reference, seed=7)
    added = sdxl_cond(reference.config, 2, 7)[1] if y is not None else None
    ref = diffusers_residuals(to_diffusers(reference), x, hint, t, ctx, added)
    ours = loaded(x, hint, t, ctx, y)
    assert all(a.dtype == x.dtype for a in ours)
    err = max(rel_err(a, b) for a, b in zip(ours, ref, strict=True))
    assert err <= tol, err
    return err


@pytest.mark.parametrize(
    ("layout", "filename"),
    [
        ("ldm-prefixed", "control_sd15_canny.pth"),
        ("ldm-prefixed", "control_v11p_sd15_canny.safetensors"),
        ("ldm", "bare.safetensors"),
        ("ldm", "bare.bin"),
        ("controlldm", "control_sd15_full.ckpt"),
        ("diffusers", "diffusion_pytorch_model.safetensors"),
        ("diffusers", "diffusion_pytorch_model.bin"),
    ],
)
def test_layouts_and_containers(tmp_path, layout, filename):
    cn = tiny_controlnet("sd1", seed=11)
    sd = _layout(cn, layout)
    if filename.endswith(".ckpt"):
        sd = {"state_dict": sd, "global_step": 1000}  # Lightning checkpoint wrapper
    _save(sd, tmp_path / filename)
    loaded = load_controlnet(tmp_path / filename)
    assert loaded.dtype == torch.float32
    _check(loaded, cn, 1e-5)


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
@pytest.mark.parametrize("layout", ["ldm-prefixed", "diffusers"])
def test_layouts_other_families(tmp_path, family, layout):
    cn = tiny_controlnet(family, seed=12)
    path = tmp_path / "cn.safetensors"
    _save(_layout(cn, layout), path)
    _check(load_controlnet(path), cn, 1e-5)


def test_diffusers_own_save_format(tmp_path):
    cn = tiny_controlnet("sdxl", seed=13)
    to_diffusers(cn).save_pretrained(tmp_path / "cn_diffusers")
    assert (tmp_path / "cn_diffusers" / "diffusion_pytorch_model.safetensors").is_file()
    _check(load_controlnet(tmp_path / "cn_diffusers" / "diffusion_pytorch_model.safetensors"), cn, 1e-5)
    _check(load_controlnet(tmp_path / "cn_diffusers"), cn, 1e-5)  # the folder works too


@pytest.mark.parametrize("storage", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_half_precision_storage(tmp_path, storage, suffix):
    cn = tiny_controlnet("sd1", seed=14)
    path = tmp_path / f"cn{suffix}"
    _save({k: v.to(storage) for k, v in _layout(cn, "ldm-prefixed").items()}, path)
    native = load_controlnet(path)
    assert native.dtype == storage  # default: the storage dtype
    # Computing in bf16 (8-bit mantissa) costs more than storing in it; fp32 compute is held to 1e-2.
    _check(native, cn, 1e-2 if storage == torch.float16 else 3e-2)
    upcast = load_controlnet(path, dtype=torch.float32)
    assert upcast.dtype == torch.float32
    _check(upcast, cn, 1e-2)


def _ldm_unet_encoder(unet) -> dict[str, torch.Tensor]:
    sd = unet.state_dict()
    return {ldm: sd[k] for k, ldm in diffusers_to_ldm(sd).items()}


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("base_kind", ["diffusers-dict", "ldm-checkpoint-file"])
def test_difference_controlnet(tmp_path, family, base_kind):
    cn = tiny_controlnet(family, seed=15)
    unet = diffusers_unet(cn.config, seed=16)
    base = _ldm_unet_encoder(unet)
    diff = {}
    for k, v in cn.state_dict().items():
        diff[f"control_model.{k}"] = v - base[k] if k in base else v
    assert sum(k in base for k in cn.state_dict()) > 20
    diff["difference"] = torch.tensor([])
    path = tmp_path / "control_any3_openpose_diff.safetensors"
    _save(diff, path)

    if base_kind == "diffusers-dict":
        base_unet = unet.state_dict()
    else:
        base_unet = tmp_path / "sd_base.safetensors"
        full = {f"model.diffusion_model.{k}": v for k, v in base.items()}
        full["first_stage_model.decoder.conv_in.weight"] = torch.randn(4, 4, 3, 3)
        _save(full, base_unet)
    loaded = load_controlnet(path, base_unet=base_unet)
    for k, v in cn.state_dict().items():
        assert rel_err(loaded.state_dict()[k], v) <= 1e-6, k
    _check(loaded, cn, 1e-5)


def test_shuffle_name_and_state_dict_source():
    cn = tiny_controlnet("sd1")
    sd = _layout(cn, "ldm-prefixed")
    assert load_controlnet(sd, name="control_v11e_sd15_shuffle.pth").global_average_pooling
    plain = load_controlnet(sd)
    assert not plain.global_average_pooling and plain.num_residuals == cn.num_residuals
    # dtype / device arguments and detection straight from a state dict of any layout
    assert load_controlnet(sd, dtype=torch.float64, device="cpu").dtype == torch.float64
    assert detect_config(_layout(cn, "diffusers")) == cn.config
    assert detect_config(_layout(cn, "controlldm")) == cn.config
