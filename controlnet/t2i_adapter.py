"""T2I-Adapter (Mou et al., "T2I-Adapter: Learning Adapters to Dig out More Controllable Ability for Text-to-Image
Diffusion Models", arXiv 2302.08453) for SD1.x / SD2.x / SDXL, pure torch.

An adapter maps the pixel-space hint to four feature maps that the frozen UNet adds to ``h`` right after some of
its input blocks (ComfyUI ``control["input"]``, and ``control["middle"]`` for SDXL's last feature). The features do
not depend on the noisy latent, the timestep or the prompt, so they are computed once per sampling run.

Parameter names are exactly those of TencentARC's code as ComfyUI ships it (``comfy/t2i_adapter/adapter.py``:
``Adapter`` and ``Adapter_light``), so published files load without renaming; the diffusers layout
(``adapter.body.N.resnets.M.*``) is renamed to them as ``comfy/controlnet.py:load_t2i_adapter`` does.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ControlNetError
from .ops import Operations, TorchOperations

log = logging.getLogger(__name__)

# UNet slot of each of the four features, per family (see T2IAdapter.encode_hint). ComfyUI's Adapter.forward
# builds a list that openaimodel.apply_control pops from the end after every input block: SD1/SD2 features land
# after input blocks 2, 5, 8, 11 (the last block of each resolution); SDXL's after blocks 3, 5, 8 and the middle.
_SLOTS = {"sd": (2, 5, 8, 11), "xl": (3, 5, 8, 9)}
_NUM_RESIDUALS = {"sd": 13, "xl": 10}
_STAGES = 4
_XL_CIN = (256, 768)  # ComfyUI's test for an SDXL adapter: 1 or 3 hint channels after PixelUnshuffle(16)


@dataclass(frozen=True)
class T2IAdapterConfig:
    """Architecture of a T2I-Adapter, as read from a state dict's shapes.

    ``cin`` is the conv input width after PixelUnshuffle (hint channels x unshuffle^2). ``channels`` are the
    four feature widths. Full adapters: ``nums_rb`` ResnetBlocks per stage, ``ksize`` the kernel of ``in_conv``
    and ``block2``, ``use_conv`` a stride-2 conv instead of avg-pooling to downsample; the skip is the identity
    (TencentARC's ``sk=True``, the only variant ComfyUI builds). Light adapters: ``nums_rb`` light blocks per stage.
    """

    light: bool
    cin: int
    channels: tuple[int, int, int, int]
    nums_rb: int
    ksize: int = 1
    use_conv: bool = False
    xl: bool = False

    @property
    def unshuffle(self) -> int:
        return 16 if self.xl else 8

    @property
    def input_channels(self) -> int:
        return self.cin // self.unshuffle**2


class _Downsample(nn.Module):
    """``down_opt``: a stride-2 3x3 conv (``op``) or a 2x2 average pool padded by the parity of the size.

    The pool's padding ``[H % 2, W % 2]`` (with zeros counted) is ComfyUI's/TencentARC's: an odd side n becomes
    (n + 1) / 2, the size the UNet's stride-2 convs give, so odd latents work (diffusers uses ceil_mode instead,
    which gives the same sizes but other values on odd sides).
    """

    def __init__(self, channels: int, use_conv: bool, ops: Operations = TorchOperations) -> None:
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.op = ops.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_conv:
            return self.op(x)
        return F.avg_pool2d(x, 2, 2, padding=(x.shape[2] % 2, x.shape[3] % 2))


class _ResnetBlock(nn.Module):
    """Full adapter block (``ResnetBlock`` with ``sk=True``): [down_opt] -> [in_conv] -> x + block2(ReLU(block1(x))).

    ComfyUI's loader always builds ``sk=True`` (identity skip); the ``skep`` conv of ``sk=False`` is not supported
    (forks disagree on its input width, and no published adapter has one).
    """

    def __init__(
        self, in_c: int, out_c: int, down: bool, ksize: int, use_conv: bool, ops: Operations = TorchOperations
    ) -> None:
        super().__init__()
        ps = ksize // 2
        self.down_opt = _Downsample(in_c, use_conv, ops) if down else None
        self.in_conv = (
            ops.Conv2d(in_c, out_c, ksize, 1, ps) if in_c != out_c else None
        )  # only where width changes
        self.block1 = ops.Conv2d(out_c, out_c, 3, 1, 1)
        self.block2 = ops.Conv2d(out_c, out_c, ksize, 1, ps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down_opt is not None:
            x = self.down_opt(x)
        if self.in_conv is not None:
            x = self.in_conv(x)
        h = self.block2(F.relu(self.block1(x)))
        return h + x


class _LightResnetBlock(nn.Module):
    """``ResnetBlock_light``: x + block2(ReLU(block1(x)))."""

    def __init__(self, c: int, ops: Operations = TorchOperations) -> None:
        super().__init__()
        self.block1 = ops.Conv2d(c, c, 3, 1, 1)
        self.block2 = ops.Conv2d(c, c, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block2(F.relu(self.block1(x)))


class _Extractor(nn.Module):
    """Light adapter stage (``extractor``): [avg-pool] -> 1x1 in_conv -> light blocks -> 1x1 out_conv."""

    def __init__(
        self, in_c: int, inter_c: int, out_c: int, nums_rb: int, down: bool, ops: Operations = TorchOperations
    ) -> None:
        super().__init__()
        self.down_opt = _Downsample(in_c, use_conv=False) if down else None
        self.in_conv = ops.Conv2d(in_c, inter_c, 1, 1, 0)
        self.body = nn.Sequential(*[_LightResnetBlock(inter_c, ops) for _ in range(nums_rb)])
        self.out_conv = ops.Conv2d(inter_c, out_c, 1, 1, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down_opt is not None:
            x = self.down_opt(x)
        return self.out_conv(self.body(self.in_conv(x)))


class T2IAdapter(nn.Module):
    """T2I-Adapter (arXiv 2302.08453): full, light or SDXL; control-module protocol kind "t2i_adapter".

    ``encode_hint`` returns ``num_residuals`` slots, a feature where the UNet adds one and None elsewhere;
    slot i < n-1 is added to ``h`` right after input block i ("input" injection), slot n-1 to the middle-block
    output.
    """

    kind = "t2i_adapter"
    injection = "input"

    compute_dtype: torch.dtype | None = None
    """Set by a host whose operations cast per layer: inputs are cast to it, weights stay in their storage dtype."""

    def __init__(
        self, config: T2IAdapterConfig, name: str = "T2I-Adapter", operations: Operations = TorchOperations
    ) -> None:
        super().__init__()
        ops = operations
        self.config = config
        self.name = name
        c = config.channels
        if config.light:
            # Adapter_light: stage i maps c[i-1] (cin for the first) to c[i] through c[i] // 4 channels.
            ins = (config.cin, *c[:-1])
            self.body = nn.ModuleList(
                _Extractor(ins[i], c[i] // 4, c[i], config.nums_rb, i > 0, ops) for i in range(_STAGES)
            )
        else:
            # Adapter: the first block of a stage changes the width; SD1/SD2 stages 1-3 downsample, SDXL only
            # stage 2 does (stage 1 widens without downsampling), so SDXL features sit at 1/16, 1/16, 1/32, 1/32.
            downsample = (2,) if config.xl else (1, 2, 3)
            blocks = []
            for i in range(_STAGES):
                for j in range(config.nums_rb):
                    in_c = c[i - 1] if j == 0 and i > 0 else c[i]
                    down = j == 0 and i in downsample
                    blocks.append(_ResnetBlock(in_c, c[i], down, config.ksize, config.use_conv, ops))
            self.body = nn.ModuleList(blocks)
            self.conv_in = ops.Conv2d(config.cin, c[0], 3, 1, 1)
        self.eval().requires_grad_(False)

    # -- protocol -------------------------------------------------------------------------------------------
    @property
    def family(self) -> str:
        return "sdxl" if self.config.xl else "sd1"

    @property
    def families(self) -> tuple[str, ...]:
        """SD1.x and SD2.x UNets share the input-block layout, so one SD adapter serves both."""
        return ("sdxl",) if self.config.xl else ("sd1", "sd2")

    @property
    def num_residuals(self) -> int:
        return _NUM_RESIDUALS["xl" if self.config.xl else "sd"]

    @property
    def slots(self) -> tuple[int, int, int, int]:
        """The slot of each of the four features (see the module constants)."""
        return _SLOTS["xl" if self.config.xl else "sd"]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype this module computes in (its weights' unless a host set ``compute_dtype``)."""
        return self.compute_dtype or next(self.parameters()).dtype

    @property
    def unshuffle_amount(self) -> int:
        return self.config.unshuffle

    def _bad(self, what: str) -> ControlNetError:
        return ControlNetError(f"{self.name}: {what}")

    # -- hint -----------------------------------------------------------------------------------------------
    def prepare_hint(self, hint: torch.Tensor) -> torch.Tensor:
        """Hint B x 3 x H x W (RGB in [0, 1], H, W = 8 x latent) -> the adapter's input, as ComfyUI makes it.

        ``comfy.controlnet.T2IAdapter.get_control``: resize to 8 x latent rounded UP to a multiple of the
        unshuffle factor (``scale_image_to``) with ``common_upscale(..., "nearest-exact", "center")``, in fp32;
        average RGB for 1-channel adapters; no remapping of the [0, 1] range.
        """
        ch = self.config.input_channels
        if hint.ndim != 4 or hint.shape[1] not in (3, ch):
            raise self._bad(f"hint must be B x 3 x H x W (RGB in [0, 1]), got shape {tuple(hint.shape)}")
        h, w = hint.shape[2:]
        if h % 8 or w % 8 or h == 0 or w == 0:
            raise self._bad(f"hint height and width must be multiples of 8 (8 x latent), got {(h, w)}")
        f = self.config.unshuffle
        height, width = math.ceil(h / f) * f, math.ceil(w / f) * f
        x = _upscale_center(hint.to(device=next(self.parameters()).device).float(), width, height)
        if ch == 1 and x.shape[1] > 1:
            x = x.mean(1, keepdim=True)
        return x.to(self.dtype)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four feature maps (shallow -> deep) of a prepared hint (ComfyUI ``Adapter.forward``, unslotted)."""
        x = F.pixel_unshuffle(x, self.config.unshuffle)
        out = []
        if self.config.light:
            for stage in self.body:
                x = stage(x)
                out.append(x)
            return out
        x = self.conv_in(x)
        n = self.config.nums_rb
        for i in range(_STAGES):
            for block in self.body[i * n : (i + 1) * n]:
                x = block(x)
            out.append(x)
        return out

    def encode_hint(self, hint: torch.Tensor) -> list[torch.Tensor | None]:
        """Hint B x 3 x H x W (RGB in [0, 1], H, W = 8 x latent) -> ``num_residuals`` slots.

        SD1/SD2: the features at 1/8, 1/16, 1/32, 1/64 of the image go to slots 2, 5, 8, 11 (after the last input
        block of each resolution), the middle slot is None. SDXL: slots 3, 5, 8 and the middle slot 9.
        """
        slots: list[torch.Tensor | None] = [None] * self.num_residuals
        for slot, feat in zip(self.slots, self.features(self.prepare_hint(hint)), strict=True):
            slots[slot] = feat
        return slots

    def forward(
        self,
        x: torch.Tensor,
        hint: torch.Tensor | None,
        timesteps: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        encoded_hint: list[torch.Tensor | None] | None = None,
    ) -> list[torch.Tensor | None]:
        """Same call as the ControlNet's; the features do not depend on ``x``, ``timesteps``, ``context`` or ``y``.

        Returns ``encoded_hint`` when given (the per-run cache), else ``encode_hint(hint)``.
        """
        if encoded_hint is not None:
            if len(encoded_hint) != self.num_residuals:
                raise self._bad(f"encoded_hint must have {self.num_residuals} slots, got {len(encoded_hint)}")
            return encoded_hint
        if hint is None:
            raise self._bad("forward needs a hint or an encoded_hint")
        return self.encode_hint(hint)


def _upscale_center(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """``comfy.utils.common_upscale(x, width, height, "nearest-exact", "center")`` for B x C x H x W tensors.

    Center-crop to the target aspect ratio (the same float arithmetic and Python ``round`` as ComfyUI, so the
    crop offsets agree to the pixel), then nearest-exact interpolation.
    """
    old_h, old_w = x.shape[-2:]
    if (old_h, old_w) == (height, width):
        return x  # nearest-exact to the same size is the identity
    old_aspect, new_aspect = old_w / old_h, width / height
    dx = dy = 0
    if old_aspect > new_aspect:
        dx = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        dy = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    x = x[..., dy : old_h - dy, dx : old_w - dx]
    return F.interpolate(x, size=(height, width), mode="nearest-exact")


# ---------------------------------------------------------------------------------------------------- loading
_DIFFUSERS_RE = re.compile(r"adapter\.body\.(\d+)\.resnets\.(\d+)\.(.*)")
_DIFFUSERS_BLOCK_RE = re.compile(r"adapter\.body\.(\d+)\.(.*)")


def _refusal(keys: Iterable[str]) -> str | None:
    """What a file that ComfyUI's T2I loader path would claim, but ControlStack cannot run, is."""
    ks = list(keys)
    if any(k == "style_embedding" or k.endswith(".style_embedding") for k in ks):
        return (
            "a style model / Revision-type adapter (style_embedding), not a T2I-Adapter: "
            "load it with ComfyUI's Load Style Model"
        )
    if any(k.startswith("backbone.") for k in ks):
        return "a Stable Cascade ControlNet (backbone.*); ControlStack supports SD1.x / SD2.x / SDXL"
    return None


