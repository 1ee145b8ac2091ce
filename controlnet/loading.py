"""Reading ControlNet files: safetensors / torch pickles, any supported layout, lazily.

Memory: tensors are read one at a time (safetensors ``safe_open``; pickles with weights_only and mmap),
converted to the target dtype and device, and assigned into a model built on the meta device, so
loading needs about one copy of the weights beyond the result.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import pickletools
import re
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NoReturn

import torch

from .config import ControlNetConfig, config_from_shapes
from .convert import DIFFERENCE_KEY, to_ldm_keys, unet_to_ldm_keys
from .errors import ControlNetError
from .model import ControlNet, build_controlnet
from .ops import Operations

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


# What a pickle may import: torch's weights-only allowlist (tensor rebuilders, storages, dtypes, OrderedDict,
# ...). Anything else is refused before torch.load runs, so a legacy and a zip pickle get the same message.
def _allowed_globals() -> set[str] | None:
    try:  # private to torch; without it, torch's own refusal (parsed below) still names the global
        from torch._weights_only_unpickler import _get_allowed_globals, _get_user_allowed_globals

        return set(_get_allowed_globals()) | set(_get_user_allowed_globals())
    except Exception:
        return None


# Bytes per element of the storage classes a legacy pickle names (torch.FloatStorage, ...): enough to bound
# the bytes a file declares before torch allocates them (it allocates every storage before reading it).
_STORAGE_ITEMSIZE = {
    "Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2, "Char": 1, "Byte": 1,
    "Bool": 1, "ComplexFloat": 8, "ComplexDouble": 16, "Untyped": 1,
}  # fmt: skip
# A deflate-compressed zip may expand; beyond this multiple of the file's size it is refused, not inflated.
_ZIP_EXPANSION = 4
# Lines of torch.load's messages that advise turning the safety off or filing torch issues: never shown.
_TORCH_ADVICE = (
    "weights_only", "weights only load failed", "safe_globals", "please file an issue", "check the documentation",
    "do those steps only", "alternatively", "will likely succeed",
)  # fmt: skip


class _Global(str):
    """A global a pickle names ("module.name"), as a value on the simulated stack."""


class _CappedReader:
    """A file whose read(n) never asks for more than is left: a length field claiming 4 GiB in a small file
    must not make Python allocate 4 GiB up front (BufferedReader.read(n) does)."""

    def __init__(self, fh, size: int) -> None:
        self.fh, self.size = fh, size
        self.readline, self.tell = fh.readline, fh.tell

    def read(self, n: int = -1) -> bytes:
        left = self.size - self.fh.tell()
        return self.fh.read(left if n < 0 else min(n, left))


def _scan_pickle(stream, imports: list[str], storages: dict[object, int]) -> None:
    """Walk one pickle's opcodes WITHOUT running it (pickletools only parses): record every global it names
    in ``imports`` and the bytes of every storage it declares (legacy persistent ids
    ``("storage", type, key, location, numel, view)``) in ``storages``. Raises ValueError if malformed."""
    mark = object()
    stack: list[object] = []
    memo: dict[int, object] = {}

    def pop(n: int) -> list[object]:
        if n > len(stack) or mark in stack[len(stack) - n :]:
            raise ValueError("pickle stack underflow")
        out = stack[len(stack) - n :]
        del stack[len(stack) - n :]
        return out

    for op, arg, _ in pickletools.genops(stream):
        name = op.name
        if name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
            if not stack:
                raise ValueError("pickle memoizes an empty stack")
            memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
            continue
        if name == "MARK":
            stack.append(mark)
            continue
        if pickletools.markobject in op.stack_before:
            if mark not in stack:
                raise ValueError("pickle has no MARK to pop to")
            at = len(stack) - 1 - stack[::-1].index(mark)
            popped = stack[at + 1 :]
            del stack[at:]
            pop(op.stack_before.index(pickletools.markobject))
        else:
            popped = pop(len(op.stack_before))
        value: object = None
        if name in ("GLOBAL", "INST"):
            value = _Global(str(arg).replace(" ", "."))
            imports.append(value)
        elif name == "STACK_GLOBAL":
            module, attr = popped
            value = _Global(
                f"{module}.{attr}"
                if isinstance(module, str) and isinstance(attr, str)
                else "(a computed name)"
            )
            imports.append(value)
        elif name.startswith("TUPLE") or name == "EMPTY_TUPLE":
            value = tuple(popped)
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            value = memo.get(arg)
        elif name == "BINPERSID" and isinstance(pid := popped[0], tuple) and len(pid) == 6:
            kind, storage_type, key, _, numel, _ = pid
            if kind in ("storage", b"storage") and isinstance(numel, int):
                typename = str(storage_type).rsplit(".", 1)[-1].removesuffix("Storage")
                storages[key] = max(storages.get(key, 0), numel * _STORAGE_ITEMSIZE.get(typename, 1))
        elif not op.stack_before and op.arg is not None:
            value = arg  # ints, strings, bytes, floats: kept so tuples above see them
        stack.extend([value] * len(op.stack_after))


def _check_pickle(path: Path, name: str, is_zip: bool) -> bool:
    """Refuse, before torch.load, a pickle that imports anything but weights, or declares more data than the
    file holds (or a zip that would inflate far beyond it): torch would allocate it before noticing.

    Returns whether the file can be memory-mapped (a zip with only stored, uncompressed entries)."""
    size = path.stat().st_size
    imports: list[str] = []
    storages: dict[object, int] = {}
    error, stored = None, False
    try:
        if is_zip:
            with zipfile.ZipFile(path) as z:
                infos = z.infolist()
                stored = all(i.compress_type == zipfile.ZIP_STORED for i in infos)
                declared = sum(i.file_size for i in infos)
                if declared > _ZIP_EXPANSION * size:
                    raise ControlNetError(
                        f"{name}: corrupt checkpoint: its zip entries declare {declared} bytes, more than "
                        f"{_ZIP_EXPANSION} x the file's {size} bytes"
                    )
                for info in infos:
                    if info.filename.endswith("data.pkl"):
                        _scan_pickle(io.BytesIO(z.read(info)), imports, storages)
        else:
            # torch.save's legacy format: pickles of the magic number, the protocol, sys info, the object
            # (with the storage ids) and the storage keys, then the raw storages.
            with open(path, "rb") as fh:
                reader = _CappedReader(fh, size)
                for _ in range(5):
                    if fh.tell() >= size:
                        break
                    _scan_pickle(reader, imports, storages)
    except ControlNetError:
        raise
    except Exception as e:  # malformed opcodes, truncated data, a broken zip directory
        error = e
    allowed = _allowed_globals()
    refused = list(dict.fromkeys(g for g in imports if allowed is not None and g not in allowed))
    if refused:
        _refuse_code(name, refused)
    if error is not None:
        raise ControlNetError(
            f"{name}: corrupt or not a checkpoint ({type(error).__name__}: {error})"
        ) from error
    declared = sum(storages.values())
    if declared > size:
        raise ControlNetError(
            f"{name}: corrupt checkpoint: it declares {declared} bytes of tensor data but the file has {size}"
        )
    return stored


def _refuse_code(name: str, imports: list[str]) -> NoReturn:
    what = ", ".join(imports[:3]) + (f" and {len(imports) - 3} more" if len(imports) > 3 else "")
    raise ControlNetError(
        f"{name}: refused to unpickle: the file asks to import {what}, which is code or an object that is not a "
        "tensor. Nothing from it was run: only weights are read from pickles. If you trust the file and its source, "
        "convert it to .safetensors with your own script (torch.load, then "
        "safetensors.torch.save_file(state_dict, 'model.safetensors')) and load that instead."
    )


def _torch_reason(e: BaseException) -> str:
    """The line of a torch.load error that says what is wrong, without torch's advice."""
    lines = (ln.strip().removeprefix("WeightsUnpickler error:").strip() for ln in str(e).splitlines())
    kept = [ln for ln in lines if ln and not any(a in ln.lower() for a in _TORCH_ADVICE)]
    return f"{type(e).__name__}: {kept[0][:200]}" if kept else type(e).__name__


