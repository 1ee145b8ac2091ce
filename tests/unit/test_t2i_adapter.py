"""T2I-Adapter (controlnet/t2i_adapter.py) against diffusers' ``T2IAdapter`` with the same random weights.

diffusers is the numeric reference: its module is built, every weight randomised, and its ``state_dict`` (the
diffusers file layout, ``adapter.body.N.resnets.M.*``) is loaded with our loader. Its four features are mapped to
our slots (SD1/SD2: 2, 5, 8, 11; SDXL: 3, 5, 8 and the middle slot 9). Odd latent sizes (where diffusers' ceil-mode
pooling and ComfyUI's padded pooling differ in value) are checked for shapes here and for values against ComfyUI in
tests/host/test_core_vs_comfy_t2i.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from controlstack.controlnet.errors import ControlNetError
from controlstack.controlnet.t2i_adapter import (
    T2IAdapter,
    T2IAdapterConfig,
    build_t2i_adapter,
    config_from_state_dict,
    is_t2i_adapter,
    load_t2i_adapter,
)
from diffusers.models.adapter import T2IAdapter as DiffusersT2IAdapter
from numerics import rel_err as rel

TOL = 1e-4
SMALL = [8, 16, 32, 32]
# (adapter_type, diffusers channels, num_res_blocks, downscale); light adapters list 3 widths (the 4th repeats).
KINDS = {
    "full_adapter": (SMALL, 2, 8),
    "light_adapter": (SMALL[:3], 3, 8),
    "full_adapter_xl": (SMALL, 2, 16),
}


@torch.no_grad()
def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter random and non-zero; weights ~ N(0, 1/fan_in) so activations stay O(1) through the blocks."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        std = 1 / math.sqrt(p[0].numel()) if p.ndim > 1 else 0.1
        p.copy_(torch.randn(p.shape, generator=g) * std)
        assert p.abs().min() > 0
    return module


def diffusers_adapter(kind: str, in_channels: int, seed: int = 0) -> DiffusersT2IAdapter:
    channels, rb, down = KINDS[kind]
    m = DiffusersT2IAdapter(in_channels, channels, rb, down, kind)
    return randomise(m.eval(), seed)


def hint(b: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(seed))


def ours_sd(model: T2IAdapter) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("kind", list(KINDS))
def test_features_match_diffusers(kind: str, in_channels: int) -> None:
    ref = diffusers_adapter(kind, in_channels)
    ours = load_t2i_adapter(ref.state_dict(), "ref.safetensors")
    xl = kind == "full_adapter_xl"
    assert ours.config.light == (kind == "light_adapter") and ours.config.xl == xl
    assert ours.config.input_channels == in_channels

    x = hint(2, 128, 64)  # latent 16 x 8: every stage even, where diffusers' and ComfyUI's pooling agree
    with torch.no_grad():
        got = ours.encode_hint(x)
        ref_in = x.mean(1, keepdim=True) if in_channels == 1 else x
        want = ref(ref_in)
    slots = (3, 5, 8, 9) if xl else (2, 5, 8, 11)
    assert len(got) == (10 if xl else 13)
    assert [i for i, t in enumerate(got) if t is not None] == list(slots)
    for slot, w in zip(slots, want, strict=True):
        assert got[slot].shape == w.shape
        assert rel(got[slot], w) <= TOL, (kind, slot, rel(got[slot], w))
    # The features change with the hint (the test can fail).
    with torch.no_grad():
        other = ours.encode_hint(hint(2, 128, 64, seed=7))
    assert rel(other[slots[0]], got[slots[0]]) > 0.01


def test_xl_hint_is_resized_up_to_a_multiple_of_16() -> None:
    """Latent 9 x 6 -> hint 72 x 48 -> ComfyUI resizes to 80 x 48 (center crop, nearest-exact) before unshuffle."""
    ref = diffusers_adapter("full_adapter_xl", 3)
    ours = load_t2i_adapter(ref.state_dict(), "xl")
    x = hint(1, 72, 48)
    prepared = ours.prepare_hint(x)
    assert prepared.shape == (1, 3, 80, 48)
    # 72/48 (1.5) > 80/48: crop the width to round((48 - 48 * (80/48) / 1.5 ... )) -> x offset, then resize.
    old_aspect, new_aspect = 48 / 72, 48 / 80
    dx = round((48 - 48 * (new_aspect / old_aspect)) / 2)
    want = torch.nn.functional.interpolate(x[..., :, dx : 48 - dx], size=(80, 48), mode="nearest-exact")
    assert torch.equal(prepared, want)
    with torch.no_grad():
        got = ours.encode_hint(x)
        want_feats = ref(want)
    assert got[3].shape[-2:] == (5, 3) and got[9].shape[-2:] == (3, 2)
    for slot, w in zip((3, 5), want_feats[:2], strict=True):  # before the (odd-size) downsample
        assert rel(got[slot], w) <= TOL


@pytest.mark.parametrize("kind", list(KINDS))
def test_odd_latent_sizes_give_the_unet_shapes(kind: str) -> None:
    """The features must have the shapes the UNet has after its stride-2 convs (n -> (n + 1) // 2)."""
    ours = load_t2i_adapter(diffusers_adapter(kind, 3).state_dict(), "odd")
    for lat_h, lat_w in ((9, 9), (9, 13), (7, 10)):
        sizes = [(lat_h, lat_w)]
        for _ in range(3):
            sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
        with torch.no_grad():
            out = ours.encode_hint(hint(1, 8 * lat_h, 8 * lat_w))
        if kind == "full_adapter_xl":  # slots 3 and 5 at 1/2 of the latent, 8 and middle at 1/4
            want = {3: sizes[1], 5: sizes[1], 8: sizes[2], 9: sizes[2]}
        else:  # slots 2, 5, 8, 11 at latent / 1, 2, 4, 8
            want = {2: sizes[0], 5: sizes[1], 8: sizes[2], 11: sizes[3]}
        got = {i: tuple(t.shape[-2:]) for i, t in enumerate(out) if t is not None}
        assert got == want, (kind, lat_h, lat_w)
        assert all(torch.isfinite(t).all() for t in out if t is not None)


def test_odd_size_pooling_is_comfys_padded_average() -> None:
    """ComfyUI pads an odd side by one on both ends and counts the zeros (AvgPool2d padding=[H%2, W%2])."""
    from controlstack.controlnet.t2i_adapter import _Downsample

    x = torch.randn(1, 2, 5, 4)
    got = _Downsample(2, use_conv=False)(x)
    want = torch.nn.AvgPool2d(2, 2, padding=(1, 0))(x)
    assert got.shape == (1, 2, 3, 2) and torch.equal(got, want)
    assert got[0, 0, 0, 0] == pytest.approx((x[0, 0, 0, 0] + x[0, 0, 0, 1]).item() / 4, rel=1e-6)


# ------------------------------------------------------------------------------------------- protocol
@pytest.mark.parametrize("kind", list(KINDS))
def test_protocol_attributes_and_forward(kind: str) -> None:
    m = load_t2i_adapter(diffusers_adapter(kind, 3).state_dict(), "proto.safetensors")
    xl = kind == "full_adapter_xl"
    assert m.kind == "t2i_adapter" and m.injection == "input" and m.name == "proto.safetensors"
    assert m.family == ("sdxl" if xl else "sd1")
    assert m.families == (("sdxl",) if xl else ("sd1", "sd2"))
    assert m.num_residuals == (10 if xl else 13)
    assert m.dtype == torch.float32 and not m.training
    assert not any(p.requires_grad for p in m.parameters())
    h = hint(2, 64, 64)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0]), torch.randn(2, 77, 32)
    with torch.no_grad():
        enc = m.encode_hint(h)
        out = m(x, h, t, ctx)
        out2 = m(torch.randn_like(x), None, t * 0, ctx, encoded_hint=enc)
    assert out2 is enc
    for a, b in zip(out, enc, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    with pytest.raises(ControlNetError, match="hint or an encoded_hint"):
        m(x, None, t, ctx)
    with pytest.raises(ControlNetError, match="multiples of 8"):
        m.encode_hint(hint(1, 60, 64))
    with pytest.raises(ControlNetError, match="B x 3 x H x W"):
        m.encode_hint(torch.rand(1, 4, 64, 64))


def test_half_precision_load() -> None:
    ref = diffusers_adapter("full_adapter", 3)
    sd = {k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()}
    m = load_t2i_adapter(sd, "bf16")
    assert m.dtype == torch.bfloat16
    m32 = load_t2i_adapter(sd, "bf16", dtype=torch.float32)
    h = hint(1, 64, 64)
    with torch.no_grad():
        a, b = m.encode_hint(h), m32.encode_hint(h)
    assert a[2].dtype == torch.bfloat16
    assert rel(a[11].float(), b[11]) <= 2e-2


def test_full_size_keys_on_meta() -> None:
    """Published sizes: diffusers' full-size modules on meta load into ours with every tensor accounted for."""
    cases = {
        ("full_adapter", 3): ([320, 640, 1280, 1280], 2, 8),
        ("full_adapter", 1): ([320, 640, 1280, 1280], 2, 8),
        ("light_adapter", 3): ([320, 640, 1280], 4, 8),
        ("full_adapter_xl", 3): ([320, 640, 1280, 1280], 2, 16),
        ("full_adapter_xl", 1): ([320, 640, 1280, 1280], 2, 16),
    }
    for (kind, cin), (channels, rb, down) in cases.items():
        with torch.device("meta"):
            ref = DiffusersT2IAdapter(cin, channels, rb, down, kind)
        sd = ref.state_dict()
        ours = load_t2i_adapter(sd, kind, device="meta")
        assert len(ours.state_dict()) == len(sd)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
        assert ours.config.cin == cin * down * down


# -------------------------------------------------------------------------------------------- layouts
def _small(kind: str = "full_adapter", cin: int = 3) -> tuple[DiffusersT2IAdapter, T2IAdapter]:
    ref = diffusers_adapter(kind, cin)
    return ref, load_t2i_adapter(ref.state_dict(), "ref")


@pytest.mark.parametrize("kind", list(KINDS))
def test_all_layouts_load_the_same_weights(kind: str) -> None:
    ref, ours = _small(kind)
    comfy = ours_sd(
        ours
    )  # our names are ComfyUI's / TencentARC's (tests/host checks against ComfyUI's class)
    layouts = {
        "diffusers": ref.state_dict(),
        "comfy": comfy,
        "wrapper dict": {"adapter": comfy},
        "adapter. prefix": {f"adapter.{k}": v for k, v in comfy.items()},
        "wrapper of diffusers": {"adapter": ref.state_dict()},
    }
    h = hint(1, 64, 64)
    with torch.no_grad():
        want = ours.encode_hint(h)
    for layout, sd in layouts.items():
        assert is_t2i_adapter(sd.keys()), layout
        m = load_t2i_adapter(sd, layout)
        assert m.config == ours.config, layout
        with torch.no_grad():
            got = m.encode_hint(h)
        for a, b in zip(got, want, strict=True):
            assert (a is None and b is None) or torch.equal(a, b), layout


def test_comfy_key_names() -> None:
    """Spot-check the TencentARC names (the full set is compared with ComfyUI's classes in tests/host)."""
    _, full = _small("full_adapter")
    keys = set(full.state_dict())
    assert {"conv_in.weight", "body.0.block1.weight", "body.0.block2.bias", "body.2.in_conv.weight"} <= keys
    assert "body.1.in_conv.weight" not in keys and not any("skep" in k or "down_opt" in k for k in keys)
    _, light = _small("light_adapter")
    keys = set(light.state_dict())
    assert {"body.0.in_conv.weight", "body.3.body.2.block2.weight", "body.3.out_conv.bias"} <= keys


def test_conv_downsample_and_ksize_are_read_from_the_tensors() -> None:
    cfg = T2IAdapterConfig(light=False, cin=64, channels=(8, 16, 32, 32), nums_rb=1, ksize=3, use_conv=True)
    m = randomise(build_t2i_adapter(cfg))
    sd = ours_sd(m)
    assert "body.1.down_opt.op.weight" in sd and sd["body.1.in_conv.weight"].shape == (16, 8, 3, 3)
    loaded = load_t2i_adapter(sd, "conv")
    assert loaded.config == cfg and config_from_state_dict(sd).ksize == 3
    h = hint(1, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.encode_hint(h)[11], m.encode_hint(h)[11])
    sd["body.0.skep.weight"] = torch.randn(8, 8, 3, 3)
    with pytest.raises(ControlNetError, match=r"skip convs \('body.0.skep.weight'"):
        load_t2i_adapter(sd, "sk")


def test_not_adapters() -> None:
    controlnet_keys = ["input_hint_block.0.weight", "zero_convs.0.0.weight", "input_blocks.0.0.weight"]
    assert not is_t2i_adapter(controlnet_keys)
    assert not is_t2i_adapter(["controlnet_cond_embedding.conv_in.weight", "conv_in.weight"])
    assert not is_t2i_adapter(
        ["lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.conditioning1.0.weight"]
    )
    with pytest.raises(ControlNetError, match="not a T2I-Adapter"):
        load_t2i_adapter({k: torch.zeros(1) for k in controlnet_keys}, "cn.safetensors")


def test_refusals_name_what_the_file_is() -> None:
    style = {
        "style_embedding": torch.randn(1, 8, 16),
        "proj": torch.randn(16, 8),
        "ln_pre.weight": torch.randn(16),
        "transformer_layes.0.attn.in_proj_weight": torch.randn(48, 16),
    }
    assert is_t2i_adapter(style)
    with pytest.raises(ControlNetError, match=r"style\.pth.*style model.*Load Style Model"):
        load_t2i_adapter(style, "style.pth")
    cascade = {"backbone.0.0.weight": torch.randn(8, 3, 3, 3), "backbone.1.weight": torch.randn(8)}
    assert is_t2i_adapter(cascade)
    with pytest.raises(
        ControlNetError, match=r"cascade_canny.*Stable Cascade ControlNet.*SD1\.x / SD2\.x / SDXL"
    ):
        load_t2i_adapter(cascade, "cascade_canny.safetensors")
    with pytest.raises(ControlNetError, match="Stable Cascade"):
        load_t2i_adapter({"backbone.10.blocks.0.weight": torch.randn(4)}, "large")


def test_missing_and_misshaped_tensors_are_named() -> None:
    ref, ours = _small("full_adapter")
    sd = ours_sd(ours)
    del sd["body.5.block1.bias"]
    with pytest.raises(
        ControlNetError, match=r"f\.pth: T2I-Adapter tensor 'body\.5\.block1\.bias' is missing"
    ):
        load_t2i_adapter(sd, "f.pth")
    sd = ours_sd(ours)
    sd["body.4.in_conv.weight"] = torch.randn(32, 16, 3, 3)
    with pytest.raises(
        ControlNetError, match=r"'body\.4\.in_conv\.weight' has shape \(32, 16, 3, 3\), expected"
    ):
        load_t2i_adapter(sd, "f.pth")
    sd = ours_sd(ours)
    del sd["body.0.block2.weight"]  # the ksize is read from it
    with pytest.raises(ControlNetError, match="'body.0.block2.weight' is missing"):
        load_t2i_adapter(sd, "f.pth")
    sd = {k: v for k, v in ours_sd(ours).items() if not k.startswith("body.7.")}
    with pytest.raises(ControlNetError, match="4 stages"):
        load_t2i_adapter(sd, "f.pth")
    sd = ours_sd(ours)
    sd["conv_in.weight"] = torch.randn(8, 128, 3, 3)  # 2 hint channels
    with pytest.raises(ControlNetError, match="input width 128"):
        load_t2i_adapter(sd, "f.pth")
    _, light = _small("light_adapter")
    sd = ours_sd(light)
    del sd["body.2.out_conv.weight"]
    with pytest.raises(ControlNetError, match="'body.2.out_conv.weight' is missing"):
        load_t2i_adapter(sd, "l.pth")
    sd = {k: v for k, v in ours_sd(light).items() if ".body." not in k}
    with pytest.raises(ControlNetError, match="'body.0.body.0.block1.weight' is missing"):
        load_t2i_adapter(sd, "l.pth")
    with pytest.raises(ControlNetError, match="no tensors"):
        load_t2i_adapter({"adapter": {}}, "empty.pth")
