"""ControlNet Union / ProMax (xinsir) against diffusers' ControlNetUnionModel, loading, detection, errors.

Every weight is random (zero convs, task_embedding and spatial_ch_projs included), so no residual is trivially
zero. Key names and shapes of the test files come from diffusers' class built on the meta device.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from cn_helpers import TINY, diffusers_kwargs, random_controlnet, randomize_, rel_err, sdxl_cond
from controlstack.controlnet import ControlNetConfig, ControlNetError, load_controlnet
from controlstack.controlnet.config import config_from_shapes, preset
from controlstack.controlnet.convert import ldm_to_diffusers
from controlstack.controlnet.loading import detect_config
from controlstack.controlnet.union import UNION_TYPES
from safetensors.torch import save_file

TOL = 1e-4
COMFY_WIDTHS = (16, 16, 32, 32, 96, 96, 256)  # ComfyUI's hard-coded hint encoder (and diffusers' from_unet)
FAT_WIDTHS = (48, 48, 96, 96, 192, 192, 384)  # diffusers' ControlNetUnionModel default ("fat encoder")


def union_config(
    n_types: int = 6, widths: tuple[int, ...] = COMFY_WIDTHS, layers: int = 1
) -> ControlNetConfig:
    """A tiny SDXL-like Union: conv_in 32 wide, one level without and one with a transformer, adm vector."""
    return ControlNetConfig(
        "sdxl",
        model_channels=32,
        context_dim=32,
        channel_mult=(1, 2),
        num_res_blocks=(1, 1),
        transformer_depth=(0, 1),
        transformer_depth_middle=1,
        num_heads=-1,
        num_head_channels=64,  # what detection assumes for SDXL
        use_linear=True,
        adm_in_channels=16 + 6 * 8,  # pooled text (16) + 6 size/crop embeddings of addition_time_embed_dim 8
        hint_widths=widths,
        union_num_control_types=n_types,
        union_type_embed_dim=8,  # diffusers uses addition_time_embed_dim for the control types too
        union_num_layers=layers,
        union_num_heads=8,
    )


def diffusers_union(cn):
    """diffusers' ControlNetUnionModel holding ``cn``'s weights (shared tensors)."""
    from diffusers import ControlNetUnionModel

    cfg = cn.config
    kw = diffusers_kwargs(cfg)
    kw.update(
        conditioning_embedding_out_channels=cfg.hint_widths[::2],
        num_control_type=cfg.union_num_control_types,
        num_trans_channel=cfg.model_channels,
        num_trans_head=cfg.union_num_heads,
        num_trans_layer=cfg.union_num_layers,
        num_proj_channel=cfg.model_channels,
    )
    assert kw["addition_time_embed_dim"] == cfg.union_type_embed_dim
    with torch.device("meta"):
        model = ControlNetUnionModel(**kw)
    sd = diffusers_state_dict(cn)
    assert set(sd) == set(model.state_dict()), sorted(set(sd) ^ set(model.state_dict()))[:6]
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def diffusers_state_dict(cn) -> dict[str, torch.Tensor]:
    sd = cn.state_dict()
    names = ldm_to_diffusers(sd, len(cn.config.channel_mult), cn.config.num_res_blocks[0])
    assert len(names) == len(sd), sorted(set(sd) - set(names))[:5]
    return {names[k]: v for k, v in sd.items()}


def union_inputs(cfg: ControlNetConfig, n_hints: int, batch: int = 2, latent: int = 8, seed: int = 0):
    """x, [hints] (different per batch row), timesteps, context, y, diffusers added_cond_kwargs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, latent, latent, generator=g)
    hints = [torch.rand(batch, 3, 8 * latent, 8 * latent, generator=g) for _ in range(n_hints)]
    timesteps = torch.rand(batch, generator=g) * 999
    context = torch.randn(batch, 7, cfg.context_dim, generator=g)
    y, added = sdxl_cond(cfg, batch, seed)
    return x, hints, timesteps, context, y, added


def reference(model, x, hints, timesteps, context, added, types, scales):
    n = model.config.num_control_type
    vec = torch.zeros(x.shape[0], n)
    vec[:, types] = 1.0
    down, mid = model(
        x,
        timesteps,
        encoder_hidden_states=context,
        controlnet_cond=hints,
        control_type=vec,
        control_type_idx=list(types),
        conditioning_scale=list(scales),
        added_cond_kwargs=added,
        return_dict=False,
    )
    return [*down, mid]


def assert_close(ours, ref, tol=TOL):
    assert len(ours) == len(ref)
    errs = [rel_err(a, b) for a, b in zip(ours, ref, strict=True)]
    assert all(r.abs().max() > 0 for r in ref)
    assert max(errs) <= tol, errs


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """{(n_types, widths): (our model loaded from a diffusers-layout file, diffusers' twin)}."""
    out = {}
    for i, (n, widths, layers) in enumerate([(6, COMFY_WIDTHS, 1), (8, FAT_WIDTHS, 2)]):
        cn = random_controlnet(union_config(n, widths, layers), seed=10 + i)
        path = tmp_path_factory.mktemp("union") / f"union_{n}.safetensors"
        save_file({k: v.contiguous() for k, v in diffusers_state_dict(cn).items()}, str(path))
        ours = load_controlnet(path)
        assert ours.config == cn.config
        for k, v in cn.state_dict().items():
            assert torch.equal(ours.state_dict()[k], v), k
        out[n] = (ours, diffusers_union(cn))
    return out


