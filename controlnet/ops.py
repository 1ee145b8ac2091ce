"""The layer classes control modules are built from ("operations"), so that a host can supply its own.

Every conv / linear / norm layer of a ControlNet, Union, Control-LoRA, T2I-Adapter or LLLite module is created as
``operations.Conv2d(...)``, ``operations.Linear(...)``, ``operations.GroupNorm(...)``, ``operations.LayerNorm(...)``.
The default is plain torch, so this package imports no host module. A host passes its own classes with the same
names and signatures: ComfyUI's ``comfy.ops`` classes (what ``comfy.ops.pick_operations`` returns, as its built-in
ControlNet is given) cast weights per layer to the input's dtype and device, which is what lets the host store a
ControlNet in fp16 / bf16 / fp8, compute in another dtype, and load it partially or offload it under ``--lowvram``.

A module built with casting operations gets a ``compute_dtype`` (the dtype inputs are cast to) distinct from the
dtype its weights are stored in; see :func:`compute_dtype_of`.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class Operations(Protocol):
    """What a control module needs from an operations namespace (torch.nn's signatures)."""

    Linear: type[nn.Linear]
    Conv2d: type[nn.Conv2d]
    GroupNorm: type[nn.GroupNorm]
    LayerNorm: type[nn.LayerNorm]


class TorchOperations:
    """Plain torch layers: weights are used in their own dtype, on their own device."""

    Linear = nn.Linear
    Conv2d = nn.Conv2d
    GroupNorm = nn.GroupNorm
    LayerNorm = nn.LayerNorm


def compute_dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype a control module computes in: its ``compute_dtype`` when set (storage differs: the layers cast
    per call), else the dtype of its weights."""
    dtype = getattr(module, "compute_dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next(module.parameters()).dtype
