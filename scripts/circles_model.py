"""The circles demo model: made once by training (``make``), shipped small, rebuilt at set-up (``install``).

``make`` (about 30 minutes on 2 CPUs; the result is committed under models/circles/):

1. a synthetic Fill50K set of 64 px circles (``controlstack.training.data``);
2. a base checkpoint: SD1.5's CLIP-L rebuilt exactly from a seed, the circles VAE (TAESD layout: an analytic
   8x8-mean encoder and a trained decoder, ``circles_parts``), the tiny SD1.x UNet;
3. the UNet trained on the circles with the training CLI (``--train-unet``: a text-to-image model of circles whose
   colours follow the prompt and whose place is random), then stored as int8;
4. a ControlNet for that base, trained with the same CLI (the tutorial's recipe at a higher learning rate), int8.

``install`` (the set-up, a few seconds): dequantises the shipped files, rebuilds the CLIP-L, writes
``controlstack_circles_sd15.safetensors`` and ``controlstack_circles_controlnet.safetensors`` and checks both
against the hashes in models/circles/manifest.json, failing with both hashes if a bit differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from host_models import CIRCLES_CHECKPOINT as CHECKPOINT_NAME  # names: one home, the harness's host_models
from host_models import CIRCLES_CONTROLNET as CONTROLNET_NAME
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "models" / "circles"
MANIFEST = SHIPPED / "manifest.json"
VAE_FILE = SHIPPED / "circles_vae.safetensors"
UNET_FILE = SHIPPED / "circles_unet.int8.safetensors"
CONTROLNET_FILE = SHIPPED / "circles_controlnet.int8.safetensors"
RESOLUTION = 64
DATA_SEED, DATA_COUNT = 11, 4000
UNET_PREFIX = "model.diffusion_model."
FORMAT = "1"

# The recipe `make` ran (kept in the manifest too); the CLI's defaults are the tutorial's, these fit 2 CPUs.
BASE_RECIPE = ["--steps", "2500", "--batch-size", "8", "--lr", "2e-4", "--drop-prompt", "0.1", "--seed", "1"]
CONTROLNET_RECIPE = [
    "--steps",
    "7000",
    "--batch-size",
    "8",
    "--lr",
    "1e-4",
    "--drop-prompt",
    "0.3",
    "--seed",
    "2",
]


def file_digest(path: Path) -> str:
    """sha256 of a safetensors file's tensors (names, dtypes, shapes, bytes): independent of header order."""
    h = hashlib.sha256()
    for k, v in sorted(load_file(str(path)).items()):
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _parts(comfy_dir: Path):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import circles_parts

    return circles_parts


