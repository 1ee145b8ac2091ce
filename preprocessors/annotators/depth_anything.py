"""Depth Anything V2 (relative depth): DINOv2 ViT-S/B/L-14 and the DPT head, on the authors' published files.

Pure torch. Module and parameter names equal the authors' ``DepthAnythingV2`` class
(github.com/DepthAnything/Depth-Anything-V2, ``depth_anything_v2/dpt.py``), so ``depth_anything_v2_vit{s,b,l}.pth``
load as they are: ``pretrained.*`` is the DINOv2 ViT (patch 14, 518 px, layer scale, no registers) and
``depth_head.*`` the DPT head (reassemble ``projects`` / ``resize_layers``, ``scratch`` fusion and output convs).
The size is read from the file (the embedding width); the tapped blocks and head widths are the authors'.

Pre/post-processing is the authors' ``infer_image`` as comfyui_controlnet_aux's Depth Anything V2 preprocessor
calls it: keep-aspect resize so the short side is at least ``input_size`` (both sides multiples of 14,
``lower_bound``) with bicubic interpolation, ImageNet normalisation, and the depth resized back bilinearly
(align_corners) to the frame; the hint is that depth min/max-normalised per frame and truncated to uint8 gray.
The bicubic resize runs in torch on the whole batch: torch's ``bicubic`` (A = -0.75, half-pixel centres, edge
clamping, no antialias) is OpenCV's ``INTER_CUBIC``; the two differ by float rounding only (checked in the tests).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import check_state_dict

__all__ = [
    "NETWORK",
    "FILES",
    "SOURCE",
    "SOURCES",
    "LICENSE",
    "LICENSES",
    "CONFIGS",
    "DepthAnythingV2",
    "build",
    "detect",
    "network_input",
    "resized_size",
]

NETWORK = "Depth Anything V2"
FILES = ("depth_anything_v2_vits.pth", "depth_anything_v2_vitb.pth", "depth_anything_v2_vitl.pth")
SOURCES = {
    "depth_anything_v2_vits.pth": "https://huggingface.co/depth-anything/Depth-Anything-V2-Small",
    "depth_anything_v2_vitb.pth": "https://huggingface.co/depth-anything/Depth-Anything-V2-Base",
    "depth_anything_v2_vitl.pth": "https://huggingface.co/depth-anything/Depth-Anything-V2-Large",
}
SOURCE = SOURCES[FILES[0]]
# The authors' README: Small is Apache-2.0, Base/Large/Giant are CC-BY-NC-4.0 (non-commercial use only).
LICENSES = {
    "depth_anything_v2_vits.pth": "Apache-2.0",
    "depth_anything_v2_vitb.pth": "CC-BY-NC-4.0",
    "depth_anything_v2_vitl.pth": "CC-BY-NC-4.0",
}
LICENSE = LICENSES[FILES[0]]

# Per embedding width: the authors' run.py ``model_configs`` (features, out_channels) and dpt.py
# ``intermediate_layer_idx`` (blocks whose outputs feed the head), DINOv2's depth and heads (64 channels each).
CONFIGS: dict[int, dict] = {
    384: {"encoder": "vits", "depth": 12, "heads": 6, "layers": (2, 5, 8, 11), "features": 64,
          "out_channels": (48, 96, 192, 384)},
    768: {"encoder": "vitb", "depth": 12, "heads": 12, "layers": (2, 5, 8, 11), "features": 128,
          "out_channels": (96, 192, 384, 768)},
    1024: {"encoder": "vitl", "depth": 24, "heads": 16, "layers": (4, 11, 17, 23), "features": 256,
           "out_channels": (256, 512, 1024, 1024)},
}  # fmt: skip

_PATCH = 14
# DINOv2 is trained at 518 px: a 37 x 37 grid of position embeddings (+ the class token's).
_GRID = 37
# DINOv2's work-around for float error when it resizes the position embeddings (interpolate_offset).
_POS_OFFSET = 0.1
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
INPUT_SIZE_RANGE = (28, 2016)
# Frames per forward: bounds activation memory (the head's last maps are input-sized, up to 128 channels).
_CHUNK = 8


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """DINOv2 block: pre-norm attention and MLP, each scaled per channel (LayerScale) before the residual add."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim)
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, dim, _PATCH, stride=_PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoVisionTransformer(nn.Module):
    """``pretrained``: DINOv2 ViT-14. ``mask_token`` (masked-image training) is in the file but unused here."""

    def __init__(self, dim: int, depth: int, heads: int) -> None:
        super().__init__()
        self.patch_embed = PatchEmbed(dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + _GRID * _GRID, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mask_token = nn.Parameter(torch.zeros(1, dim))

    def resized_pos_embed(self, grid_h: int, grid_w: int) -> torch.Tensor:
        """The 37 x 37 grid resized to the token grid as DINOv2's ``interpolate_pos_encoding`` does it: bicubic
        in fp32 by a *scale factor* of (n + 0.1) / 37 (not to a size: the sample positions differ slightly),
        no antialias; unchanged for a 37 x 37 grid."""
        if grid_h == grid_w == _GRID:
            return self.pos_embed
        dtype = self.pos_embed.dtype
        pos = self.pos_embed.float()
        grid = pos[:, 1:].reshape(1, _GRID, _GRID, -1).permute(0, 3, 1, 2)
        scale = ((grid_h + _POS_OFFSET) / _GRID, (grid_w + _POS_OFFSET) / _GRID)
        grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, -1)
        return torch.cat([pos[:, :1], grid], dim=1).to(dtype)

    def intermediate_layers(self, x: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
        """The final-norm'ed patch tokens (class token dropped) after each block in ``layers``."""
        b, _, h, w = x.shape
        tokens = torch.cat([self.cls_token.expand(b, -1, -1), self.patch_embed(x)], dim=1)
        tokens = tokens + self.resized_pos_embed(h // _PATCH, w // _PATCH)
        taps = []
        for i, block in enumerate(self.blocks[: max(layers) + 1]):
            tokens = block(tokens)
            if i in layers:
                taps.append(self.norm(tokens)[:, 1:])
        return taps


class ResidualConvUnit(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(features, features, 3, padding=1)
        self.conv2 = nn.Conv2d(features, features, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(F.relu(x)))) + x


class FeatureFusionBlock(nn.Module):
    """DPT fusion: add the refined skip, refine, resize bilinearly (align_corners) to the next finer map's size
    (x2 for the last block), 1x1 conv."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.out_conv = nn.Conv2d(features, features, 1)
        self.resConfUnit1 = ResidualConvUnit(features)
        self.resConfUnit2 = ResidualConvUnit(features)

    def forward(
        self, x: torch.Tensor, skip: torch.Tensor | None = None, size: torch.Size | None = None
    ) -> torch.Tensor:
        if skip is not None:
            x = x + self.resConfUnit1(skip)
        x = self.resConfUnit2(x)
        if size is None:
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        else:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=True)
        return self.out_conv(x)


class Scratch(nn.Module):
    def __init__(self, out_channels: tuple[int, ...], features: int) -> None:
        super().__init__()
        for i, channels in enumerate(out_channels, start=1):
            setattr(self, f"layer{i}_rn", nn.Conv2d(channels, features, 3, padding=1, bias=False))
        for i in range(1, 5):
            setattr(self, f"refinenet{i}", FeatureFusionBlock(features))
        self.output_conv1 = nn.Conv2d(features, features // 2, 3, padding=1)
        # Indices as in the file: conv, relu, conv, relu (non-negative depth), identity.
        self.output_conv2 = nn.Sequential(
            nn.Conv2d(features // 2, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 1, 1),
            nn.ReLU(),
            nn.Identity(),
        )


class DPTHead(nn.Module):
    def __init__(self, dim: int, features: int, out_channels: tuple[int, ...]) -> None:
        super().__init__()
        self.projects = nn.ModuleList(nn.Conv2d(dim, c, 1) for c in out_channels)
        # Token maps at 1/14 become 4x, 2x, 1x and 1/2x that (transposed convs up, a strided conv down).
        self.resize_layers = nn.ModuleList(
            [
                nn.ConvTranspose2d(out_channels[0], out_channels[0], 4, stride=4),
                nn.ConvTranspose2d(out_channels[1], out_channels[1], 2, stride=2),
                nn.Identity(),
                nn.Conv2d(out_channels[3], out_channels[3], 3, stride=2, padding=1),
            ]
        )
        self.scratch = Scratch(out_channels, features)

    def forward(self, taps: list[torch.Tensor], grid_h: int, grid_w: int) -> torch.Tensor:
        s = self.scratch
        maps = []
        for tokens, project, resize in zip(taps, self.projects, self.resize_layers, strict=True):
            feat = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], grid_h, grid_w)
            maps.append(resize(project(feat)))
        layer_1, layer_2, layer_3, layer_4 = (rn(m) for rn, m in zip(
            (s.layer1_rn, s.layer2_rn, s.layer3_rn, s.layer4_rn), maps, strict=True))  # fmt: skip
        path = s.refinenet4(layer_4, size=layer_3.shape[2:])
        path = s.refinenet3(path, layer_3, size=layer_2.shape[2:])
        path = s.refinenet2(path, layer_2, size=layer_1.shape[2:])
        path = s.refinenet1(path, layer_1)
        out = s.output_conv1(path)
        out = F.interpolate(out, (grid_h * _PATCH, grid_w * _PATCH), mode="bilinear", align_corners=True)
        return s.output_conv2(out)


class DepthAnythingV2(nn.Module):
    """B x 3 x H x W ImageNet-normalised RGB (H, W multiples of 14) -> B x H x W relative inverse depth (>= 0)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        config = CONFIGS[dim]
        self.encoder: str = config["encoder"]
        self.layers: tuple[int, ...] = config["layers"]
        self.pretrained = DinoVisionTransformer(dim, config["depth"], config["heads"])
        self.depth_head = DPTHead(dim, config["features"], config["out_channels"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid_h, grid_w = x.shape[-2] // _PATCH, x.shape[-1] // _PATCH
        taps = self.pretrained.intermediate_layers(x, self.layers)
        # The authors apply one more ReLU; after the head's own it changes nothing.
        return self.depth_head(taps, grid_h, grid_w).squeeze(1)


def build(sd: Mapping[str, torch.Tensor], name: str) -> DepthAnythingV2:
    """Depth Anything V2 with the weights of ``sd`` (from ``common.read_state_dict``); ``name`` is the file, for
    errors. The size (vits / vitb / vitl) comes from the embedding width; anything that is not exactly one of the
    three published layouts raises AnnotatorFileError.

    The module is made on the meta device and takes the file's tensors (as fp32) without a copy, so a 335M
    parameter vitl file is not held twice; meta tensors in ``sd`` give a meta module (shape checks).
    """
    pos = sd.get("pretrained.pos_embed")
    dim = int(pos.shape[-1]) if pos is not None and pos.ndim == 3 else 0
    # An unknown width (another network, or the vitg file whose FFN differs) is checked against vits, so the
    # message lists what is missing or shaped otherwise.
    with torch.device("meta"):
        net = DepthAnythingV2(dim if dim in CONFIGS else 384)
    expected = {k: v.shape for k, v in net.state_dict().items()}
    check_state_dict(sd, expected, NETWORK, name, FILES)
    net.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True, assign=True)
    return net.eval().requires_grad_(False)


def resized_size(height: int, width: int, input_size: int = 518) -> tuple[int, int]:
    """(height, width) the network sees, as the authors' ``Resize(input_size, input_size, keep_aspect_ratio=True,
    ensure_multiple_of=14, resize_method='lower_bound')``: one scale for both sides, the larger of the two that
    would make a side ``input_size``, each side rounded (numpy's half-to-even) to a multiple of 14 and rounded up
    instead where that falls below ``input_size``."""
    scale_h, scale_w = input_size / height, input_size / width
    if scale_w > scale_h:
        scale_h = scale_w
    else:
        scale_w = scale_h

    def constrain(x: float) -> int:
        y = int(np.round(x / _PATCH) * _PATCH)
        return int(np.ceil(x / _PATCH) * _PATCH) if y < input_size else y

    return constrain(scale_h * height), constrain(scale_w * width)


def _check_input_size(input_size: object) -> int:
    low, high = INPUT_SIZE_RANGE
    if (
        isinstance(input_size, bool)
        or not isinstance(input_size, (int, np.integer))
        or not low <= input_size <= high
        or input_size % _PATCH
    ):
        raise ValueError(
            f"input_size: expected a multiple of {_PATCH} in [{low}, {high}], got {input_size!r}"
        )
    return int(input_size)


def network_input(images: torch.Tensor, input_size: int = 518) -> torch.Tensor:
    """B x H x W x 3 RGB in [0, 1] -> the B x 3 x h x w fp32 network input of the authors' ``image2tensor``:
    uint8 pixels / 255, bicubic resize to :func:`resized_size`, ImageNet mean / std (on the images' device)."""
    input_size = _check_input_size(input_size)
    size = resized_size(images.shape[1], images.shape[2], input_size)
    # The preprocessor gets uint8 pixels and divides by 255 (in float64; fp32 here changes ~1e-7).
    pixels = (images.float() * 255).round().clamp(0, 255) / 255.0
    x = F.interpolate(pixels.permute(0, 3, 1, 2), size=size, mode="bicubic", align_corners=False)
    mean = torch.tensor(_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def _hint(depth: torch.Tensor) -> torch.Tensor:
    """B x H x W fp32 depth -> B x H x W x 3 uint8 gray levels (as float), as the preprocessor: ``(d - min) /
    (max - min) * 255.0`` in fp32 per frame, truncated. A constant frame (0/0 there) is black here."""
    low = depth.amin(dim=(1, 2), keepdim=True)
    span = depth.amax(dim=(1, 2), keepdim=True) - low
    normalised = (depth - low) / torch.where(span > 0, span, torch.ones_like(span)) * 255.0
    return normalised.clamp(0, 255).floor().unsqueeze(-1).expand(-1, -1, -1, 3)


def detect(net: nn.Module, images: torch.Tensor, *, input_size: int = 518) -> torch.Tensor:
    """Depth Anything V2 hint (gray relative depth, near = white) of B x H x W x 3 RGB frames in [0, 1].

    ``input_size`` (default 518, a multiple of 14 in [28, 2016]) is the short side the network sees (the
    authors' ``--input-size``; comfyui_controlnet_aux fixes it at 518). Larger gives finer detail and costs
    roughly quadratically. Returns B x H x W x 3 float32 in [0, 1] (uint8 levels / 255) on the images' device.
    """
    input_size = _check_input_size(input_size)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected B x H x W x 3, got {tuple(images.shape)}")
    h, w = images.shape[1:3]
    param = next(net.parameters())
    outs = []
    with torch.inference_mode():
        for chunk in images.split(_CHUNK):
            x = network_input(chunk.to(param.device), input_size).to(param.dtype)
            depth = net(x).float().unsqueeze(1)
            depth = F.interpolate(depth, (h, w), mode="bilinear", align_corners=True).squeeze(1)
            outs.append(_hint(depth))
    return (torch.cat(outs) / 255.0).to(images.device)
