"""Running a weight-based annotator over an IMAGE batch, host-free.

The frames are scaled and edge-padded to multiples of 64 exactly as the weight-free preprocessors do
(``preprocessors.common.resize_image_with_pad``, the reference annotators' ``resize_image_with_pad``), stacked
into one tensor, and handed to the network's ``detect`` in chunks of frames (one batched forward per chunk on the
network's device; one frame per chunk on the CPU, where batching was measured slower); the padding is cut off
afterwards. So the hint's short side is the resolution, like every ControlStack preprocessor, and on a GPU N frames
cost N / chunk forwards instead of N.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from ..batch import check_images, images_to_uint8
from ..common import resize_image_with_pad

__all__ = ["CPU_CHUNK", "DEFAULT_CHUNK", "chunk_for", "run_annotator"]

DEFAULT_CHUNK = 8
"""Frames per batched forward on a GPU: large enough to fill it at 512², small enough that a 16-frame SDXL-size
batch does not hold every activation at once."""

CPU_CHUNK = 1
"""Frames per forward on the CPU. Measured (bench/bench_annotators.py, 2 cores, 512², 16 frames): batches of 8
were 7 % (HED) to 25 % (PiDiNet) slower than one frame at a time (the activations of 8 frames fall out of cache,
and oneDNN already uses every core for one frame)."""


def chunk_for(device: torch.device | str) -> int:
    """Frames per forward on ``device``."""
    return CPU_CHUNK if torch.device(device).type == "cpu" else DEFAULT_CHUNK


Detect = Callable[[torch.Tensor], "torch.Tensor | tuple[torch.Tensor, Sequence[Any]]"]


def run_annotator(
    detect: Detect,
    images: torch.Tensor,
    resolution: int,
    *,
    device: torch.device | str = "cpu",
    chunk: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, list[Any]]:
    """``detect`` over every frame of ``images`` (B x H x W x C, [0, 1]) at ``resolution``.

    ``detect`` takes a B' x H' x W' x 3 float [0, 1] tensor on ``device`` (H', W' multiples of 64) and returns the
    hints at that size, or ``(hints, per-frame extras)`` (OpenPose's keypoint dicts). Returns the hints
    (B x h x w x 3 float32 on the CPU, short side = resolution) and the extras, one per frame (empty when
    ``detect`` has none). Extras are in padded-frame coordinates; the padding only ever extends right and down,
    so coordinates inside the unpadded frame are unchanged.
    """
    check_images(images)
    chunk = chunk_for(device) if chunk is None else chunk
    if chunk < 1:
        raise ValueError(f"chunk: expected >= 1 frames, got {chunk}")
    frames = images_to_uint8(images)
    padded, unpad = [], None
    for frame in frames:
        p, unpad = resize_image_with_pad(frame, resolution)
        padded.append(p)
    hints: list[torch.Tensor] = []
    extras: list[Any] = []
    for start in range(0, len(padded), chunk):
        batch = np.stack(padded[start : start + chunk])
        x = torch.from_numpy(batch).to(device=device, dtype=torch.float32).div_(255.0)
        out = detect(x)
        if isinstance(out, tuple):
            out, more = out
            extras.extend(more)
        hints.append(out.float().cpu())
        if progress is not None:
            progress(len(batch))
    hint = torch.cat(hints)
    h, w = unpad(np.zeros(hint.shape[1:3], dtype=np.uint8)).shape[:2]
    return hint[:, :h, :w].contiguous(), extras
