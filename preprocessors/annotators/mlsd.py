"""M-LSD straight lines: NAVER's M-LSD large model (``mlsd_large_512_fp32.pth``, lihaoweicv's PyTorch port), as
controlnet_aux 0.0.10's ``MLSDdetector`` computes it, batched over frames.

The network is a truncated MobileNetV2 (TFLite-style "same" padding for the stride-2 convs) with an FPN-like
decoder; it takes RGB plus a constant fourth channel (the training data's alpha, all ones) in [-1, 1] and
predicts, at half the frame size, a line-centre logit and the displacement from each centre to the segment's two
ends. Decoding (controlnet_aux.mlsd.utils.pred_lines): centres are the 3x3 local maxima of the sigmoid, the 200
best are kept, and each with a score above ``score_threshold`` and a length above ``distance_threshold`` (both in
the half-size map) is drawn as a 1-pixel white line, at twice its coordinates, on black.

In 0.0.10 the detector calls ``pred_lines(img, model, [H, W], ...)``: the network runs at the frame's own size
(the 512 x 512 of pred_lines' default and of the file's name is not used), so its INTER_AREA resize is a copy and
the coordinate ratios are 1. The network forward and the peak picking are batched torch; the line list and the
drawing are per frame in numpy/OpenCV, with the reference's float64 arithmetic and ``int()`` truncation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import check_state_dict, finish_hint, quantised_pixels

__all__ = ["NETWORK", "FILES", "SOURCE", "LICENSE", "MLSDNetwork", "build", "detect", "decode_lines"]

NETWORK = "M-LSD"
FILES = ("mlsd_large_512_fp32.pth",)
SOURCE = "https://huggingface.co/lllyasviel/Annotators"
# navervision/mlsd and the port's header (controlnet_aux.mlsd.utils): "Copyright 2021-present NAVER Corp.
# Apache License v2.0".
LICENSE = "Apache-2.0"

# MobileNetV2 inverted-residual stages (expansion t, channels c, repeats n, first stride s), the first five of
# torchvision's table: M-LSD large stops at 96 channels (1/16 of the frame).
_STAGES = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1))
# Indices into ``backbone.features`` whose outputs feed the decoder (1/2, 1/4, 1/8, 1/16, 1/16).
_FPN_TAPS = (1, 3, 6, 10, 13)
# pred_lines' decoding constants: 200 candidate centres, 3x3 peak neighbourhood; the first 7 of the 16 output
# channels are the segment-of-line maps the line decoder does not use.
_TOP_K, _PEAK_SIZE, _FIRST_LINE_CHANNEL = 200, 3, 7


class _ConvBNReLU6(nn.Sequential):
    """Conv (no bias) + BN + ReLU6 under keys ``0`` and ``1``; stride 2 pads right/bottom by one like TFLite."""

    def __init__(
        self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, groups: int = 1
    ):
        padding = 0 if stride == 2 else (kernel_size - 1) // 2
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU6(inplace=True),
        )
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 2:
            x = F.pad(x, (0, 1, 0, 1), "constant", 0)
        return super().forward(x)


class _InvertedResidual(nn.Module):
    """MobileNetV2 block: [1x1 expand] -> 3x3 depthwise -> 1x1 project (+ input when shapes allow)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = int(round(in_channels * expansion))
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: list[nn.Module] = [] if expansion == 1 else [_ConvBNReLU6(in_channels, hidden, kernel_size=1)]
        layers += [
            _ConvBNReLU6(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, out_channels, 1, 1, 0, bias=False),
            nn.BatchNorm2d(out_channels),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_residual else self.conv(x)


class _Backbone(nn.Module):
    """The truncated MobileNetV2 (``backbone.features.N``); returns the five FPN taps."""

    def __init__(self) -> None:
        super().__init__()
        features: list[nn.Module] = [_ConvBNReLU6(4, 32, stride=2)]
        channels = 32
        for expansion, out_channels, repeats, stride in _STAGES:
            for i in range(repeats):
                features.append(_InvertedResidual(channels, out_channels, stride if i == 0 else 1, expansion))
                channels = out_channels
        self.features = nn.Sequential(*features)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, feature in enumerate(self.features):
            x = feature(x)
            if i in _FPN_TAPS:
                taps.append(x)
        return taps


def _conv_bn_relu(
    in_channels: int, out_channels: int, kernel_size: int, relu: nn.Module, **conv
) -> nn.Sequential:
    padding = conv.pop("padding", 0)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, **conv),
        nn.BatchNorm2d(out_channels),
        relu,
    )