def checkpoint_tensors(comfy_dir: Path, unet: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full SD1.x checkpoint: the exact CLIP-L, the circles VAE, and ``unet`` (bare UNet keys), fp16."""
    parts = _parts(comfy_dir)
    tensors = dict(parts.build_clip(comfy_dir))
    tensors.update(load_file(str(VAE_FILE)))
    tensors.update({UNET_PREFIX + k: v.to(torch.float16) for k, v in unet.items()})
    return tensors


def _write(tensors: dict[str, torch.Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata={"controlstack_circles": FORMAT})
    tmp.replace(path)


def install(comfy_dir: Path, models_dir: Path) -> dict[str, Path]:
    """Write the demo checkpoint and ControlNet into ``models_dir`` (idempotent), checked by hash."""
    parts = _parts(comfy_dir)
    manifest = json.loads(MANIFEST.read_text())
    paths = {
        "checkpoint": models_dir / "checkpoints" / CHECKPOINT_NAME,
        "controlnet": models_dir / "controlnet" / CONTROLNET_NAME,
    }
    stamp = models_dir / ".controlstack_circles.json"
    if (
        all(p.is_file() for p in paths.values())
        and stamp.is_file()
        and stamp.read_text() == MANIFEST.read_text()
    ):
        return paths
    unet = parts.dequantize_int8(load_file(str(UNET_FILE)))
    _write(checkpoint_tensors(comfy_dir, unet), paths["checkpoint"])
    _write(parts.dequantize_int8(load_file(str(CONTROLNET_FILE))), paths["controlnet"])
    for key, path in paths.items():
        got, want = file_digest(path), manifest["sha256"][key]
        if got != want:
            path.unlink()
            raise SystemExit(
                f"{path.name}: rebuilt with sha256 {got}, but the shipped model was made with {want}. The CLIP-L "
                "is regenerated from a seed and the int8 weights are dequantised here; a different result means "
                "this machine's float arithmetic is not the IEEE-exact one they rely on. Please report it."
            )
    stamp.write_text(MANIFEST.read_text())
    return paths


def _train(
    comfy_dir: Path, checkpoint: Path, data: Path, output: Path, recipe: list[str], *extra: str
) -> float:
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "controlstack.training", "train", "--checkpoint", str(checkpoint)]
    cmd += ["--data", str(data), "--output", str(output), "--resolution", str(RESOLUTION), "--comfyui"]
    cmd += [
        str(comfy_dir),
        "--save-every",
        "500",
        "--validate-every",
        "500",
        "--cache-latents",
        *recipe,
        *extra,
    ]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return time.perf_counter() - started


def make(comfy_dir: Path, work: Path, tiny_checkpoint: Path) -> None:
    """Train the base UNet and the ControlNet and write models/circles/ (minutes to tens of minutes)."""
    from controlstack.training.data import write_synthetic_fill50k

    parts = _parts(comfy_dir)
    data = work / "data"
    if not (data / "prompt.json").is_file():
        write_synthetic_fill50k(data, DATA_COUNT, size=RESOLUTION, seed=DATA_SEED)
    init = work / "base_init.safetensors"
    if not init.is_file():  # the tiny random UNet (a normal fan-in init) as the starting point
        unet = {
            k[len(UNET_PREFIX) :]: v
            for k, v in load_file(str(tiny_checkpoint)).items()
            if k.startswith(UNET_PREFIX)
        }
        _write(checkpoint_tensors(comfy_dir, unet), init)
    base_s = _train(comfy_dir, init, data, work / "base", BASE_RECIPE, "--train-unet")
    trained = load_file(str(work / "base" / "unet.safetensors"))
    SHIPPED.mkdir(parents=True, exist_ok=True)
    save_file(parts.quantize_int8(trained), str(UNET_FILE))
    base = work / "base.safetensors"  # what users get: the dequantised UNet, so the ControlNet learns on it
    _write(checkpoint_tensors(comfy_dir, parts.dequantize_int8(load_file(str(UNET_FILE)))), base)
    cn_s = _train(comfy_dir, base, data, work / "controlnet", CONTROLNET_RECIPE)
    save_file(
        parts.quantize_int8(load_file(str(work / "controlnet" / "controlnet.safetensors"))),
        str(CONTROLNET_FILE),
    )
    (work / "train_seconds.json").write_text(json.dumps({"base": round(base_s), "controlnet": round(cn_s)}))
    write_manifest(comfy_dir, work)


def write_manifest(comfy_dir: Path, work: Path) -> dict:
    """Rebuild the installed files from the shipped ones and record their hashes, the recipe and the loss curve."""
    parts = _parts(comfy_dir)
    models = work / "installed"
    unet = parts.dequantize_int8(load_file(str(UNET_FILE)))
    _write(checkpoint_tensors(comfy_dir, unet), models / CHECKPOINT_NAME)
    _write(parts.dequantize_int8(load_file(str(CONTROLNET_FILE))), models / CONTROLNET_NAME)
    losses = {k: json.loads((work / k / "losses.json").read_text()) for k in ("base", "controlnet")}

    def curve(values: list) -> list:  # mean loss over 50-step windows at a few points
        points = [50, 250, 500, 1000, 2000, 2500, 3000, 4000, 5000, 6000, 7000]
        return [[n, round(sum(v for _, v in values[n - 50 : n]) / 50, 4)] for n in points if n <= len(values)]

    manifest = {
        "format": FORMAT,
        "sha256": {
            "checkpoint": file_digest(models / CHECKPOINT_NAME),
            "controlnet": file_digest(models / CONTROLNET_NAME),
        },
        "resolution": RESOLUTION,
        "data": {"count": DATA_COUNT, "seed": DATA_SEED},
        "base_recipe": BASE_RECIPE,
        "controlnet_recipe": CONTROLNET_RECIPE,
        "train_seconds": json.loads((work / "train_seconds.json").read_text()),
        "loss_curve_50_step_means": {k: curve(v) for k, v in losses.items()},
        "made": time.strftime("%Y-%m-%d"),
    }
    MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest, indent=1))
    return manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("install", "make", "manifest"))
    p.add_argument("--comfy-dir", type=Path, required=True)
    p.add_argument("--models-dir", type=Path, help="install: the ComfyUI models/ folder to write into")
    p.add_argument("--work", type=Path, default=REPO / ".host" / "circles_make", help="make: scratch folder")
    p.add_argument(
        "--tiny-checkpoint", type=Path, help="make: the random tiny SD1.x checkpoint to start from"
    )
    args = p.parse_args(argv)
    sys.path.insert(0, str(args.comfy_dir))
    from comfy.cli_args import args as comfy_args

    if not torch.cuda.is_available():
        comfy_args.cpu = True
    if args.command == "install":
        paths = install(args.comfy_dir, args.models_dir)
        print(json.dumps({k: str(v) for k, v in paths.items()}))
    elif args.command == "manifest":
        write_manifest(args.comfy_dir, args.work)
    else:
        make(args.comfy_dir, args.work, args.tiny_checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main())
