"""Build seeded random files of the other control kinds (T2I-Adapter, Control-LoRA, Union, LLLite): test fixtures.

Run by ``scripts/host.py control-files`` with the host's python and ``--comfy-dir`` pointing at a ComfyUI checkout.
Every file is in the layout its publishers release it in, and its key/shape set comes from the reference class
instantiated on the ``meta`` device (ComfyUI's, diffusers', or kohya's constructor), never from a typed list:

SD1.5 (``--family sd15``), into ``MODELS/controlnet/``:

- ``controlstack_random_sd15_t2i_depth``: TencentARC ``Adapter`` (3-channel hint, ``ksize=1``), bare keys.
- ``controlstack_random_sd15_t2i_sketch_light``: TencentARC ``Adapter_light`` (1-channel hint), bare keys.

SDXL (``--family sdxl``), into ``MODELS/controlnet/``:

- ``controlstack_random_sdxl_t2i_canny_diffusers``: diffusers ``T2IAdapter`` ``full_adapter_xl`` state dict.
- ``controlstack_random_sdxl_control_lora_rank8``: Stability Control-LoRA: the ``lora_controlnet`` marker,
  ``<layer>.up`` / ``<layer>.down`` (rank 8) for every Linear/Conv2d of the SDXL UNet encoder, full norms and
  biases, full ``input_hint_block`` / ``zero_convs`` / ``middle_block_out``.
- ``controlstack_random_sdxl_union_promax``: diffusers ``ControlNetUnionModel`` (8 control types), reduced to the
  smallest SDXL layout ComfyUI's diffusers detection accepts (its ``SDXL_small_cnet``: no transformer blocks).
- ``controlstack_random_sdxl_lllite``: kohya ControlNet-LLLite (cond_emb_dim 32, mlp_dim 64) on attn1 q/k/v and
  attn2 q of every transformer block of the SDXL encoder and middle block.

Values and file format are those of ``make_random_models.py`` (``random_tensor``: every tensor non-zero, seeded per
tensor; fp16 safetensors with the ``controlstack_random`` / ``seed`` / ``kind`` header), so a second run skips what
is already there. ``--check`` loads every file ComfyUI has a loader for with ``comfy.controlnet.load_controlnet``
and exits non-zero unless ComfyUI detects the expected kind with no missing or leftover keys.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import make_random_models as mrm
import torch
from host import CONTROL_FILES
from safetensors.torch import save_file

REPO = mrm.REPO
META = torch.device("meta")
SD15_HINT_CHANNELS_DEPTH = 3
SD15_HINT_CHANNELS_SKETCH = 1
PIXEL_UNSHUFFLE_SD = 8  # TencentARC's SD1.x adapters pixel-unshuffle the hint by 8: cin = channels * 64
T2I_CHANNELS = [320, 640, 1280, 1280]
CONTROL_LORA_RANK = 8
CONTROL_LORA_UP_SCALE = 0.1
"""``up`` and ``down`` from ``random_tensor`` multiply to a delta as large as the base weight (std 1/sqrt(fan_in)
each); scaling ``up`` by 0.1 keeps the merged weight within ~10 % of the base, so merged layers stay well-conditioned
while the delta is still far above fp16 noise."""
UNION_NUM_CONTROL_TYPE = 8  # xinsir's promax release (the first release had 6)
UNION_HINT_WIDTHS = (16, 32, 96, 256)
"""``conditioning_embedding_out_channels`` of xinsir's controlnet-union-sdxl-1.0 promax config.json (as copied into
public code; the same widths as ComfyUI's ``input_hint_block`` 16/32/96/256, unlike diffusers' 48/96/192/384
default)."""
LLLITE_COND_EMB_DIM = 32
LLLITE_MLP_DIM = 64
LLLITE_EXPECTED_DEPTHS = {
    "input_blocks_4": 2,
    "input_blocks_5": 2,
    "input_blocks_7": 10,
    "input_blocks_8": 10,
    "middle_block": 10,
}
"""Transformer depth of each SDXL block LLLite attaches to; asserted against ComfyUI's UNetModel on ``meta``."""

FILES = CONTROL_FILES  # family -> file name -> seed; its one home is scripts/host_models.py

Shapes = dict[str, tuple[int, ...]]


def _state_shapes(module: torch.nn.Module, prefix: str = "") -> Shapes:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------- T2I-Adapter


