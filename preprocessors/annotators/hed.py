"""HED soft edges: lllyasviel's Apache-2.0 retrain of HED (``ControlNetHED.pth``), as controlnet_aux 0.0.10's
``HEDdetector`` computes it, batched over frames.

The network is a VGG-style stack of five conv blocks, each with a 1x1 side "projection" to one channel; the hint
is the sigmoid of the mean of the five projections upsampled to the frame. Unlike Saining Xie's original HED it
takes RGB pixels in 0..255 (minus a learnt per-channel ``norm``), not mean-subtracted BGR.

Its post-processing (``safe_step``, the scribble thinning) lives in ``common`` with the rest that the edge
networks share.
"""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import check_flag, check_state_dict, finish_hint, quantised_pixels, safe_step, to_levels

__all__ = [
    "NETWORK",
    "FILES",
    "SOURCE",
    "LICENSE",
    "HEDNetwork",
    "build",
    "detect",
]

NETWORK = "HED"
FILES = ("ControlNetHED.pth",)
SOURCE = "https://huggingface.co/lllyasviel/Annotators"
LICENSE = "Apache-2.0"

# (input channels, output channels, convs) per block, from controlnet_aux.hed.ControlNetHED_Apache2.
_BLOCKS = ((3, 64, 2), (64, 128, 2), (128, 256, 3), (256, 512, 3), (512, 512, 3))


class _DoubleConvBlock(nn.Module):
    """``layers`` 3x3 conv + ReLU, then a 1x1 projection of the features to one edge channel."""

    def __init__(self, in_channels: int, out_channels: int, layers: int) -> None:
        super().__init__()
        self.convs = nn.Sequential(
            *(
                nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1)
                for i in range(layers)
            )
        )
        self.projection = nn.Conv2d(out_channels, 1, 1)

    def forward(self, x: torch.Tensor, down_sampling: bool) -> tuple[torch.Tensor, torch.Tensor]:
        h = F.max_pool2d(x, kernel_size=2, stride=2) if down_sampling else x
        for conv in self.convs:
            h = F.relu(conv(h))
        return h, self.projection(h)


class HEDNetwork(nn.Module):
    """ControlNetHED_Apache2 under the published key names (``norm``, ``block{1..5}.convs.N``, ``.projection``)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.Parameter(torch.zeros(1, 3, 1, 1))
        for i, (cin, cout, layers) in enumerate(_BLOCKS, start=1):
            self.add_module(f"block{i}", _DoubleConvBlock(cin, cout, layers))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """B x 3 x H x W RGB in 0..255 -> the five side projections (B x 1 x H/2^k x W/2^k, k = 0..4)."""
        h = x - self.norm
        projections = []
        for i in range(1, len(_BLOCKS) + 1):
            h, p = getattr(self, f"block{i}")(h, down_sampling=i > 1)
            projections.append(p)
        return projections


def build(sd: Mapping[str, torch.Tensor], name: str) -> HEDNetwork:
    """The HED network holding ``sd`` (a ``ControlNetHED.pth`` state dict), in eval mode, without gradients."""
    net = HEDNetwork()
    expected = {k: v.shape for k, v in net.state_dict().items()}
    check_state_dict(sd, expected, NETWORK, name, FILES)
    net.load_state_dict(dict(sd), strict=True)
    return net.eval().requires_grad_(False)


def _mean_edge_cv2(projections: list[torch.Tensor], height: int, width: int) -> torch.Tensor:
    # cv2.resize (IPP's float kernel) rounds differently from torch's bilinear by an ulp; on the CPU we can
    # afford the reference's own calls, frame by frame, so the hint is bit-identical to it there.
    maps = [p.float().cpu().numpy()[:, 0] for p in projections]
    out = []
    for i in range(maps[0].shape[0]):
        edges = np.stack(
            [cv2.resize(m[i], (width, height), interpolation=cv2.INTER_LINEAR) for m in maps], axis=2
        )
        out.append(np.mean(edges, axis=2))
    return torch.from_numpy(np.stack(out))


def _mean_edge_torch(projections: list[torch.Tensor], height: int, width: int) -> torch.Tensor:
    # Same arithmetic on the device (bilinear, half-pixel centres, edge-clamped = cv2's INTER_LINEAR), summed in
    # numpy's order and divided in float32 like np.mean; only the upsampling's last bit can differ.
    total = None
    for p in projections:
        up = F.interpolate(p.float(), size=(height, width), mode="bilinear", align_corners=False)[:, 0]
        total = up if total is None else total + up
    return total / float(len(projections))


def detect(
    net: nn.Module, images: torch.Tensor, *, safe: bool = False, scribble: bool = False
) -> torch.Tensor:
    """HEDdetector's hint for each frame: B x H x W x 3 float32 [0, 1] (uint8 levels / 255) on the images' device.

    ``images``: B x H x W x 3 RGB float [0, 1], H and W multiples of 64 (read as the reference's uint8 pixels).
    ``safe``: quantise the soft edges to 0, 0.5, 1 (``safe_step``), which keeps the ControlNet from copying
    JPEG-like noise. ``scribble``: thin and binarise the edges into strokes (for the scribble ControlNets).
    One batched forward; the resize/mean runs on the network's device (bit-exact reference calls on the CPU).
    """
    safe = check_flag("safe", safe)
    scribble = check_flag("scribble", scribble)
    x = quantised_pixels(images, net)
    height, width = x.shape[-2:]
    dtype = next(net.parameters()).dtype
    with torch.inference_mode():
        projections = net(x.to(dtype))
        if x.device.type == "cpu":
            mean = _mean_edge_cv2(projections, height, width)
        else:
            mean = _mean_edge_torch(projections, height, width)
        # float64 sigmoid as the reference writes it (1 / (1 + exp(-x))), not torch.sigmoid's float32 path.
        edge = 1.0 / (1.0 + torch.exp(-mean.to(torch.float64)))
        if safe:
            edge = safe_step(edge)
        levels = to_levels(edge)
        return finish_hint(levels, scribble, images.device)
