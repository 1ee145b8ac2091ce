"""Build full-size SD1.5 checkpoint + ControlNet files with seeded random weights (test fixtures).

Run by ``scripts/host.py models`` with the host's python and ``--comfy-dir`` pointing at a ComfyUI checkout:
the checkpoint's key/shape set is taken from ComfyUI's own classes instantiated on the ``meta`` device, so it
is exactly what ``CheckpointLoaderSimple`` expects. The ControlNet key/shape set is the one of a real SD1.5
ControlNet (``tests/fixtures/controlnet_sd15_ldm_keys.tsv``). Nothing is downloaded.

Values: ``normal / sqrt(fan_in)`` for weights of rank >= 2 (activations keep their scale), ``1 + 0.01 * normal``
for 1-D weights (norms), ``0.01 * normal`` for biases. Every tensor gets its own ``torch.Generator`` seeded from
(file seed, tensor name), so a file is reproducible bit for bit. Stored as fp16 safetensors. The images these
models make are noise; tests compare numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import zlib
from pathlib import Path

import torch

# Names, seeds and the format version have one home, the harness's host_models (stdlib only, so both import it).
from host_models import CHECKPOINT as CHECKPOINT_NAME
from host_models import CONTROLNETS as _CONTROLNET_NAMES
from host_models import MODEL_SEEDS
from host_models import RANDOM_MODELS_VERSION as FORMAT_VERSION
from host_models import TINY_CHECKPOINT as TINY_CHECKPOINT_NAME
from safetensors import safe_open
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parent.parent
CONTROLNET_KEYS_TSV = REPO / "tests" / "fixtures" / "controlnet_sd15_ldm_keys.tsv"
CONTROLNETS = dict(zip(_CONTROLNET_NAMES, MODEL_SEEDS[1:4], strict=True))
CHECKPOINT_SEED = MODEL_SEEDS[0]
TINY_CHECKPOINT_SEED = MODEL_SEEDS[4]

# The SD1.5 UNet config ComfyUI's model detection produces for a real SD1.5 checkpoint (comfy/model_detection.py).
SD15_UNET_CONFIG = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "adm_in_channels": None,
    "in_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4],
    "transformer_depth_middle": 1,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
# The smallest UNet ComfyUI still detects as SD1.5 (it matches on model_channels 320, context_dim 768, conv
# projections, no adm; levels, blocks and depths are read from the tensors): one level with one ResBlock +
# transformer, a middle block of one ResBlock, two output blocks (the first with a transformer).
TINY_SD15_UNET_CONFIG = {
    **SD15_UNET_CONFIG,
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_middle": -1,
    "transformer_depth_output": [1, 0],
}
SD_VAE_DDCONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}


def _import_comfy(comfy_dir: Path) -> None:
    sys.path.insert(0, str(comfy_dir))
    from comfy.cli_args import args  # parses no argv unless main.py enabled it

    args.cpu = True


def checkpoint_shapes(comfy_dir: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an original-layout SD1.5 single-file checkpoint, from ComfyUI's classes on ``meta``."""
    _import_comfy(comfy_dir)
    import comfy.ops
    from comfy.clip_model import CLIPTextModel
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    ops = comfy.ops.disable_weight_init
    meta = torch.device("meta")
    shapes: dict[str, tuple[int, ...]] = {}
    with torch.device(meta):
        unet = UNetModel(**SD15_UNET_CONFIG, dtype=torch.float16, device=meta, operations=ops)
        for k, v in unet.state_dict().items():
            shapes["model.diffusion_model." + k] = tuple(v.shape)
        vae = AutoencoderKL(ddconfig=SD_VAE_DDCONFIG, embed_dim=4)
        for k, v in vae.state_dict().items():
            shapes["first_stage_model." + k] = tuple(v.shape)
        with open(comfy_dir / "comfy" / "sd1_clip_config.json") as f:
            clip_config = json.load(f)
        clip = CLIPTextModel(clip_config, dtype=torch.float16, device=meta, operations=ops)
        for k, v in clip.state_dict().items():
            if k.startswith("text_model."):  # text_projection / logit_scale are not in SD1.5 files
                shapes["cond_stage_model.transformer." + k] = tuple(v.shape)
    return shapes