def t2i_sd15_shapes(comfy_dir: Path, light: bool) -> Shapes:
    """TencentARC SD1.x adapter keys (no prefix), from ComfyUI's ``comfy.t2i_adapter.adapter`` classes: the full
    ``Adapter`` as TencentARC trains its depth/sketch adapters (``ksize=1, sk=True, use_conv=False``), or
    ``Adapter_light`` (``nums_rb=4``) — the configurations ComfyUI's ``load_t2i_adapter`` rebuilds from a file."""
    mrm._import_comfy(comfy_dir)
    from comfy.t2i_adapter.adapter import Adapter, Adapter_light

    with torch.device(META):
        if light:
            cin = SD15_HINT_CHANNELS_SKETCH * PIXEL_UNSHUFFLE_SD**2
            model: torch.nn.Module = Adapter_light(cin=cin, channels=T2I_CHANNELS, nums_rb=4)
        else:
            cin = SD15_HINT_CHANNELS_DEPTH * PIXEL_UNSHUFFLE_SD**2
            model = Adapter(cin=cin, channels=T2I_CHANNELS, nums_rb=2, ksize=1, sk=True, use_conv=False)
    return _state_shapes(model)


def t2i_sdxl_diffusers_shapes() -> Shapes:
    """diffusers ``T2IAdapter`` (``full_adapter_xl``) state dict keys, as ``save_pretrained`` writes them."""
    from diffusers import T2IAdapter

    with torch.device(META):
        model = T2IAdapter(
            in_channels=3,
            channels=T2I_CHANNELS,
            num_res_blocks=2,
            downscale_factor=16,
            adapter_type="full_adapter_xl",
        )
    return _state_shapes(model)


# ------------------------------------------------------------------------------------------------ Control-LoRA


def _sdxl_unet_config() -> dict[str, Any]:
    sys.path.insert(0, str(REPO / "bench"))
    from bench_controlnet import SDXL_UNET

    return dict(SDXL_UNET)


ENCODER_PREFIXES = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
CONTROL_ONLY_PREFIXES = ("input_hint_block.", "zero_convs.", "middle_block_out.")


def _sdxl_cldm_controlnet(comfy_dir: Path, operations: Any) -> torch.nn.Module:
    """ComfyUI's ``comfy.cldm.cldm.ControlNet`` in the SDXL configuration with a 3-channel hint, on ``meta``."""
    mrm._import_comfy(comfy_dir)
    import comfy.cldm.cldm

    config = _sdxl_unet_config()
    config.pop("out_channels")
    with torch.device(META):
        return comfy.cldm.cldm.ControlNet(
            **config, hint_channels=3, dtype=torch.float16, device=META, operations=operations
        )


def control_lora_shapes(comfy_dir: Path, rank: int = CONTROL_LORA_RANK) -> Shapes:
    """Control-LoRA keys: for every Linear/Conv2d of the SDXL UNet encoder (ComfyUI's ``UNetModel`` on ``meta``)
    ``<name>.up`` [out, r(, 1, 1)] and ``<name>.down`` [r, in(, kh, kw)] plus its full bias; every other encoder
    tensor (norms) in full; the control-only parts (hint block, zero convs, middle-block-out) of ComfyUI's SDXL
    ``ControlNet`` in full; and the ``lora_controlnet`` marker ComfyUI detects the kind by."""
    mrm._import_comfy(comfy_dir)
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    ops = comfy.ops.disable_weight_init
    with torch.device(META):
        unet = UNetModel(**_sdxl_unet_config(), dtype=torch.float16, device=META, operations=ops)
    shapes: Shapes = {"lora_controlnet": ()}
    covered: set[str] = set()
    for name, module in unet.named_modules():
        if not (name + ".").startswith(ENCODER_PREFIXES):
            continue
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            out_dim, *rest = module.weight.shape
            shapes[f"{name}.up"] = (out_dim, rank, *([1] * (len(rest) - 1)))
            shapes[f"{name}.down"] = (rank, *rest)
            covered.add(f"{name}.weight")
    for key, value in unet.state_dict().items():
        if key.startswith(ENCODER_PREFIXES) and key not in covered:
            shapes[key] = tuple(value.shape)  # biases of the LoRA'd layers, GroupNorm / LayerNorm weights
    del unet
    control = _sdxl_cldm_controlnet(comfy_dir, ops)
    control_sd = control.state_dict()
    encoder_keys = {k for k in control_sd if k.startswith(ENCODER_PREFIXES)}
    missing = encoder_keys - covered - set(shapes)
    if missing:  # ComfyUI's ControlNet encoder must be the UNet encoder, tensor for tensor
        raise SystemExit(f"ControlNet encoder keys not in the UNet encoder: {sorted(missing)[:5]}")
    for key, value in control_sd.items():
        if key.startswith(CONTROL_ONLY_PREFIXES):
            shapes[key] = tuple(value.shape)
    return shapes


