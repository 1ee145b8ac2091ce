"""MiDaS DPT-Hybrid depth (ControlNet's "depth" annotator) and the normal map ControlNet 1.0 derived from it.

Pure torch: the network is MiDaS v3 DPT-Hybrid (Ranftl et al., "Vision Transformers for Dense Prediction"), a
ResNet-50 V2 stem + 3 stages (weight-standardised convs, GroupNorm, TF "SAME" padding) feeding a ViT-B/16 at
384 px, whose position embeddings are resized bilinearly to other input sizes, and the DPT reassemble / fusion /
depth head. Module and parameter names equal the published ``dpt_hybrid-midas-501f0c75.pt`` (as the reference
``controlnet_aux.midas`` builds it on timm's ``vit_base_resnet50_384``), so the file loads as it is.

Post-processing is ``controlnet_aux.midas.MidasDetector.__call__``: the inverse depth, min/max-normalised per
frame, truncated to uint8; the normal map is the 3x3 Sobel gradient of the raw inverse depth with ``z = a``,
flattened where the normalised depth is below ``bg_threshold`` (the far background), unit-normalised and stored
as (z, y, x) in RGB (the reference writes BGR order and reverses it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .common import check_state_dict

__all__ = ["NETWORK", "FILES", "SOURCE", "LICENSE", "MODES", "DPTHybrid", "build", "detect", "sobel"]

NETWORK = "MiDaS DPT-Hybrid"
FILES = ("dpt_hybrid-midas-501f0c75.pt",)
SOURCE = "https://huggingface.co/lllyasviel/Annotators"
LICENSE = "MIT"
MODES = ("depth", "normal")

_EMBED_DIM = 768
_NUM_HEADS = 12
_VIT_DEPTH = 12
_PATCH = 16
_STAGE_DEPTHS = (3, 4, 9)
_STAGE_CHANNELS = (256, 512, 1024)
_FEATURES = 256
# The DPT-Hybrid taps: ResNet stages 0 and 1 (layers 1-2) and the outputs of ViT blocks 8 and 11 (layers 3-4).
_HOOKS = (8, 11)
# Frames per forward: bounds activation memory (the stage-0 map alone is 256 x H/4 x W/4 per frame).
_CHUNK = 8


def _same_pad(x: torch.Tensor, kernel: int, stride: int, value: float = 0.0) -> torch.Tensor:
    """TensorFlow 'SAME' padding (timm ``pad_same``): total ``max((ceil(n/s)-1)*s + k - n, 0)``, extra on the
    bottom/right. For even sizes and stride 2 it is asymmetric, which torch's symmetric padding cannot express."""
    ih, iw = x.shape[-2:]
    pad_h = max((math.ceil(ih / stride) - 1) * stride + kernel - ih, 0)
    pad_w = max((math.ceil(iw / stride) - 1) * stride + kernel - iw, 0)
    if pad_h or pad_w:
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=value)
    return x


