"""Reading ControlNet files: safetensors / torch pickles, any supported layout, lazily.

Memory: tensors are read one at a time (safetensors ``safe_open``; pickles with weights_only and mmap),
converted to the target dtype and device, and assigned into a model built on the meta device, so
loading needs about one copy of the weights beyond the result.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from .config import ControlNetConfig, config_from_shapes
from .convert import DIFFERENCE_KEY, to_ldm_keys, unet_to_ldm_keys
from .errors import ControlNetError
from .model import ControlNet, build_controlnet

log = logging.getLogger(__name__)

Source = str | os.PathLike | Mapping[str, torch.Tensor]
_DIFFUSERS_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", "model.safetensors")
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


class _Tensors:
    """Lazy view of a checkpoint: names, shapes and dtypes without reading the data."""

    def __init__(
        self,
        name: str,
        shapes: dict[str, tuple[int, ...]],
        dtypes: dict[str, torch.dtype | None],
        get: Callable[[str], torch.Tensor],
    ) -> None:
        self.name, self.shapes, self.dtypes, self.get = name, shapes, dtypes, get


def _from_mapping(sd: Mapping[str, object], name: str) -> _Tensors:
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if DIFFERENCE_KEY in sd:  # the marker's value may be anything; keep its presence
        tensors.setdefault(DIFFERENCE_KEY, torch.zeros(()))
    return _Tensors(
        name,
        {k: tuple(v.shape) for k, v in tensors.items()},
        {k: v.dtype for k, v in tensors.items()},
        tensors.__getitem__,
    )


def _read_safetensors(path: Path, name: str) -> _Tensors:
    from safetensors import safe_open

    try:
        f = safe_open(str(path), framework="pt", device="cpu")
        shapes, dtypes = {}, {}
        for k in f.keys():
            s = f.get_slice(k)
            shapes[k], dtypes[k] = tuple(s.get_shape()), _SAFETENSORS_DTYPES.get(s.get_dtype())
    except Exception as e:  # SafetensorError, OSError: a corrupt header or a truncated body
        raise ControlNetError(f"{name}: not a readable safetensors file ({type(e).__name__}: {e})") from e

    def get(k: str) -> torch.Tensor:
        try:
            return f.get_tensor(k)
        except Exception as e:
            raise ControlNetError(f"{name}: cannot read tensor {k!r} ({e})") from e

    return _Tensors(name, shapes, dtypes, get)


def _read_pickle(path: Path, name: str) -> _Tensors:
    # weights_only=True: the unpickler only builds tensors and containers, no code from the file runs.
    mmap = zipfile.is_zipfile(path)  # mmap needs the zip format; legacy pickles are read whole
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # The weights-only unpickler names the callable a malicious file asks for ("Unsupported global");
        # anything else it rejects is just not a pickle.
        detail = next((ln.strip() for ln in str(e).splitlines() if "global" in ln.lower()), None)
        if detail is None:
            raise ControlNetError(
                f"{name}: corrupt or not a checkpoint ({str(e).splitlines()[0][:200]})"
            ) from e
        raise ControlNetError(
            f"{name}: refused to unpickle: the file asks to run code or build non-tensor objects ({detail}); "
            "only weights are loaded from pickles. Convert it to .safetensors if you trust it."
        ) from e
    except Exception as e:  # truncated zip, garbage bytes, ...
        raise ControlNetError(f"{name}: corrupt or truncated checkpoint ({type(e).__name__}: {e})") from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):  # Lightning .ckpt
        obj = obj["state_dict"]
    if isinstance(obj, Mapping) and isinstance(obj.get("adapter"), Mapping):  # TencentARC's T2I-Adapter .pth
        obj = obj["adapter"]
    if not isinstance(obj, Mapping):
        raise ControlNetError(f"{name}: expected a state dict, found a {type(obj).__name__}")
    return _from_mapping(obj, name)


def read_tensors(source: Source, name: str | None = None) -> _Tensors:
    """Open a checkpoint lazily. The format is sniffed from the bytes, not the extension."""
    if isinstance(source, Mapping):
        return _from_mapping(source, name or "state dict")
    path = Path(source)
    name = name or str(path)
    if path.is_dir():  # a diffusers model folder
        found = [path / f for f in _DIFFUSERS_FILES if (path / f).is_file()]
        if not found:
            raise ControlNetError(f"{name}: folder has none of {_DIFFUSERS_FILES}")
        path = found[0]
    if not path.is_file():
        raise ControlNetError(f"{name}: no such file")
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) < 9:
        raise ControlNetError(f"{name}: file is empty or truncated ({path.stat().st_size} bytes)")
    if head[8:9] == b"{":  # safetensors: u64 header length, then a JSON header
        return _read_safetensors(path, name)
    return _read_pickle(path, name)


def _target_dtype(dtypes: dict[str, torch.dtype | None]) -> torch.dtype:
    floats = Counter(d for d in dtypes.values() if d is not None and d.is_floating_point)
    return floats.most_common(1)[0][0] if floats else torch.float32


def detect_config(state_dict: Mapping[str, torch.Tensor], name: str = "state dict") -> ControlNetConfig:
    """The ControlNet configuration of a state dict in any supported layout, from names and shapes only."""
    t = read_tensors(state_dict, name)
    _, keymap = to_ldm_keys(t.shapes, t.name)
    return config_from_shapes({k: t.shapes[src] for k, src in keymap.items()}, t.name)


def load_controlnet(
    source: Source,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    *,
    base_unet: Source | None = None,
    name: str | None = None,
) -> ControlNet:
    """Load a ControlNet (arXiv 2302.05543) from a file, a diffusers folder or a state dict.

    ``dtype`` defaults to the checkpoint's storage dtype. ``base_unet`` (path or state dict of the base
    SD model or its UNet) is needed only for "difference" files, whose weights are ControlNet minus UNet.
    ``name`` is used in messages and for the shuffle heuristic when ``source`` is a state dict.
    """
    t = read_tensors(source, name)
    layout, keymap = to_ldm_keys(t.shapes, t.name)
    config = config_from_shapes({k: t.shapes[src] for k, src in keymap.items()}, t.name)
    dtype = dtype or _target_dtype({src: t.dtypes[src] for src in keymap.values()})
    device = torch.device(device or "cpu")
    label = Path(t.name).name if not isinstance(source, Mapping) or name else "ControlNet"
    log.info("loading %s: %s layout, family %s, %s", t.name, layout, config.family, dtype)

    base = None
    if DIFFERENCE_KEY in t.shapes:
        if base_unet is None:
            raise ControlNetError(
                f"{t.name}: this is a 'difference' ControlNet (weights = ControlNet - base UNet); "
                "pass the base model's UNet weights as base_unet="
            )
        base = read_tensors(base_unet, None if not isinstance(base_unet, Mapping) else "base_unet state dict")
        base_map = unet_to_ldm_keys(base.shapes)

    model = build_controlnet(config, device="meta", name=label)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(keymap))
    if missing:
        raise ControlNetError(f"{t.name}: ControlNet tensors missing: {missing[:5]} ({len(missing)} in all)")
    unexpected = sorted(set(keymap) - set(expected))
    if unexpected:
        log.warning("%s: ignoring %d unexpected tensors, e.g. %s", t.name, len(unexpected), unexpected[:3])

    state: dict[str, torch.Tensor] = {}
    for key, shape in expected.items():
        w = t.get(keymap[key])
        if tuple(w.shape) != shape:
            raise ControlNetError(
                f"{t.name}: tensor {keymap[key]!r} has shape {tuple(w.shape)}, expected {shape}"
            )
        if base is not None and key in base_map:
            b = base.get(base_map[key])
            if tuple(b.shape) != shape:
                raise ControlNetError(
                    f"base UNet: {base_map[key]!r} has shape {tuple(b.shape)}, expected {shape}"
                )
            # Add in float32, then round once to the target dtype.
            w = w.float() + b.float()
        state[key] = w.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    del state

    # Shuffle ControlNets average each residual globally; nothing in the weights says so, so the
    # ecosystem goes by the name (ComfyUI: "*_shuffle"); the stack applies it.
    model.global_average_pooling = "shuffle" in label.lower()
    return model.eval().requires_grad_(False)