def control_lora_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """``random_tensor``, with ``.up`` scaled so that up @ down is a small delta (see CONTROL_LORA_UP_SCALE)."""
    t = mrm.random_tensor(name, shape, seed)
    if name.endswith(".up"):
        t = (t.float() * CONTROL_LORA_UP_SCALE).to(torch.float16)
    return t


# ------------------------------------------------------------------------------------------------------- Union


def union_shapes(full_size: bool = False) -> Shapes:
    """diffusers ``ControlNetUnionModel`` keys (``save_pretrained`` layout) for xinsir's promax release reduced to
    ComfyUI's ``SDXL_small_cnet``: the three SDXL down blocks as plain ``DownBlock2D`` and a middle block whose
    attention has no transformer block (norm / proj_in / proj_out only). ComfyUI's
    ``unet_config_from_diffusers_unet`` then sees transformer depth [0]*6 (only ``SDXL_small_cnet`` matches),
    and its ControlNet built from that config wants exactly these tensors. Everything that is not the UNet copy
    (hint embedding, task embedding, transformer, projections, control-type embedding) has xinsir's sizes.
    ``full_size``: xinsir's release at full SDXL size (the benchmark's)."""
    from diffusers import ControlNetUnionModel

    down = (
        ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D") if full_size else ("DownBlock2D",) * 3
    )
    with torch.device(META):
        model = ControlNetUnionModel(
            down_block_types=down,
            block_out_channels=(320, 640, 1280),
            transformer_layers_per_block=(0, 2, 10) if full_size else (0, 0, 0),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
            conditioning_embedding_out_channels=UNION_HINT_WIDTHS,
            num_control_type=UNION_NUM_CONTROL_TYPE,
        )
    return _state_shapes(model)


# ------------------------------------------------------------------------------------------------------ LLLite


class LLLiteModuleShell(torch.nn.Module):
    """The layers of kohya-ss/sd-scripts ``networks/control_net_lllite.py`` ``LLLiteModule.__init__`` for a Linear
    (commit 48d368fa, 2026-02-16): ``conditioning1`` is Conv(3, c/2, 4, s4) then per depth 1: ReLU, Conv(c/2, c, 2,
    s2); 2: ReLU, Conv(c/2, c, 4, s4); 3: ReLU, Conv(c/2, c/2, 4, s4), ReLU, Conv(c/2, c, 2, s2); ``down`` =
    Linear(in, mlp) + ReLU, ``mid`` = Linear(mlp + c, mlp) + ReLU, ``up`` = Linear(mlp, in). sd-scripts is not a
    dependency, so the constructor is mirrored here; the Sequential indices give the saved key names."""

    def __init__(self, depth: int, cond_emb_dim: int, in_dim: int, mlp_dim: int):
        super().__init__()
        half = cond_emb_dim // 2
        layers: list[torch.nn.Module] = [torch.nn.Conv2d(3, half, kernel_size=4, stride=4, padding=0)]
        if depth == 1:
            layers += [
                torch.nn.ReLU(inplace=True),
                torch.nn.Conv2d(half, cond_emb_dim, kernel_size=2, stride=2),
            ]
        elif depth == 2:
            layers += [
                torch.nn.ReLU(inplace=True),
                torch.nn.Conv2d(half, cond_emb_dim, kernel_size=4, stride=4),
            ]
        elif depth == 3:
            layers += [
                torch.nn.ReLU(inplace=True),
                torch.nn.Conv2d(half, half, kernel_size=4, stride=4),
                torch.nn.ReLU(inplace=True),
                torch.nn.Conv2d(half, cond_emb_dim, kernel_size=2, stride=2),
            ]
        else:
            raise ValueError(f"LLLite depth must be 1..3, got {depth}")
        self.conditioning1 = torch.nn.Sequential(*layers)
        self.down = torch.nn.Sequential(torch.nn.Linear(in_dim, mlp_dim), torch.nn.ReLU(inplace=True))
        self.mid = torch.nn.Sequential(
            torch.nn.Linear(mlp_dim + cond_emb_dim, mlp_dim), torch.nn.ReLU(inplace=True)
        )
        self.up = torch.nn.Sequential(torch.nn.Linear(mlp_dim, in_dim))


