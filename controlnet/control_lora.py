"""Stability's Control-LoRA: a ControlNet stored as low-rank deltas against the host UNet's encoder.

A Control-LoRA file (huggingface.co/stabilityai/control-lora) holds
- a marker tensor ``lora_controlnet``;
- ``<ldm key without .weight>.up`` / ``.down`` for the Linear / Conv layers it shares with the UNet
  encoder (``time_embed``, ``label_emb``, ``input_blocks``, ``middle_block``);
- full ``.weight`` / ``.bias`` tensors for everything else it carries: norms and biases of the shared
  layers, and the ControlNet-only ``input_hint_block.*``, ``zero_convs.*``, ``middle_block_out.*``.

The ControlNet it describes is the host UNet's encoder, with the file's full tensors replacing the
UNet's, plus ``(up.flatten(1) @ down.flatten(1)).reshape(weight.shape)`` on every layer that has a pair.
ComfyUI (``comfy/controlnet.py``: ``ControlLora.pre_run`` builds a ``cldm.ControlNet`` from the UNet's
``unet_config`` with ``ControlLoraOps``, assigns the UNet's tensors then the file's; ``ControlLoraOps``
adds the product in every forward). We merge ONCE instead: the result is a plain :class:`ControlNet`
(:class:`ControlLoraNet`, whose ``kind`` is "control_lora") that owns its weights; the host UNet is never
modified.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .config import config_from_shapes
from .convert import unet_to_ldm_keys
from .errors import ControlNetError
from .loading import Source, read_tensors
from .model import ControlNet
from .ops import Operations, TorchOperations

log = logging.getLogger(__name__)

MARKER = "lora_controlnet"
# The UNet modules a ControlNet copies (arXiv 2302.05543 section 3.2): what is read from the base.
ENCODER_PREFIXES = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
_FAMILY_LABEL = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
# Cross-attention width of the public base models, used only when the projections do not tell.
_CONTEXT_FAMILY = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ControlLoraNet(ControlNet):
    """A ControlNet merged from a Control-LoRA: the classic module, weights and forward unchanged.

    It exists only to report ``kind == "control_lora"`` (the ControlNet class derives ``kind`` from its
    config in a read-only property, so an instance attribute cannot be set).
    """

    kind = "control_lora"


def is_control_lora(keys: Iterable[str]) -> bool:
    """True for a Control-LoRA state dict (ComfyUI's test in ``load_controlnet_state_dict``: the marker)."""
    return MARKER in set(keys)


def _stem(key: str) -> tuple[str, str]:
    """(module path, parameter suffix) of ``a.b.weight`` / ``a.b.up``."""
    stem, _, suffix = key.rpartition(".")
    return stem, suffix


def control_lora_family(shapes: Mapping[str, tuple[int, ...]], name: str = "state dict") -> str:
    """'sd1', 'sd2' or 'sdxl' from the structure of a Control-LoRA file or of a (bare-key) UNet.

    Works on full ``.weight`` keys and on ``.up`` / ``.down`` pairs alike, so the file and the base can be
    compared with the same rule. The rule is the one :func:`config_from_shapes` uses for ControlNets:
    SDXL has the adm embedding (``label_emb``), SD2.x projects its transformers with Linear layers, SD1.x
    with 1x1 convs. When only low-rank pairs tell (a file), the cross-attention width of the public models
    (768 / 1024 / 2048) decides first, then the pairs' rank (4-D: a conv).
    """
    if any(k.startswith("label_emb.") for k in shapes):
        return "sdxl"
    # proj_in's full weight is 2-D for a Linear (SD2.x) and 4-D for a 1x1 conv (SD1.x).
    proj = {len(s) for k, s in shapes.items() if k.endswith(".proj_in.weight")}
    if proj in ({2}, {4}):
        return "sd2" if proj == {2} else "sd1"
    # attn2.to_k maps the text context: its weight is [inner, context], its down [rank, context].
    for k, s in shapes.items():
        stem, suffix = _stem(k)
        if stem.endswith(".attn2.to_k") and suffix in ("weight", "down") and len(s) == 2:
            if s[1] in _CONTEXT_FAMILY:
                return _CONTEXT_FAMILY[s[1]]
    # Last clue, the low-rank pair of proj_in: a conv's pair is 4-D unless an extractor flattened it
    # (ComfyUI flattens anyway), so only 4-D is conclusive for SD1.x.
    proj = {len(s) for k, s in shapes.items() if _stem(k)[0].endswith(".proj_in")}
    if proj:
        return "sd1" if 4 in proj else "sd2"
    raise ControlNetError(
        f"{name}: cannot tell the base model family (no label_emb, transformer projections or "
        "cross-attention layers found); expected an SD1.x, SD2.x or SDXL Control-LoRA / UNet"
    )


def _default_dtype(dtypes: Iterable[torch.dtype | None]) -> torch.dtype:
    found = [d for d in dtypes if d is not None and d.is_floating_point]
    if not found:
        return torch.float32
    dtype = max(set(found), key=found.count)
    # 8-bit storage (ComfyUI's fp8 UNets) cannot run a ControlNet forward: compute in bf16 instead.
    return dtype if dtype in _WEIGHT_DTYPES else torch.bfloat16


def merge_control_lora(
    lora: Source,
    base_unet: Source,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    name: str | None = None,
    operations: Operations | None = None,
) -> ControlLoraNet:
    """Merge a Control-LoRA with its base UNet's encoder into a plain :class:`ControlNet`.

    ``lora``: the file (path or state dict). ``base_unet``: the host UNet's weights (state dict or file),
    bare ldm keys (``input_blocks.1.0.in_layers.2.weight``, as ComfyUI's
    ``model.model_state_dict(filter_prefix="diffusion_model.")`` gives once the prefix is stripped),
    ``diffusion_model.`` / ``model.diffusion_model.``-prefixed, or diffusers keys. Only the encoder part
    of the base is read. ``dtype`` defaults to the base's dtype, ``device`` to the CPU. ``name`` is used in
    messages and as the module's name (default: the file name, or "Control-LoRA").

    Each weight is computed as ComfyUI's ``ControlLoraOps`` does it per forward (file tensor if present,
    else the base's, plus ``up @ down``), in float32, and rounded once to ``dtype``.
    """
    label = name or (Path(lora).name if not isinstance(lora, Mapping) else "Control-LoRA")
    if isinstance(lora, Mapping) and not is_control_lora(lora.keys()):
        raise ControlNetError(f"{label}: not a Control-LoRA (no {MARKER!r} marker tensor)")
    f = read_tensors(lora, label)
    if MARKER not in f.shapes and not isinstance(lora, Mapping):
        raise ControlNetError(f"{label}: not a Control-LoRA (no {MARKER!r} marker tensor)")

    # 1. Sort the file: full tensors, low-rank pairs; ComfyUI skips keys with "__" and other suffixes.
    full: dict[str, str] = {}
    ups: dict[str, str] = {}
    downs: dict[str, str] = {}
    for k in f.shapes:
        if k == MARKER or "__" in k:
            continue
        stem, suffix = _stem(k)
        if suffix in ("weight", "bias"):
            full[k] = k
        elif suffix == "up":
            ups[stem] = k
        elif suffix == "down":
            downs[stem] = k
    lone = sorted({*ups} ^ {*downs})
    if lone:
        what = [ups.get(s) or downs[s] for s in lone]
        raise ControlNetError(
            f"{label}: low-rank tensors without their partner (each layer needs both .up and .down): "
            f"{what[:5]} ({len(what)} in all)"
        )

    # 2. The base's encoder, by name and shape only (nothing is read yet).
    base_name = "base UNet" if isinstance(base_unet, Mapping) else str(base_unet)
    b = read_tensors(base_unet, base_name)
    base_map = {k: src for k, src in unet_to_ldm_keys(b.shapes).items() if k.startswith(ENCODER_PREFIXES)}
    if not base_map:
        raise ControlNetError(
            f"{label}: the base model has no UNet encoder tensors (time_embed / input_blocks / middle_block); "
            f"expected the UNet's weights, e.g. 'input_blocks.1.0.in_layers.2.weight' (got e.g. "
            f"{sorted(b.shapes)[:3]})"
        )
    base_shapes = {k: tuple(b.shapes[src]) for k, src in base_map.items()}

    # 3. Family first: a mismatch would otherwise surface as a confusing shape error.
    file_shapes = {k: tuple(s) for k, s in f.shapes.items() if k != MARKER}
    file_family = control_lora_family(file_shapes, label)
    base_family = control_lora_family(base_shapes, "base UNet")
    if file_family != base_family:
        raise ControlNetError(
            f"{label}: this Control-LoRA is for {_FAMILY_LABEL[file_family]} but the model is "
            f"{_FAMILY_LABEL[base_family]}; load it with a {_FAMILY_LABEL[file_family]} checkpoint"
        )

    # 4. The ControlNet's architecture: the base encoder with the file's tensors on top (hint channels,
    # zero convs and middle_block_out come from the file).
    merged_shapes = {**base_shapes, **{k: file_shapes[k] for k in full}}
    # A pair on an encoder layer needs the layer's weight: from the base UNet unless the file has it.
    absent = sorted(
        f"{s}.weight" for s in ups if s.startswith(ENCODER_PREFIXES) and f"{s}.weight" not in merged_shapes
    )
    if absent:
        raise ControlNetError(
            f"{label}: the base UNet has no {absent[:5]} ({len(absent)} in all) for the file's low-rank pairs; "
            "is the base model the one this Control-LoRA was made for?"
        )
    try:
        config = config_from_shapes(merged_shapes, label)
    except ControlNetError as e:
        raise ControlNetError(
            f"{e} (the ControlNet is built from the base UNet's encoder plus the file's tensors)"
        ) from e
    with torch.device("meta"):  # an empty shell, filled by load_state_dict(assign=True) below
        model = ControlLoraNet(config, name=label, operations=operations or TorchOperations)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    # 5. Validate every shape before reading any data.
    missing = sorted(k for k in expected if k not in full and k not in base_map)
    if missing:
        # ControlNet-only tensors can come from the file alone; encoder ones from the base as well.
        from_file = [k for k in missing if not k.startswith(ENCODER_PREFIXES)]
        shown, where = (from_file, "the file") if from_file else (missing, "the base UNet")
        raise ControlNetError(
            f"{label}: tensors needed by the ControlNet are missing from {where}: {shown[:5]} "
            f"({len(shown)} in all); is the base model the one this Control-LoRA was made for?"
        )
    for k, shape in expected.items():
        if k in full and file_shapes[k] != shape:
            raise ControlNetError(f"{label}: tensor {k!r} has shape {file_shapes[k]}, expected {shape}")
        if k not in full and base_shapes[k] != shape:
            raise ControlNetError(
                f"base UNet: tensor {base_map[k]!r} has shape {base_shapes[k]}, expected {shape}"
            )
    pairs: dict[str, str] = {}  # ControlNet weight key -> stem of its up/down pair
    for stem in sorted(ups):
        key = f"{stem}.weight"
        if key not in expected:
            log.warning(
                "%s: ignoring low-rank pair %s.up/.down: the ControlNet has no such layer", label, stem
            )
            continue
        up, down, shape = file_shapes[ups[stem]], file_shapes[downs[stem]], expected[key]
        rank_up, rank_down = math.prod(up[1:]), down[0] if down else 0
        if (
            len(up) < 2
            or len(down) < 2
            or up[0] != shape[0]
            or rank_up != rank_down
            or math.prod(down[1:]) != math.prod(shape[1:])
        ):
            raise ControlNetError(
                f"{label}: {stem}.up {up} @ {stem}.down {down} does not fit the layer's weight {shape} "
                f"(expected up [{shape[0]}, r, ...] and down [r, {', '.join(map(str, shape[1:]))}])"
            )
        pairs[key] = stem
    unused = sorted(k for k in full if k not in expected)
    if unused:
        log.warning(
            "%s: ignoring %d tensors the ControlNet has no place for, e.g. %s", label, len(unused), unused[:3]
        )

    # 6. Merge, one tensor at a time. Every result is a fresh tensor: the base is never written to
    # and the ControlNet shares no storage with the host UNet (ComfyUI may patch the UNet in place).
    dtype = dtype or _default_dtype(b.dtypes[src] for src in base_map.values())
    device = torch.device(device or "cpu")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    state: dict[str, torch.Tensor] = {}
    for key, shape in expected.items():
        w = f.get(key) if key in full else b.get(base_map[key])
        if key in pairs:
            stem = pairs[key]
            up = f.get(ups[stem]).to(device=device, dtype=acc).flatten(1)
            down = f.get(downs[stem]).to(device=device, dtype=acc).flatten(1)
            w = w.to(device=device, dtype=acc) + (up @ down).reshape(shape)
            state[key] = w.to(dtype)
        else:
            state[key] = w.to(device=device, dtype=dtype, copy=True)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    log.info(
        "merged Control-LoRA %s: %d low-rank layers, %d full tensors, family %s, %s",
        label,
        len(pairs),
        sum(k in expected for k in full),
        config.family,
        dtype,
    )

    if not hasattr(model, "injection"):  # model.py may define it; ControlNets add to the skips
        model.injection = "output"
    return model.eval().requires_grad_(False)
