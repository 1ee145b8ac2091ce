"""ControlNet-LLLite (kohya-ss): small learned terms added to the inputs of the UNet's attention projections.

Source: kohya-ss/sd-scripts ``networks/control_net_lllite.py`` (``LLLiteModule``, ``ControlNetLLLite``). Each
module wraps one Linear of an SDXL transformer block (by default ``attn1.to_q/to_k/to_v`` and ``attn2.to_q``
of the input and middle blocks) and replaces ``to_x(x)`` with ``to_x(x + up(mid(cat[cond, down(x)])) * m)``:

- ``conditioning1`` embeds the hint (rescaled to [-1, 1]) once per image: a k4/s4 conv to half the embedding
  width, then for depth 1 a k2/s2 conv (1/8 of the hint, the latent grid), depth 2 a k4/s4 conv (1/16),
  depth 3 k4/s4 + k2/s2 convs (1/32), ReLU between them; the result is flattened to tokens (B x h*w x C).
- ``down`` (Linear + ReLU) reduces x to ``mlp_dim``; ``mid`` (Linear + ReLU) mixes it with the hint tokens
  concatenated on the channel axis; ``up`` (a Linear kohya zero-initialises) maps back to x's width.

The module names are kohya's (``"lllite_unet." + module path`` with dots as underscores, e.g.
``lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``) and the parameter names are kept, so a
published file's state dict loads into :class:`LLLite` as is.

How ComfyUI reaches these inputs (checked in ComfyUI 0.3.75, ``comfy/ldm/modules/attention.py``,
``BasicTransformerBlock.forward``): ``attn1_patch`` / ``attn2_patch`` callables get ``(n, context, value,
extra_options)`` *before* ``to_q/to_k/to_v`` and return the three, so adding :meth:`LLLite.delta` there is
kohya's ``org_forward(x + cx * multiplier)``. For attn1 the three are one tensor object (the normed hidden
states); for attn2 ``n`` is the normed hidden states and context/value the text context (kohya does not
wrap ``attn2.to_k/to_v``). ``extra_options["block"]`` is ``("input", i)`` / ``("middle", 0)`` /
``("output", i)`` and ``extra_options["block_index"]`` the index in ``transformer_blocks`` — what
:meth:`LLLite.targets` takes (Kosinkadink/ComfyUI-Advanced-ControlNet ``adv_control/control_lllite.py``
maps modules the same way). Not ``extra_options["transformer_index"]``: that counts whole transformers.

Pure torch; never imports ComfyUI.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ControlNetError
from .ops import Operations, TorchOperations

log = logging.getLogger(__name__)

PREFIX = "lllite_unet_"
ANIMA_MARKER = "lllite_dit_blocks_"
ATTNS = ("attn1", "attn2")

# kohya's module names for attention projections; other wrapped layers (ResBlock convs, ff, proj_in, only
# with non-default kohya options) load but have no attention call to hang on.
_ATTN_NAME_RE = re.compile(
    r"^lllite_unet_(?:(input|output)_blocks_(\d+)|(middle)_block)_1_transformer_blocks_(\d+)_"
    r"(attn1|attn2)_to_(q|k|v)$"
)


def is_lllite(keys: Iterable[str]) -> bool:
    """True when the tensor names are a kohya ControlNet-LLLite file (UNet or Anima DiT flavour).

    kohya's names start with ``lllite_unet_`` (sd-scripts ``ControlNetLLLite.create_modules``); Anima DiT
    LLLite files have ``lllite_dit_blocks_`` names and are refused by :func:`load_lllite`.
    """
    return any(k.startswith(PREFIX) or k.startswith(ANIMA_MARKER) for k in keys)


def _stride(depth: int) -> int:
    """Total stride of ``conditioning1`` at this depth: 8, 16 or 32 pixels per token."""
    return 8 << (depth - 1)


class LLLiteModule(nn.Module):
    """One kohya ``LLLiteModule`` (sd-scripts ``networks/control_net_lllite.py``), inference only.

    Parameter names match the file: ``conditioning1.{0,2[,4]}``, ``down.0``, ``mid.0``, ``up.0``. ``is_conv2d``
    modules (kohya wraps Conv2d layers when ``TRANSFORMER_ONLY`` is off) work on B x C x H x W maps with 1x1
    convs; Linear ones on B x T x C tokens.
    """

    def __init__(
        self,
        depth: int,
        in_dim: int,
        cond_emb_dim: int,
        mlp_dim: int,
        is_conv2d: bool,
        ops: Operations = TorchOperations,
    ) -> None:
        super().__init__()
        if depth not in (1, 2, 3):
            raise ControlNetError(f"LLLite depth must be 1, 2 or 3, got {depth}")
        self.depth, self.in_dim, self.cond_emb_dim, self.mlp_dim = depth, in_dim, cond_emb_dim, mlp_dim
        self.is_conv2d = is_conv2d
        half = cond_emb_dim // 2
        # The ReLUs keep kohya's Sequential indices (conditioning1.2 / .4 are convs); not in place, so no
        # caller tensor is ever written.
        layers: list[nn.Module] = [ops.Conv2d(3, half, 4, stride=4)]
        if depth == 1:
            layers += [nn.ReLU(), ops.Conv2d(half, cond_emb_dim, 2, stride=2)]
        elif depth == 2:
            layers += [nn.ReLU(), ops.Conv2d(half, cond_emb_dim, 4, stride=4)]
        else:  # kohya: "kernel size 8 is too large, so set it to 4" (then a k2/s2 conv)
            layers += [nn.ReLU(), ops.Conv2d(half, half, 4, stride=4), nn.ReLU()]
            layers += [ops.Conv2d(half, cond_emb_dim, 2, stride=2)]
        self.conditioning1 = nn.Sequential(*layers)

        def proj(i: int, o: int) -> nn.Module:
            return ops.Conv2d(i, o, 1) if is_conv2d else ops.Linear(i, o)

        self.down = nn.Sequential(proj(in_dim, mlp_dim), nn.ReLU())
        self.mid = nn.Sequential(proj(mlp_dim + cond_emb_dim, mlp_dim), nn.ReLU())
        self.up = nn.Sequential(proj(mlp_dim, in_dim))

    @property
    def stride(self) -> int:
        return _stride(self.depth)

    def embed(self, hint: torch.Tensor) -> torch.Tensor:
        """``conditioning1`` on a hint already in [-1, 1] and padded to a multiple of :attr:`stride`.

        Linear modules get tokens B x h*w x C (kohya ``set_cond_image``), Conv2d ones the B x C x h x w map.
        """
        cx = self.conditioning1(hint)
        return cx if self.is_conv2d else cx.flatten(2).transpose(1, 2)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The learned term up(mid(cat[cond, down(x)])), without the multiplier (kohya ``forward``)."""
        # Functional calls on the Sequentials' weights: this runs ~136 times per UNet call and is bound by
        # per-op overhead, which nn.Module.__call__ on six submodules would double.
        d, m, u = self.down[0], self.mid[0], self.up[0]
        if getattr(d, "comfy_cast_weights", False) or d.weight.dtype != x.dtype:
            # Host operations that cast weights per call (storage dtype != compute dtype, partial loading):
            # go through the layers so the host's casting runs.
            return self.up(self.mid(torch.cat([cond, self.down(x)], dim=-1 if not self.is_conv2d else 1)))
        if self.is_conv2d:
            h = F.relu(F.conv2d(x, d.weight, d.bias))
            h = F.relu(F.conv2d(torch.cat([cond, h], dim=1), m.weight, m.bias))
            return F.conv2d(h, u.weight, u.bias)
        h = F.relu(F.linear(x, d.weight, d.bias))
        h = F.relu(F.linear(torch.cat([cond, h], dim=-1), m.weight, m.bias))
        return F.linear(h, u.weight, u.bias)