def lllite_depth(block_name: str, index: int) -> int:
    """kohya's ``create_modules`` rule: the conditioning depth follows the UNet resolution of the block."""
    if block_name == "input_blocks":
        return 1 if index <= 2 else (2 if index <= 5 else 3)
    if block_name == "middle_block":
        return 3
    raise ValueError(f"LLLite is not applied to {block_name} (kohya's SKIP_OUTPUT_BLOCKS)")


def lllite_targets(comfy_dir: Path) -> list[tuple[str, int, int]]:
    """(LLLite module name, depth, in_dim) for kohya's default flags (TRANSFORMER_ONLY, ATTN1_2_ONLY,
    ATTN_QKV_ONLY, SKIP_OUTPUT_BLOCKS): attn1 to_q/k/v and attn2 to_q of every transformer block in the SDXL
    encoder and middle block, walked in ComfyUI's ``UNetModel`` on ``meta`` (same module paths as kohya's
    ``sdxl_original_unet``)."""
    mrm._import_comfy(comfy_dir)
    import comfy.ops
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    with torch.device(META):
        unet = UNetModel(
            **_sdxl_unet_config(), dtype=torch.float16, device=META, operations=comfy.ops.disable_weight_init
        )
    targets: list[tuple[str, int, int]] = []
    depths: dict[str, int] = {}
    for name, module in unet.named_modules():
        if not isinstance(module, SpatialTransformer) or name.startswith("output_blocks"):
            continue
        block_name, index = name.split(".")[:2]
        depths[f"{block_name}_{index}" if block_name == "input_blocks" else block_name] = len(
            module.transformer_blocks
        )
        for i, block in enumerate(module.transformer_blocks):
            for attn, proj in (("attn1", "to_q"), ("attn1", "to_k"), ("attn1", "to_v"), ("attn2", "to_q")):
                linear = getattr(getattr(block, attn), proj)
                lllite_name = f"lllite_unet.{name}.transformer_blocks.{i}.{attn}.{proj}".replace(".", "_")
                targets.append((lllite_name, lllite_depth(block_name, int(index)), linear.in_features))
    if depths != LLLITE_EXPECTED_DEPTHS:
        raise SystemExit(f"SDXL transformer depths {depths} differ from {LLLITE_EXPECTED_DEPTHS}")
    return targets


def lllite_shapes(comfy_dir: Path) -> Shapes:
    """kohya ControlNet-LLLite state dict keys (``<module>.conditioning1.N`` / ``down.0`` / ``mid.0`` / ``up.0``)."""
    shapes: Shapes = {}
    shells: dict[tuple[int, int], Shapes] = {}
    for name, depth, in_dim in lllite_targets(comfy_dir):
        if (depth, in_dim) not in shells:
            with torch.device(META):
                shell = LLLiteModuleShell(depth, LLLITE_COND_EMB_DIM, in_dim, LLLITE_MLP_DIM)
            shells[(depth, in_dim)] = _state_shapes(shell)
        shapes.update({f"{name}.{k}": v for k, v in shells[(depth, in_dim)].items()})
    return shapes


# ------------------------------------------------------------------------------------------------------- write


def write_tensors(
    path: Path,
    shapes: Shapes,
    seed: int,
    kind: str,
    make: Callable[[str, tuple[int, ...], int], torch.Tensor],
) -> bool:
    """``make_random_models.write_random`` with a custom per-tensor maker (for the Control-LoRA's scaled ``up``):
    same header, same write-then-rename, same skip when ``already_built``."""
    if mrm.already_built(path, seed):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: make(name, shape, seed) for name, shape in sorted(shapes.items())}
    tmp = path.with_name(path.name + ".partial")
    meta = {"controlstack_random": mrm.FORMAT_VERSION, "seed": str(seed), "kind": kind}
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return True


