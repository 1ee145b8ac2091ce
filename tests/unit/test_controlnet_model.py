"""The ControlNet module against diffusers' ControlNetModel, and the real checkpoints' key sets."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from cn_helpers import (
    TINY,
    diffusers_residuals,
    random_controlnet,
    random_inputs,
    rel_err,
    sdxl_cond,
    tiny_controlnet,
    to_diffusers,
)
from controlstack.controlnet import ControlNetConfig, build_controlnet, detect_config, load_controlnet, preset

pytestmark = pytest.mark.unit

FIXTURES = Path(__file__).parent.parent / "fixtures"


def _read_tsv(name: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in (FIXTURES / name).read_text().splitlines():
        key, shape = line.split("\t")
        out[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return out


@pytest.mark.parametrize(
    ("family", "fixture"), [("sd1", "controlnet_sd15_ldm_keys.tsv"), ("sd2", "controlnet_sd21_ldm_keys.tsv")]
)
def test_full_size_key_set_matches_real_checkpoint(family, fixture):
    ref = _read_tsv(fixture)
    model = build_controlnet(preset(family), device="meta")
    got = {f"control_model.{k}": tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == ref
    assert len(got) == 340
    if family == "sd1":
        assert sum(p.numel() for p in model.parameters()) == 361_279_120
    # Detection from the real names/shapes gives back the preset.
    meta = {k: torch.empty(s, device="meta") for k, s in ref.items()}
    assert detect_config(meta) == preset(family)


def test_sdxl_preset_round_trips_through_detection():
    model = build_controlnet(preset("sdxl"), device="meta")
    assert model.num_residuals == 10 and model.family == "sdxl"
    assert detect_config(model.state_dict()) == preset("sdxl")


def test_fresh_model_has_zero_convs():
    cn = build_controlnet(TINY["sd1"])
    x, hint, t, ctx, y = random_inputs(cn)
    assert all(torch.equal(r, torch.zeros_like(r)) for r in cn(x, hint, t, ctx))


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_tiny_parity_with_diffusers(family):
    cn = tiny_controlnet(family, seed=1)
    x, hint, t, ctx, y = random_inputs(cn, seed=2)
    ours = cn(x, hint, t, ctx, y)
    added = sdxl_cond(cn.config, 2, 2)[1] if y is not None else None
    ref = diffusers_residuals(to_diffusers(cn), x, hint, t, ctx, added)
    assert len(ours) == len(ref) == cn.num_residuals
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == b.shape
        assert b.abs().max() > 0
        assert rel_err(a, b) <= 1e-5


def test_encoded_hint_path_equals_hint_path():
    cn = tiny_controlnet("sd2")
    x, hint, t, ctx, y = random_inputs(cn)
    enc = cn.encode_hint(hint)
    assert enc.shape == (2, cn.config.model_channels, 8, 8)
    for a, b in zip(cn(x, hint, t, ctx), cn(x, None, t, ctx, encoded_hint=enc), strict=True):
        assert torch.equal(a, b)


def test_scalar_timestep_and_dtype_follow_x():
    cn = tiny_controlnet("sd1")
    x, hint, t, ctx, _ = random_inputs(cn)
    a = cn(x, hint, t[0], ctx)
    b = cn(x, hint, t[:1].expand(2), ctx)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert all(r.dtype == torch.float64 for r in cn(x.double(), hint, t, ctx))


def _full_size_parity(config: ControlNetConfig, context_len: int, via_file: Path | None = None) -> float:
    """Random full-size ControlNet vs diffusers at an 8x8 latent; returns the worst relative error."""
    cn = random_controlnet(config, seed=3)
    if via_file is not None:  # exercise the real loader on a real file
        from safetensors.torch import save_file

        save_file({f"control_model.{k}": v for k, v in cn.state_dict().items()}, str(via_file))
        ours_model = load_controlnet(via_file)
    else:  # in-memory state dict: the loader shares the tensors, so no second copy
        ours_model = load_controlnet(cn.state_dict(), name="full-size")
    assert ours_model.config == config
    x, hint, t, _, y = random_inputs(cn, latent=8, seed=4)
    ctx = torch.randn(2, context_len, config.context_dim, generator=torch.Generator().manual_seed(5))
    added = sdxl_cond(config, 2, 4)[1] if y is not None else None
    with torch.inference_mode():
        ours = ours_model(x, hint, t, ctx, y)
        del ours_model
        gc.collect()
        ref = diffusers_residuals(to_diffusers(cn), x, hint, t, ctx, added)
    del cn
    gc.collect()
    if via_file is not None:
        via_file.unlink()  # 1.4 GB: free the disk now, not at the end of the session
    assert len(ours) == config.num_residuals
    errs = [rel_err(a, b) for a, b in zip(ours, ref, strict=True)]
    print(f"{config.family} full size: worst relative error {max(errs):.2e}")
    assert max(errs) <= 1e-4, errs
    return max(errs)


def test_full_size_sd15_from_file_matches_diffusers(tmp_path):
    _full_size_parity(preset("sd1"), 77, tmp_path / "control_sd15_random.safetensors")


def test_full_size_sd21_matches_diffusers():
    _full_size_parity(preset("sd2"), 77)


def test_full_size_sdxl_matches_diffusers():
    _full_size_parity(preset("sdxl"), 77)
