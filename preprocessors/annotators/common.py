"""What every weight-based annotator shares: reading its published file safely, clear errors, and the edge
networks' common post-processing (pixels in, uint8 levels, safe steps, scribble thinning, the float hint out).

Host-free (no ComfyUI import). Files are read by the ControlNet layer's loader (safetensors, or pickles scanned
opcode by opcode and loaded with ``weights_only=True``: nothing in a file runs), so an annotator file is as safe
to open as a control file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import cv2
import numpy as np
import torch
from torch import nn

from ...controlnet.errors import ControlNetError
from ...controlnet.loading import read_tensors

__all__ = [
    "AnnotatorFileError",
    "read_state_dict",
    "check_state_dict",
    "check_flag",
    "quantised_pixels",
    "safe_step",
    "to_levels",
    "scribble_lines",
    "finish_hint",
]


class AnnotatorFileError(ValueError):
    """A missing, corrupt or wrong annotator file. The message names the file and what was expected."""


def read_state_dict(
    source: str | Mapping[str, torch.Tensor], name: str | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of an annotator checkpoint, on the CPU, with a DataParallel ``module.`` prefix removed.

    ``source`` is a path (safetensors, or a torch pickle; a Lightning ``state_dict`` wrapper is unwrapped) or an
    in-memory state dict. Raises :class:`AnnotatorFileError` for a file that is not a checkpoint.
    """
    try:
        tensors = read_tensors(source, name)
        sd = {k: tensors.get(k) for k in tensors.shapes}
    except ControlNetError as e:
        raise AnnotatorFileError(str(e)) from e
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    return sd


def _article(name: str) -> str:
    """The article before a network's name: an OpenPose, an HED, an M-LSD (acronyms read letter by letter), a MiDaS."""
    first_word = name.split()[0]
    spelled = first_word.isupper() and first_word[0] in "AEFHILMNORSX"
    return "an" if name[0] in "AEIOU" or spelled else "a"


def check_state_dict(
    sd: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size | tuple[int, ...]],
    network: str,
    name: str,
    published: Iterable[str] = (),
) -> None:
    """Refuse a state dict whose tensor names or shapes are not the network's, naming a few of each.

    ``expected`` is the network module's own ``state_dict()`` shapes (build the module from the file's shapes
    first, so a config read from the tensors is checked too). ``published`` names the files this network ships as,
    for the message ("expected ControlNetHED.pth").
    """
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k])]
    if not (missing or unexpected or wrong):
        return
    files = ", ".join(published)
    what = f"not {_article(network)} {network} file" + (f" (expected {files})" if files else "")
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensors missing, e.g. {', '.join(missing[:3])}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {', '.join(unexpected[:3])}")
    if wrong:
        k = wrong[0]
        parts.append(
            f"{len(wrong)} with other shapes, e.g. {k}: {tuple(sd[k].shape)} where {tuple(expected[k])} was expected"
        )
    raise AnnotatorFileError(f"{name}: {what}: {'; '.join(parts)}")


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
