"""Anime line art: Xiaoyu Xiang's Anime2Sketch generator (``netG.pth``), as controlnet_aux 0.0.10's
``LineartAnimeDetector`` computes it, batched over frames.

The network is pix2pix's 8-level U-Net (``UnetGenerator(3, 1, 8, 64)``) with parameter-free InstanceNorm (so
its convs carry biases, and frames in a batch stay independent): stride-2 4x4 convs down to 1/256 of the frame,
transposed convs back up, each level's input concatenated to its output, a tanh at the top. Because of the eight
halvings the reference bicubically resizes each frame to multiples of 256 first and resizes the line map back;
we make the same OpenCV calls (a copy when the frame is already a multiple of 256). The hint is white lines on
black: ``255 - line``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import cv2
import numpy as np
import torch
from torch import nn

from .common import check_state_dict, finish_hint, quantised_pixels

__all__ = ["NETWORK", "FILES", "SOURCE", "LICENSE", "AnimeLineartNetwork", "build", "detect"]

NETWORK = "lineart (anime)"
FILES = ("netG.pth",)
SOURCE = "https://huggingface.co/lllyasviel/Annotators"
# lllyasviel's ControlNet 1.1 notes: "This is Mukosame/Anime2Sketch"; that repository's licence is MIT.
LICENSE = "MIT"

# UnetGenerator(3, 1, num_downs=8, ngf=64) as controlnet_aux builds it for netG.pth.
_LEVELS = 8
_BASE_WIDTH = 64
# The frame is resized to a multiple of 2^levels so that every halving is exact.
_MULTIPLE = 2**_LEVELS


class _UnetLevel(nn.Module):
    """One UnetSkipConnectionBlock: ``model`` is (down, [inner level], up) as one Sequential, so the published keys
    (``model.1.model.3.model.1.weight`` ...) nest exactly like the reference's."""

    def __init__(
        self,
        outer: int,
        inner: int,
        inner_level: _UnetLevel | None = None,
        in_channels: int | None = None,
        outermost: bool = False,
    ) -> None:
        super().__init__()
        self.outermost = outermost
        in_channels = outer if in_channels is None else in_channels
        down = nn.Conv2d(in_channels, inner, kernel_size=4, stride=2, padding=1, bias=True)
        if outermost:
            layers = [
                down,
                inner_level,
                nn.ReLU(True),
                nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1),
                nn.Tanh(),
            ]
        elif (
            inner_level is None
        ):  # the innermost level: no norm at the 1/256 bottleneck, no concatenated input
            up = nn.ConvTranspose2d(inner, outer, 4, 2, 1, bias=True)
            layers = [nn.LeakyReLU(0.2, True), down, nn.ReLU(True), up, nn.InstanceNorm2d(outer)]
        else:
            up = nn.ConvTranspose2d(inner * 2, outer, 4, 2, 1, bias=True)
            layers = [
                nn.LeakyReLU(0.2, True),
                down,
                nn.InstanceNorm2d(inner),
                inner_level,
                nn.ReLU(True),
                up,
                nn.InstanceNorm2d(outer),
            ]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.outermost:
            return self.model(x)
        # The skip connection: the level's input beside what the level made of it.
        return torch.cat([x, self.model(x)], 1)


class AnimeLineartNetwork(nn.Module):
    """controlnet_aux.lineart_anime.UnetGenerator(3, 1, 8, 64, InstanceNorm) under the published key names
    (``model.model.*``, without the ``module.`` prefix that :func:`common.read_state_dict` strips)."""

    def __init__(self) -> None:
        super().__init__()
        w = _BASE_WIDTH
        level = _UnetLevel(w * 8, w * 8)
        for _ in range(_LEVELS - 5):
            level = _UnetLevel(w * 8, w * 8, level)
        level = _UnetLevel(w * 4, w * 8, level)
        level = _UnetLevel(w * 2, w * 4, level)
        level = _UnetLevel(w, w * 2, level)
        self.model = _UnetLevel(1, w, level, in_channels=3, outermost=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W RGB in [-1, 1] -> B x 1 x H x W in [-1, 1] (H, W multiples of 256)."""
        return self.model(x)


def build(sd: Mapping[str, torch.Tensor], name: str) -> AnimeLineartNetwork:
    """The Anime2Sketch U-Net holding ``sd`` (a ``netG.pth`` state dict), in eval mode, without gradients."""
    net = AnimeLineartNetwork()
    expected = {k: v.shape for k, v in net.state_dict().items()}
    check_state_dict(sd, expected, NETWORK, name, FILES)
    net.load_state_dict(dict(sd), strict=True)
    return net.eval().requires_grad_(False)


def _network_size(height: int, width: int) -> tuple[int, int]:
    """The reference's ``256 * ceil(size / 256)`` per side."""
    return _MULTIPLE * math.ceil(height / _MULTIPLE), _MULTIPLE * math.ceil(width / _MULTIPLE)


def _network_input(x: torch.Tensor) -> torch.Tensor:
    """B x 3 x H x W pixels 0..255 -> B x 3 x Hn x Wn float32 on the same device, resized like the reference
    (OpenCV bicubic on the uint8 frames, whose fixed-point rounding torch's bicubic does not reproduce)."""
    height, width = x.shape[-2:]
    size = _network_size(height, width)
    if size == (height, width):
        return x  # cv2.resize to the same size is a copy
    frames = x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    resized = np.stack([cv2.resize(f, (size[1], size[0]), interpolation=cv2.INTER_CUBIC) for f in frames])
    # Contiguous NCHW like the reference's single-frame input (whose permuted view torch treats as NCHW): a
    # channels-last batch would take another oneDNN conv path with other float32 rounding.
    return torch.from_numpy(resized).to(x.device).permute(0, 3, 1, 2).float().contiguous()


def _line_levels(line: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """B x Hn x Wn line map 0..255 (float32) -> B x H x W uint8 as the reference: cv2 bicubic back to the frame,
    clip, truncate. The resize runs on the CPU in OpenCV so the levels are the reference's own arithmetic."""
    if tuple(line.shape[-2:]) == (height, width):
        return line.clamp(0, 255).to(torch.uint8)
    maps = line.cpu().numpy()
    back = np.stack([cv2.resize(m, (width, height), interpolation=cv2.INTER_CUBIC) for m in maps])
    return torch.from_numpy(back.clip(0, 255).astype(np.uint8))


def detect(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """LineartAnimeDetector's hint for each frame (white lines on black): B x H x W x 3 float32 [0, 1] (uint8
    levels / 255) on the images' device.

    ``images``: B x H x W x 3 RGB float [0, 1], H and W multiples of 64 (read as the reference's uint8 pixels).
    One batched forward at the 256-multiple size; the two resizes are the reference's OpenCV calls per frame.
    """
    pixels = quantised_pixels(images, net)
    height, width = pixels.shape[-2:]
    dtype = next(net.parameters()).dtype
    with torch.inference_mode():
        x = _network_input(pixels)
        # The reference's float32 arithmetic: pixel / 127.5 - 1 in, out * 127.5 + 127.5.
        line = net((x / 127.5 - 1.0).to(dtype))[:, 0].float() * 127.5 + 127.5
        levels = 255 - _line_levels(line, height, width)
        return finish_hint(levels, False, images.device)
