"""Control modules built from ComfyUI's operation classes (``comfy.ops``), imported (no server).

The patcher builds every control module with the layer classes the host picks for its storage / compute dtypes
(``comfy.ops.pick_operations``, as ComfyUI's built-in ControlNet loader), so the host's per-layer casting, partial
loading and offload cover them. Here each kind is loaded twice from the same random fp16 weights: once with plain
torch layers in fp32 (what ControlStack did before), once stored in fp16 with ``comfy.ops.manual_cast`` computing in
fp32 (the host with ``--fp16-unet`` on a CPU). The outputs must be equal, every conv / linear / norm must be a host
operation, and the weights must stay fp16 (half the memory).
"""

from __future__ import annotations

import sys

import host
import pytest
import torch

sys.path.insert(0, str(host.REPO / "tests" / "unit"))
from cn_helpers import TINY, random_controlnet, random_inputs, randomize_, rel_err  # noqa: E402
from controlstack.controlnet import build_controlnet  # noqa: E402
from controlstack.controlnet.kinds import load_control  # noqa: E402
from controlstack.controlnet.ops import compute_dtype_of  # noqa: E402
from test_lllite import SMALL as LLLITE_SMALL  # noqa: E402
from test_lllite import make_file as lllite_file  # noqa: E402
from test_t2i_adapter import diffusers_adapter  # noqa: E402
from test_union import union_config  # noqa: E402

sys.path.insert(0, str(host.resolve_comfy_dir()))
from comfy.cli_args import args  # noqa: E402

args.cpu = True
import comfy.ops  # noqa: E402

HOST_LAYER = comfy.ops.CastWeightBiasOp


def fp16(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(torch.float16).contiguous() for k, v in sd.items()}


def controlnet_file() -> dict[str, torch.Tensor]:
    return fp16(random_controlnet(TINY["sdxl"], seed=3).state_dict())


def union_file() -> dict[str, torch.Tensor]:
    cn = build_controlnet(union_config(), device="meta")
    cn.to_empty(device="cpu")
    return fp16(randomize_(cn, seed=4).state_dict())


def t2i_file() -> dict[str, torch.Tensor]:
    return fp16(diffusers_adapter("full_adapter", 3).state_dict())


def lllite_state() -> dict[str, torch.Tensor]:
    return fp16(lllite_file(LLLITE_SMALL, seed=5))


def both(sd: dict[str, torch.Tensor], name: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(plain torch, fp32) and (comfy.ops.manual_cast, stored fp16, computing fp32) modules of one file."""
    plain = load_control(dict(sd), dtype=torch.float32, name=name)
    hosted = load_control(dict(sd), dtype=torch.float16, name=name, operations=comfy.ops.manual_cast)
    hosted.compute_dtype = torch.float32
    return plain, hosted


def layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]


def assert_hosted(plain: torch.nn.Module, hosted: torch.nn.Module) -> None:
    not_host = [type(m).__name__ for m in layers(hosted) if not isinstance(m, HOST_LAYER)]
    # Union's task_embedding is a bare parameter on the ControlNet itself, cast where it is used.
    assert set(not_host) <= {"ControlNet"}, not_host
    assert all(p.dtype == torch.float16 for p in hosted.parameters())
    assert compute_dtype_of(hosted) == torch.float32 and compute_dtype_of(plain) == torch.float32
    size = sum(p.numel() * p.element_size() for p in hosted.parameters())
    assert size * 2 == sum(p.numel() * p.element_size() for p in plain.parameters())


@pytest.mark.parametrize("kind", ["controlnet", "union"])
def test_residual_modules_equal_plain_torch(kind: str) -> None:
    sd = controlnet_file() if kind == "controlnet" else union_file()
    plain, hosted = both(sd, f"tiny_{kind}.safetensors")
    assert plain.kind == hosted.kind == kind
    assert_hosted(plain, hosted)
    x, hint, t, ctx, y = random_inputs(plain, batch=2)
    kw = {"control_types": [1]} if kind == "union" else {}
    ref = plain(x, hint, t, ctx, y, **kw)
    got = hosted(x, hint, t, ctx, y, **kw)
    assert all(g.dtype == torch.float32 for g in got)
    errs = [rel_err(g, r) for g, r in zip(got, ref, strict=True)]
    assert max(errs) <= 1e-6, errs
    assert min(r.abs().mean() for r in ref) > 0  # no residual is trivially zero


def test_t2i_adapter_equals_plain_torch() -> None:
    plain, hosted = both(t2i_file(), "tiny_t2i.safetensors")
    assert_hosted(plain, hosted)
    hint = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ref, got = plain.encode_hint(hint), hosted.encode_hint(hint)
    pairs = [(g, r) for g, r in zip(got, ref, strict=True) if r is not None]
    assert pairs and max(rel_err(g, r) for g, r in pairs) <= 1e-6


def test_lllite_equals_plain_torch() -> None:
    plain, hosted = both(lllite_state(), "tiny_lllite.safetensors")
    assert_hosted(plain, hosted)
    hint = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    cond_ref, cond_got = plain.encode_hint(hint), hosted.encode_hint(hint)
    assert max(rel_err(cond_got[k], cond_ref[k]) for k in cond_ref) <= 1e-6
    name = next(iter(cond_ref))
    module = plain[name]
    tokens = cond_ref[name].shape[1]
    x = torch.randn(2, tokens, module.in_dim, generator=torch.Generator().manual_seed(3))
    ref = plain.delta(name, x, cond_ref[name])
    got = hosted.delta(name, x, cond_got[name])
    assert got.dtype == torch.float32 and rel_err(got, ref) <= 1e-6 and ref.abs().mean() > 0


def test_partially_loaded_layers_cast_per_call() -> None:
    """What the host's low-VRAM mode does to layers it does not load: `comfy_cast_weights` on, weights cast to the
    input's device and dtype at each call. Same storage and compute dtype here (disable_weight_init, fp32)."""
    sd = controlnet_file()
    plain = load_control(dict(sd), dtype=torch.float32, name="tiny.safetensors")
    hosted = load_control(
        dict(sd), dtype=torch.float32, name="tiny.safetensors", operations=comfy.ops.disable_weight_init
    )
    for m in layers(hosted):
        m.comfy_cast_weights = True
    x, hint, t, ctx, y = random_inputs(plain, batch=1)
    errs = [rel_err(g, r) for g, r in zip(hosted(x, hint, t, ctx, y), plain(x, hint, t, ctx, y), strict=True)]
    assert max(errs) == 0.0, errs