def test_protocol(loaded):
    ours, _ = loaded[6]
    assert (ours.kind, ours.family, ours.injection, ours.num_residuals) == ("union", "sdxl", "output", 5)
    assert ours.task_embedding.abs().min() > 0 and ours.spatial_ch_projs.weight.abs().min() > 0
    classic = random_controlnet(TINY["sdxl"])
    assert (classic.kind, classic.injection) == ("controlnet", "output")
    assert not hasattr(classic, "task_embedding")


@pytest.mark.parametrize("n_types", [6, 8])
@pytest.mark.parametrize(
    "types, scales",
    [([1], [1.0]), ([5], [0.7]), ([0, 3], [0.6, 1.3]), ([4, 2], [1.0, 1.0])],
)
def test_residuals_match_diffusers(loaded, n_types, types, scales):
    ours, ref_model = loaded[n_types]
    x, hints, t, ctx, y, added = union_inputs(ours.config, len(types), seed=len(types) + n_types)
    ref = reference(ref_model, x, hints, t, ctx, added, types, scales)
    with torch.no_grad():
        res = ours(x, hints, t, ctx, y, control_types=types, condition_scales=scales)
        # Encoded once, as the stack does, and passed as encoded hints.
        enc = [ours.encode_hint(h) for h in hints]
        res_enc = ours(x, None, t, ctx, y, encoded_hint=enc, control_types=types, condition_scales=scales)
    if len(types) == 1:  # one condition: the caller scales the residuals (diffusers scales them itself)
        res = [r * scales[0] for r in res]
        res_enc = [r * scales[0] for r in res_enc]
    assert_close(res, ref)
    assert_close(res_enc, ref)


def test_one_condition_ignores_scales(loaded):
    ours, _ = loaded[6]
    x, hints, t, ctx, y, _ = union_inputs(ours.config, 1)
    with torch.no_grad():
        a = ours(x, hints, t, ctx, y, control_types=[2])
        b = ours(x, hints, t, ctx, y, control_types=[2], condition_scales=[0.3])
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_auto_uses_plain_hint(loaded):
    """ComfyUI's "auto" (no type): zero type vector, the plain encoded hint, no fusion; same either way."""
    ours, _ = loaded[8]
    x, hints, t, ctx, y, _ = union_inputs(ours.config, 1)
    with torch.no_grad():
        auto = ours(x, hints[0], t, ctx, y, control_types=[])
        auto_none = ours(x, hints, t, ctx, y)
        auto_flag = ours(x, hints, t, ctx, y, control_types=[], latent_token=False)
        typed = ours(x, hints, t, ctx, y, control_types=[1])
    assert all(torch.equal(p, q) for p, q in zip(auto, auto_none, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(auto, auto_flag, strict=True))
    assert min(rel_err(p, q) for p, q in zip(auto, typed, strict=True)) > 1e-2


def test_type_out_of_range(loaded):
    ours, _ = loaded[6]
    x, hints, t, ctx, y, _ = union_inputs(ours.config, 1)
    with pytest.raises(
        ControlNetError, match=r"tile \(6\) needs a ProMax file with 8 control types; this file has 6"
    ):
        ours(x, hints, t, ctx, y, control_types=[UNION_TYPES["tile"]])
    with pytest.raises(ControlNetError, match=r"repaint \(7\).*ProMax"):
        ours(x, hints, t, ctx, y, control_types=[7])
    promax, _ = loaded[8]
    with pytest.raises(ControlNetError, match=r"control type 9 is out of range; this file has 8"):
        promax(x, hints, t, ctx, y, control_types=[9])
    with pytest.raises(ControlNetError, match=r"control type id: expected an int in 0\.\., got -1"):
        ours(x, hints, t, ctx, y, control_types=[-1])
    with pytest.raises(ControlNetError, match=r"control type id: expected an int, got float 1\.0"):
        ours(x, hints, t, ctx, y, control_types=[1.0])
    with pytest.raises(ControlNetError, match=r"2 hint"):  # two types, one hint
        ours(x, hints, t, ctx, y, control_types=[0, 1])
    with pytest.raises(ControlNetError, match="condition_scales"):
        ours(x, hints * 2, t, ctx, y, control_types=[0, 1], condition_scales=[1.0])
    classic = random_controlnet(TINY["sdxl"])
    xc, hc = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 64, 64)
    yc = sdxl_cond(classic.config, 2)[0]
    with pytest.raises(ControlNetError, match="only apply to ControlNet Union"):
        classic(xc, hc, t, torch.randn(2, 7, 32), yc, control_types=[1])


