"""Through a real ComfyUI server: ControlStack equals the built-in ControlNet, cold start, and bad input.

Every graph is fp32 on the CPU at 64x64 pixels (8x8 latent). Weights are seeded random (zero convs too), so a
ControlNet that did nothing, or did something else than the built-in, fails these tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from graphs import (
    add_builtin,
    add_controlstack,
    base_graph,
    difference_file,
    rel_err,
    run_latent,
    set_sampler,
)
from host import PromptFailed, PromptRejected
from PIL import Image
from safetensors.torch import load_file, save_file

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture(scope="module")
def files(comfy_server, host_models):
    """Hint images in BASE/input and extra ControlNet files in BASE/models/controlnet, made for these tests."""
    base = Path(comfy_server.base_dir)
    rng = np.random.default_rng(0)
    inputs = base / "input"
    for name in ("cs_hint_a.png", "cs_hint_b.png"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(inputs / name)
    Image.fromarray(rng.integers(0, 256, (60, 100, 3), dtype=np.uint8)).save(inputs / "cs_hint_odd.png")
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), mode="L").save(
        inputs / "cs_hint_gray.png"
    )

    cn_dir = base / "models" / "controlnet"
    canny = load_file(str(host_models["canny"]))
    zero = {
        k: torch.zeros_like(v) if ("zero_convs" in k or "middle_block_out" in k) else v
        for k, v in canny.items()
    }
    save_file(zero, str(cn_dir / "cs_test_zero_convs.safetensors"))
    save_file(
        {"foo.weight": torch.zeros(3, 3), "bar.bias": torch.zeros(3)},
        str(cn_dir / "cs_test_unknown.safetensors"),
    )
    raw = host_models["canny"].read_bytes()
    (cn_dir / "cs_test_truncated.safetensors").write_bytes(raw[: len(raw) // 3])
    sd21 = cn_dir / "cs_test_random_sd21.safetensors"
    if not sd21.is_file():
        g = torch.Generator().manual_seed(21)
        tensors = {}
        for line in (FIXTURES / "controlnet_sd21_ldm_keys.tsv").read_text().splitlines():
            key, shape = line.split("\t")
            dims = tuple(int(d) for d in shape.strip("()").split(",") if d.strip())
            tensors[key] = (torch.randn(dims, generator=g) * 0.02).half()
        save_file(tensors, str(sd21))
    return {"a": "cs_hint_a.png", "b": "cs_hint_b.png"}


@pytest.fixture(scope="module")
def unpatched(comfy_server, files):
    return run_latent(comfy_server, base_graph(files["a"]))


def _ours(files, **kw):
    g = base_graph(files["a"])
    model = add_controlstack(g, "7", "controlstack_random_sd15_canny.safetensors", ["6", 0], ["1", 0], **kw)
    return set_sampler(g, model=model)


def test_one_controlnet_equals_builtin(comfy_server, files, unpatched):
    g = base_graph(files["a"])
    cond = add_builtin(g, "7", "controlstack_random_sd15_canny.safetensors", ["6", 0], (["2", 0], ["3", 0]))
    builtin = run_latent(comfy_server, set_sampler(g, cond=cond))
    ours = run_latent(comfy_server, _ours(files))
    assert rel_err(builtin, unpatched) > 1e-3, (
        "the ControlNet must change the result for this test to mean anything"
    )
    err = rel_err(ours, builtin)
    print(f"parity 1 ControlNet: relative error {err:.3e}")
    assert err <= 1e-4


def test_two_stacked_windows_equal_builtin(comfy_server, files, unpatched):
    g = base_graph(files["a"], steps=5)
    cond = add_builtin(
        g, "7", "controlstack_random_sd15_canny.safetensors", ["6", 0], (["2", 0], ["3", 0]), end_percent=0.6
    )
    g["16"] = {"class_type": "LoadImage", "inputs": {"image": files["b"]}}
    cond = add_builtin(
        g, "8", "controlstack_random_sd15_depth.safetensors", ["16", 0], cond, start_percent=0.3
    )
    builtin = run_latent(comfy_server, set_sampler(g, cond=cond))

    g = base_graph(files["a"], steps=5)
    model = add_controlstack(
        g, "7", "controlstack_random_sd15_canny.safetensors", ["6", 0], ["1", 0], end_percent=0.6
    )
    g["16"] = {"class_type": "LoadImage", "inputs": {"image": files["b"]}}
    model = add_controlstack(
        g, "8", "controlstack_random_sd15_depth.safetensors", ["16", 0], model, start_percent=0.3
    )
    ours = run_latent(comfy_server, set_sampler(g, model=model))

    only_first = _ours(files, end_percent=0.6)
    only_first["4"]["inputs"], only_first["10"]["inputs"]["steps"] = dict(g["4"]["inputs"]), 5
    assert rel_err(ours, run_latent(comfy_server, only_first)) > 1e-3, "the second ControlNet must matter"
    err = rel_err(ours, builtin)
    print(f"parity 2 stacked ControlNets, windows 0-0.6 / 0.3-1.0: relative error {err:.3e}")
    assert err <= 1e-4


def test_zero_conv_cold_start_is_exact(comfy_server, files, unpatched):
    g = base_graph(files["a"])
    model = add_controlstack(g, "7", "cs_test_zero_convs.safetensors", ["6", 0], ["1", 0])
    assert torch.equal(run_latent(comfy_server, set_sampler(g, model=model)), unpatched)


def test_strength_zero_is_exactly_unpatched(comfy_server, files, unpatched):
    assert torch.equal(run_latent(comfy_server, _ours(files, strength=0.0)), unpatched)


def _server_still_serves(server, files, seed):
    """The next prompt on the same server succeeds (a new seed, so ComfyUI's cache cannot answer it)."""
    latent = run_latent(server, base_graph(files["a"], steps=1, seed=seed))
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()


@pytest.mark.parametrize(
    ("cn_file", "error", "message"),
    [
        ("cs_test_missing.safetensors", PromptRejected, "control_net_name"),
        ("cs_test_unknown.safetensors", PromptFailed, "cs_test_unknown.safetensors"),
        ("cs_test_truncated.safetensors", PromptFailed, "cs_test_truncated.safetensors"),
        ("cs_test_random_sd21.safetensors", PromptFailed, "SD2.x ControlNet, but the model is SD1.x"),
    ],
)
def test_bad_controlnet_files_fail_clearly(comfy_server, files, cn_file, error, message):
    g = base_graph(files["a"])
    model = add_controlstack(g, "7", cn_file, ["6", 0], ["1", 0])
    with pytest.raises(error, match=message) as info:
        run_latent(comfy_server, set_sampler(g, model=model))
    print(f"{cn_file}: {str(info.value).splitlines()[0]}")
    _server_still_serves(comfy_server, files, seed=hash(cn_file) % 1000)


def test_hint_batch_mismatch_fails_clearly(comfy_server, files):
    g = base_graph(files["a"], batch=3)
    g["16"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["6", 0], "amount": 2}}
    model = add_controlstack(g, "7", "controlstack_random_sd15_canny.safetensors", ["16", 0], ["1", 0])
    with pytest.raises(PromptFailed, match="batch of 2 does not fit 3 latent"):
        run_latent(comfy_server, set_sampler(g, model=model))
    _server_still_serves(comfy_server, files, seed=101)