class LLLite(nn.ModuleDict):
    """A kohya ControlNet-LLLite file as an ``nn.ModuleDict`` keyed by kohya's module names.

    The control-module protocol: ``kind`` "lllite", ``family`` "sdxl" (kohya trains on the SDXL UNet only),
    ``injection`` "attention" (no UNet residuals: the host glue calls :meth:`apply` from ComfyUI's
    ``attn1_patch`` / ``attn2_patch``), ``num_residuals`` 10 (SDXL's), ``name``, :attr:`dtype`,
    :meth:`encode_hint` (once per run).
    """

    kind = "lllite"
    family = "sdxl"
    injection = "attention"
    num_residuals = 10

    def __init__(self, modules: Mapping[str, LLLiteModule], name: str = "ControlNet-LLLite") -> None:
        super().__init__(modules)
        self.name = name
        # (block kind, block number, block_index, attn) -> {"q"|"k"|"v": module name}; built once so the
        # per-call lookup in the attention patch is one dict access.
        table: dict[tuple[str, int, int, str], dict[str, str]] = {}
        unused = []
        for key in self.keys():
            m = _ATTN_NAME_RE.match(key)
            if m is None or self[key].is_conv2d:
                unused.append(key)
                continue
            kind, number, middle, index, attn, role = m.groups()
            block = ("middle", 0) if middle else (kind, int(number))
            table.setdefault((*block, int(index), attn), {})[role] = key
        self._targets = table
        self.unused: tuple[str, ...] = tuple(unused)
        if unused:
            log.warning(
                "%s: %d LLLite module(s) wrap layers other than attention q/k/v and are not applied: %s",
                name,
                len(unused),
                ", ".join(unused[:3]) + (" ..." if len(unused) > 3 else ""),
            )

    compute_dtype: torch.dtype | None = None
    """Set by a host whose operations cast per layer: inputs are cast to it, weights stay in their storage dtype."""

    @property
    def dtype(self) -> torch.dtype:
        """The dtype this module computes in (its weights' unless a host set ``compute_dtype``)."""
        return self.compute_dtype or next(self.parameters()).dtype

    def _device(self) -> torch.device:
        # Not a `device` property: ComfyUI's ModelPatcher assigns `model.device` when it moves a model.
        return next(self.parameters()).device

    def _bad(self, what: str) -> ControlNetError:
        return ControlNetError(f"{self.name}: {what}")

    # 1. Hint -> per-module tokens (once per run) ------------------------------------------------------
    def encode_hint(self, hint: torch.Tensor) -> dict[str, torch.Tensor]:
        """Hint B x 3 x H x W (RGB in [0, 1], H, W = 8 x latent) -> {module name: B x T x cond_emb_dim}.

        The hint is rescaled to [-1, 1] (ACN ``set_cond_hint_inject``: ``hint * 2 - 1``; kohya trains on
        images normalised that way). Each module's ``conditioning1`` has a stride of 8, 16 or 32 pixels
        (depth 1/2/3), which for latent sizes divisible by 1/2/4 gives exactly the UNet's token grid at its
        block. The UNet halves odd sizes upwards (stride-2 3x3 convs with padding 1: 13 -> 7 -> 4), so the
        hint is padded at the bottom and right, by edge replication, to the next multiple of the stride:
        ceil(H / 16) = ceil(h / 2) tokens per column at depth 2, ceil(h / 4) at depth 3. Every token then
        sees the same pixels as with an even size (token i covers pixel rows [s*i, s*(i+1)), kohya's training
        geometry); only the last row/column of tokens reaches into the padding. ACN instead stretches the
        whole hint to the padded size, which moves every token a little.
        """
        if hint.ndim != 4 or hint.shape[1] != 3:
            raise self._bad(f"hint must be B x 3 x H x W (RGB in [0, 1]), got shape {tuple(hint.shape)}")
        h, w = hint.shape[2:]
        if h % 8 or w % 8 or h == 0 or w == 0:
            raise self._bad(f"hint height and width must be multiples of 8 (8 x latent), got {(h, w)}")
        x = hint.to(self._device(), self.dtype) * 2.0 - 1.0
        padded: dict[int, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}
        for key, module in self.items():
            s = module.stride
            if s not in padded:
                ph, pw = -h % s, -w % s
                padded[s] = F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x
            out[key] = module.embed(padded[s])
        return out

    # 2. Which modules an attention call feeds ---------------------------------------------------------
    def targets(self, block: tuple[str, int], block_index: int, attn: str) -> dict[str, str]:
        """Module names for the q / k / v inputs of one attention call, e.g. ``(("input", 4), 0, "attn1")`` ->
        ``{"q": "lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "k": ..., "v": ...}``.

        ``block`` is ComfyUI's ``extra_options["block"]`` (``("middle", 0)`` for the middle block),
        ``block_index`` its ``extra_options["block_index"]`` (the index in ``transformer_blocks``), ``attn``
        "attn1" or "attn2". Empty when nothing applies (SDXL input blocks 1, 2; output blocks in kohya's
        default files).
        """
        if attn not in ATTNS:
            raise self._bad(f"attn must be one of {ATTNS}, got {attn!r}")
        found = self._targets.get((block[0], int(block[1]), int(block_index), attn))
        return dict(found) if found else {}

    # 3. The learned term ------------------------------------------------------------------------------
    def delta(self, module_name: str, x: torch.Tensor, cond_tokens: torch.Tensor) -> torch.Tensor:
        """kohya's ``up(mid(cat[cond_emb, down(x)]))`` for one module, in ``x``'s dtype.

        ``x`` is the projection's input (B x T x in_dim; B x in_dim x h x w for Conv2d modules),
        ``cond_tokens`` this module's entry of :meth:`encode_hint` with x's batch. The caller multiplies by
        strength / mask and adds it to ``x`` (kohya: ``org_forward(x + cx * multiplier)``).
        """
        if module_name not in self:
            raise self._bad(f"no LLLite module named {module_name!r}")
        module: LLLiteModule = self[module_name]
        if module.is_conv2d:
            want_x = x.ndim == 4 and x.shape[1] == module.in_dim
            want_c = (x.shape[0], module.cond_emb_dim, *x.shape[2:]) if want_x else None
            layout = "B x C x h x w"
        else:
            want_x = x.ndim == 3 and x.shape[-1] == module.in_dim
            want_c = (x.shape[0], x.shape[1], module.cond_emb_dim) if want_x else None
            layout = "B x tokens x C"
        if not want_x:
            raise self._bad(
                f"{module_name}: input must be {layout} with C = {module.in_dim}, got {tuple(x.shape)}"
            )
        if tuple(cond_tokens.shape) != want_c:
            raise self._bad(
                f"{module_name}: hint tokens {tuple(cond_tokens.shape)} do not fit the input "
                f"{tuple(x.shape)}: expected {want_c} (broadcast cond/uncond rows to the input's batch; "
                f"encode a hint of 8 x the latent size)"
            )
        dtype = self.dtype
        return module(x.to(dtype), cond_tokens.to(x.device, dtype)).to(x.dtype)

    def apply(
        self,
        block: tuple[str, int],
        block_index: int,
        attn: str,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cond: Mapping[str, torch.Tensor],
        multiplier: float | torch.Tensor = 1.0,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Add ``multiplier * delta`` to each targeted projection input; returns new tensors, never in place.

        The arguments match ComfyUI's attention patches (``n, context, value`` -> ``q, k, v``; for attn1 they
        are one tensor object, and each target's delta is computed from its own, unmodified input).
        ``multiplier`` is a float or a tensor broadcastable to B x T x 1 (strength x mask x cond/uncond
        weights). ``cond`` is :meth:`encode_hint`'s dict with rows already matching the batch.
        """
        names = self.targets(block, block_index, attn)
        if not names:
            return q, k, v
        if isinstance(multiplier, torch.Tensor):
            b, t = q.shape[0], q.shape[1]
            try:
                ok = torch.broadcast_shapes(tuple(multiplier.shape), (b, t, 1)) == (b, t, 1)
            except RuntimeError:
                ok = False
            if not ok:
                raise self._bad(
                    f"multiplier shape {tuple(multiplier.shape)} does not broadcast to B x T x 1 = {(b, t, 1)}"
                )
        elif multiplier == 0:
            return q, k, v
        inputs = {"q": q, "k": k, "v": v}
        outputs = dict(inputs)
        for role, module_name in names.items():
            if module_name not in cond:
                raise self._bad(f"no hint tokens for {module_name!r}: pass the dict encode_hint returned")
            x = inputs[role]
            d = self.delta(module_name, x, cond[module_name])
            outputs[role] = x + d * (
                multiplier.to(x.device, x.dtype) if torch.is_tensor(multiplier) else multiplier
            )
        return outputs["q"], outputs["k"], outputs["v"]


# Loading -------------------------------------------------------------------------------------------------
def _module_from_tensors(
    key: str, weights: Mapping[str, torch.Tensor], name: str, ops: Operations = TorchOperations
) -> LLLiteModule:
    """Build one module on meta from its tensors' shapes (depth and dims as ACN ``load_controllllite``)."""

    def need(suffix: str) -> torch.Tensor:
        if suffix not in weights:
            raise ControlNetError(f"{name}: LLLite tensor {key + '.' + suffix!r} is missing")
        return weights[suffix]

    down = need("down.0.weight")
    c0 = need("conditioning1.0.weight")
    c2 = need("conditioning1.2.weight")
    if down.ndim not in (2, 4) or c0.ndim != 4 or c2.ndim != 4:
        raise ControlNetError(
            f"{name}: LLLite module {key!r}: down.0.weight must be a Linear or 1x1 Conv2d weight and "
            f"conditioning1 weights 4-D convs, got shapes {tuple(down.shape)}, {tuple(c0.shape)}, {tuple(c2.shape)}"
        )
    # Depth: a third conv means depth 3; otherwise the second conv's kernel tells 2 (k4) from 1 (k2).
    depth = 3 if "conditioning1.4.weight" in weights else 2 if c2.shape[-1] == 4 else 1
    with torch.device("meta"):
        module = LLLiteModule(
            depth,
            in_dim=down.shape[1],
            cond_emb_dim=2 * c0.shape[0],
            mlp_dim=down.shape[0],
            is_conv2d=down.ndim == 4,
            ops=ops,
        )
    expected = module.state_dict()
    for suffix, t in expected.items():
        got = need(suffix)
        if tuple(got.shape) != tuple(t.shape):
            raise ControlNetError(
                f"{name}: LLLite tensor {key + '.' + suffix!r} has shape {tuple(got.shape)}, "
                f"expected {tuple(t.shape)} (depth {depth}, in_dim {module.in_dim}, "
                f"cond_emb_dim {module.cond_emb_dim}, mlp_dim {module.mlp_dim})"
            )
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise ControlNetError(f"{name}: unexpected LLLite tensor(s) {[key + '.' + s for s in extra][:4]}")
    return module


def load_lllite(
    tensors: Mapping[str, torch.Tensor],
    name: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    operations: Operations | None = None,
) -> LLLite:
    """A kohya ControlNet-LLLite state dict -> :class:`LLLite` (eval, no grad).

    ``dtype`` defaults to the file's (the first floating tensor's); ``device`` to the tensors'. Module depth,
    Linear/Conv2d and widths are read from the tensors as ACN ``load_controllllite`` does; missing,
    mis-shaped or stray tensors raise :class:`ControlNetError` naming the tensor.
    """
    keys = list(tensors)
    if any(ANIMA_MARKER in k for k in keys):
        raise ControlNetError(
            f"{name}: this is an Anima (DiT) LLLite; ControlStack supports SD1.x / SD2.x / SDXL"
        )
    if not keys:
        raise ControlNetError(f"{name}: the file holds no tensors")
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for k in keys:
        module_name, _, suffix = k.partition(".")
        if not module_name.startswith(PREFIX) or not suffix:
            raise ControlNetError(
                f"{name}: unexpected tensor {k!r} in an LLLite file (expected '{PREFIX}<layer>.<param>')"
            )
        grouped.setdefault(module_name, {})[suffix] = tensors[k]
    if dtype is None:
        dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)

    modules = {
        key: _module_from_tensors(key, weights, name, operations or TorchOperations)
        for key, weights in grouped.items()
    }
    model = LLLite(modules, name=name)
    state = {
        k: t.to(device=device, dtype=dtype) if device is not None else t.to(dtype) for k, t in tensors.items()
    }
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