def test_config_detection(loaded):
    for n, (ours, _) in loaded.items():
        cfg = ours.config
        shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert config_from_shapes(shapes) == cfg
        assert detect_config(diffusers_state_dict(ours)) == cfg
        assert cfg.union_num_control_types == n and cfg.union_type_embed_dim == 8
    assert loaded[6][0].config.hint_widths == COMFY_WIDTHS and loaded[6][0].config.union_num_layers == 1
    assert loaded[8][0].config.hint_widths == FAT_WIDTHS and loaded[8][0].config.union_num_layers == 2
    # A classic ControlNet with a non-default hint encoder: the widths come from the tensors.
    classic = random_controlnet(replace(TINY["sd1"], hint_widths=(8, 8, 16, 16, 32, 32, 64)))
    shapes = {k: tuple(v.shape) for k, v in classic.state_dict().items()}
    assert config_from_shapes(shapes) == classic.config and not classic.config.is_union
    # The full-size ProMax preset builds (on meta) with the published file's layout.
    full = preset("sdxl", union_num_control_types=8)
    assert (full.model_channels, full.union_type_embed_dim, full.union_num_heads) == (320, 256, 8)


def test_latent_token_difference(loaded, capsys):
    """Measure xinsir/diffusers maths (latent_token=True) against ComfyUI's (False).

    In the reference, nn.MultiheadAttention is not batch-first, so on the B x N x C token tensor it attends
    over the batch axis, separately per token position: the latent token never reaches a condition token
    (it only decides its own, discarded, position), and conditions never see each other. The maths differ
    only through the attention axis: identical rows (one hint broadcast over the batch, as the stack does)
    give the same result; different hints per row, or several conditions, do not.
    """
    ours, _ = loaded[8]
    cfg = ours.config
    lines = []

    def measure(label, types, same_rows):
        x, hints, t, ctx, y, _ = union_inputs(cfg, len(types), seed=3)
        if same_rows:
            hints = [h[:1].expand_as(h).contiguous() for h in hints]
        scales = [0.8, 1.2][: len(types)]
        with torch.no_grad():
            a = ours(x, hints, t, ctx, y, control_types=types, condition_scales=scales, latent_token=True)
            b = ours(x, hints, t, ctx, y, control_types=types, condition_scales=scales, latent_token=False)
            enc = [ours.encode_hint(h) for h in hints]
            h0 = ours.input_blocks[0](x, None, None)
            fused = [ours._fuse(enc, types, scales, h0, lt, over_batch=True) for lt in (True, False)]
        err = max(rel_err(p, q) for p, q in zip(b, a, strict=True))
        inert = rel_err(fused[1], fused[0])
        lines.append(
            f"{label}: max residual rel. error latent_token False vs True = {err:.3e}; "
            f"latent token alone (same attention axis) = {inert:.1e}"
        )
        assert inert < 1e-6
        return err

    assert measure("1 condition, hint broadcast over batch 2", [1], True) < 1e-5
    assert measure("1 condition, different hints per row   ", [1], False) > 1e-4
    measure("2 conditions, hints broadcast over batch", [0, 3], True)
    measure("2 conditions, different hints per row   ", [0, 3], False)
    with capsys.disabled():
        print("\nUnion token difference (tiny random ProMax, batch 2):\n  " + "\n  ".join(lines))


def test_small_cnet_without_transformers(tmp_path):
    """An SDXL Union whose UNet copy has no transformer block at all (ComfyUI's "SDXL_small_cnet" shape, the
    lead's random ProMax fixture): detection has no cross-attention to read and the middle SpatialTransformer
    has depth 0. Weights random on diffusers' side, saved in its layout, loaded and compared."""
    from diffusers import ControlNetUnionModel

    ref = ControlNetUnionModel(
        down_block_types=("DownBlock2D", "DownBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        transformer_layers_per_block=(0, 0),
        attention_head_dim=(1, 1),
        cross_attention_dim=32,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8,
        conditioning_embedding_out_channels=(16, 32, 96, 256),
        num_control_type=8,
        num_trans_channel=32,
        num_proj_channel=32,
    )
    randomize_(ref, seed=5).eval().requires_grad_(False)
    path = tmp_path / "small.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    ours = load_controlnet(path)
    cfg = ours.config
    assert (cfg.transformer_depth, cfg.transformer_depth_middle, cfg.union_num_control_types) == (
        (0, 0),
        0,
        8,
    )
    x, hints, t, _, y, added = union_inputs(cfg, 2, seed=4)
    ctx = torch.randn(2, 7, 32)  # unread: no cross-attention anywhere
    with torch.no_grad():
        for types, scales in (([7], [1.0]), ([6, 1], [0.5, 1.5])):
            res = ours(
                x,
                hints[: len(types)],
                t,
                torch.randn(2, 7, cfg.context_dim),
                y,
                control_types=types,
                condition_scales=scales,
            )
            assert_close(res, reference(ref, x, hints[: len(types)], t, ctx, added, types, scales))