class _MergeBlock(nn.Module):
    """BlockTypeA: 1x1 conv-BN-ReLU of the skip (``conv2``) and of the coarser map (``conv1``, then 2x bilinear
    with aligned corners), concatenated."""

    def __init__(
        self, skip_channels: int, coarse_channels: int, out_skip: int, out_coarse: int, upscale: bool
    ):
        super().__init__()
        self.conv1 = _conv_bn_relu(coarse_channels, out_coarse, 1, nn.ReLU(inplace=True))
        self.conv2 = _conv_bn_relu(skip_channels, out_skip, 1, nn.ReLU(inplace=True))
        self.upscale = upscale

    def forward(self, skip: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        coarse = self.conv1(coarse)
        skip = self.conv2(skip)
        if self.upscale:
            coarse = F.interpolate(coarse, scale_factor=2.0, mode="bilinear", align_corners=True)
        return torch.cat((skip, coarse), dim=1)


class _RefineBlock(nn.Module):
    """BlockTypeB: a residual 3x3 conv-BN-ReLU, then a 3x3 conv-BN-ReLU to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(in_channels, in_channels, 3, nn.ReLU(), padding=1)
        self.conv2 = _conv_bn_relu(in_channels, out_channels, 3, nn.ReLU(), padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(self.conv1(x) + x)


class _HeadBlock(nn.Module):
    """BlockTypeC: dilated (5) 3x3 conv-BN-ReLU, 3x3 conv-BN-ReLU, 1x1 conv to the output maps."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = _conv_bn_relu(in_channels, in_channels, 3, nn.ReLU(), padding=5, dilation=5)
        self.conv2 = _conv_bn_relu(in_channels, in_channels, 3, nn.ReLU(), padding=1)
        self.conv3 = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(self.conv2(self.conv1(x)))


class MLSDNetwork(nn.Module):
    """controlnet_aux's MobileV2_MLSD_Large under the published key names (``backbone.features.*``,
    ``block15`` .. ``block23``)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = _Backbone()
        self.block15 = _MergeBlock(64, 96, 64, 64, upscale=False)
        self.block16 = _RefineBlock(128, 64)
        self.block17 = _MergeBlock(32, 64, 64, 64, upscale=True)
        self.block18 = _RefineBlock(128, 64)
        self.block19 = _MergeBlock(24, 64, 64, 64, upscale=True)
        self.block20 = _RefineBlock(128, 64)
        self.block21 = _MergeBlock(16, 64, 64, 64, upscale=True)
        self.block22 = _RefineBlock(128, 64)
        self.block23 = _HeadBlock(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x 4 x H x W (RGB + ones, in [-1, 1]) -> B x 9 x H/2 x W/2: centre logit, then the (x, y) displacement
        to the start and to the end of the segment, then four maps the line decoder does not read."""
        c1, c2, c3, c4, c5 = self.backbone(x)
        x = self.block16(self.block15(c4, c5))
        x = self.block18(self.block17(c3, x))
        x = self.block20(self.block19(c2, x))
        x = self.block22(self.block21(c1, x))
        return self.block23(x)[:, _FIRST_LINE_CHANNEL:]


def build(sd: Mapping[str, torch.Tensor], name: str) -> MLSDNetwork:
    """The M-LSD large network holding ``sd`` (a ``mlsd_large_512_fp32.pth`` state dict), eval, no gradients."""
    net = MLSDNetwork()
    expected = {k: v.shape for k, v in net.state_dict().items()}
    check_state_dict(sd, expected, NETWORK, name, FILES)
    net.load_state_dict(dict(sd), strict=True)
    return net.eval().requires_grad_(False)


def check_threshold(option: str, value: object) -> float:
    """A finite, non-negative number (a score is a sigmoid in (0, 1); a length is >= 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{option}: expected a number >= 0, got {value!r}")
    if not math.isfinite(float(value)) or value < 0:
        raise ValueError(f"{option}: expected a finite number >= 0, got {value!r}")
    return float(value)


def network_input(images: torch.Tensor, net: nn.Module) -> torch.Tensor:
    """B x H x W x 3 [0, 1] -> the B x 4 x H x W float32 input pred_lines makes: (uint8 RGB, 1) / 127.5 - 1."""
    x = quantised_pixels(images, net)
    ones = torch.ones_like(x[:, :1])
    return torch.cat([x, ones], dim=1) / 127.5 - 1.0


def _peaks(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """deccode_output_score_and_ptss for a batch: the 200 best 3x3-local-maximum sigmoid scores of each frame and
    their flat indices into the half-size map (torch.topk, as the reference, so ties resolve alike)."""
    heat = torch.sigmoid(maps[:, 0])
    hmax = F.max_pool2d(heat, (_PEAK_SIZE, _PEAK_SIZE), stride=1, padding=(_PEAK_SIZE - 1) // 2)
    heat = heat * (hmax == heat).float()
    return torch.topk(heat.reshape(heat.shape[0], -1), _TOP_K, dim=-1, largest=True)


def decode_lines(
    scores: np.ndarray,
    indices: np.ndarray,
    displacement: np.ndarray,
    score_threshold: float,
    distance_threshold: float,
) -> np.ndarray:
    """pred_lines' segment list for one frame, in the reference's arithmetic: N x 4 int (x0, y0, x1, y1) pixels.

    ``scores``/``indices``: the 200 peaks (float32, flat indices); ``displacement``: 4 x h x w float32 (start dx,
    dy, end dx, dy) of the half-size map. Kept: score > ``score_threshold`` and the float32 length
    > ``distance_threshold``. Endpoints are the centre plus its displacement (float64), doubled, truncated.
    """
    width = displacement.shape[2]
    ys, xs = indices // width, indices % width
    vectors = displacement[:, ys, xs].T  # 200 x 4 float32
    start, end = vectors[:, :2], vectors[:, 2:]
    length = np.sqrt(np.sum((start - end) ** 2, axis=-1))
    keep = (scores > score_threshold) & (length > distance_threshold)
    centres = np.stack([xs, ys, xs, ys], axis=1)[keep].astype(np.float64)
    # x + disp (int64 + float32 -> float64), then "2 * lines" (256 -> 512) and the ratio 1.0 of the reference.
    lines = 2.0 * (centres + vectors[keep].astype(np.float64))
    return np.trunc(lines).astype(np.int64)


def draw_lines(lines: np.ndarray, height: int, width: int) -> np.ndarray:
    """The 1-pixel white segments on a black H x W uint8 map (the reference draws all three channels alike)."""
    canvas = np.zeros((height, width), dtype=np.uint8)
    for x0, y0, x1, y1 in lines.tolist():
        try:
            cv2.line(canvas, (x0, y0), (x1, y1), 255, 1)
        except (cv2.error, OverflowError):
            # An endpoint beyond OpenCV's int range: the reference's blanket try/except stops drawing there and
            # keeps the lines drawn so far; so do we.
            break
    return canvas


def detect(
    net: nn.Module, images: torch.Tensor, *, score_threshold: float = 0.1, distance_threshold: float = 0.1
) -> torch.Tensor:
    """MLSDdetector's hint for each frame (white lines on black): B x H x W x 3 float32 in {0, 1} on the images'
    device.

    ``images``: B x H x W x 3 RGB float [0, 1], H and W multiples of 64 (read as the reference's uint8 pixels).
    ``score_threshold`` (the reference's ``thr_v``): minimum centre confidence, >= 0 (the scores are in (0, 1), so
    1 or more keeps nothing). ``distance_threshold`` (``thr_d``): minimum segment length in pixels of the
    half-size map, >= 0. One batched forward and peak search; the line list and drawing per frame.
    """
    score_threshold = check_threshold("score_threshold", score_threshold)
    distance_threshold = check_threshold("distance_threshold", distance_threshold)
    x = network_input(images, net)
    height, width = x.shape[-2:]
    dtype = next(net.parameters()).dtype
    with torch.inference_mode():
        maps = net(x.to(dtype)).float()
        scores, indices = _peaks(maps)
        scores, indices = scores.cpu().numpy(), indices.cpu().numpy()
        displacement = maps[:, 1:5].cpu().numpy()
    frames = []
    for i in range(len(displacement)):
        lines = decode_lines(scores[i], indices[i], displacement[i], score_threshold, distance_threshold)
        frames.append(draw_lines(lines, height, width))
    return finish_hint(torch.from_numpy(np.stack(frames)), False, images.device)
