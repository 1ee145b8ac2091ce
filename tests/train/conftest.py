"""Fixtures for training tests: ComfyUI imported in this process (no server) and the tiny SD1.x checkpoint.

Training runs on the host's frozen UNet, so these tests need the host's python packages (``comfy``) but not a
server. The host and the random models are installed on first use, as for tests/host.
"""

from __future__ import annotations

import sys
from pathlib import Path

import host
import pytest


@pytest.fixture(scope="session")
def comfy_dir() -> Path:
    """The ComfyUI folder, on sys.path, with its argument parser left at its defaults."""
    path = host.resolve_comfy_dir()
    if path == host.DEFAULT_COMFY_DIR:
        host.install_host(path)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import torch
    from comfy.cli_args import args  # parses no argv: ComfyUI's main.py is not running

    if not torch.cuda.is_available():
        args.cpu = True  # as `main.py --cpu`

    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(comfy_dir: Path) -> Path:
    """The random tiny SD1.x checkpoint (TAESD-layout VAE, CLIP-L) that training tests train on."""
    return host.build_models(host.resolve_base_dir(), comfy_dir=comfy_dir)["tiny_checkpoint"]