class StdConv2dSame(nn.Conv2d):
    """Conv with weight standardisation (zero mean, unit variance per output filter, eps 1e-8) and SAME padding,
    as timm's ``StdConv2dSame`` in the ViT-Hybrid backbone (no bias)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> None:
        # Static SAME padding (stride 1, odd kernel) is the symmetric (k-1)/2; otherwise it is computed per input.
        self.dynamic_pad = stride > 1
        padding = 0 if self.dynamic_pad else (kernel_size - 1) // 2
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.eps = 1e-8

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_pad:
            x = _same_pad(x, self.kernel_size[0], self.stride[0])
        # Standardise in fp32 (the variance of a 3x3x1024 filter in fp16 loses digits; eps 1e-8 underflows).
        w = self.weight.float().reshape(1, self.out_channels, -1)
        w = F.batch_norm(w, None, None, training=True, momentum=0.0, eps=self.eps).reshape_as(self.weight)
        return F.conv2d(x, w.to(x.dtype), None, self.stride, self.padding)


class GroupNormAct(nn.GroupNorm):
    """GroupNorm(32) optionally followed by ReLU (timm ``GroupNormAct``, eps 1e-5)."""

    def __init__(self, channels: int, act: bool = True) -> None:
        super().__init__(32, channels, eps=1e-5)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return F.relu(x) if self.act else x


class ConvNorm(nn.Module):
    """A (conv, norm) pair under the names the checkpoint uses for the stem and the projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int, act: bool) -> None:
        super().__init__()
        self.conv = StdConv2dSame(in_channels, out_channels, kernel_size, stride)
        self.norm = GroupNormAct(out_channels, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


class Bottleneck(nn.Module):
    """Post-activation ResNet bottleneck (timm ``resnetv2.Bottleneck``, preact=False); stride on the 3x3."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        mid = out_channels // 4
        self.downsample = (
            ConvNorm(in_channels, out_channels, 1, stride, act=False)
            if stride != 1 or in_channels != out_channels
            else None
        )
        self.conv1 = StdConv2dSame(in_channels, mid, 1)
        self.norm1 = GroupNormAct(mid)
        self.conv2 = StdConv2dSame(mid, mid, 3, stride)
        self.norm2 = GroupNormAct(mid)
        self.conv3 = StdConv2dSame(mid, out_channels, 1)
        self.norm3 = GroupNormAct(out_channels, act=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        x = self.norm1(self.conv1(x))
        x = self.norm2(self.conv2(x))
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class ResNetStage(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, depth: int, stride: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            *(
                Bottleneck(in_channels if i == 0 else out_channels, out_channels, stride if i == 0 else 1)
                for i in range(depth)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetV2(nn.Module):
    """The R50 part of ViT-Hybrid: 7x7/2 stem + SAME max-pool, then 3 stages (256@/4, 512@/8, 1024@/16)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvNorm(3, 64, 7, 2, act=True)
        stages = []
        in_channels = 64
        for i, (depth, channels) in enumerate(zip(_STAGE_DEPTHS, _STAGE_CHANNELS, strict=True)):
            stages.append(ResNetStage(in_channels, channels, depth, 1 if i == 0 else 2))
            in_channels = channels
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        # SAME max-pool pads with -inf so padding never wins the max (timm MaxPool2dSame).
        x = F.max_pool2d(_same_pad(x, 3, 2, value=-math.inf), 3, 2)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


class HybridEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = ResNetV2()
        self.proj = nn.Conv2d(_STAGE_CHANNELS[-1], _EMBED_DIM, 1)


class Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(_EMBED_DIM, 3 * _EMBED_DIM)
        self.proj = nn.Linear(_EMBED_DIM, _EMBED_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, _NUM_HEADS, c // _NUM_HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(_EMBED_DIM, 4 * _EMBED_DIM)
        self.fc2 = nn.Linear(4 * _EMBED_DIM, _EMBED_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(_EMBED_DIM, eps=1e-6)
        self.attn = Attention()
        self.norm2 = nn.LayerNorm(_EMBED_DIM, eps=1e-6)
        self.mlp = Mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformerHybrid(nn.Module):
    """ViT-B/16 on the R50 features. ``norm`` and ``head`` are in the checkpoint but DPT never uses them (it taps
    the block outputs before the final norm); they are kept so the file loads strictly."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, _EMBED_DIM))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + (384 // _PATCH) ** 2, _EMBED_DIM))
        self.patch_embed = HybridEmbed()
        self.blocks = nn.ModuleList(Block() for _ in range(_VIT_DEPTH))
        self.norm = nn.LayerNorm(_EMBED_DIM, eps=1e-6)
        self.head = nn.Linear(_EMBED_DIM, 1000)

    def resized_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The 24x24 grid resized to the input's token grid, as MiDaS' ``_resize_pos_embed``: bilinear with
        torch's default ``align_corners=False`` and no antialias (at 384 px it is the identity)."""
        tok, grid = self.pos_embed[:, :1], self.pos_embed[0, 1:]
        old = int(math.sqrt(len(grid)))
        grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bilinear")
        grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([tok, grid], dim=1)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[stage 0 map, stage 1 map, block-8 tokens, block-11 tokens]."""
        b, _, h, w = x.shape
        stage_maps = self.patch_embed.backbone(x)
        tokens = self.patch_embed.proj(stage_maps[-1]).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), tokens], dim=1)
        tokens = tokens + self.resized_pos_embed(h // _PATCH, w // _PATCH)
        taps = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i in _HOOKS:
                taps.append(tokens)
        return [stage_maps[0], stage_maps[1], *taps]


class ProjectReadout(nn.Module):
    """DPT 'project' readout: each patch token concatenated with the class token, Linear + GELU."""

    def __init__(self) -> None:
        super().__init__()
        self.project = nn.Sequential(nn.Linear(2 * _EMBED_DIM, _EMBED_DIM), nn.GELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        readout = x[:, 0].unsqueeze(1).expand_as(x[:, 1:])
        return self.project(torch.cat((x[:, 1:], readout), -1))


def _reassemble(with_downsample: bool) -> nn.Sequential:
    # Indices 1-2 (transpose, unflatten) hold no weights; identities keep the checkpoint's indices 0, 3, 4.
    layers: list[nn.Module] = [
        ProjectReadout(),
        nn.Identity(),
        nn.Identity(),
        nn.Conv2d(_EMBED_DIM, _EMBED_DIM, 1),
    ]
    if with_downsample:
        layers.append(nn.Conv2d(_EMBED_DIM, _EMBED_DIM, 3, stride=2, padding=1))
    return nn.Sequential(*layers)


class Backbone(nn.Module):
    """``pretrained`` in the checkpoint: the ViT-Hybrid and the reassemble layers for the two token taps."""

    def __init__(self) -> None:
        super().__init__()
        self.model = VisionTransformerHybrid()
        self.act_postprocess3 = _reassemble(with_downsample=False)
        self.act_postprocess4 = _reassemble(with_downsample=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        grid = (x.shape[2] // _PATCH, x.shape[3] // _PATCH)
        layer_1, layer_2, tokens_3, tokens_4 = self.model(x)
        maps = []
        for post, tokens in ((self.act_postprocess3, tokens_3), (self.act_postprocess4, tokens_4)):
            feat = post[0](tokens).transpose(1, 2).unflatten(2, grid)
            maps.append(post[3:](feat))
        return [layer_1, layer_2, *maps]


class ResidualConvUnit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(_FEATURES, _FEATURES, 3, padding=1)
        self.conv2 = nn.Conv2d(_FEATURES, _FEATURES, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class FeatureFusionBlock(nn.Module):
    """DPT fusion: add the refined skip, refine, upsample x2 (bilinear, align_corners=True), 1x1 conv.
    ``resConfUnit1`` of the deepest block has no skip to refine; its weights are in the file all the same."""

    def __init__(self) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(_FEATURES, _FEATURES, 1)
        self.resConfUnit1 = ResidualConvUnit()
        self.resConfUnit2 = ResidualConvUnit()

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Upsample2x(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class Scratch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        for i, channels in enumerate((256, 512, _EMBED_DIM, _EMBED_DIM), start=1):
            setattr(self, f"layer{i}_rn", nn.Conv2d(channels, _FEATURES, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self, f"refinenet{i}", FeatureFusionBlock())
        # Indices as in the file: conv, upsample, conv, relu, conv, relu (non-negative inverse depth), identity.
        self.output_conv = nn.Sequential(
            nn.Conv2d(_FEATURES, _FEATURES // 2, 3, padding=1),
            Upsample2x(),
            nn.Conv2d(_FEATURES // 2, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, 1),
            nn.ReLU(),
            nn.Identity(),
        )


class DPTHybrid(nn.Module):
    """MiDaS DPT-Hybrid: B x 3 x H x W in [-1, 1] (H, W multiples of 32) -> B x H x W relative inverse depth."""

    def __init__(self) -> None:
        super().__init__()
        self.pretrained = Backbone()
        self.scratch = Scratch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scratch
        layer_1, layer_2, layer_3, layer_4 = self.pretrained(x)
        path = s.refinenet4(s.layer4_rn(layer_4))
        path = s.refinenet3(path, s.layer3_rn(layer_3))
        path = s.refinenet2(path, s.layer2_rn(layer_2))
        path = s.refinenet1(path, s.layer1_rn(layer_1))
        return s.output_conv(path).squeeze(1)


def build(sd: Mapping[str, torch.Tensor], name: str) -> DPTHybrid:
    """DPT-Hybrid with the weights of ``sd`` (from ``common.read_state_dict``); ``name`` is the file, for errors.

    The architecture is fixed (one published file); any other tensor names or shapes raise AnnotatorFileError.
    """
    net = DPTHybrid()
    expected = {k: v.shape for k, v in net.state_dict().items()}
    check_state_dict(sd, expected, NETWORK, name, FILES)
    net.load_state_dict(dict(sd), strict=True)
    return net.eval().requires_grad_(False)


def sobel(depth: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``cv2.Sobel(d, CV_32F, 1, 0, ksize=3)`` and ``(0, 1)`` of B x H x W fp32 maps, bit-identical to OpenCV for
    widths that are multiples of 8 (its SIMD path; the scalar tail sums in another order).

    Separable as OpenCV computes it: a row pass, then a column pass, each a difference ``b - a`` or a smoothing
    ``(a + c) + 2 b``; border BORDER_REFLECT_101 (torch's 'reflect').
    """
    p = F.pad(depth.unsqueeze(1), (1, 1, 1, 1), mode="reflect").squeeze(1)
    row_diff = p[:, :, 2:] - p[:, :, :-2]
    gx = (row_diff[:, :-2] + row_diff[:, 2:]) + 2 * row_diff[:, 1:-1]
    row_smooth = (p[:, :, :-2] + p[:, :, 2:]) + 2 * p[:, :, 1:-1]
    gy = row_smooth[:, 2:] - row_smooth[:, :-2]
    return gx, gy


def _as_float(option: str, value: object) -> float:
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{option}: expected a number, got {value!r}") from None


def _check_options(mode: str, a: float, bg_threshold: float) -> tuple[str, float, float]:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {mode!r}")
    a, bg_threshold = _as_float("a", a), _as_float("bg_threshold", bg_threshold)
    # a is the normal's z against the Sobel gradient: 0 makes flat regions 0/0, negative flips the map.
    if not (math.isfinite(a) and 0 < a <= 1000):
        raise ValueError(f"a: expected a number in (0, 1000], got {a}")
    if not (0 <= bg_threshold <= 1):
        raise ValueError(f"bg_threshold: expected a number in [0, 1], got {bg_threshold}")
    return mode, a, bg_threshold


def _postprocess(depth: torch.Tensor, mode: str, a: float, bg_threshold: float) -> torch.Tensor:
    """B x H x W fp32 inverse depth -> B x H x W x 3 uint8 values (as float) of the reference's hint."""
    # depth_pt -= min; depth_pt /= max, per frame, in fp32 like the reference. A constant frame (max 0) would be
    # 0/0 there; it is black here.
    shifted = depth - depth.amin(dim=(1, 2), keepdim=True)
    top = shifted.amax(dim=(1, 2), keepdim=True)
    normalised = shifted / torch.where(top > 0, top, torch.ones_like(top))
    if mode == "depth":
        # (x * 255.0).clip(0, 255).astype(uint8): truncation, which is floor for these non-negative values.
        return (normalised * 255.0).clamp(0, 255).floor().unsqueeze(-1).expand(-1, -1, -1, 3)
    gx, gy = sobel(depth)
    # numpy compares a float32 array with a Python float in float32 (NEP 50): do the same.
    background = normalised < torch.tensor(bg_threshold, dtype=torch.float32, device=depth.device)
    gx = gx.masked_fill(background, 0.0)
    gy = gy.masked_fill(background, 0.0)
    gz = torch.full_like(gx, a)
    # The reference's np.sum(normal ** 2, axis=2) ** 0.5 adds x^2 + y^2 first, then z^2.
    squared = gx * gx + gy * gy + gz * gz
    # numpy's sqrt is correctly rounded; torch's vectorised fp32 sqrt on CPU is not always (1 ulp, which moves a
    # gray level now and then). A float64 sqrt rounded to float32 is the correctly rounded fp32 result.
    wide = torch.float32 if squared.device.type == "mps" else torch.float64
    length = torch.sqrt(squared.to(wide)).float()
    # Stored reversed ([:, :, ::-1] of x, y, z): RGB = (z, y, x).
    normal = torch.stack([gz / length, gy / length, gx / length], dim=-1)
    return (normal * 127.5 + 127.5).clamp(0, 255).floor()


def detect(
    net: nn.Module,
    images: torch.Tensor,
    *,
    mode: str = "depth",
    a: float = math.pi * 2.0,
    bg_threshold: float = 0.1,
) -> torch.Tensor:
    """MiDaS hint of B x H x W x 3 RGB frames in [0, 1] (H, W multiples of 32; the caller gives 64-multiples).

    ``mode``: "depth" (gray inverse depth, near = white) or "normal" (ControlNet 1.0 normal-from-depth).
    ``a`` (default 2 pi) and ``bg_threshold`` (default 0.1, fraction of the frame's depth range) are
    MidasDetector's ``a`` and ``bg_th``; they only affect "normal". Returns B x H x W x 3 float32 in [0, 1]
    (uint8 levels / 255) on the images' device.
    """
    mode, a, bg_threshold = _check_options(mode, a, bg_threshold)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected B x H x W x 3, got {tuple(images.shape)}")
    h, w = images.shape[1:3]
    if h % 32 or w % 32:
        raise ValueError(f"images: height and width must be multiples of 32 for DPT, got {h} x {w}")
    param = next(net.parameters())
    outs = []
    with torch.inference_mode():
        for chunk in images.split(_CHUNK):
            # The reference gets uint8 pixels and feeds x / 127.5 - 1 in fp32.
            pixels = (chunk.to(param.device, torch.float32) * 255).round().clamp(0, 255)
            # Contiguous NCHW: on CPU the conv algorithm (and so the last bits) follows the memory format, and
            # the reference's 1 x C x H x W view is taken as NCHW-contiguous.
            x = (pixels / 127.5 - 1.0).permute(0, 3, 1, 2).to(param.dtype).contiguous()
            depth = net(x).float()
            outs.append(_postprocess(depth, mode, a, bg_threshold))
    return (torch.cat(outs) / 255.0).to(images.device)