def test_one_hint_per_latent_equals_shared_hint(comfy_server, files):
    g = base_graph(files["a"], batch=2)
    g["16"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["6", 0], "amount": 2}}
    model = add_controlstack(g, "7", "controlstack_random_sd15_canny.safetensors", ["16", 0], ["1", 0])
    per_latent = run_latent(comfy_server, set_sampler(g, model=model))
    g = base_graph(files["a"], batch=2)
    model = add_controlstack(g, "7", "controlstack_random_sd15_canny.safetensors", ["6", 0], ["1", 0])
    shared = run_latent(comfy_server, set_sampler(g, model=model))
    assert per_latent.shape == (2, 4, 8, 8)
    assert rel_err(per_latent, shared) < 1e-5  # same numbers up to fp32 rounding (other conv layouts)


@pytest.mark.parametrize("variant", ["odd size 100x60", "grayscale", "rgba"])
def test_odd_grayscale_and_rgba_hints_work(comfy_server, files, unpatched, variant):
    """Documented: any hint size is fitted by the resize mode; grayscale is repeated to RGB; RGBA is composited
    onto black (transparent = no control)."""
    g = base_graph(files["a"])
    image = ["6", 0]
    if variant == "odd size 100x60":
        g["6"]["inputs"]["image"] = "cs_hint_odd.png"
    elif variant == "grayscale":
        g["6"]["inputs"]["image"] = "cs_hint_gray.png"
    else:
        g["16"] = {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 64, "height": 64}}
        g["17"] = {"class_type": "JoinImageWithAlpha", "inputs": {"image": ["6", 0], "alpha": ["16", 0]}}
        image = ["17", 0]
    model = add_controlstack(g, "7", "controlstack_random_sd15_canny.safetensors", image, ["1", 0])
    latent = run_latent(comfy_server, set_sampler(g, model=model))
    assert torch.isfinite(latent).all()
    assert rel_err(latent, unpatched) > 1e-3


def test_difference_controlnet_needs_and_uses_the_base_model(comfy_server, files, host_models):
    """A "difference" file (ControlNet - base UNet) loaded with the base MODEL connected equals the full file."""
    difference_file(comfy_server, host_models)
    g = base_graph(files["a"])
    model = add_controlstack(g, "7", "cs_test_difference.safetensors", ["6", 0], ["1", 0])
    with pytest.raises(PromptFailed, match="difference"):
        run_latent(comfy_server, set_sampler(g, model=model))
    g["7L"]["inputs"]["model"] = ["1", 0]
    from_difference = run_latent(comfy_server, set_sampler(g, model=model))
    assert rel_err(from_difference, run_latent(comfy_server, _ours(files))) <= 1e-5