def tiny_checkpoint_shapes(comfy_dir: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the tiny SD1.x checkpoint: TINY_SD15_UNET_CONFIG's UNet, a TAESD-layout VAE under
    ``first_stage_model.`` (ComfyUI's VAE class picks TAESD from ``taesd_decoder.1.weight``) and SD1.5's CLIP-L."""
    _import_comfy(comfy_dir)
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.taesd.taesd import TAESD

    meta = torch.device("meta")
    shapes = {k: v for k, v in checkpoint_shapes(comfy_dir).items() if k.startswith("cond_stage_model.")}
    with torch.device(meta):
        unet = UNetModel(
            **TINY_SD15_UNET_CONFIG,
            dtype=torch.float16,
            device=meta,
            operations=comfy.ops.disable_weight_init,
        )
        shapes.update({"model.diffusion_model." + k: tuple(v.shape) for k, v in unet.state_dict().items()})
        for k, v in TAESD().state_dict().items():
            if k.startswith("taesd_"):  # vae_scale / vae_shift: ComfyUI's defaults (1, 0)
                shapes["first_stage_model." + k] = tuple(v.shape)
    return shapes


SDXL_CHECKPOINT_NAME = "controlstack_random_sdxl.safetensors"
SDXL_CONTROLNET_NAME = "controlstack_random_sdxl_canny.safetensors"
SDXL_SEEDS = (100, 101)


def sdxl_checkpoint_shapes(comfy_dir: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an original-layout SDXL single-file checkpoint (UNet, CLIP-L + OpenCLIP-G, VAE), from
    ComfyUI's own classes on ``meta`` and its own save-time key conversion."""
    _import_comfy(comfy_dir)
    import comfy.ops
    import comfy.sdxl_clip
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    sys.path.insert(0, str(REPO / "bench"))
    from bench_controlnet import SDXL_UNET

    ops = comfy.ops.disable_weight_init
    meta = torch.device("meta")
    config = comfy.supported_models.SDXL(dict(SDXL_UNET))
    shapes: dict[str, tuple[int, ...]] = {}
    with torch.device(meta):
        unet = UNetModel(**SDXL_UNET, dtype=torch.float16, device=meta, operations=ops)
        shapes.update({"model.diffusion_model." + k: tuple(v.shape) for k, v in unet.state_dict().items()})
        vae = AutoencoderKL(ddconfig=SD_VAE_DDCONFIG, embed_dim=4)
        shapes.update({"first_stage_model." + k: tuple(v.shape) for k, v in vae.state_dict().items()})
        clip = comfy.sdxl_clip.SDXLClipModel(device=meta, dtype=torch.float16)
        saved = config.process_clip_state_dict_for_saving(clip.state_dict())
        shapes.update({k: tuple(v.shape) for k, v in saved.items() if not k.endswith("position_ids")})
    return shapes


def sdxl_controlnet_shapes() -> dict[str, tuple[int, ...]]:
    from controlstack.controlnet import build_controlnet
    from controlstack.controlnet.config import preset

    shell = build_controlnet(preset("sdxl"), device="meta")
    return {"control_model." + k: tuple(v.shape) for k, v in shell.state_dict().items()}


def controlnet_shapes() -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for line in CONTROLNET_KEYS_TSV.read_text().splitlines():
        if not line.strip():
            continue
        name, shape = line.split("\t")
        shapes[name] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return shapes


def random_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    # torch's CPU generator (mt19937) keeps only the low 32 bits of a seed: mix the file seed and the tensor name
    # into those bits, or files with different seeds get identical tensors (format 1 did exactly that).
    gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
    t = torch.randn(shape, generator=gen, dtype=torch.float32)
    if name.endswith("position_ids"):
        return torch.arange(shape[-1], dtype=torch.int64).expand(shape).contiguous()
    if len(shape) >= 2:
        t.mul_(1.0 / math.sqrt(math.prod(shape[1:])))
    elif name.endswith(".weight"):
        t.mul_(0.01).add_(1.0)
    else:
        t.mul_(0.01)
    return t.to(torch.float16)


def already_built(path: Path, seed: int) -> bool:
    """Files are written to a temporary name and renamed, so a file with our header metadata is complete."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:
        return False
    return meta.get("controlstack_random") == FORMAT_VERSION and meta.get("seed") == str(seed)


def write_random(path: Path, shapes: dict[str, tuple[int, ...]], seed: int, kind: str) -> bool:
    """Write ``path`` unless the same build is already there. Returns True when it wrote."""
    if already_built(path, seed):
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: random_tensor(name, shape, seed) for name, shape in sorted(shapes.items())}
    tmp = path.with_name(path.name + ".partial")
    meta = {"controlstack_random": FORMAT_VERSION, "seed": str(seed), "kind": kind}
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return True


def check_checkpoint(comfy_dir: Path, path: Path, unet_config: dict = SD15_UNET_CONFIG) -> str:
    """Load ``path`` the way CheckpointLoaderSimple does; return the detected model config's class name."""
    _import_comfy(comfy_dir)
    import comfy.sd

    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(path))
    name = type(model.model.model_config).__name__
    detected = model.model.model_config.unet_config
    wrong = {k: detected.get(k) for k, v in unet_config.items() if k in detected and detected[k] != v}
    if name != "SD15" or clip is None or vae is None or wrong:
        raise SystemExit(
            f"{path}: ComfyUI detected {name!r} (clip={clip is not None}, vae={vae is not None}, "
            f"config differences {wrong})"
        )
    return name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--comfy-dir", type=Path, required=True)
    p.add_argument("--models-dir", type=Path, required=True, help="ComfyUI models/ folder to write into")
    p.add_argument("--check", action="store_true", help="load the checkpoint in ComfyUI after building it")
    p.add_argument(
        "--sdxl", action="store_true", help="build the SDXL checkpoint + ControlNet instead (~10 GB)"
    )
    a = p.parse_args(argv)
    if a.sdxl:
        t0 = time.perf_counter()
        ckpt = a.models_dir / "checkpoints" / SDXL_CHECKPOINT_NAME
        cn = a.models_dir / "controlnet" / SDXL_CONTROLNET_NAME
        built = []
        if not already_built(ckpt, SDXL_SEEDS[0]):
            built += [str(ckpt)] * write_random(
                ckpt, sdxl_checkpoint_shapes(a.comfy_dir), SDXL_SEEDS[0], "sdxl"
            )
        built += [str(cn)] * write_random(cn, sdxl_controlnet_shapes(), SDXL_SEEDS[1], "sdxl-controlnet")
        print(json.dumps({"built": built, "build_s": round(time.perf_counter() - t0, 1)}))
        return 0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result: dict[str, object] = {"built": [], "kept": []}
    t0 = time.perf_counter()
    ckpt = a.models_dir / "checkpoints" / CHECKPOINT_NAME
    wrote_ckpt = not already_built(ckpt, CHECKPOINT_SEED) and write_random(
        ckpt, checkpoint_shapes(a.comfy_dir), CHECKPOINT_SEED, "sd15-checkpoint"
    )
    result["built" if wrote_ckpt else "kept"].append(str(ckpt))  # type: ignore[union-attr]
    cn_shapes = controlnet_shapes()
    for name, seed in CONTROLNETS.items():
        path = a.models_dir / "controlnet" / name
        wrote = write_random(path, cn_shapes, seed, "sd15-controlnet")
        result["built" if wrote else "kept"].append(str(path))  # type: ignore[union-attr]
    tiny = a.models_dir / "checkpoints" / TINY_CHECKPOINT_NAME
    wrote_tiny = not already_built(tiny, TINY_CHECKPOINT_SEED) and write_random(
        tiny, tiny_checkpoint_shapes(a.comfy_dir), TINY_CHECKPOINT_SEED, "sd15-tiny-checkpoint"
    )
    result["built" if wrote_tiny else "kept"].append(str(tiny))  # type: ignore[union-attr]
    result["build_s"] = round(time.perf_counter() - t0, 1)
    if a.check and wrote_tiny:
        check_checkpoint(a.comfy_dir, tiny, TINY_SD15_UNET_CONFIG)
    if a.check and wrote_ckpt:
        t1 = time.perf_counter()
        result["detected"] = check_checkpoint(a.comfy_dir, ckpt)
        result["check_s"] = round(time.perf_counter() - t1, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
