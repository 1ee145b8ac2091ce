"""HED soft edges: lllyasviel's Apache-2.0 retrain of HED (``ControlNetHED.pth``), as controlnet_aux 0.0.10's
``HEDdetector`` computes it, batched over frames.

The network is a VGG-style stack of five conv blocks, each with a 1x1 side "projection" to one channel; the hint
is the sigmoid of the mean of the five projections upsampled to the frame. Unlike Saining Xie's original HED it
takes RGB pixels in 0..255 (minus a learnt per-channel ``norm``), not mean-subtracted BGR.

Also home of the post-processing PiDiNet shares with it (``safe_step`` and the scribble thinning).
"""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .common import check_state_dict

__all__ = [
    "NETWORK",
    "FILES",
    "SOURCE",
    "LICENSE",
    "HEDNetwork",
    "build",
    "detect",
    "check_flag",
    "safe_step",
    "scribble_lines",
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


def check_flag(option: str, value: object) -> bool:
    """A boolean option; anything else (1, "yes", None) is refused rather than read by truthiness."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{option}: expected True or False, got {value!r}")
    return bool(value)


def safe_step(x: torch.Tensor, step: int = 2) -> torch.Tensor:
    """controlnet_aux.util.safe_step in torch: quantise [0, 1] to ``step + 1`` levels (float32, truncation)."""
    y = x.to(torch.float32) * float(step + 1)
    return y.to(torch.int32).to(torch.float32) / float(step)


def to_levels(edge: torch.Tensor) -> torch.Tensor:
    """``(edge * 255).clip(0, 255).astype(uint8)`` of the reference, kept as a uint8 tensor (truncation)."""
    return (edge * 255.0).clamp_(0, 255).to(torch.uint8)


def scribble_lines(levels: np.ndarray) -> np.ndarray:
    """The reference's scribble post-processing of one H x W uint8 soft-edge map, in OpenCV as the reference does.

    ``nms(map, 127, 3.0)`` (Gaussian blur sigma 3, keep pixels that are a maximum along any of the four 3-pixel
    lines through them, threshold at 127), then a sigma-3 blur and any value above 4 made white: thin, bold
    strokes. The reference runs it on the 3-channel map; its channels are equal and every step is per channel,
    so one channel gives the same bytes for a third of the work.
    """
    x = cv2.GaussianBlur(levels.astype(np.float32), (0, 0), 3.0)
    lines = (
        np.array([[0, 0, 0], [1, 1, 1], [0, 0, 0]], dtype=np.uint8),
        np.array([[0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=np.uint8),
        np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.uint8),
        np.array([[0, 0, 1], [0, 1, 0], [1, 0, 0]], dtype=np.uint8),
    )
    kept = np.zeros_like(x)
    for kernel in lines:
        np.putmask(kept, cv2.dilate(x, kernel=kernel) == x, x)
    thin = np.where(kept > 127, np.uint8(255), np.uint8(0))
    blurred = cv2.GaussianBlur(thin, (0, 0), 3.0)
    return np.where(blurred > 4, np.uint8(255), np.uint8(0))


def finish_hint(levels: torch.Tensor, scribble: bool, device: torch.device) -> torch.Tensor:
    """B x H x W uint8 levels -> the B x H x W x 3 float32 [0, 1] hint on ``device`` (scribble per frame)."""
    if scribble:
        frames = levels.cpu().numpy()
        levels = torch.from_numpy(np.stack([scribble_lines(f) for f in frames]))
    hint = levels.to(device=device, dtype=torch.float32).div_(255.0)
    return hint.unsqueeze(-1).expand(*hint.shape, 3).contiguous()


def quantised_pixels(images: torch.Tensor, net: nn.Module) -> torch.Tensor:
    """B x H x W x 3 [0, 1] -> B x 3 x H x W float32 0..255 integers on the net's device (the reference's uint8)."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images: expected B x H x W x 3, got {tuple(images.shape)}")
    device = next(net.parameters()).device
    x = images.to(device=device, dtype=torch.float32)
    return (x * 255.0).round_().clamp_(0, 255).permute(0, 3, 1, 2).contiguous()


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
