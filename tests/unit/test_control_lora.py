"""Control-LoRA merge (controlnet/control_lora.py) against weights computed independently in float64.

The "host UNet encoder" is one of our own tiny ControlNets, randomised: its time_embed / label_emb /
input_blocks / middle_block keys ARE the UNet encoder's ldm keys. A few decoder keys are added that the
merge must ignore. The Control-LoRA file is written here the way Stability's files are laid out
(huggingface.co/stabilityai/control-lora): rank-4 up/down for every shared Linear / Conv weight, full
norms and biases, full hint block / zero convs / middle_block_out, and the ``lora_controlnet`` marker.
"""

from __future__ import annotations

import math

import pytest
import torch
from cn_helpers import TINY, random_controlnet, random_inputs, rel_err
from controlstack.controlnet import ControlNet, ControlNetError, build_controlnet, preset
from controlstack.controlnet.control_lora import (
    ENCODER_PREFIXES,
    control_lora_family,
    is_control_lora,
    merge_control_lora,
)

RANK = 4
NAME = "control-lora-test.safetensors"
# Layers whose full tensors the file leaves out (the base's are used) and one layer whose weight the file
# replaces AND adds a pair to (ComfyUI assigns the file's weight, then adds up @ down in forward).
KEPT_FROM_BASE = ("input_blocks.1.0.in_layers.0.weight", "input_blocks.1.0.in_layers.0.bias")
REPLACED_AND_PAIRED = "time_embed.0.weight"