def builders(comfy_dir: Path, family: str) -> dict[str, tuple[str, Callable[[], Shapes], Callable[..., Any]]]:
    """file name -> (kind, shapes function, tensor maker). Shapes are only computed for files being built."""
    if family == "sd15":
        return {
            "controlstack_random_sd15_t2i_depth.safetensors": (
                "sd15-t2i-adapter",
                lambda: t2i_sd15_shapes(comfy_dir, light=False),
                mrm.random_tensor,
            ),
            "controlstack_random_sd15_t2i_sketch_light.safetensors": (
                "sd15-t2i-adapter-light",
                lambda: t2i_sd15_shapes(comfy_dir, light=True),
                mrm.random_tensor,
            ),
        }
    return {
        "controlstack_random_sdxl_t2i_canny_diffusers.safetensors": (
            "sdxl-t2i-adapter-diffusers",
            t2i_sdxl_diffusers_shapes,
            mrm.random_tensor,
        ),
        "controlstack_random_sdxl_control_lora_rank8.safetensors": (
            "sdxl-control-lora",
            lambda: control_lora_shapes(comfy_dir),
            control_lora_tensor,
        ),
        "controlstack_random_sdxl_union_promax.safetensors": (
            "sdxl-controlnet-union",
            union_shapes,
            mrm.random_tensor,
        ),
        "controlstack_random_sdxl_lllite.safetensors": (
            "sdxl-controlnet-lllite",
            lambda: lllite_shapes(comfy_dir),
            mrm.random_tensor,
        ),
    }


# ------------------------------------------------------------------------------------------------------- check


