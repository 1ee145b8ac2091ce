"""ControlNet-LLLite (kohya-ss sd-scripts ``networks/control_net_lllite.py``): loading, hint tokens, q/k/v terms.

Files are built here in the published layout (module names from the SDXL UNet, shapes from kohya's
constructor with its defaults cond_emb_dim 32, mlp_dim 64) with seeded random weights, every tensor non-zero
(kohya zero-initialises ``up.0``; a zero there would make every comparison pass). The reference below is
kohya's forward written out with ``torch.nn.functional``: ``x + up(mid(cat(cond, down(x)))) * multiplier``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from controlstack.controlnet import build_controlnet, preset
from controlstack.controlnet.errors import ControlNetError
from controlstack.controlnet.lllite import LLLite, is_lllite, load_lllite
from numerics import rel_err as rel

COND_EMB, MLP = (
    32,
    64,
)  # kohya defaults (sd-scripts train_controlnet_lllite: --cond_emb_dim 32, --network_dim 64)
ROLES = {"attn1": ("q", "k", "v"), "attn2": ("q",)}


def sdxl_targets() -> dict[str, int]:
    """kohya's default module names for the SDXL UNet -> the wrapped Linear's in_features.

    The UNet layout comes from our SDXL ControlNet encoder on meta (input blocks 4, 5 with 2 transformer
    blocks, 7, 8 and the middle with 10): the same input/middle blocks kohya's ``create_modules`` walks.
    """
    net = build_controlnet(preset("sdxl"), device="meta")
    out = {}
    for path, mod in net.named_modules():
        if path.endswith(("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_q")):
            out["lllite_unet_" + path.replace(".", "_")] = mod.in_features
    return out


def kohya_depth(name: str) -> int:
    """sd-scripts ``create_modules``: input_blocks <= 2 -> 1, <= 5 -> 2, else 3; middle_block -> 3."""
    if name.startswith("lllite_unet_middle_block"):
        return 3
    index = int(name.removeprefix("lllite_unet_input_blocks_").split("_")[0])
    return 1 if index <= 2 else 2 if index <= 5 else 3


def kohya_shapes(in_dim: int, depth: int) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of one kohya LLLiteModule (Linear variant) from its constructor."""
    half = COND_EMB // 2
    shapes = {"conditioning1.0.weight": (half, 3, 4, 4), "conditioning1.0.bias": (half,)}
    if depth == 1:
        shapes |= {"conditioning1.2.weight": (COND_EMB, half, 2, 2), "conditioning1.2.bias": (COND_EMB,)}
    elif depth == 2:
        shapes |= {"conditioning1.2.weight": (COND_EMB, half, 4, 4), "conditioning1.2.bias": (COND_EMB,)}
    else:
        shapes |= {"conditioning1.2.weight": (half, half, 4, 4), "conditioning1.2.bias": (half,)}
        shapes |= {"conditioning1.4.weight": (COND_EMB, half, 2, 2), "conditioning1.4.bias": (COND_EMB,)}
    shapes |= {
        "down.0.weight": (MLP, in_dim),
        "down.0.bias": (MLP,),
        "mid.0.weight": (MLP, MLP + COND_EMB),
        "mid.0.bias": (MLP,),
        "up.0.weight": (in_dim, MLP),
        "up.0.bias": (in_dim,),
    }
    return shapes


