"""Which kind of control file a checkpoint is, and loading any of them (see docs/formats.md).

Kinds ControlStack loads (each module follows the control-module protocol of docs/design.md):

- ``controlnet``: classic ControlNets in every layout (ldm, prefixed, diffusers, "difference"), incl. Union / ProMax
  (``task_embedding``; kind ``union``), loaded by :func:`controlnet.loading.load_controlnet`;
- ``control_lora``: Stability's Control-LoRA (``lora_controlnet`` marker): merged with the base UNet once;
- ``t2i_adapter``: TencentARC's T2I-Adapters (full, light, SDXL; ldm or diffusers layout);
- ``lllite``: kohya's ControlNet-LLLite (``lllite_unet_*``).

Files for other model families (Flux, SD3 / 3.5, Qwen-Image, HunyuanDiT ControlNets) and things that are not
control models at all (style adapters, IP-Adapters) are refused with a message naming what the file is.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from .errors import ControlNetError
from .loading import Source, load_controlnet, read_tensors
from .ops import Operations

KINDS = ("controlnet", "union", "control_lora", "t2i_adapter", "lllite")
KIND_NAMES = {
    "controlnet": "ControlNet",
    "union": "ControlNet Union / ProMax",
    "control_lora": "Control-LoRA",
    "t2i_adapter": "T2I-Adapter",
    "lllite": "ControlNet-LLLite",
}
SUPPORTED = "ControlStack supports SD1.x / SD2.x / SDXL control files"

# (keys that must all be present, what the file is); the first match wins. From ComfyUI's own dispatch
# (comfy/controlnet.py load_controlnet_state_dict) and the published files.
_OTHER_FAMILIES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("after_proj_list.18.bias",), "a HunyuanDiT ControlNet"),
    (
        ("controlnet_blocks.0.weight", "double_blocks.0.img_attn.norm.key_norm.scale"),
        "a Flux ControlNet (XLabs)",
    ),
    (
        ("pos_embed_input.proj.weight", "transformer_blocks.0.adaLN_modulation.1.bias"),
        "an SD3.5 ControlNet (Stability)",
    ),
    (("pos_embed_input.proj.weight",), "an SD3 ControlNet"),
    (("transformer_blocks.0.img_mlp.net.0.proj.weight",), "a Qwen-Image ControlNet (InstantX)"),
    (("controlnet_x_embedder.weight",), "a Flux ControlNet (InstantX / Union)"),
    (("control_blocks.0.after_proj.weight", "control_img_in.weight"), "a Qwen-Image Fun ControlNet"),
    (("controlnet_blocks.0.linear.weight",), "a Flux ControlNet (MistoLine)"),
)
_OTHER_PREFIXES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("controlnet_blocks.", "controlnet_single_blocks."), "a DiT ControlNet (SD3 / Flux family)"),
    (("image_proj.", "ip_adapter."), "an IP-Adapter (load it with an IP-Adapter node)"),
    (
        ("style_embedding",),
        "a style model (T2I style adapter / Revision); load it with ComfyUI's Load Style Model",
    ),
    (("lllite_dit_blocks_",), "an Anima (DiT) LLLite"),
)


def detect_kind(keys: Iterable[str], name: str = "state dict") -> str:
    """'controlnet', 'control_lora', 't2i_adapter' or 'lllite' from tensor names; refuses other families clearly.

    Union files are 'controlnet' here (they load through the ControlNet loader; the module's ``kind`` says
    'union').
    """
    ks = set(keys)
    for needed, what in _OTHER_FAMILIES:
        if all(k in ks for k in needed):
            raise ControlNetError(f"{name}: this is {what}; {SUPPORTED}")
    for prefixes, what in _OTHER_PREFIXES:
        if any(k.startswith(prefixes) for k in ks):
            raise ControlNetError(f"{name}: this is {what}; {SUPPORTED}")
    if "lora_controlnet" in ks:
        return "control_lora"
    if any(k.startswith("lllite_unet") for k in ks):
        return "lllite"
    from .t2i_adapter import is_t2i_adapter

    if is_t2i_adapter(ks):
        return "t2i_adapter"
    return "controlnet"


def _all_tensors(source: Source, name: str | None) -> tuple[str, dict[str, torch.Tensor]]:
    t = read_tensors(source, name)
    return t.name, {k: t.get(k) for k in t.shapes}


def _unwrap_adapter(source: Source, name: str | None) -> Source:
    # TencentARC's .pth adapters may be {"adapter": {...}}: a nested dict the flat reader cannot see into.
    if isinstance(source, Mapping) and isinstance(source.get("adapter"), Mapping):
        return source["adapter"]
    return source


def file_kind(source: Source, name: str | None = None) -> str:
    """The kind of a control file, read from its tensor names only (no tensor data is read)."""
    t = read_tensors(_unwrap_adapter(source, name), name)
    return detect_kind(t.shapes, t.name)


def load_control(
    source: Source,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    *,
    base_unet: Source | None = None,
    name: str | None = None,
    operations: Operations | None = None,
) -> torch.nn.Module:
    """Load any supported control file (ControlNet, Union, Control-LoRA, T2I-Adapter, LLLite).

    ``base_unet`` (path or state dict of the base model's UNet, any layout) is needed by "difference" ControlNets and
    Control-LoRAs; both are refused without it. ``operations``: the layer classes every module is built from (plain
    torch by default; a host passes its own so that it can cast, partially load and offload them; see ``ops.py``).
    """
    source = _unwrap_adapter(source, name)
    t = read_tensors(source, name)
    kind = detect_kind(t.shapes, t.name)
    label = name or t.name
    if kind == "controlnet":
        return load_controlnet(source, dtype, device, base_unet=base_unet, name=name, operations=operations)
    tensors = {k: t.get(k) for k in t.shapes}
    if kind == "t2i_adapter":
        from .t2i_adapter import load_t2i_adapter

        return load_t2i_adapter(tensors, label, dtype=dtype, device=device, operations=operations)
    if kind == "lllite":
        from .lllite import load_lllite

        return load_lllite(tensors, label, dtype=dtype, device=device, operations=operations)
    from .control_lora import merge_control_lora

    if base_unet is None:
        raise ControlNetError(
            f"{t.name}: this is a Control-LoRA: its ControlNet is built from the base model's own UNet weights, "
            "so it needs the base model (connect the MODEL input)"
        )
    base = read_tensors(base_unet, "base UNet" if isinstance(base_unet, Mapping) else None)
    base_tensors = {k: base.get(k) for k in base.shapes if not _is_decoder(k)}
    return merge_control_lora(
        tensors, base_tensors, dtype=dtype, device=device, name=label, operations=operations
    )


def _is_decoder(key: str) -> bool:
    # Only the encoder half of a UNet is a ControlNet's; skip reading the decoder's weights.
    return ".output_blocks." in f".{key}" or key.startswith(("out.", "diffusion_model.out."))


def describe_file(source: Source, name: str | None = None) -> dict[str, str]:
    """{"kind", "kind_name", "family"} of a control file from its tensor names and shapes only (no tensor data is
    read): what the frontend shows on Load ControlNet before anything runs. "family" is "" where the file alone does
    not tell (it always does for the published layouts)."""
    t = read_tensors(_unwrap_adapter(source, name), name)
    kind = detect_kind(t.shapes, t.name)
    family = ""
    if kind == "controlnet":
        from .config import config_from_shapes
        from .convert import to_ldm_keys

        _, keymap = to_ldm_keys(t.shapes, t.name)
        config = config_from_shapes({k: t.shapes[src] for k, src in keymap.items()}, t.name)
        family = config.family
        if getattr(config, "union_num_control_types", None):
            kind = "union"
    elif kind == "control_lora":
        from .control_lora import control_lora_family

        family = control_lora_family(t.shapes, t.name)
    elif kind == "lllite":
        family = "sdxl"
    elif kind == "t2i_adapter":
        conv_in = next(
            (s for k, s in t.shapes.items() if k.endswith(("conv_in.weight", "body.0.in_conv.weight"))), None
        )
        family = "sdxl" if conv_in is not None and conv_in[1] in (256, 768) else "sd1"
    return {"kind": kind, "kind_name": KIND_NAMES[kind], "family": family}
