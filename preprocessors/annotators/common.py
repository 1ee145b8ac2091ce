"""What every weight-based annotator shares: reading its published file safely, and clear errors.

Host-free (no ComfyUI import). Files are read by the ControlNet layer's loader (safetensors, or pickles scanned
opcode by opcode and loaded with ``weights_only=True``: nothing in a file runs), so an annotator file is as safe
to open as a control file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ...controlnet.errors import ControlNetError
from ...controlnet.loading import read_tensors

__all__ = ["AnnotatorFileError", "read_state_dict", "check_state_dict"]


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
    what = f"not a {network} file" + (f" (expected {files})" if files else "")
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
