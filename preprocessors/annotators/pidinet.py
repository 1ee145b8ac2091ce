"""PiDiNet soft edges (Su et al., ICCV 2021; ``table5_pidinet.pth``), as controlnet_aux 0.0.10's
``PidiNetDetector`` computes it, batched over frames.

PiDiNet is a light depthwise-separable CNN whose 3x3 depthwise convs are *pixel difference* convolutions:
central (``cd``: each neighbour minus the centre), angular (``ad``: each neighbour minus the next one clockwise)
and radial (``rd``: the outer 5x5 ring minus the inner ring), in the "carv4" order (cd, ad, rd, vanilla) x 4.
The published file holds the raw 3x3 difference kernels; the reference applies the difference ops at every
forward (it does not convert them to vanilla kernels at load, although the paper's code can), so we do exactly
the same: the same kernels, built from the same weights, in the same arithmetic.
Then a compact dilation module (CDCM) and spatial attention (CSAM) per stage, a 1x1 reduction to one channel,
bilinear upsampling of the four stage maps, and a learnt 1x1 fusion with a sigmoid.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .common import check_flag, check_state_dict, finish_hint, quantised_pixels, safe_step, to_levels

__all__ = ["NETWORK", "FILES", "SOURCE", "LICENSE", "PiDiNetNetwork", "build", "detect"]

NETWORK = "PiDiNet"
FILES = ("table5_pidinet.pth",)
SOURCE = "https://huggingface.co/lllyasviel/Annotators"
# hellozhuo/pidinet's LICENSE: the MIT text, headed "It is just for research purpose, and commercial use should
# be contacted with authors first." -- so research use only, unlike the Apache-2.0 HED retrain.
LICENSE = "MIT, research use only (commercial use: ask the authors)"

# controlnet_aux.pidi.model.nets["carv4"], layer0 .. layer15 (layer0 is the stem).
CARV4 = ("cd", "ad", "rd", "cv") * 4
# The reference's default pidinet(): 60 stem channels, CDCM width 24, CSAM on (the published file's config).
_DEFAULT_WIDTH, _DEFAULT_DILATION = 60, 24
# 'ad' pairs each tap of the flattened 3x3 kernel with its clockwise neighbour (the centre with itself).
_CLOCKWISE = (3, 0, 1, 6, 4, 2, 7, 8, 5)
# 'rd' spreads the 8 outer taps onto a 5x5 kernel: + on the outer ring, - on the inner ring, 0 at the centre.
_RD_OUTER = (0, 2, 4, 10, 14, 20, 22, 24)
_RD_INNER = (6, 7, 8, 11, 13, 16, 17, 18)


class PixelDifferenceConv(nn.Module):
    """A pixel-difference conv (stride 1, same size out) holding its raw 3x3 kernel as ``weight``, no bias; ``rd``
    applies it as a 5x5 kernel (padding 2), the others as 3x3 (padding 1)."""

    def __init__(self, op: str, in_channels: int, out_channels: int, groups: int = 1) -> None:
        super().__init__()
        if op not in ("cv", "cd", "ad", "rd"):
            raise ValueError(f"op: expected cv, cd, ad or rd, got {op!r}")
        self.op = op
        self.groups = groups
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, 3, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, groups = self.weight, self.groups
        if self.op == "cv":
            return F.conv2d(x, w, padding=1, groups=groups)
        if self.op == "cd":
            # As the reference: the full conv minus the centre pixel times the kernel's sum (two convs, not one
            # folded kernel, so the rounding is the reference's too).
            centre = F.conv2d(x, w.sum(dim=[2, 3], keepdim=True), groups=groups)
            return F.conv2d(x, w, padding=1, groups=groups) - centre
        flat = w.reshape(w.shape[0], w.shape[1], 9)
        if self.op == "ad":
            kernel = (flat - flat[:, :, list(_CLOCKWISE)]).reshape(w.shape)
            return F.conv2d(x, kernel, padding=1, groups=groups)
        ring = w.new_zeros(w.shape[0], w.shape[1], 25)
        ring[:, :, list(_RD_OUTER)] = flat[:, :, 1:]
        ring[:, :, list(_RD_INNER)] = -flat[:, :, 1:]
        return F.conv2d(x, ring.reshape(w.shape[0], w.shape[1], 5, 5), padding=2, groups=groups)


class _PDCBlock(nn.Module):
    """Depthwise pixel-difference conv, ReLU, pointwise conv, residual (with 2x max-pool and a 1x1 shortcut)."""

    def __init__(self, op: str, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        if stride > 1:
            self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1)
        self.conv1 = PixelDifferenceConv(op, in_channels, in_channels, groups=in_channels)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = self.pool(x)
        y = self.conv2(F.relu(self.conv1(x)))
        if self.stride > 1:
            x = self.shortcut(x)
        return y + x


class _CSAM(nn.Module):
    """Compact spatial attention: the features times a sigmoid mask computed from them."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 4, 1)
        self.conv2 = nn.Conv2d(4, 1, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.conv2(self.conv1(F.relu(x))))