class _Warnings(logging.Handler):
    """Collects the warnings ComfyUI's loaders log (missing / leftover / unexpected keys) while a file loads."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _load_in_comfy(path: Path) -> tuple[Any, list[str]]:
    import comfy.controlnet

    handler = _Warnings()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        control = comfy.controlnet.load_controlnet(str(path))
    finally:
        root.removeHandler(handler)
    return control, handler.messages


def _fail(path: Path, why: str) -> None:
    raise SystemExit(f"--check: {path.name}: {why}")


def check_control_lora_structure(comfy_dir: Path, path: Path) -> int:
    """Replay what ``ControlLora.pre_run`` does with each key, without a base model: every key must resolve as an
    attribute of ComfyUI's SDXL ControlNet built with ``ControlLoraOps`` (where ``set_attr_param`` puts it),
    ``up``/``down`` only on ControlLoraOps Linear/Conv2d with ``up @ down`` the layer's weight shape, full tensors
    with the ControlNet's shapes, and every ControlNet tensor present (directly, through up/down, or taken from
    the base UNet's encoder). Returns the number of LoRA'd layers."""
    from safetensors import safe_open

    mrm._import_comfy(comfy_dir)
    import comfy.controlnet
    import comfy.ops

    class ControlLoraOps(comfy.controlnet.ControlLoraOps, comfy.ops.disable_weight_init):
        pass

    lora_net = _sdxl_cldm_controlnet(comfy_dir, ControlLoraOps)
    plain_shapes = _state_shapes(_sdxl_cldm_controlnet(comfy_dir, comfy.ops.disable_weight_init))
    with safe_open(str(path), framework="pt") as f:
        file_shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    lora_layers = 0
    for key, shape in file_shapes.items():
        if key == "lora_controlnet":
            continue
        owner_name, attr = key.rsplit(".", 1)
        owner = lora_net.get_submodule(owner_name)
        if not hasattr(owner, attr):
            _fail(path, f"{key}: ComfyUI's ControlNet has no attribute {attr!r} on {owner_name}")
        if attr in ("up", "down"):
            if not isinstance(owner, (ControlLoraOps.Linear, ControlLoraOps.Conv2d)):
                _fail(path, f"{key}: {owner_name} is a {type(owner).__name__}, not a ControlLoraOps layer")
            weight = plain_shapes[owner_name + ".weight"]
            up, down = file_shapes[owner_name + ".up"], file_shapes[owner_name + ".down"]
            if up[0] != weight[0] or math.prod(down[1:]) != math.prod(weight[1:]) or up[1] != down[0]:
                _fail(path, f"{owner_name}: up {up} @ down {down} does not make weight {weight}")
            lora_layers += attr == "up"
        elif plain_shapes.get(key) != shape:
            _fail(path, f"{key}: shape {shape}, ComfyUI's ControlNet has {plain_shapes.get(key)}")
    for key in plain_shapes:
        from_lora = key.endswith(".weight") and key[: -len(".weight")] + ".up" in file_shapes
        from_unet = key.startswith(ENCODER_PREFIXES)
        if key not in file_shapes and not from_lora and not from_unet:
            _fail(path, f"ComfyUI's ControlNet needs {key}, which neither the file nor the UNet provides")
    return lora_layers


def check(comfy_dir: Path, models_dir: Path, family: str) -> dict[str, str]:
    """Load each file with ComfyUI's own loader; exit non-zero unless it is detected as the expected kind."""
    mrm._import_comfy(comfy_dir)
    import comfy.controlnet

    out: dict[str, str] = {}
    for name in FILES[family]:
        path = models_dir / "controlnet" / name
        if "lllite" in name:
            out[name] = "not checked: ComfyUI core has no LLLite loader"
            continue
        control, warnings = _load_in_comfy(path)
        bad = [w for w in warnings if any(s in w for s in ("missing", "leftover", "could not detect"))]
        if bad:
            _fail(path, f"ComfyUI warned while loading: {bad[0][:500]}")
        if "_t2i_" in name:
            want_model = "Adapter_light" if "light" in name else "Adapter"
            want_channels = 1 if "sketch" in name else 3
            if not isinstance(control, comfy.controlnet.T2IAdapter):
                _fail(path, f"detected {type(control).__name__}, expected T2IAdapter")
            got_model = type(control.t2i_model).__name__
            if got_model != want_model or control.channels_in != want_channels:
                _fail(
                    path,
                    f"T2IAdapter({got_model}, {control.channels_in} ch), want {want_model}, {want_channels}",
                )
            xl = bool(getattr(control.t2i_model, "xl", False))
            if xl != (family == "sdxl"):
                _fail(path, f"ComfyUI's adapter xl={xl}")
            out[name] = f"T2IAdapter({got_model}, channels_in={control.channels_in}, xl={xl})"
        elif "control_lora" in name:
            if type(control) is not comfy.controlnet.ControlLora:
                _fail(path, f"detected {type(control).__name__}, expected ControlLora")
            layers = check_control_lora_structure(comfy_dir, path)
            out[name] = f"ControlLora ({layers} LoRA layers resolve in ComfyUI's SDXL ControlNet)"
        elif "union" in name:
            model = getattr(control, "control_model", None)
            types = getattr(model, "num_control_type", None)
            if type(control) is not comfy.controlnet.ControlNet or types != UNION_NUM_CONTROL_TYPE:
                _fail(
                    path, f"detected {type(control).__name__} with union types {types}, want ControlNet / 8"
                )
            out[name] = f"ControlNet(union, num_control_type={types})"
        del control
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--comfy-dir", type=Path, required=True)
    p.add_argument("--models-dir", type=Path, required=True, help="ComfyUI models/ folder to write into")
    p.add_argument("--family", choices=sorted(FILES), required=True)
    p.add_argument("--check", action="store_true", help="load each file with ComfyUI's loader afterwards")
    a = p.parse_args(argv)
    result: dict[str, Any] = {"family": a.family, "built": [], "kept": [], "files": {}}
    t0 = time.perf_counter()
    for name, (kind, shapes_fn, make) in builders(a.comfy_dir, a.family).items():
        seed = FILES[a.family][name]
        path = a.models_dir / "controlnet" / name
        t1 = time.perf_counter()
        if mrm.already_built(path, seed):
            wrote = False
        elif make is mrm.random_tensor:
            wrote = mrm.write_random(path, shapes_fn(), seed, kind)
        else:
            wrote = write_tensors(path, shapes_fn(), seed, kind, make)
        result["built" if wrote else "kept"].append(str(path))
        result["files"][name] = {
            "seed": seed,
            "kind": kind,
            "bytes": path.stat().st_size,
            "build_s": round(time.perf_counter() - t1, 1) if wrote else 0.0,
        }
    result["build_s"] = round(time.perf_counter() - t0, 1)
    if a.check:
        t1 = time.perf_counter()
        result["detected"] = check(a.comfy_dir, a.models_dir, a.family)
        result["check_s"] = round(time.perf_counter() - t1, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
