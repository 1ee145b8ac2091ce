"""Host harness, server: a ComfyUI server process with the ControlStack pack loaded in place.

``ComfyServer`` starts ``main.py`` on a free port with its own extra_model_paths.yaml whose custom_nodes folder holds
only a symlink to this repo, waits until the API answers, and stops it with SIGTERM (SIGKILL when it hangs). It is a
``ComfyClient`` (host_client.py) of that server. Stdlib + requests. Imported through ``host`` (scripts/host.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

import requests
from host_client import ComfyClient
from host_install import PACK_NAME, REPO, HostError, log, prepare_base, resolve_comfy_dir, resolve_python


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


class ComfyServer(ComfyClient):
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
        self.port = port or free_port()
        super().__init__(f"http://127.0.0.1:{self.port}", base_dir)
        self.comfy_dir = resolve_comfy_dir(comfy_dir)
        self.extra_args = list(extra_args)
        self.python = resolve_python(python)
        self.pack_dir = Path(pack_dir).resolve()
        self.extra_packs = [Path(p).resolve() for p in extra_packs]
        """More custom-node folders to load next to the pack (test-side reference nodes)."""
        self.run_dir = self.base_dir / "controlstack_run" / f"server-{self.port}"
        self.log_path = self.base_dir / "controlstack_logs" / f"comfyui-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start_seconds: float | None = None

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
                    f"ComfyUI exited during start-up (exit {code}); log {self.log_path}:\n{self.log_tail()}"
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
                    f"ComfyUI did not answer within {timeout:.0f} s; log {self.log_path}:\n{self.log_tail()}"
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

    def check_alive(self, prompt_id: str) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise HostError(
                f"ComfyUI died while running {prompt_id}; log {self.log_path}:\n{self.log_tail()}"
            )

    # ---- log

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def import_failed(self) -> bool:
        """True when ComfyUI logged that importing our pack failed."""
        link = str(self.run_dir / "custom_nodes" / PACK_NAME)
        return any(
            link in line and ("IMPORT FAILED" in line or line.startswith("Cannot import"))
            for line in self.log_text().splitlines()
        )