def is_t2i_adapter(keys: Iterable[str]) -> bool:
    """True for the keys of a T2I-Adapter file in any layout this module reads (and for the style models and
    Stable Cascade ControlNets that ComfyUI's T2I loader would claim, so ``load_t2i_adapter`` refuses them with
    a message saying what they are).

    Layouts: ComfyUI/TencentARC (``conv_in``, ``body.N.block1`` / ``body.N.in_conv``), the same under an
    ``adapter.`` prefix or a top-level ``adapter`` dict (key ``"adapter"``), diffusers (``adapter.body.N.resnets``).
    """
    ks = set(keys)
    if "adapter" in ks or _refusal(ks) is not None:
        return True
    bare = {k.removeprefix("adapter.") for k in ks}
    if "conv_in.weight" in bare and "body.0.block1.weight" in bare:
        return True
    if "body.0.in_conv.weight" in bare and "body.0.out_conv.weight" in bare:  # Adapter_light
        return True
    return "adapter.body.0.resnets.0.block1.weight" in ks  # diffusers (comfy's own test)


def _unwrap(tensors: Mapping[str, object], name: str) -> dict[str, torch.Tensor]:
    """A flat {ComfyUI key: tensor} dict from any supported layout (as ``load_t2i_adapter`` in comfy/controlnet.py).

    The diffusers renaming generalises ComfyUI's (which hard-codes 4 blocks of 2 resnets and leaves light
    adapters' ``resnets`` misnamed): full/XL ``adapter.body.i.resnets.j.`` -> ``body.{i * n + j}.``,
    ``adapter.body.i.in_conv`` -> ``body.{i * n}.in_conv`` (the block that changes the width), light
    ``adapter.body.i.resnets.j.`` -> ``body.i.body.j.``; ``adapter.`` is stripped.
    """
    inner = tensors.get("adapter") if "adapter" in tensors else None
    if isinstance(inner, Mapping):  # TencentARC training checkpoints: {"adapter": state_dict}
        tensors = inner
    sd = {k: v for k, v in tensors.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise ControlNetError(f"{name}: no tensors found (expected a T2I-Adapter state dict)")
    if (what := _refusal(sd)) is not None:
        raise ControlNetError(f"{name}: this is {what}")
    diffusers = any(_DIFFUSERS_RE.fullmatch(k) for k in sd)
    if not diffusers:
        if all(k.startswith("adapter.") for k in sd):
            sd = {k[len("adapter.") :]: v for k, v in sd.items()}
        return sd
    light = "adapter.body.0.out_conv.weight" in sd
    n = 1 + max(int(m.group(2)) for k in sd if (m := _DIFFUSERS_RE.fullmatch(k)) and m.group(1) == "0")
    out = {}
    for k, v in sd.items():
        if m := _DIFFUSERS_RE.fullmatch(k):
            i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            out[f"body.{i}.body.{j}.{rest}" if light else f"body.{i * n + j}.{rest}"] = v
        elif m := _DIFFUSERS_BLOCK_RE.fullmatch(k):
            i, rest = int(m.group(1)), m.group(2)
            out[f"body.{i}.{rest}" if light else f"body.{i * n}.{rest}"] = v
        else:
            out[k.removeprefix("adapter.")] = v
    return out


def _shape(sd: Mapping[str, torch.Tensor], key: str, name: str) -> tuple[int, ...]:
    if key not in sd:
        raise ControlNetError(f"{name}: T2I-Adapter tensor {key!r} is missing")
    return tuple(sd[key].shape)


def config_from_state_dict(sd: Mapping[str, torch.Tensor], name: str = "state dict") -> T2IAdapterConfig:
    """The architecture of a ComfyUI-layout adapter state dict, read from its shapes like ComfyUI does.

    Light (``body.0.in_conv``): ``cin``, widths and blocks per stage from the tensors (ComfyUI hard-codes
    320/640/1280/1280 and 4). Full (``conv_in``): widths c, 2c, 4c, 4c from ``conv_in``, ``ksize`` from
    ``body.0.block2``, ``use_conv`` when a ``down_opt.op.weight`` exists, SDXL when ``cin`` is 256 or 768
    (ComfyUI's test); blocks per stage from the number of ``body`` blocks (ComfyUI hard-codes 2). Files with
    ``skep`` convs (TencentARC ``sk=False``) are refused: ComfyUI would silently drop those weights.
    """
    keys = set(sd)
    body = {int(m.group(1)) for k in keys if (m := re.match(r"body\.(\d+)\.", k))}
    if "conv_in.weight" in keys:
        if skep := sorted(k for k in keys if ".skep." in k):
            raise ControlNetError(
                f"{name}: unsupported T2I-Adapter variant with skip convs ({skep[0]!r}, TencentARC sk=False); "
                "ComfyUI and ControlStack run only the published sk=True layout"
            )
        c, cin = _shape(sd, "conv_in.weight", name)[:2]
        if len(body) == 0 or len(body) % _STAGES or body != set(range(len(body))):
            raise ControlNetError(
                f"{name}: a T2I-Adapter needs 4 stages of body blocks, found blocks {sorted(body)[:12]}"
            )
        cfg = T2IAdapterConfig(
            light=False,
            cin=cin,
            channels=(c, 2 * c, 4 * c, 4 * c),
            nums_rb=len(body) // _STAGES,
            ksize=_shape(sd, "body.0.block2.weight", name)[2],
            use_conv=any(k.endswith("down_opt.op.weight") for k in keys),
            xl=cin in _XL_CIN,
        )
    elif "body.0.in_conv.weight" in keys:
        if body != set(range(_STAGES)):
            raise ControlNetError(f"{name}: a light T2I-Adapter needs body.0 .. body.3, found {sorted(body)}")
        cin = _shape(sd, "body.0.in_conv.weight", name)[1]
        channels = tuple(_shape(sd, f"body.{i}.out_conv.weight", name)[0] for i in range(_STAGES))
        rb = {int(m.group(1)) for k in keys if (m := re.match(r"body\.0\.body\.(\d+)\.", k))}
        if not rb:
            raise ControlNetError(f"{name}: T2I-Adapter tensor 'body.0.body.0.block1.weight' is missing")
        cfg = T2IAdapterConfig(light=True, cin=cin, channels=channels, nums_rb=len(rb))  # type: ignore[arg-type]
    else:
        sample = ", ".join(sorted(keys)[:5])
        raise ControlNetError(
            f"{name}: not a T2I-Adapter (no conv_in.weight or body.0.in_conv.weight; keys: {sample}, ...)"
        )
    if cfg.cin % cfg.unshuffle**2 or cfg.input_channels not in (1, 3):
        raise ControlNetError(
            f"{name}: T2I-Adapter input width {cfg.cin} is not 1 or 3 hint channels x {cfg.unshuffle}^2 "
            f"(expected {', '.join(str(k * cfg.unshuffle**2) for k in (1, 3))})"
        )
    return cfg


def build_t2i_adapter(
    config: T2IAdapterConfig,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    name: str = "T2I-Adapter",
    operations: Operations | None = None,
) -> T2IAdapter:
    """An adapter with default-initialised (or, on ``meta``, unallocated) weights."""
    with torch.device(device or "cpu"):
        model = T2IAdapter(config, name=name, operations=operations or TorchOperations)
    return model.to(dtype=dtype) if dtype is not None else model


def load_t2i_adapter(
    tensors: Mapping[str, torch.Tensor],
    name: str,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    operations: Operations | None = None,
) -> T2IAdapter:
    """Load a T2I-Adapter from a state dict in any supported layout (see ``is_t2i_adapter``).

    Mirrors ``comfy/controlnet.py:load_t2i_adapter`` but strictly: a missing or mis-shaped tensor raises
    ControlNetError naming it (ComfyUI only logs a warning and keeps random weights); unexpected extra tensors are
    logged and ignored, as ComfyUI does. ``dtype`` defaults to the file's dtype.
    """
    sd = _unwrap(tensors, name)
    config = config_from_state_dict(sd, name)
    model = build_t2i_adapter(config, device="meta", name=name, operations=operations)
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ControlNetError(
            f"{name}: T2I-Adapter tensor {missing[0]!r} is missing ({len(missing)} missing in all; "
            f"{'light' if config.light else 'SDXL' if config.xl else 'full'} adapter)"
        )
    for k, ref in expected.items():
        if tuple(sd[k].shape) != tuple(ref.shape):
            raise ControlNetError(
                f"{name}: T2I-Adapter tensor {k!r} has shape {tuple(sd[k].shape)}, expected {tuple(ref.shape)}"
            )
    unexpected = sorted(set(sd) - set(expected))
    if unexpected:
        log.warning(
            "%s: ignoring %d unexpected T2I-Adapter tensors: %s", name, len(unexpected), unexpected[:5]
        )
    first = sd[next(iter(expected))]
    dtype = dtype or (first.dtype if first.dtype.is_floating_point else torch.float32)
    device = torch.device(device or "cpu")
    model.load_state_dict(
        {k: sd[k].to(device=device, dtype=dtype) for k in expected}, strict=True, assign=True
    )
    log.info("loaded %s: %s T2I-Adapter, %s", name, model.family, dtype)
    return model.eval().requires_grad_(False)
