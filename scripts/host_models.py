"""Host harness, models: the seeded random test models in a base directory's models/ folder.

The tensors are written by scripts/make_random_models.py and scripts/make_random_control_files.py, run with the
host's python inside the ComfyUI folder (they load what they built with ComfyUI's own loaders); this module knows
the file names and seeds, runs them, and tells a complete build from a stale one by the safetensors header alone.
Stdlib only. Imported through ``host`` (scripts/host.py) by tests and scripts.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from host_install import REPO, HostError, log, prepare_base, resolve_comfy_dir, resolve_python, run_checked

RANDOM_MODELS_VERSION = (
    "2"  # in every random file's header; a change rebuilds them (2: per-seed tensors differ)
)
CHECKPOINT = "controlstack_random_sd15.safetensors"
TINY_CHECKPOINT = "controlstack_random_sd15_tiny.safetensors"
"""An SD1.x checkpoint ComfyUI detects as SD15 with a one-level UNet (model_channels 320, one ResBlock + transformer,
a middle ResBlock), a TAESD-layout VAE and the full-size CLIP-L: the training tests' base model (scripts/make_random_models.py)."""
CONTROLNETS = (
    "controlstack_random_sd15_canny.safetensors",
    "controlstack_random_sd15_depth.safetensors",
    "controlstack_random_sd15_scribble.safetensors",
)
MODEL_SEEDS = (0, 1, 2, 3, 4)  # checkpoint, canny, depth, scribble, tiny checkpoint
CIRCLES_CHECKPOINT = "controlstack_circles_sd15.safetensors"
CIRCLES_CONTROLNET = "controlstack_circles_controlnet.safetensors"
"""The trained circles demo model (models/circles/, scripts/circles_model.py): not random, rebuilt at set-up."""

SDXL_BASE_DIR = REPO / ".host" / "base_sdxl"
SDXL_SERVER_ARGS = ("--fp16-unet",)
"""SDXL on a CPU host: UNet weights stored fp16 and cast per layer (fp32 compute), or the full-size SDXL
checkpoint + ControlNet would need ~20 GB of RAM."""

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


def build_models(
    base_dir: Path | None = None, *, comfy_dir: Path | None = None, python: str | None = None
) -> dict[str, Path]:
    """Write the seeded random SD1.5 checkpoint and the canny/depth/scribble ControlNets (plus the SD1.5
    T2I-Adapters of `build_control_files`) into ``base_dir/models``. Idempotent (files carry their seed and
    format version in the safetensors header). A freshly built checkpoint is loaded once with ComfyUI's own
    loader and must be detected as SD1.5. Returns {"checkpoint": path, "canny": path, "depth": path,
    "scribble": path, "tiny_checkpoint": path, "circles_checkpoint": path, "circles_controlnet": path}."""
    base_dir = prepare_base(base_dir)
    comfy_dir = resolve_comfy_dir(comfy_dir)
    models = base_dir / "models"
    paths = {"checkpoint": models / "checkpoints" / CHECKPOINT}
    for name in CONTROLNETS:
        paths[name.rsplit("_", 1)[1].split(".")[0]] = models / "controlnet" / name
    paths["tiny_checkpoint"] = models / "checkpoints" / TINY_CHECKPOINT
    build_control_files(base_dir, "sd15", comfy_dir=comfy_dir, python=python)
    annotators = build_annotator_files(base_dir, python=python)
    circles = {**install_circles(models, comfy_dir=comfy_dir, python=python), **annotators}
    if all(_random_model_ok(path, seed) for path, seed in zip(paths.values(), MODEL_SEEDS, strict=True)):
        return {**paths, **circles}
    proc = _make_random_models(comfy_dir, models, python, "--check")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["built"]:
        log.info("built %d model file(s) in %.1f s", len(result["built"]), result["build_s"])
    missing = [str(p) for p in paths.values() if not p.is_file()]
    if missing:
        raise HostError(f"model build left no file at {missing}")
    return {**paths, **circles}


def build_annotator_files(base_dir: Path, *, python: str | None = None) -> dict[str, Path]:
    """Write the seeded random annotator files the shipped workflow reads (Depth Anything v2 small, OpenPose body)
    into ``base_dir/models/annotators`` under their published names (scripts/make_random_annotator_files.py;
    idempotent through its stamp). Returns {"annotator:<file name>": path}."""
    models = prepare_base(base_dir) / "models"
    script = REPO / "scripts" / "make_random_annotator_files.py"
    proc = run_checked(
        [resolve_python(python), str(script), "--models-dir", str(models), "--check"],
        "build random annotator files",
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["built"]:
        log.info("built %d annotator file(s) in %.1f s", len(result["built"]), result["build_s"])
    folder = models / "annotators"
    return {f"annotator:{p.name}": p for p in sorted(folder.glob("*.pth"))}


def install_circles(models_dir: Path, *, comfy_dir: Path, python: str | None = None) -> dict[str, Path]:
    """Rebuild the circles demo checkpoint and ControlNet from models/circles/ (seconds; checked by hash)."""
    paths = {
        "circles_checkpoint": models_dir / "checkpoints" / CIRCLES_CHECKPOINT,
        "circles_controlnet": models_dir / "controlnet" / CIRCLES_CONTROLNET,
    }
    stamp = models_dir / ".controlstack_circles.json"
    manifest = REPO / "models" / "circles" / "manifest.json"
    if (
        all(p.is_file() for p in paths.values())
        and stamp.is_file()
        and stamp.read_text() == manifest.read_text()
    ):
        return paths  # the same check circles_model.install makes, without starting a python
    script = REPO / "scripts" / "circles_model.py"
    cmd = [resolve_python(python), str(script), "install", "--comfy-dir", str(comfy_dir), "--models-dir"]
    run_checked([*cmd, str(models_dir)], "install the circles demo model", cwd=str(comfy_dir))
    return paths


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


def build_control_files(
    base_dir: Path, family: str, *, comfy_dir: Path | None = None, python: str | None = None
) -> dict[str, Path]:
    """Write the seeded random files of the other control kinds for ``family`` ("sd15": T2I-Adapter full + light;
    "sdxl": diffusers T2I-Adapter XL, Control-LoRA rank 8, Union promax (reduced SDXL), LLLite) into
    ``base_dir/models/controlnet`` with scripts/make_random_control_files.py (~190 MB / ~7 s for sd15, ~580 MB /
    ~40 s for sdxl). Idempotent: nothing runs when every file carries its seed in its header. Files built in a run
    are loaded once with ComfyUI's loader, which must detect their kind (LLLite excepted: no loader in core).
    Returns {"t2i_depth": path, ...}: the file name without ``controlstack_random_<family>_`` and extension."""
    if family not in CONTROL_FILES:
        raise HostError(f"unknown family {family!r} for control files (sd15 or sdxl)")
    base_dir = prepare_base(base_dir)
    comfy_dir = resolve_comfy_dir(comfy_dir)
    models = base_dir / "models"
    prefix = f"controlstack_random_{family}_"
    seeds = {name[len(prefix) : -len(".safetensors")]: seed for name, seed in CONTROL_FILES[family].items()}
    paths = {key: models / "controlnet" / f"{prefix}{key}.safetensors" for key in seeds}
    if all(_random_model_ok(paths[key], seed) for key, seed in seeds.items()):
        return paths
    script = REPO / "scripts" / "make_random_control_files.py"
    cmd = [resolve_python(python), str(script), "--comfy-dir", str(comfy_dir), "--models-dir", str(models)]
    proc = run_checked(
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
    return run_checked([*cmd, *flags], f"build random models {' '.join(flags)}", cwd=str(comfy_dir))


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