def _read_pickle(path: Path, name: str) -> _Tensors:
    # weights_only=True: the unpickler only builds tensors and containers, no code from the file runs.
    # mmap needs the zip format with stored (uncompressed) entries: with deflated ones torch would map the
    # compressed bytes as weights. Legacy pickles and compressed zips are read whole.
    mmap = _check_pickle(path, name, zipfile.is_zipfile(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # The imports were checked above; torch's own refusal is the fallback if its allowlist moved.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            _refuse_code(name, [found.group(1)])
        raise ControlNetError(f"{name}: corrupt or not a checkpoint ({_torch_reason(e)})") from e
    except Exception as e:  # truncated zip, garbage bytes, ...
        raise ControlNetError(f"{name}: corrupt or truncated checkpoint ({_torch_reason(e)})") from e
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
    operations: Operations | None = None,
) -> ControlNet:
    """Load a ControlNet (arXiv 2302.05543) from a file, a diffusers folder or a state dict.

    ``dtype`` defaults to the checkpoint's storage dtype. ``base_unet`` (path or state dict of the base
    SD model or its UNet) is needed only for "difference" files, whose weights are ControlNet minus UNet.
    ``name`` is used in messages and for the shuffle heuristic when ``source`` is a state dict.
    ``operations``: the layer classes to build with (plain torch by default; see ``ops.py``).
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

    model = build_controlnet(config, device="meta", name=label, operations=operations)
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
