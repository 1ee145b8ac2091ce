"""Our ControlNet Union / ProMax vs ComfyUI's built-in one (import only, no server).

ComfyUI 0.3.75 ``comfy/cldm/cldm.py`` builds the Union modules when ``union_controlnet_num_control_type`` is set,
with hard-coded widths: 320-wide fusion tokens (so model_channels must be 320), 8 heads, 256-wide control-type
embeddings and the 16/32/96/256 hint encoder. Its merge (``union_controlnet_merge``) has no latent token and uses
one condition: our ``latent_token=False`` with one condition must equal it. "auto" (``control_type=[]``) adds the
zero-type embedding and the plain hint. Weights are seeded random everywhere; the keys come from ComfyUI's class
built on the meta device.
"""

from __future__ import annotations

import sys

import host
import pytest
import torch

# The pure layers first, before ComfyUI is importable: the pack's root __init__ then skips node registration
# (which needs a running ComfyUI server module), and only comfy.cldm is compared here.
sys.path.insert(0, str(host.REPO / "tests" / "unit"))
from cn_helpers import randomize_, rel_err, sdxl_cond  # noqa: E402
from controlstack.controlnet import ControlNetConfig, ControlNetError, build_controlnet  # noqa: E402
from controlstack.controlnet.config import config_from_shapes  # noqa: E402
from controlstack.controlnet.convert import diffusers_to_ldm, ldm_to_diffusers  # noqa: E402

sys.path.insert(0, str(host.resolve_comfy_dir()))
from comfy.cli_args import args  # noqa: E402

args.cpu = True
import comfy.cldm.cldm  # noqa: E402

TOL = 1e-4


def config(n_types: int) -> ControlNetConfig:
    """The smallest SDXL-like Union ComfyUI can build: one 320-wide level with a transformer, adm vector."""
    return ControlNetConfig(
        "sdxl",
        model_channels=320,
        context_dim=32,
        channel_mult=(1,),
        num_res_blocks=(1,),
        transformer_depth=(1,),
        transformer_depth_middle=1,
        num_heads=-1,
        num_head_channels=64,
        use_linear=True,
        adm_in_channels=16 + 6 * 256,
        union_num_control_types=n_types,
    )


def comfy_model(c: ControlNetConfig, device: str):
    kw = dict(
        image_size=32,
        in_channels=c.in_channels,
        model_channels=c.model_channels,
        hint_channels=c.hint_channels,
        num_res_blocks=list(c.num_res_blocks),
        channel_mult=list(c.channel_mult),
        transformer_depth=list(c.transformer_depth),
        transformer_depth_middle=c.transformer_depth_middle,
        context_dim=c.context_dim,
        num_heads=c.num_heads,
        num_head_channels=c.num_head_channels,
        use_linear_in_transformer=c.use_linear,
        use_spatial_transformer=True,
        legacy=False,
        adm_in_channels=c.adm_in_channels,
        num_classes="sequential",
        union_controlnet_num_control_type=c.union_num_control_types,
        device=device,
        dtype=torch.float32,
    )
    return comfy.cldm.cldm.ControlNet(**kw)


@pytest.fixture(scope="module", params=[6, 8])
def pair(request):
    c = config(request.param)
    theirs_meta = comfy_model(c, "meta")
    shapes = {k: tuple(v.shape) for k, v in theirs_meta.state_dict().items()}
    # Their key names and shapes are ours, and detection reads the config back from them.
    assert config_from_shapes(shapes) == c
    ours = build_controlnet(c, device="meta")
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == shapes
    ours.to_empty(device="cpu")
    randomize_(ours, seed=request.param)
    theirs = comfy_model(c, "cpu")
    theirs.load_state_dict(ours.state_dict(), strict=True)
    # The diffusers-file mapping agrees with ComfyUI's (comfy/controlnet.py: '.attn.in_proj_' -> '.attn.in_proj.').
    diff = ldm_to_diffusers(shapes, 1, 1)
    union = [
        k for k in shapes if k.startswith(("task_embedding", "control_add", "transformer_layes", "spatial"))
    ]
    assert {diff[k].replace(".attn.in_proj_", ".attn.in_proj.") for k in union} == set(union)
    assert diffusers_to_ldm(diff.values()) == {v: k for k, v in diff.items()}
    return ours.eval(), theirs.eval().requires_grad_(False)


def inputs(c: ControlNetConfig, batch: int = 2, latent: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c.in_channels, latent, latent, generator=g)
    hint = torch.rand(batch, 3, 8 * latent, 8 * latent, generator=g)  # different hint per row
    t = torch.rand(batch, generator=g) * 999
    ctx = torch.randn(batch, 5, c.context_dim, generator=g)
    y = sdxl_cond(c, batch, seed)[0]
    return x, hint, t, ctx, y


def comfy_residuals(model, x, hint, t, ctx, y, types):
    out = model(x, hint, t, ctx, y, control_type=list(types))
    return [*out["output"], *out["middle"]]


@pytest.mark.parametrize("types", [[0], [3], [5], []], ids=["openpose", "canny", "segment", "auto"])
def test_matches_comfy(pair, types):
    ours, theirs = pair
    x, hint, t, ctx, y = inputs(ours.config, seed=len(types) + 7 * (types or [9])[0])
    with torch.no_grad():
        ref = comfy_residuals(theirs, x, hint, t, ctx, y, types)
        res = ours(x, hint, t, ctx, y, control_types=types, latent_token=False)
        enc = ours(
            x, None, t, ctx, y, encoded_hint=[ours.encode_hint(hint)], control_types=types, latent_token=False
        )
    assert all(r.abs().max() > 0 for r in ref)
    for got in (res, enc):
        errs = [rel_err(a, b) for a, b in zip(got, ref, strict=True)]
        assert max(errs) <= TOL, errs
    if types:  # a typed hint is not the plain hint
        with torch.no_grad():
            auto = comfy_residuals(theirs, x, hint, t, ctx, y, [])
        assert min(rel_err(a, b) for a, b in zip(auto, ref, strict=True)) > 1e-3


def test_promax_types_need_promax(pair):
    ours, theirs = pair
    x, hint, t, ctx, y = inputs(ours.config)
    n = ours.config.union_num_control_types
    if n >= 8:
        with torch.no_grad():  # ProMax: tile and repaint run in both
            ref = comfy_residuals(theirs, x, hint, t, ctx, y, [6])
            res = ours(x, hint, t, ctx, y, control_types=[6], latent_token=False)
        assert max(rel_err(a, b) for a, b in zip(res, ref, strict=True)) <= TOL
        return
    with pytest.raises(ValueError, match="out of range"):  # ComfyUI refuses too
        comfy_residuals(theirs, x, hint, t, ctx, y, [6])
    with pytest.raises(
        ControlNetError, match=r"tile \(6\) needs a ProMax file with 8 control types; this file has 6"
    ):
        ours(x, hint, t, ctx, y, control_types=[6], latent_token=False)