def make_file(modules: dict[str, int], seed: int = 0, device: str = "cpu") -> dict[str, torch.Tensor]:
    """A state dict in the published layout; weights ~ N(0, 1/fan_in), biases N(0, 0.1^2), none zero."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, in_dim in modules.items():
        for suffix, shape in kohya_shapes(in_dim, kohya_depth(name)).items():
            if device == "meta":
                sd[f"{name}.{suffix}"] = torch.empty(shape, device="meta")
                continue
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 10.0
            sd[f"{name}.{suffix}"] = torch.randn(shape, generator=g) / math.sqrt(fan_in)
    return sd


ALL = sdxl_targets()
# A reduced file: a full attn1 triple + attn2 q at depth 2 (input 4) and at depth 3 (middle), one more depth-3.
SMALL = {
    k: ALL[k]
    for k in ALL
    if k.startswith("lllite_unet_input_blocks_4_1_transformer_blocks_0_")
    or k.startswith("lllite_unet_middle_block_1_transformer_blocks_9_")
    or k == "lllite_unet_input_blocks_7_1_transformer_blocks_3_attn2_to_q"
}


def ref_tokens(sd: dict[str, torch.Tensor], name: str, hint01: torch.Tensor) -> torch.Tensor:
    """conditioning1 on the [-1, 1] hint, edge-extended to the stride, flattened to B x h*w x C."""
    depth = kohya_depth(name)
    stride = {1: 8, 2: 16, 3: 32}[depth]
    x = hint01 * 2 - 1
    h, w = x.shape[2:]
    # Edge extension by index clamping (independent of F.pad's replicate mode).
    rows = torch.arange(math.ceil(h / stride) * stride).clamp(max=h - 1)
    cols = torch.arange(math.ceil(w / stride) * stride).clamp(max=w - 1)
    x = x[:, :, rows][:, :, :, cols]
    p = lambda s: (sd[f"{name}.conditioning1.{s}.weight"], sd[f"{name}.conditioning1.{s}.bias"])  # noqa: E731
    x = F.conv2d(x, *p(0), stride=4)
    if depth == 1:
        x = F.conv2d(F.relu(x), *p(2), stride=2)
    elif depth == 2:
        x = F.conv2d(F.relu(x), *p(2), stride=4)
    else:
        x = F.conv2d(F.relu(F.conv2d(F.relu(x), *p(2), stride=4)), *p(4), stride=2)
    b, c = x.shape[:2]
    return x.reshape(b, c, -1).permute(0, 2, 1)


def ref_forward(
    sd: dict[str, torch.Tensor], name: str, x: torch.Tensor, cond: torch.Tensor, mult
) -> torch.Tensor:
    """kohya LLLiteModule.forward before org_forward: x + up(mid(cat([cond, down(x)]))) * multiplier."""
    lin = lambda t, s: F.linear(t, sd[f"{name}.{s}.weight"], sd[f"{name}.{s}.bias"])  # noqa: E731
    cx = torch.cat([cond, F.relu(lin(x, "down.0"))], dim=2)
    return x + lin(F.relu(lin(cx, "mid.0")), "up.0") * mult


def unet_grid(h: int, w: int, level: int) -> tuple[int, int]:
    """Token grid of the UNet at a level: stride-2 3x3 convs with padding 1 (ldm Downsample)."""
    x = torch.empty(1, 1, h, w, device="meta")
    for _ in range(level):
        x = F.conv2d(x, torch.empty(1, 1, 3, 3, device="meta"), stride=2, padding=1)
    return tuple(x.shape[2:])


@pytest.fixture(scope="module")
def small() -> tuple[dict[str, torch.Tensor], LLLite]:
    sd = make_file(SMALL, seed=1)
    return sd, load_lllite(sd, "small.safetensors")


def hint(b: int, h: int, w: int, seed: int = 2) -> torch.Tensor:
    return torch.rand(b, 3, 8 * h, 8 * w, generator=torch.Generator().manual_seed(seed))


def test_file_is_random_and_loads_as_is(small) -> None:
    sd, model = small
    assert all(t.abs().min() > 0 for t in sd.values()), "every tensor, up.0 included, must be non-zero"
    assert set(model.state_dict()) == set(sd)
    assert all(torch.equal(model.state_dict()[k], sd[k]) for k in sd)
    assert (model.kind, model.family, model.injection, model.num_residuals) == (
        "lllite",
        "sdxl",
        "attention",
        10,
    )
    assert model.name == "small.safetensors" and model.dtype == torch.float32 and not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert {k: m.depth for k, m in model.items()} == {k: kohya_depth(k) for k in SMALL}
    assert model.unused == ()
    half = load_lllite(sd, "half", dtype=torch.float16)
    assert half.dtype == torch.float16 and all(p.dtype == torch.float16 for p in half.parameters())


def test_is_lllite() -> None:
    assert is_lllite(SMALL) and is_lllite(["lllite_dit_blocks_0_self_attn_q_proj.down.weight"])
    assert not is_lllite(["input_blocks.0.0.weight", "control_model.zero_convs.0.0.weight"])


def test_full_size_names_and_targets_on_meta() -> None:
    sd = make_file(ALL, device="meta")
    assert len(ALL) == 136  # (2 + 2) x 2 + (2 + 1) x 10 ... = 16 + 80 + 40 modules
    model = load_lllite(sd, "full.safetensors")
    assert set(model.keys()) == set(ALL) and set(model.state_dict()) == set(sd)
    covered = set()
    for block, depth in [(("input", 4), 2), (("input", 5), 2), (("input", 7), 10), (("input", 8), 10)] + [
        (("middle", 0), 10)
    ]:
        stem = f"input_blocks_{block[1]}" if block[0] == "input" else "middle_block"
        for i in range(depth):
            for attn, roles in ROLES.items():
                want = {r: f"lllite_unet_{stem}_1_transformer_blocks_{i}_{attn}_to_{r}" for r in roles}
                assert model.targets(block, i, attn) == want
                covered |= set(want.values())
            m = model[f"lllite_unet_{stem}_1_transformer_blocks_{i}_attn1_to_q"]
            assert (m.depth, m.in_dim) == ((2, 640) if block in (("input", 4), ("input", 5)) else (3, 1280))
    assert covered == set(ALL)
    for block in [("input", 1), ("input", 2), ("output", 0), ("output", 5)]:
        assert model.targets(block, 0, "attn1") == {} and model.targets(block, 0, "attn2") == {}
    assert model.targets(("input", 4), 2, "attn1") == {}


def test_targets_table_example(small) -> None:
    _, model = small
    stem = "lllite_unet_input_blocks_4_1_transformer_blocks_0"
    assert model.targets(("input", 4), 0, "attn1") == {r: f"{stem}_attn1_to_{r}" for r in "qkv"}
    assert model.targets(("input", 4), 0, "attn2") == {"q": f"{stem}_attn2_to_q"}
    assert model.targets(("middle", 0), 9, "attn2") == {
        "q": "lllite_unet_middle_block_1_transformer_blocks_9_attn2_to_q"
    }
    assert model.targets(("middle", 0), 0, "attn1") == {}  # not in the reduced file
    with pytest.raises(ControlNetError, match="attn must be"):
        model.targets(("input", 4), 0, "attn3")


def test_tokens_and_deltas_match_kohya(small) -> None:
    sd, model = small
    b, h, w = 2, 16, 12
    hint01 = hint(b, h, w)
    cond = model.encode_hint(hint01)
    assert set(cond) == set(SMALL)
    for name in SMALL:
        want = ref_tokens(sd, name, hint01)
        assert cond[name].shape == want.shape
        assert rel(cond[name], want) <= 1e-5
    g = torch.Generator().manual_seed(3)
    for name, in_dim in SMALL.items():
        grid = (h // 2) * (w // 2) if kohya_depth(name) == 2 else (h // 4) * (w // 4)
        x = torch.randn(b, grid, in_dim, generator=g)
        got = x + model.delta(name, x, cond[name]) * 0.7
        want = ref_forward(sd, name, x, ref_tokens(sd, name, hint01), 0.7)
        assert rel(got - x, want - x) <= 1e-4 and rel(got, want) <= 1e-5


def test_apply_attn1_attn2_and_encode_once(small) -> None:
    sd, model = small
    b, h, w = 2, 8, 8
    hint01 = hint(1, h, w, seed=4)
    cond1 = model.encode_hint(hint01)
    ref_cond = {k: ref_tokens(sd, k, hint01).expand(b, -1, -1) for k in SMALL}
    cond = {k: v.expand(b, -1, -1) for k, v in cond1.items()}  # the caller broadcasts cond/uncond rows
    # Encode once: conditioning1 is not run again by apply (changing its weights changes nothing now).
    saved = {k: v.clone() for k, v in model.state_dict().items() if "conditioning1" in k}
    with torch.no_grad():
        for k, p in model.named_parameters():
            if "conditioning1" in k:
                p.mul_(-3.0)
    try:
        g = torch.Generator().manual_seed(5)
        n = torch.randn(b, (h // 4) * (w // 4), 1280, generator=g)
        n_copy = n.clone()
        mask = torch.rand(b, n.shape[1], 1, generator=g)
        to_q = torch.randn(1280, 1280, generator=g) / 36
        for mult in (1.0, 0.5, mask):
            q, k, v = model.apply(("middle", 0), 9, "attn1", n, n, n, cond, mult)
            assert torch.equal(n, n_copy), "inputs must never be modified"
            for out, role in zip((q, k, v), "qkv", strict=True):
                name = f"lllite_unet_middle_block_1_transformer_blocks_9_attn1_to_{role}"
                assert rel(out, ref_forward(sd, name, n, ref_cond[name], mult)) <= 1e-5
                assert rel(out - n, ref_forward(sd, name, n, ref_cond[name], mult) - n) <= 1e-4
            # kohya runs org_forward(x + cx * m): feeding apply's q to to_q is the same projection.
            name = "lllite_unet_middle_block_1_transformer_blocks_9_attn1_to_q"
            assert rel(q @ to_q.T, ref_forward(sd, name, n, ref_cond[name], mult) @ to_q.T) <= 1e-4
        # An earlier patch in ComfyUI's chain may have made q, k, v differ: each term uses its own input.
        qkv = [torch.randn_like(n) for _ in range(3)]
        for out, x, role in zip(
            model.apply(("middle", 0), 9, "attn1", *qkv, cond, mask), qkv, "qkv", strict=True
        ):
            name = f"lllite_unet_middle_block_1_transformer_blocks_9_attn1_to_{role}"
            assert rel(out - x, ref_forward(sd, name, x, ref_cond[name], mask) - x) <= 1e-4
        # attn2: only q changes; the text context goes through untouched (same objects back).
        ctx = torch.randn(b, 7, 2048, generator=g)
        n4 = torch.randn(b, (h // 2) * (w // 2), 640, generator=g)
        q, k, v = model.apply(("input", 4), 0, "attn2", n4, ctx, ctx, cond, 1.0)
        assert k is ctx and v is ctx
        name = "lllite_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_q"
        assert rel(q, ref_forward(sd, name, n4, ref_cond[name], 1.0)) <= 1e-5
        # Nothing targeted, or multiplier 0: the inputs come back unchanged.
        assert model.apply(("output", 0), 0, "attn1", n, n, n, cond, 1.0) == (n, n, n)
        assert model.apply(("middle", 0), 9, "attn1", n, n, n, cond, 0.0) == (n, n, n)
    finally:
        model.load_state_dict(saved, strict=False)


@pytest.mark.parametrize("size", [(13, 10), (10, 14), (7, 9)])
def test_odd_latent_sizes_match_unet_grid(small, size: tuple[int, int]) -> None:
    sd, model = small
    h, w = size
    hint01 = hint(1, h, w, seed=6)
    cond = model.encode_hint(hint01)
    for name in SMALL:
        level = 1 if kohya_depth(name) == 2 else 2
        gh, gw = unet_grid(h, w, level)
        assert cond[name].shape == (1, gh * gw, COND_EMB)
        assert rel(cond[name], ref_tokens(sd, name, hint01)) <= 1e-5
    # Interior tokens see the pixels they see at an even size: encode a crop and compare the shared rows.
    name = "lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    eh, ew = 2 * (h // 2), 2 * (w // 2)
    crop = model.encode_hint(hint01[:, :, : 8 * eh, : 8 * ew])[name].reshape(1, eh // 2, ew // 2, -1)
    full = cond[name].reshape(1, *unet_grid(h, w, 1), -1)
    assert torch.equal(full[:, : eh // 2, : ew // 2], crop)
    x = torch.randn(1, cond[name].shape[1], 640, generator=torch.Generator().manual_seed(7))
    out = model.apply(("input", 4), 0, "attn1", x, x, x, cond, 1.0)[0]
    assert rel(out, ref_forward(sd, name, x, ref_tokens(sd, name, hint01), 1.0)) <= 1e-5


def test_conv2d_module_variant() -> None:
    # kohya wraps Conv2d layers (1x1 down/mid/up convs) when TRANSFORMER_ONLY is off; such modules load and
    # compute, but no attention call targets them.
    g = torch.Generator().manual_seed(8)
    name, c = "lllite_unet_input_blocks_4_0_in_layers_2", 320
    shapes = kohya_shapes(c, 2)
    shapes |= {"down.0.weight": (MLP, c, 1, 1), "mid.0.weight": (MLP, MLP + COND_EMB, 1, 1)}
    shapes |= {"up.0.weight": (c, MLP, 1, 1)}
    sd = {f"{name}.{s}": torch.randn(shape, generator=g) * 0.1 for s, shape in shapes.items()}
    model = load_lllite(sd, "conv.safetensors")
    assert model[name].is_conv2d and model.unused == (name,)
    hint01 = hint(1, 6, 4, seed=9)
    cond = model.encode_hint(hint01)[name]
    assert cond.shape == (1, COND_EMB, 3, 2)
    x = torch.randn(1, c, 3, 2, generator=g)
    p = lambda s, t: F.conv2d(t, sd[f"{name}.{s}.weight"], sd[f"{name}.{s}.bias"])  # noqa: E731
    assert rel(cond, ref_tokens(sd, name, hint01).reshape(1, 3, 2, COND_EMB).permute(0, 3, 1, 2)) <= 1e-5
    want = p("up.0", F.relu(p("mid.0", torch.cat([cond, F.relu(p("down.0", x))], 1))))
    assert rel(model.delta(name, x, cond), want) <= 1e-5


def test_refusals(small) -> None:
    sd, model = small
    with pytest.raises(
        ControlNetError, match=r"an Anima \(DiT\) LLLite; ControlStack supports SD1.x / SD2.x / SDXL"
    ):
        load_lllite(
            {"lllite_dit_blocks_0_self_attn_q_proj.down.weight": torch.ones(2, 2)}, "anima.safetensors"
        )
    key = "lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.mid.0.bias"
    with pytest.raises(ControlNetError, match=f"small.safetensors: LLLite tensor '{key}' is missing"):
        load_lllite({k: v for k, v in sd.items() if k != key}, "small.safetensors")
    bad = dict(sd) | {key: torch.ones(63)}
    with pytest.raises(ControlNetError, match=rf"'{key}' has shape \(63,\), expected \(64,\)"):
        load_lllite(bad, "small.safetensors")
    with pytest.raises(ControlNetError, match="unexpected tensor 'input_blocks.0.0.weight'"):
        load_lllite(dict(sd) | {"input_blocks.0.0.weight": torch.ones(1)}, "mixed.safetensors")
    with pytest.raises(ControlNetError, match="unexpected LLLite tensor"):
        load_lllite(dict(sd) | {key.replace("mid.0.bias", "mid.1.weight"): torch.ones(1)}, "x")

    cond = model.encode_hint(hint(1, 8, 8))
    name = "lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    x = torch.randn(2, 16, 640)
    with pytest.raises(ControlNetError, match="broadcast cond/uncond rows"):
        model.delta(name, x, cond[name])  # batch 1 tokens for a batch 2 input
    with pytest.raises(ControlNetError, match="do not fit the input"):
        model.delta(name, torch.randn(1, 15, 640), cond[name])  # wrong token count
    with pytest.raises(ControlNetError, match="C = 640"):
        model.delta(name, torch.randn(1, 16, 1280), cond[name])
    with pytest.raises(ControlNetError, match="no hint tokens"):
        model.apply(("input", 4), 0, "attn1", x[:1], x[:1], x[:1], {}, 1.0)
    with pytest.raises(ControlNetError, match="does not broadcast to B x T x 1"):
        model.apply(("input", 4), 0, "attn1", x[:1], x[:1], x[:1], cond, torch.ones(1, 16, 640))
    with pytest.raises(ControlNetError, match="B x 3 x H x W"):
        model.encode_hint(torch.rand(1, 1, 64, 64))
    with pytest.raises(ControlNetError, match="multiples of 8"):
        model.encode_hint(torch.rand(1, 3, 60, 64))