def make_base(family: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A randomised UNet "encoder" of the tiny config plus decoder tensors that must be ignored."""
    cn = random_controlnet(TINY[family], seed)
    base = {k: v for k, v in cn.state_dict().items() if k.startswith(ENCODER_PREFIXES)}
    g = torch.Generator().manual_seed(seed + 7)
    mc = TINY[family].model_channels
    base["output_blocks.0.0.in_layers.2.weight"] = torch.randn(2 * mc, 3 * mc, 3, 3, generator=g)
    base["output_blocks.0.0.in_layers.2.bias"] = torch.randn(2 * mc, generator=g)
    base["out.2.weight"] = torch.randn(4, mc, 3, 3, generator=g)
    return base


def make_lora(family: str, seed: int = 1) -> dict[str, torch.Tensor]:
    """A rank-4 Control-LoRA for the tiny config; every tensor random and non-zero."""
    donor = random_controlnet(TINY[family], seed + 100)  # supplies the full tensors
    g = torch.Generator().manual_seed(seed)
    lora = {"lora_controlnet": torch.tensor([])}
    for k, v in donor.state_dict().items():
        if k.startswith(ENCODER_PREFIXES) and k.endswith(".weight") and v.ndim >= 2:
            stem = k[: -len(".weight")]
            # A conv's pair is [out, r, 1, 1] @ [r, in, kh, kw], as Stability's files store it; scaled so
            # that up @ down is as large as the weight itself (a missing delta cannot go unnoticed).
            up = torch.randn(v.shape[0], RANK, *([1, 1] if v.ndim == 4 else []), generator=g) / math.sqrt(
                RANK
            )
            down = torch.randn(RANK, *v.shape[1:], generator=g) / math.sqrt(v[0].numel())
            lora[f"{stem}.up"], lora[f"{stem}.down"] = up, down
            if k == REPLACED_AND_PAIRED:
                lora[k] = v.clone()
        elif k not in KEPT_FROM_BASE:
            lora[k] = v.clone()
    return lora


def expected_weights(lora: dict, base: dict, family: str) -> dict[str, torch.Tensor]:
    """The ControlNet's weights in float64: file tensor if present, else the base's, plus up @ down."""
    keys = build_controlnet(TINY[family], device="meta").state_dict()
    out = {}
    for k, meta in keys.items():
        w = (lora[k] if k in lora else base[k]).double()
        stem = k[: -len(".weight")]
        if f"{stem}.up" in lora:
            up, down = lora[f"{stem}.up"].double(), lora[f"{stem}.down"].double()
            w = w + (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(meta.shape)
        out[k] = w
    return out


def reference_model(weights: dict[str, torch.Tensor], family: str):
    model = build_controlnet(TINY[family], device="meta")
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True, assign=True)
    return model.eval()


def residuals(model, inputs) -> list[torch.Tensor]:
    x, hint, t, ctx, y = inputs
    with torch.no_grad():
        return model(x, hint, t, ctx, y)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_merged_weights_and_residuals(family: str) -> None:
    base, lora = make_base(family), make_lora(family)
    model = merge_control_lora(lora, base, name=NAME)
    want = expected_weights(lora, base, family)
    got = model.state_dict()
    assert set(got) == set(want)

    n_pairs = 0
    for k, w in want.items():
        assert got[k].dtype == torch.float32
        stem = k[: -len(".weight")]
        if f"{stem}.up" in lora:
            n_pairs += 1
            assert rel_err(got[k], w) <= 1e-6, k
            # The delta is as large as the weight: leaving it out would fail the line above.
            assert rel_err((lora[k] if k in lora else base[k]), w) > 0.1, k
        elif k in lora:
            assert torch.equal(got[k], lora[k]), k  # replacements: the file's tensor, bit for bit
        else:
            assert k in KEPT_FROM_BASE and torch.equal(got[k], base[k]), k
    assert n_pairs > 20

    inputs = random_inputs(model, batch=2, latent=8, seed=3)
    ours, ref = residuals(model, inputs), residuals(reference_model(want, family), inputs)
    assert len(ours) == model.num_residuals == TINY[family].num_residuals
    errs = [rel_err(a, b) for a, b in zip(ours, ref, strict=True)]
    assert max(errs) <= 1e-4, errs
    # The comparison can fail: the ControlNet without the deltas is far off.
    no_delta = {k: (lora[k] if k in lora else base[k]).double() for k in want}
    far = residuals(reference_model(no_delta, family), inputs)
    assert min(rel_err(a, b) for a, b in zip(far, ref, strict=True)) > 1e-2


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_module_protocol(family: str) -> None:
    model = merge_control_lora(make_lora(family), make_base(family), name=NAME)
    assert isinstance(model, ControlNet) and model.kind == "control_lora"
    assert model.injection == "output"
    assert model.family == family and model.name == NAME
    assert model.num_residuals == TINY[family].num_residuals
    assert model.dtype == torch.float32
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    hint = torch.rand(1, 3, 64, 64)
    assert model.encode_hint(hint).shape == (1, TINY[family].model_channels, 8, 8)


def test_base_unchanged_and_not_shared() -> None:
    base, lora = make_base("sd1"), make_lora("sd1")
    before = {k: v.clone() for k, v in base.items()}
    model = merge_control_lora(lora, base)
    assert all(torch.equal(base[k], before[k]) for k in before)
    # The ControlNet owns its weights: a later in-place patch of the UNet must not reach it.
    base_ptrs = {v.data_ptr() for v in base.values()}
    assert not any(p.data_ptr() in base_ptrs for p in model.state_dict().values())


def test_prefixed_base_and_file_path(tmp_path) -> None:
    from safetensors.torch import save_file

    base, lora = make_base("sdxl"), make_lora("sdxl")
    bare = merge_control_lora(lora, base).state_dict()
    prefixed = merge_control_lora(lora, {f"diffusion_model.{k}": v for k, v in base.items()}).state_dict()
    path = tmp_path / NAME
    save_file(lora, str(path))
    from_file = merge_control_lora(path, base)
    assert from_file.name == NAME
    for k, v in bare.items():
        assert torch.equal(prefixed[k], v) and torch.equal(from_file.state_dict()[k], v), k


def test_dtype_rounds_once() -> None:
    base = {k: v.half() for k, v in make_base("sd1").items()}
    lora = make_lora("sd1")
    model = merge_control_lora(lora, base)
    assert model.dtype == torch.float16  # default: the base's dtype
    k = "input_blocks.1.0.in_layers.2"
    delta = (lora[f"{k}.up"].flatten(1) @ lora[f"{k}.down"].flatten(1)).reshape(base[f"{k}.weight"].shape)
    want = (base[f"{k}.weight"].float() + delta).half()
    assert torch.equal(model.state_dict()[f"{k}.weight"], want)
    assert merge_control_lora(lora, base, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize(("file_family", "base_family"), [("sdxl", "sd1"), ("sd1", "sdxl"), ("sd2", "sd1")])
def test_family_mismatch_refused(file_family: str, base_family: str) -> None:
    label = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
    with pytest.raises(ControlNetError) as e:
        merge_control_lora(make_lora(file_family), make_base(base_family), name=NAME)
    msg = str(e.value)
    assert NAME in msg
    assert f"for {label[file_family]} but the model is {label[base_family]}" in msg


def test_errors_name_the_file() -> None:
    base, lora = make_base("sd1"), make_lora("sd1")

    missing = dict(base)
    del missing["input_blocks.1.0.in_layers.2.weight"]
    with pytest.raises(ControlNetError, match=r"control-lora-test.*base UNet.*in_layers\.2\.weight"):
        merge_control_lora(lora, missing, name=NAME)

    no_norm = dict(base)  # a tensor the file does not carry and no pair targets
    del no_norm[KEPT_FROM_BASE[1]]
    with pytest.raises(
        ControlNetError, match=r"control-lora-test.*missing from the base UNet.*in_layers\.0\.bias"
    ):
        merge_control_lora(lora, no_norm, name=NAME)

    bad = dict(lora)
    bad["input_blocks.1.0.in_layers.2.down"] = torch.randn(RANK, 5, 3, 3)
    with pytest.raises(ControlNetError, match=r"control-lora-test.*in_layers\.2\.up.*does not fit"):
        merge_control_lora(bad, base, name=NAME)

    lone = dict(lora)
    del lone["middle_block.0.emb_layers.1.down"]
    with pytest.raises(ControlNetError, match=r"control-lora-test.*without their partner.*emb_layers\.1\.up"):
        merge_control_lora(lone, base, name=NAME)

    no_hint = {k: v for k, v in lora.items() if not k.startswith("input_hint_block.")}
    with pytest.raises(ControlNetError, match=r"control-lora-test.*input_hint_block"):
        merge_control_lora(no_hint, base, name=NAME)

    unmarked = {k: v for k, v in lora.items() if k != "lora_controlnet"}
    with pytest.raises(ControlNetError, match=r"control-lora-test.*not a Control-LoRA"):
        merge_control_lora(unmarked, base, name=NAME)

    with pytest.raises(ControlNetError, match=r"no UNet encoder"):
        merge_control_lora(lora, {"out.2.weight": base["out.2.weight"]}, name=NAME)


def test_is_control_lora() -> None:
    assert is_control_lora(make_lora("sd1"))
    assert not is_control_lora(make_base("sd1"))


def _lora_shapes(shapes: dict[str, tuple], rank: int, flatten: bool = False) -> dict[str, tuple]:
    """The shapes of a Control-LoRA file for a model with these shapes (convs flattened to 2-D if asked)."""
    out: dict[str, tuple] = {"lora_controlnet": (0,)}
    for k, s in shapes.items():
        if k.startswith(ENCODER_PREFIXES) and k.endswith(".weight") and len(s) >= 2:
            stem = k[: -len(".weight")]
            conv = len(s) == 4 and not flatten
            out[f"{stem}.up"] = (s[0], rank, 1, 1) if conv else (s[0], rank)
            out[f"{stem}.down"] = (rank, *s[1:]) if conv else (rank, math.prod(s[1:]))
        else:
            out[k] = s
    return out


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_family_from_structure(family: str) -> None:
    # Full-size and tiny models, as a base UNet (full weights) and as Control-LoRA files.
    for config in (preset(family), TINY[family]):
        shapes = {k: tuple(v.shape) for k, v in build_controlnet(config, device="meta").state_dict().items()}
        assert control_lora_family(shapes) == family
        assert control_lora_family(_lora_shapes(shapes, 128)) == family
    # An extractor that flattens conv pairs to 2-D: the public models' context width still tells.
    full = {
        k: tuple(v.shape) for k, v in build_controlnet(preset(family), device="meta").state_dict().items()
    }
    assert control_lora_family(_lora_shapes(full, 64, flatten=True)) == family


def test_family_unknown_refused() -> None:
    with pytest.raises(ControlNetError, match="cannot tell"):
        control_lora_family({"input_hint_block.0.weight": (16, 3, 3, 3)}, "x.safetensors")
