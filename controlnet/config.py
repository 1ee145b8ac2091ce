"""ControlNet configuration and its detection from tensor names and shapes.

The configuration is never taken from a file name: two files with the same architecture can have
any name. Detection works on ldm key names (``input_blocks.1.0.in_layers.2.weight``); other layouts
are renamed first by :mod:`.convert`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace

from .errors import ControlNetError

FAMILIES = ("sd1", "sd2", "sdxl")
# input_hint_block widths of the original ControlNet (and ComfyUI's hard-coded ones): 8 convs, the 3rd,
# 5th and 7th stride 2. diffusers' ControlNetUnionModel defaults to (48, 48, 96, 96, 192, 192, 384); the
# real file decides, so config_from_shapes reads them.
DEFAULT_HINT_WIDTHS = (16, 16, 32, 32, 96, 96, 256)

_BLOCK_RE = re.compile(r"^input_blocks\.(\d+)\.")
_UNION_LAYER_RE = re.compile(r"^transformer_layes\.(\d+)\.")
_DEPTH_RE = re.compile(r"^(input_blocks\.\d+|middle_block)\.1\.transformer_blocks\.(\d+)\.")


@dataclass(frozen=True)
class ControlNetConfig:
    """Architecture of a ControlNet encoder copy (arXiv 2302.05543, section 3.2).

    ``transformer_depth`` has one entry per ResBlock of the encoder (level by level);
    ``transformer_depth_middle`` is -1 when the middle block has no transformer.
    Heads follow the ecosystem: SD1.x uses a fixed number of heads (``num_heads``), SD2.x and SDXL
    a fixed head width (``num_head_channels``); the unused one is -1.
    """

    family: str
    in_channels: int = 4
    model_channels: int = 320
    hint_channels: int = 3
    context_dim: int = 768
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1, 1, 1, 0, 0)
    transformer_depth_middle: int = 1
    num_heads: int = 8
    num_head_channels: int = -1
    use_linear: bool = False
    adm_in_channels: int | None = None
    hint_widths: tuple[int, ...] = DEFAULT_HINT_WIDTHS
    # ControlNet Union / ProMax (xinsir): rows of ``task_embedding`` (None: a classic ControlNet); width of
    # each control type's sinusoidal embedding (256 = SDXL's addition_time_embed_dim; ComfyUI hard-codes
    # it); fusion-transformer layers and heads. The heads are not in the tensors: every published file and
    # both reference codes use 8.
    union_num_control_types: int | None = None
    union_type_embed_dim: int = 256
    union_num_layers: int = 1
    union_num_heads: int = 8

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ControlNetError(f"unknown ControlNet family {self.family!r}; expected one of {FAMILIES}")
        if len(self.num_res_blocks) != len(self.channel_mult):
            raise ControlNetError("num_res_blocks and channel_mult must have one entry per level")
        if len(self.transformer_depth) != sum(self.num_res_blocks):
            raise ControlNetError("transformer_depth needs one entry per encoder ResBlock")
        if (self.num_heads == -1) == (self.num_head_channels == -1):
            raise ControlNetError("exactly one of num_heads / num_head_channels must be set")
        if len(self.hint_widths) != 7:
            raise ControlNetError(
                f"hint_widths needs the 7 inner widths of the 8-conv hint encoder, got {self.hint_widths}"
            )
        if self.union_num_control_types is not None and (
            self.union_num_control_types < 1 or self.model_channels % self.union_num_heads
        ):
            raise ControlNetError(
                f"Union: {self.union_num_control_types} control types / {self.union_num_heads} heads do not fit "
                f"{self.model_channels} channels"
            )

    @property
    def is_union(self) -> bool:
        return self.union_num_control_types is not None

    @property
    def time_embed_dim(self) -> int:
        return self.model_channels * 4

    @property
    def num_input_blocks(self) -> int:
        """conv_in + ResBlocks + one downsample between levels."""
        return 1 + sum(self.num_res_blocks) + len(self.channel_mult) - 1

    @property
    def num_residuals(self) -> int:
        """One per input block plus the middle one (13 for SD1.x/2.x, 10 for SDXL)."""
        return self.num_input_blocks + 1

    def heads(self, channels: int) -> tuple[int, int]:
        """(number of heads, head width) of a transformer with ``channels`` channels."""
        if self.num_head_channels == -1:
            return self.num_heads, channels // self.num_heads
        return channels // self.num_head_channels, self.num_head_channels


def preset(family: str, union_num_control_types: int | None = None) -> ControlNetConfig:
    """The full-size configuration of the public ControlNets of one family.

    ``union_num_control_types`` (SDXL only): 6 for xinsir's Union file, 8 for ProMax.
    """
    if union_num_control_types is not None:
        if family != "sdxl":
            raise ControlNetError(f"ControlNet Union / ProMax files exist for SDXL only, not {family!r}")
        return replace(preset("sdxl"), union_num_control_types=union_num_control_types)
    if family == "sd1":
        return ControlNetConfig("sd1")
    if family == "sd2":
        return ControlNetConfig("sd2", context_dim=1024, num_heads=-1, num_head_channels=64, use_linear=True)
    if family == "sdxl":
        return ControlNetConfig(
            "sdxl",
            context_dim=2048,
            channel_mult=(1, 2, 4),
            num_res_blocks=(2, 2, 2),
            transformer_depth=(0, 0, 2, 2, 10, 10),
            transformer_depth_middle=10,
            num_heads=-1,
            num_head_channels=64,
            use_linear=True,
            adm_in_channels=2816,
        )
    raise ControlNetError(f"unknown ControlNet family {family!r}; expected one of {FAMILIES}")


def config_from_shapes(shapes: Mapping[str, tuple[int, ...]], name: str = "state dict") -> ControlNetConfig:
    """Infer the configuration from bare ldm key names and tensor shapes."""

    what = "ControlNet Union" if "task_embedding" in shapes else "ControlNet"

    def need(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ControlNetError(f"{name}: {what} tensor {key!r} is missing")
        if len(shapes[key]) != 4:  # every tensor read through need() is a conv weight
            raise ControlNetError(f"{name}: {what} tensor {key!r} has shape {tuple(shapes[key])}, not 4-D")
        return tuple(shapes[key])

    model_channels, in_channels = need("input_blocks.0.0.weight")[:2]
    if model_channels <= 0 or model_channels % 32:  # GroupNorm(32) everywhere; 0 would divide below
        raise ControlNetError(
            f"{name}: conv_in has {model_channels} channels, not a UNet's (a multiple of 32)"
        )
    hint_channels = need("input_hint_block.0.weight")[1]
    hint_widths = tuple(need(f"input_hint_block.{2 * i}.weight")[0] for i in range(7))
    if need("input_hint_block.14.weight")[0] != model_channels:
        raise ControlNetError(
            f"{name}: hint encoder output does not match conv_in's {model_channels} channels"
        )
    union = _union_from_shapes(shapes, model_channels, name)

    n_blocks = 1 + max(int(m.group(1)) for k in shapes if (m := _BLOCK_RE.match(k)))
    depth_of: dict[str, int] = {}
    for k in shapes:
        if m := _DEPTH_RE.match(k):
            depth_of[m.group(1)] = max(depth_of.get(m.group(1), 0), int(m.group(2)) + 1)

    # Walk the encoder: ResBlocks until a Downsample closes a level.
    levels: list[list[int]] = [[]]
    depths: list[int] = []
    for i in range(1, n_blocks):
        if f"input_blocks.{i}.0.op.weight" in shapes:
            levels.append([])
            continue
        levels[-1].append(need(f"input_blocks.{i}.0.in_layers.2.weight")[0])
        has_attn = f"input_blocks.{i}.1.proj_in.weight" in shapes
        depths.append(depth_of.get(f"input_blocks.{i}", 0) if has_attn else 0)
    if any(not lv for lv in levels) or any(len(set(lv)) != 1 for lv in levels):
        raise ControlNetError(f"{name}: encoder blocks do not form regular UNet levels")
    mult = tuple(lv[0] // model_channels for lv in levels)
    if any(lv[0] % model_channels for lv in levels) or any(lv[0] % 32 for lv in levels):
        raise ControlNetError(f"{name}: channel counts {[lv[0] for lv in levels]} are not a UNet's")

    middle_depth = depth_of.get("middle_block", 0) if "middle_block.1.proj_in.weight" in shapes else -1
    need("middle_block_out.0.weight")

    attn_keys = sorted(k for k in shapes if k.endswith(".attn2.to_k.weight"))
    proj_keys = [k for k in shapes if k.endswith(".proj_in.weight")]
    for k in ("label_emb.0.0.weight", *attn_keys[:1]):  # Linear weights
        if k in shapes and len(shapes[k]) != 2:
            raise ControlNetError(f"{name}: {what} tensor {k!r} has shape {tuple(shapes[k])}, not 2-D")
    adm = shapes["label_emb.0.0.weight"][1] if "label_emb.0.0.weight" in shapes else None
    if attn_keys and proj_keys:
        context_dim = shapes[attn_keys[0]][1]
        use_linear = len(shapes[proj_keys[0]]) == 2
    elif adm is not None:
        # SDXL ControlNets without any transformer block (ComfyUI's "SDXL_small_cnet": at most a middle
        # SpatialTransformer of depth 0) never read the text context; SDXL's width keeps forward's check.
        context_dim = 2048
        use_linear = len(shapes[proj_keys[0]]) == 2 if proj_keys else True
    else:
        raise ControlNetError(f"{name}: no cross-attention found; not a Stable Diffusion ControlNet")

    # Family from structure: SDXL has the adm vector, SD2.x linear projections, SD1.x neither.
    family = "sdxl" if adm is not None else "sd2" if use_linear else "sd1"
    heads = (
        {"num_heads": 8, "num_head_channels": -1}
        if family == "sd1"
        else {"num_heads": -1, "num_head_channels": 64}
    )
    return ControlNetConfig(
        family=family,
        in_channels=in_channels,
        model_channels=model_channels,
        hint_channels=hint_channels,
        context_dim=context_dim,
        channel_mult=mult,
        num_res_blocks=tuple(len(lv) for lv in levels),
        transformer_depth=tuple(depths),
        transformer_depth_middle=middle_depth,
        use_linear=use_linear,
        adm_in_channels=adm,
        hint_widths=hint_widths,
        **union,
        **heads,
    )


def _union_from_shapes(shapes: Mapping[str, tuple[int, ...]], model_channels: int, name: str) -> dict:
    """The Union fields of the config (empty for a classic ControlNet); ldm-side (ComfyUI) key names.

    Layout from ComfyUI's ``comfy/cldm/cldm.py`` and diffusers' ``ControlNetUnionModel``: the fusion
    tokens are hint features (model_channels wide), so ``task_embedding`` and ``spatial_ch_projs`` must be
    model_channels wide too.
    """
    if "task_embedding" not in shapes:
        return {}
    key = "control_add_embedding.linear_1.weight"
    for k in ("task_embedding", key):
        if k in shapes and (len(shapes[k]) != 2 or 0 in shapes[k]):
            raise ControlNetError(
                f"{name}: Union tensor {k!r} has shape {tuple(shapes[k])}, not a 2-D weight"
            )
    n_types, width = shapes["task_embedding"]
    if width != model_channels:
        raise ControlNetError(
            f"{name}: Union task_embedding is {width} wide, expected conv_in's {model_channels} channels"
        )
    if key not in shapes:
        raise ControlNetError(f"{name}: ControlNet Union tensor {key!r} is missing")
    type_in = shapes[key][1]
    if type_in % n_types:
        raise ControlNetError(
            f"{name}: Union {key} takes {type_in} inputs, not a multiple of the {n_types} control types"
        )
    layers = {int(m.group(1)) for k in shapes if (m := _UNION_LAYER_RE.match(k))}
    if not layers or layers != set(range(len(layers))):
        raise ControlNetError(f"{name}: ControlNet Union fusion transformer (transformer_layes.N) missing")
    return {
        "union_num_control_types": n_types,
        "union_type_embed_dim": type_in // n_types,
        "union_num_layers": len(layers),
    }
