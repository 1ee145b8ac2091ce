"""Checkpoint layouts and the ONE ldm <-> diffusers key mapping.

Layouts (decided by key names only, see docs/formats.md):

- ``ldm``: bare ldm keys (``input_blocks.1.0.in_layers.2.weight``, ``zero_convs.0.0.weight``).
- ``ldm-prefixed``: the same under ``control_model.`` (lllyasviel's .pth files); full ControlLDM v1.0
  checkpoints also carry ``model.diffusion_model.*``, ``first_stage_model.*``, ... which are dropped.
- ``diffusers``: ``ControlNetModel`` keys (``controlnet_cond_embedding.*``, ``down_blocks.*``,
  ``controlnet_down_blocks.N``, ``controlnet_mid_block``, ``time_embedding``, ``add_embedding``).

ControlNet Union / ProMax (xinsir) files are diffusers ``ControlNetUnionModel`` state dicts: the classic keys
plus ``task_embedding``, ``control_add_embedding.linear_{1,2}``, ``transformer_layes.N.*`` and
``spatial_ch_projs``. ComfyUI's ldm-side names are the same except the fusion attention's packed
projection, ``nn.MultiheadAttention``'s ``attn.in_proj_weight`` / ``in_proj_bias`` vs ComfyUI's
``attn.in_proj.weight`` / ``.bias`` (comfy/controlnet.py: ``k.replace('.attn.in_proj_', '.attn.in_proj.')``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import ControlNetError

LDM_PREFIX = "control_model."
DIFFERENCE_KEY = "difference"  # ComfyUI's marker of "ControlNet minus base UNet" files

# ldm ResBlock sub-module -> diffusers ResnetBlock2D sub-module.
_RESNET = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_HINT_CONVS = 8  # input_hint_block.{0,2,...,14}


def key_prefix_map(num_levels: int, layers_per_block: int) -> dict[str, str]:
    """ldm module prefix -> diffusers module prefix for a ControlNet (or a UNet's encoder half).

    Parameter names below these prefixes are identical in both layouts (the transformers, the convs),
    except ResBlocks whose sub-modules are renamed by ``_RESNET`` (expanded here too).
    """
    pairs = {
        "time_embed.0": "time_embedding.linear_1",
        "time_embed.2": "time_embedding.linear_2",
        "label_emb.0.0": "add_embedding.linear_1",
        "label_emb.0.2": "add_embedding.linear_2",
        "input_blocks.0.0": "conv_in",
        "input_hint_block.0": "controlnet_cond_embedding.conv_in",
        f"input_hint_block.{2 * (_HINT_CONVS - 1)}": "controlnet_cond_embedding.conv_out",
        "middle_block.1": "mid_block.attentions.0",
        "middle_block_out.0": "controlnet_mid_block",
    }
    for k in range(1, _HINT_CONVS - 1):
        pairs[f"input_hint_block.{2 * k}"] = f"controlnet_cond_embedding.blocks.{k - 1}"
    resnets = {"middle_block.0": "mid_block.resnets.0", "middle_block.2": "mid_block.resnets.1"}
    n = 1
    for level in range(num_levels):
        for j in range(layers_per_block):
            resnets[f"input_blocks.{n}.0"] = f"down_blocks.{level}.resnets.{j}"
            pairs[f"input_blocks.{n}.1"] = f"down_blocks.{level}.attentions.{j}"
            n += 1
        if level != num_levels - 1:
            pairs[f"input_blocks.{n}.0.op"] = f"down_blocks.{level}.downsamplers.0.conv"
            n += 1
    for i in range(n):
        pairs[f"zero_convs.{i}.0"] = f"controlnet_down_blocks.{i}"
    for ldm, diff in resnets.items():
        for sub_ldm, sub_diff in _RESNET.items():
            pairs[f"{ldm}.{sub_ldm}"] = f"{diff}.{sub_diff}"
    return pairs


UNION_PREFIXES = ("task_embedding", "control_add_embedding.", "transformer_layes.", "spatial_ch_projs.")
_IN_PROJ_LDM = re.compile(r"(\.attn\.in_proj)\.(weight|bias)$")
_IN_PROJ_DIFFUSERS = re.compile(r"(\.attn\.in_proj)_(weight|bias)$")


def _union_key(key: str, to_diffusers: bool) -> str | None:
    # Union modules keep their names in both layouts but for the packed q/k/v projection; None: not Union.
    if not key.startswith(UNION_PREFIXES):
        return None
    if to_diffusers:
        return _IN_PROJ_LDM.sub(r"\1_\2", key)
    return _IN_PROJ_DIFFUSERS.sub(r"\1.\2", key)


def _rename(key: str, table: dict[str, str]) -> str | None:
    # Longest matching module prefix wins; the parameter name after it is kept.
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        if (new := table.get(".".join(parts[:cut]))) is not None:
            return ".".join([new, *parts[cut:]])
    return None


def ldm_to_diffusers(keys: Iterable[str], num_levels: int, layers_per_block: int) -> dict[str, str]:
    """ldm key -> diffusers key (keys without a diffusers counterpart are left out)."""
    table = key_prefix_map(num_levels, layers_per_block)
    out = {}
    for k in keys:
        new = _union_key(k, to_diffusers=True)
        if new is None:
            new = _rename(k, table)
        if new is not None:
            out[k] = new
    return out


def diffusers_to_ldm(keys: Iterable[str]) -> dict[str, str]:
    """diffusers key -> ldm key; the UNet geometry is read from the key names themselves."""
    keys = list(keys)
    levels = {int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.(\d+)\.", k))}
    per_block = {int(m.group(1)) for k in keys if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", k))}
    table = {v: k for k, v in key_prefix_map(len(levels), len(per_block)).items()}
    out = {}
    for k in keys:
        new = _union_key(k, to_diffusers=False)
        if new is None:
            new = _rename(k, table)
        if new is not None:
            out[k] = new
    return out


# (key prefixes or exact names, what it is); any key matching is enough.
_UNSUPPORTED = (
    (("lora_controlnet",), "Control-LoRA (lora_controlnet)"),
    (("lllite",), "ControlNet-LLLite"),
    (("controlnet_blocks.", "controlnet_x_embedder."), "SD3 / Flux / DiT ControlNet"),
)
_NOT_A_CONTROLNET = (
    (("adapter.", "body.0.", "style_embedding"), "a T2I-Adapter"),
    (("encoder.down", "decoder.up", "first_stage_model.", "quant_conv."), "a VAE"),
    (
        ("output_blocks.", "model.diffusion_model.", "diffusion_model.", "up_blocks."),
        "a UNet / SD checkpoint",
    ),
)


def _any_starts(keys: set[str], prefixes: tuple[str, ...]) -> bool:
    return any(k.startswith(prefixes) for k in keys)


def detect_layout(keys: Iterable[str], name: str = "state dict") -> str:
    """'ldm', 'ldm-prefixed' or 'diffusers'; refuses other models and unsupported variants clearly."""
    ks = set(keys)
    for prefixes, what in _UNSUPPORTED:
        if _any_starts(ks, prefixes):
            raise ControlNetError(f"{name}: unsupported ControlNet variant {what}")
    if LDM_PREFIX + "zero_convs.0.0.weight" in ks:
        return "ldm-prefixed"
    if "zero_convs.0.0.weight" in ks:
        return "ldm"
    if "controlnet_cond_embedding.conv_in.weight" in ks:
        return "diffusers"
    for prefixes, what in _NOT_A_CONTROLNET:
        if _any_starts(ks, prefixes):
            raise ControlNetError(
                f"{name}: this is {what}, not a ControlNet (no zero_convs / controlnet_down_blocks)"
            )
    sample = ", ".join(sorted(ks)[:5]) or "no tensors"
    raise ControlNetError(f"{name}: unknown layout, not a ControlNet (keys: {sample}, ...)")


def to_ldm_keys(keys: Iterable[str], name: str = "state dict") -> tuple[str, dict[str, str]]:
    """(layout, {bare ldm key: source key}) for the ControlNet part of a checkpoint."""
    keys = list(keys)
    layout = detect_layout(keys, name)
    if layout == "ldm-prefixed":
        bare = {k[len(LDM_PREFIX) :]: k for k in keys if k.startswith(LDM_PREFIX)}
        return layout, {_union_key(k, False) or k: src for k, src in bare.items()}
    if layout == "ldm":
        return layout, {_union_key(k, False) or k: k for k in keys if k != DIFFERENCE_KEY}
    return layout, {v: k for k, v in diffusers_to_ldm(keys).items()}


def unet_to_ldm_keys(keys: Iterable[str]) -> dict[str, str]:
    """{bare ldm key: source key} for a base UNet (ldm, ``model.diffusion_model.``-prefixed or diffusers).

    Only the encoder half matters: that is what a "difference" ControlNet was subtracted from.
    """
    keys = list(keys)
    for prefix in ("model.diffusion_model.", "diffusion_model."):
        if any(k.startswith(prefix) for k in keys):
            return {k[len(prefix) :]: k for k in keys if k.startswith(prefix)}
    if any(k.startswith("down_blocks.") for k in keys):
        return {v: k for k, v in diffusers_to_ldm(keys).items()}
    return {k: k for k in keys}
