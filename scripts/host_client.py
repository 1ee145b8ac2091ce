"""Host harness, client: talk to a running ComfyUI over its HTTP API with ``requests``.

Queue API-format prompts, wait for them (polling /history, which also carries the execution_error that a
websocket would announce), read /object_info, and find the images a prompt wrote. The server runs on this machine:
inputs are copied into its base directory's input/ and output images are read from its output/ and temp/.
Stdlib + requests. Imported through ``host`` (scripts/host.py) by tests and scripts.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import requests
from host_install import HostError, resolve_base_dir


class PromptRejected(HostError):
    """POST /prompt failed validation. ``.error`` and ``.node_errors`` are the server's answer; ``.prompt_id`` is set
    when the server queued the valid part anyway (and the client took it back)."""

    def __init__(self, error: Any, node_errors: dict[str, Any], prompt_id: str | None = None):
        self.error = error
        self.node_errors = node_errors
        self.prompt_id = prompt_id
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


class ComfyClient:
    """A client of the ComfyUI server at ``url`` whose base directory (input/, output/, temp/) is ``base_dir``.

    ``ComfyServer`` (host_server.py) is one that also owns the server process."""

    def __init__(self, url: str, base_dir: Path | str | None = None):
        self.url = url.rstrip("/")
        self.base_dir = resolve_base_dir(base_dir)
        self._session = requests.Session()

    def check_alive(self, prompt_id: str) -> None:
        """Called while waiting for a prompt: raise HostError when the server is known to have died.
        A bare client cannot tell (it only sees the prompt time out)."""

    def log_tail(self, n: int = 60) -> str:
        """The last ``n`` lines of the server's log, for error messages ("" when this client has no log)."""
        return ""

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
        if data.get("node_errors"):
            # ComfyUI queues the outputs that validated and drops the rest; a caller would then see a partial run
            # as a success. Fail like a rejected prompt, and take the queued part back so it cannot run later.
            prompt_id = str(data["prompt_id"])
            self._session.post(self.url + "/queue", json={"delete": [prompt_id]}, timeout=60)
            self._session.post(self.url + "/interrupt", json={"prompt_id": prompt_id}, timeout=60)
            raise PromptRejected(
                {"message": "some output nodes failed validation"}, data["node_errors"], prompt_id
            )
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
            self.check_alive(prompt_id)
            if time.monotonic() > deadline:
                raise HostError(
                    f"prompt {prompt_id} not done after {timeout:.0f} s; log tail:\n{self.log_tail(20)}"
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
