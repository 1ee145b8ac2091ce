"""T2I-Adapter core (controlnet/t2i_adapter.py) against ComfyUI's own classes, imported (no server).

References: ``comfy.t2i_adapter.adapter.Adapter`` / ``Adapter_light`` (the network), ``comfy.controlnet.T2IAdapter``
(hint preparation in ``get_control`` and the ``control["input"]`` / ``control["middle"]`` lists) and
``comfy.controlnet.load_t2i_adapter`` (layout handling). ComfyUI's modules are built on ``meta`` to take key names
and shapes, every tensor is randomised, and the features are compared slot by slot, odd latent sizes included.
"""

from __future__ import annotations

import math
import sys

import host
import pytest
import torch
from numerics import rel_err as rel

sys.path.insert(0, str(host.resolve_comfy_dir()))
from comfy.cli_args import args  # noqa: E402

args.cpu = True
import comfy.controlnet  # noqa: E402
from comfy.t2i_adapter.adapter import Adapter, Adapter_light  # noqa: E402
from controlstack.controlnet.t2i_adapter import T2IAdapter, is_t2i_adapter, load_t2i_adapter  # noqa: E402

TOL = 1e-4
SMALL = [8, 16, 32, 32]
FULL = [320, 640, 1280, 1280]


def random_state_dict(meta_module: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Names and shapes from the reference module (built on meta); values random and non-zero."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in meta_module.state_dict().items():
        std = 1 / math.sqrt(v[0].numel()) if v.ndim > 1 else 0.1
        out[k] = torch.randn(v.shape, generator=g) * std
        assert out[k].abs().min() > 0
    return out


def comfy_adapter(light: bool, **kw: object) -> torch.nn.Module:
    with torch.device("meta"):
        return Adapter_light(**kw) if light else Adapter(sk=True, **kw)


def comfy_slots(control: dict[str, list], n: int) -> list[torch.Tensor | None]:
    """ComfyUI's lists in our slot order: apply_control pops ``input`` from the end after input block i (slot i)
    and ``middle`` after the middle block (slot n - 1)."""
    inputs, middle = control["input"], control["middle"]
    slots = [inputs[len(inputs) - 1 - i] for i in range(n - 1)]
    slots.append(middle[-1] if middle else None)
    return slots


def comfy_features(
    wrapper: comfy.controlnet.T2IAdapter, hint: torch.Tensor, n: int
) -> list[torch.Tensor | None]:
    """Run ComfyUI's own hint preparation (``get_control``) for a latent of hint size / 8."""
    wrapper.set_cond_hint(hint, strength=1.0)
    b, _, h, w = hint.shape
    x_noisy = torch.zeros(b, 4, h // 8, w // 8)
    with torch.no_grad():
        control = wrapper.get_control(x_noisy, torch.full((b,), 500.0), {}, 1, {})
    return comfy_slots(control, n)


def compare(ours: T2IAdapter, ref: list[torch.Tensor | None], hint: torch.Tensor) -> float:
    with torch.no_grad():
        got = ours.encode_hint(hint)
    assert len(got) == len(ref) == ours.num_residuals
    worst = 0.0
    for i, (a, b) in enumerate(zip(got, ref, strict=True)):
        assert (a is None) == (b is None), f"slot {i}"
        if a is not None:
            assert a.shape == b.shape, (i, a.shape, b.shape)
            worst = max(worst, rel(a, b))
    assert worst <= TOL, worst
    return worst


# Latent sizes: even, odd square (9 -> 5 -> 3 -> 2), odd and non-square (XL crops then).
LATENTS = [(8, 12), (9, 9), (9, 13)]

FULL_CASES = {
    "sd-rgb-k1": dict(cin=192, ksize=1, use_conv=False, xl=False),
    "sd-gray-k1": dict(cin=64, ksize=1, use_conv=False, xl=False),
    "sd-rgb-k3-conv": dict(cin=192, ksize=3, use_conv=True, xl=False),
    "xl-rgb": dict(cin=768, ksize=1, use_conv=False, xl=True),
    "xl-gray": dict(cin=256, ksize=1, use_conv=False, xl=True),
}


@pytest.mark.parametrize("case", list(FULL_CASES))
def test_full_adapter_matches_comfy(case: str) -> None:
    kw = FULL_CASES[case]
    sd = random_state_dict(comfy_adapter(False, channels=SMALL, nums_rb=2, **kw))
    assert is_t2i_adapter(sd)
    wrapper = comfy.controlnet.load_t2i_adapter(dict(sd))  # ComfyUI reads cin/ksize/use_conv/xl itself
    wrapper.device = torch.device("cpu")
    ours = load_t2i_adapter(sd, case)
    assert ours.config.xl == kw["xl"] and ours.config.use_conv == kw["use_conv"]
    for i, (lh, lw) in enumerate(LATENTS):
        hint = torch.rand(2, 3, 8 * lh, 8 * lw, generator=torch.Generator().manual_seed(i))
        worst = compare(ours, comfy_features(wrapper, hint, ours.num_residuals), hint)
        print(f"{case} latent {lh}x{lw}: max rel err {worst:.2e}")


@pytest.mark.parametrize("cin", [64, 192])
def test_light_adapter_matches_comfy(cin: int) -> None:
    # ComfyUI's loader hard-codes the published widths (320..1280) for light adapters, so the small one is wrapped
    # directly, as load_t2i_adapter does after building it.
    sd = random_state_dict(comfy_adapter(True, channels=SMALL, nums_rb=2, cin=cin))
    model = Adapter_light(channels=SMALL, nums_rb=2, cin=cin)
    model.load_state_dict(sd, strict=True)
    wrapper = comfy.controlnet.T2IAdapter(model, model.input_channels, 8, "nearest-exact", device="cpu")
    ours = load_t2i_adapter(sd, f"light{cin}")
    assert ours.config.light and ours.config.nums_rb == 2
    for i, (lh, lw) in enumerate(LATENTS):
        hint = torch.rand(1, 3, 8 * lh, 8 * lw, generator=torch.Generator().manual_seed(10 + i))
        worst = compare(ours, comfy_features(wrapper, hint, ours.num_residuals), hint)
        print(f"light cin {cin} latent {lh}x{lw}: max rel err {worst:.2e}")


@pytest.mark.parametrize("kind", ["full_adapter", "full_adapter_xl"])
def test_diffusers_layout_is_renamed_like_comfy(kind: str) -> None:
    """The same diffusers-layout file through ComfyUI's loader (its prefix renaming) and ours."""
    from diffusers.models.adapter import T2IAdapter as DiffusersT2IAdapter

    with torch.device("meta"):
        ref = DiffusersT2IAdapter(3, SMALL, 2, 16 if kind.endswith("xl") else 8, kind)
    sd = random_state_dict(ref, seed=3)
    wrapper = comfy.controlnet.load_t2i_adapter(dict(sd))
    wrapper.device = torch.device("cpu")
    ours = load_t2i_adapter({"adapter": sd}, kind)  # the TencentARC wrapper dict around it, too
    hint = torch.rand(1, 3, 72, 104, generator=torch.Generator().manual_seed(5))
    print(
        f"diffusers {kind}: max rel err {compare(ours, comfy_features(wrapper, hint, ours.num_residuals), hint):.2e}"
    )


FULL_SIZE = {
    "sd15 full (1ch)": (False, dict(channels=FULL, nums_rb=2, cin=64, ksize=1, use_conv=False, xl=False)),
    "sd15 full (3ch, conv down, k3)": (
        False,
        dict(channels=FULL, nums_rb=2, cin=192, ksize=3, use_conv=True, xl=False),
    ),
    "sdxl full (3ch)": (False, dict(channels=FULL, nums_rb=2, cin=768, ksize=1, use_conv=False, xl=True)),
    "sdxl full (1ch)": (False, dict(channels=FULL, nums_rb=2, cin=256, ksize=1, use_conv=False, xl=True)),
    "light (3ch)": (True, dict(channels=FULL, nums_rb=4, cin=192)),
    "light (1ch)": (True, dict(channels=FULL, nums_rb=4, cin=64)),
}


@pytest.mark.parametrize("case", list(FULL_SIZE))
def test_full_size_key_and_shape_set_matches_comfy(case: str) -> None:
    light, kw = FULL_SIZE[case]
    ref = comfy_adapter(light, **kw).state_dict()
    ours = load_t2i_adapter(ref, case, device="meta")  # meta tensors in, meta module out
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in ref.items()
    }
    assert ours.unshuffle_amount == (16 if kw.get("xl") else 8)
    assert ours.config.input_channels == kw["cin"] // ours.unshuffle_amount**2