class _CDCM(nn.Module):
    """Compact dilation module: a 1x1 squeeze, then four 3x3 convs dilated 5, 7, 9, 11, summed."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 1)
        for i, d in enumerate((5, 7, 9, 11), start=1):
            self.add_module(
                f"conv2_{i}", nn.Conv2d(out_channels, out_channels, 3, dilation=d, padding=d, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(F.relu(x))
        return self.conv2_1(x) + self.conv2_2(x) + self.conv2_3(x) + self.conv2_4(x)


class _MapReduce(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class PiDiNetNetwork(nn.Module):
    """controlnet_aux.pidi.model.PiDiNet (unconverted) under the published key names (``init_block``,
    ``block{stage}_{n}``, ``dilations``, ``attentions``, ``conv_reduces``, ``classifier``)."""

    def __init__(self, width: int = _DEFAULT_WIDTH, dilation: int = _DEFAULT_DILATION) -> None:
        super().__init__()
        self.init_block = PixelDifferenceConv(CARV4[0], 3, width)
        # (stage, blocks, channels): stages 2 and 3 double the width, stage 4 keeps it; each later stage starts
        # with a stride-2 block.
        stages = ((1, 3, width), (2, 4, 2 * width), (3, 4, 4 * width), (4, 4, 4 * width))
        layer, channels, self.stage_channels = 1, width, []
        for stage, blocks, out_channels in stages:
            for n in range(1, blocks + 1):
                stride = 2 if stage > 1 and n == 1 else 1
                self.add_module(f"block{stage}_{n}", _PDCBlock(CARV4[layer], channels, out_channels, stride))
                layer, channels = layer + 1, out_channels
            self.stage_channels.append(out_channels)
        self.blocks = [[f"block{s}_{n}" for n in range(1, b + 1)] for s, b, _ in stages]
        # The reference's sa=True, dil=24 branch (pidinet()): CDCM, then CSAM, then the 1x1 reduction.
        self.dilations = nn.ModuleList(_CDCM(c, dilation) for c in self.stage_channels)
        self.attentions = nn.ModuleList(_CSAM(dilation) for _ in self.stage_channels)
        self.conv_reduces = nn.ModuleList(_MapReduce(dilation) for _ in self.stage_channels)
        self.classifier = nn.Conv2d(4, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W BGR in [0, 1] -> the fused edge probability, B x 1 x H x W (the reference's ``[-1]``)."""
        height, width = x.shape[-2:]
        h = self.init_block(x)
        edges = []
        for i, names in enumerate(self.blocks):
            for name in names:
                h = getattr(self, name)(h)
            e = self.conv_reduces[i](self.attentions[i](self.dilations[i](h)))
            edges.append(F.interpolate(e, (height, width), mode="bilinear", align_corners=False))
        return torch.sigmoid(self.classifier(torch.cat(edges, dim=1)))


def _config(sd: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    """(stem width, CDCM width) read from the tensors, the defaults where a key is missing or odd, so that the
    shape check names what is wrong instead of a KeyError here. CDCM and CSAM are always built: the published
    file has them, and a file without them is damaged or another variant, refused by the check."""
    stem, squeeze = sd.get("init_block.weight"), sd.get("dilations.0.conv1.weight")
    width = int(stem.shape[0]) if stem is not None and stem.ndim == 4 else _DEFAULT_WIDTH
    dilation = int(squeeze.shape[0]) if squeeze is not None and squeeze.ndim == 4 else _DEFAULT_DILATION
    return width, dilation


def build(sd: Mapping[str, torch.Tensor], name: str) -> PiDiNetNetwork:
    """The PiDiNet holding ``sd`` (``table5_pidinet.pth`` after ``read_state_dict``: its ``state_dict`` wrapper
    and ``module.`` prefix gone), in eval mode, without gradients. Width, CDCM and CSAM are read from the shapes
    (so the paper's other carv4 checkpoints with CDCM and CSAM, -small / -tiny, load too)."""
    net = PiDiNetNetwork(*_config(sd))
    expected = {k: v.shape for k, v in net.state_dict().items()}
    check_state_dict(sd, expected, NETWORK, name, FILES)
    net.load_state_dict(dict(sd), strict=True)
    return net.eval().requires_grad_(False)


def detect(
    net: nn.Module,
    images: torch.Tensor,
    *,
    safe: bool = False,
    scribble: bool = False,
    apply_filter: bool = False,
) -> torch.Tensor:
    """PidiNetDetector's hint for each frame: B x H x W x 3 float32 [0, 1] (uint8 levels / 255) on the images'
    device.

    ``images``: B x H x W x 3 RGB float [0, 1], H and W multiples of 64 (read as the reference's uint8 pixels;
    the network sees them as BGR / 255, as it was trained). ``apply_filter``: binarise at probability 0.5.
    ``safe``: quantise to 0, 0.5, 1. ``scribble``: thin and binarise into strokes (for the scribble ControlNets).
    One batched forward; everything up to the scribble thinning runs on the network's device.
    """
    safe = check_flag("safe", safe)
    scribble = check_flag("scribble", scribble)
    apply_filter = check_flag("apply_filter", apply_filter)
    x = quantised_pixels(images, net).flip(1) / 255.0
    with torch.inference_mode():
        edge = net(x.to(next(net.parameters()).dtype))[:, 0].float()
        if apply_filter:
            edge = (edge > 0.5).float()
        if safe:
            edge = safe_step(edge)
        return finish_hint(to_levels(edge), scribble, images.device)
