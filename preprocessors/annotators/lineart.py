"""Realistic line art: Caroline Chan's "informative drawings" generator (``sk_model.pth``, and ``sk_model2.pth`` for
the coarse variant), as controlnet_aux 0.0.10's ``LineartDetector`` computes it, batched over frames.

The network is a small CycleGAN-style ResNet generator (Chan, Durand and Isola, "Learning to generate line
drawings that convey geometry and semantics", CVPR 2022): a reflection-padded 7x7 stem, two stride-2 convs, three
residual blocks at 1/4 size, two transposed convs back up and a 7x7 conv to one sigmoid channel; every hidden
conv is followed by a parameter-free InstanceNorm, so frames in a batch are still independent. The detailed and
the coarse files have the same layout: which one is loaded decides the style, ``detect`` is the same for both.
The reference's hint is white lines on black: ``255 - (line * 255)``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from .common import check_state_dict, finish_hint, quantised_pixels, to_levels

__all__ = ["NETWORK", "FILES", "SOURCE", "LICENSE", "LineartNetwork", "build", "detect", "file_for"]

NETWORK = "lineart"
FILES = ("sk_model.pth", "sk_model2.pth")
SOURCE = "https://huggingface.co/lllyasviel/Annotators"
# lllyasviel's ControlNet 1.1 notes: "This is awacke1/Image-to-Line-Drawings", a Space running
# carolineec/informative-drawings' generator and weights; that repository (and the controlnet_aux port's
# header, "From https://github.com/carolineec/informative-drawings  MIT License") says MIT.
LICENSE = "MIT"

# controlnet_aux builds Generator(3, 1, 3) for both files: RGB in, one line channel out, three residual blocks.
_DEFAULT_RESIDUAL_BLOCKS = 3


class _ResidualBlock(nn.Module):
    """x + (pad, 3x3 conv, norm, ReLU, pad, 3x3 conv, norm); the key names are ``conv_block.1`` and ``.5``."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.conv_block = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(features, features, 3),
            nn.InstanceNorm2d(features),
            nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1),
            nn.Conv2d(features, features, 3),
            nn.InstanceNorm2d(features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv_block(x)


class LineartNetwork(nn.Module):
    """controlnet_aux.lineart.Generator(3, 1, residual_blocks) under the published key names (``model0`` ..
    ``model4``, Sequential indices included: the norms, pads and ReLUs hold no tensors but keep the numbering)."""

    def __init__(self, residual_blocks: int = _DEFAULT_RESIDUAL_BLOCKS) -> None:
        super().__init__()
        self.model0 = nn.Sequential(
            nn.ReflectionPad2d(3), nn.Conv2d(3, 64, 7), nn.InstanceNorm2d(64), nn.ReLU(inplace=True)
        )
        self.model1 = nn.Sequential(
            nn.Conv2d(64, 128, 3, stride=2, padding=1),
            nn.InstanceNorm2d(128),
            nn.ReLU(inplace=True),
            nn.Conv2d(128, 256, 3, stride=2, padding=1),
            nn.InstanceNorm2d(256),
            nn.ReLU(inplace=True),
        )
        self.model2 = nn.Sequential(*(_ResidualBlock(256) for _ in range(residual_blocks)))
        self.model3 = nn.Sequential(
            nn.ConvTranspose2d(256, 128, 3, stride=2, padding=1, output_padding=1),
            nn.InstanceNorm2d(128),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(128, 64, 3, stride=2, padding=1, output_padding=1),
            nn.InstanceNorm2d(64),
            nn.ReLU(inplace=True),
        )
        self.model4 = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(64, 1, 7), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """B x 3 x H x W RGB in [0, 1] -> B x 1 x H x W line darkness in (0, 1) (H, W multiples of 4)."""
        return self.model4(self.model3(self.model2(self.model1(self.model0(x)))))


def file_for(coarse: bool) -> str:
    """The published file of the detailed (``sk_model.pth``) or coarse (``sk_model2.pth``) line art."""
    if not isinstance(coarse, bool):
        raise ValueError(f"coarse: expected True or False, got {coarse!r}")
    return FILES[1] if coarse else FILES[0]


def build(sd: Mapping[str, torch.Tensor], name: str) -> LineartNetwork:
    """The line-art generator holding ``sd`` (``sk_model.pth`` or ``sk_model2.pth``), eval, without gradients."""
    # The residual-block count is the file's (both published files have 3); a file without any is refused by the
    # key check below rather than guessed.
    blocks = {int(m.group(1)) for k in sd if (m := re.fullmatch(r"model2\.(\d+)\.conv_block\.1\.weight", k))}
    net = LineartNetwork(max(blocks) + 1 if blocks else _DEFAULT_RESIDUAL_BLOCKS)
    expected = {k: v.shape for k, v in net.state_dict().items()}
    check_state_dict(sd, expected, NETWORK, name, FILES)
    net.load_state_dict(dict(sd), strict=True)
    return net.eval().requires_grad_(False)


def detect(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """LineartDetector's hint for each frame (white lines on black): B x H x W x 3 float32 [0, 1] (uint8 levels /
    255) on the images' device.

    ``images``: B x H x W x 3 RGB float [0, 1], H and W multiples of 64 (read as the reference's uint8 pixels).
    Detailed or coarse is the loaded file's choice (see :func:`file_for`). One batched forward.
    """
    x = quantised_pixels(images, net)
    dtype = next(net.parameters()).dtype
    with torch.inference_mode():
        # The reference feeds float32 pixel / 255.0; the same division here, then the network's dtype.
        line = net((x / 255.0).to(dtype))[:, 0].float()
        levels = 255 - to_levels(line)
        return finish_hint(levels, False, images.device)
