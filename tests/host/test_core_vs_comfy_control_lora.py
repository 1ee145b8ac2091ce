"""Our merged Control-LoRA vs ComfyUI's own Control-LoRA path (import only, no server).

ComfyUI 0.3.75 ``comfy/controlnet.py`` ``ControlLora.pre_run``: build ``comfy.cldm.cldm.ControlNet`` from the
UNet's config with ``ControlLoraOps`` mixed into ``comfy.ops.disable_weight_init`` (or ``manual_cast`` when the
model casts), ``set_attr_param`` every UNet tensor (keys the ControlNet lacks fail silently), then every file
tensor ending ``.up`` / ``.down`` / ``.weight`` / ``.bias`` cast to the model dtype. ``ControlLoraOps`` adds
``up @ down`` to the weight in every forward. We do the same here on tiny configs with random weights and
compare the residuals with :func:`merge_control_lora`'s plain ControlNet.
"""

from __future__ import annotations

import sys

import host
import pytest
import torch

sys.path.insert(0, str(host.resolve_comfy_dir()))
from comfy.cli_args import args  # noqa: E402

args.cpu = True
import comfy.cldm.cldm  # noqa: E402
import comfy.controlnet  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.utils  # noqa: E402

sys.path.insert(0, str(host.REPO / "tests" / "unit"))
from cn_helpers import TINY, random_inputs, rel_err  # noqa: E402
from controlstack.controlnet.control_lora import merge_control_lora  # noqa: E402
from test_control_lora import make_base, make_lora  # noqa: E402


def comfy_kwargs(family: str) -> dict:
    """cldm.ControlNet arguments for TINY[family], as ComfyUI's unet_config spells them."""
    c = TINY[family]
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
        use_spatial_transformer=True,
        use_linear_in_transformer=c.use_linear,
        num_heads=c.num_heads,
        num_head_channels=c.num_head_channels,
        legacy=False,
    )
    if c.adm_in_channels is not None:
        kw.update(num_classes="sequential", adm_in_channels=c.adm_in_channels)
    return kw


def comfy_control_lora(family: str, lora: dict, base: dict, manual_cast: bool) -> torch.nn.Module:
    """ComfyUI's Control-LoRA model, built and filled the way ``ControlLora.pre_run`` does it."""
    parent = comfy.ops.manual_cast if manual_cast else comfy.ops.disable_weight_init

    class control_lora_ops(comfy.controlnet.ControlLoraOps, parent):
        pass

    dtype = torch.float32
    model = comfy.cldm.cldm.ControlNet(
        **comfy_kwargs(family), operations=control_lora_ops, dtype=dtype, device="cpu"
    )
    for k, w in base.items():
        try:
            comfy.utils.set_attr_param(model, k, w)
        except Exception:  # decoder keys: pre_run's bare try/except skips them too
            pass
    for k, w in lora.items():
        if k != "lora_controlnet" and k.endswith((".up", ".down", ".weight", ".bias")) and "__" not in k:
            comfy.utils.set_attr_param(model, k, w.to(dtype))
    return model.eval()


@pytest.mark.parametrize("manual_cast", [False, True], ids=["disable_weight_init", "manual_cast"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_residuals_match_comfy(family: str, manual_cast: bool) -> None:
    base, lora = make_base(family), make_lora(family)
    ours = merge_control_lora(lora, base, name="cl.safetensors")
    theirs = comfy_control_lora(family, lora, base, manual_cast)

    # Every parameter of ComfyUI's model was assigned: ours plus the file's pairs, nothing left empty.
    pairs = {k for k in lora if k.endswith((".up", ".down"))}
    assert set(theirs.state_dict()) == set(ours.state_dict()) | pairs

    x, hint, t, ctx, y = random_inputs(ours, batch=2, latent=8, seed=5)
    with torch.no_grad():
        got = ours(x, hint, t, ctx, y)
        out = theirs(x, hint, t, ctx, y=y)
    want = [*out["output"], *out["middle"]]
    assert len(got) == len(want) == ours.num_residuals
    errs = [rel_err(a, b) for a, b in zip(got, want, strict=True)]
    print(f"{family} {'manual_cast' if manual_cast else 'disable_weight_init'}: max rel err {max(errs):.2e}")
    assert max(errs) <= 1e-4, errs
    # Not vacuous: ComfyUI's model without the pairs gives clearly different residuals.
    for m in theirs.modules():
        if getattr(m, "up", None) is not None:
            m.up = None
    with torch.no_grad():
        out = theirs(x, hint, t, ctx, y=y)
    assert min(rel_err(a, b) for a, b in zip(got, [*out["output"], *out["middle"]], strict=True)) > 1e-2


def test_fp16_base_manual_cast_matches_comfy() -> None:
    """fp16 UNet, fp32 compute: pre_run's manual_cast branch (control model dtype = the cast dtype)."""
    base = {k: v.half() for k, v in make_base("sd1").items()}
    lora = make_lora("sd1")
    ours = merge_control_lora(lora, base, dtype=torch.float32)
    theirs = comfy_control_lora("sd1", lora, base, manual_cast=True)
    x, hint, t, ctx, y = random_inputs(ours, batch=1, latent=8, seed=6)
    with torch.no_grad():
        got = ours(x, hint, t, ctx, y)
        out = theirs(x, hint, t, ctx, y=y)
    errs = [rel_err(a, b) for a, b in zip(got, [*out["output"], *out["middle"]], strict=True)]
    print(f"sd1 fp16 base, manual_cast fp32: max rel err {max(errs):.2e}")
    assert max(errs) <= 1e-4, errs
