"""Parts of the circles demo model: an exactly reproducible CLIP-L, the circles VAE, and int8 storage.

- **CLIP-L stays random** (SD1.x needs its full-size text encoder; 246 MB is too big to ship) but the base UNet was
  trained on its outputs, so every machine must rebuild the same bits. ``torch.randn``'s CPU kernels differ by
  instruction set, so values come from numpy's PCG64 integer stream turned into floats with exactly rounded IEEE
  operations only, and the result is checked against a hash.
- **The VAE** is in TAESD's layout (ComfyUI loads it from a checkpoint's ``first_stage_model.taesd_*`` keys). Its
  encoder is analytic: the latent is the exact 8x8 block mean of R, G and B mapped to [-2.5, 2.5] (channel 3 is 0),
  a smooth latent that a small UNet learns easily. Only the decoder is trained, to draw sharp circle edges back.
  ``vae_scale`` makes the UNet see about [-1, 1] after SD1.x's latent factor 0.18215.
- **int8**: the trained UNet and ControlNet are stored per-output-channel int8 (fp16 scales) to fit the 40 MB
  budget; dequantising is exact and deterministic, so the installed files hash the same everywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

CLIP_SEED = 77
CLIP_SHA256 = "4e33f0fb01a260009b850ca0ad14f02961093228f6ea30f3c1db51bac304e547"
LATENT_RANGE = 2.5
VAE_SCALE = 0.18215 * LATENT_RANGE  # model input = 0.18215 * e / VAE_SCALE, in [-1, 1]
INT8_MIN_ELEMENTS = 4096


# Exact random values ----------------------------------------------------------------------------------------------


def exact_uniform(seed: int, name: str, shape: tuple[int, ...], std: float) -> torch.Tensor:
    """Uniform values of standard deviation ``std``, the same bits on every machine (float32)."""
    key = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")
    k = np.random.Generator(np.random.PCG64(key)).integers(0, 2**24, size=shape, dtype=np.int64)
    unit = (k.astype(np.float64) - (2**23 - 0.5)) / 2**23  # exact: |values| < 2**24, a power-of-two divisor
    return torch.from_numpy((unit * (std * math.sqrt(3.0))).astype(np.float32))


def tensors_digest(state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k, v in sorted(state_dict.items()):
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def clip_state_dict(comfy_dir: Path, seed: int = CLIP_SEED) -> dict[str, torch.Tensor]:
    """SD1.5's text encoder (checkpoint key names from ComfyUI's classes on meta), exact random values, fp16."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from make_random_models import checkpoint_shapes

    out = {}
    for name, shape in sorted(checkpoint_shapes(comfy_dir).items()):
        if not name.startswith("cond_stage_model."):
            continue
        if name.endswith("position_ids"):
            out[name] = torch.arange(shape[-1], dtype=torch.int64).expand(shape).contiguous()
            continue
        if "layer_norm" in name or "norm" in name.rsplit(".", 2)[-2]:
            value = torch.ones(shape) if name.endswith("weight") else torch.zeros(shape)
        elif "embedding" in name:
            value = exact_uniform(seed, name, shape, 0.02)
        elif len(shape) >= 2:
            value = exact_uniform(seed, name, shape, 1.0 / math.sqrt(math.prod(shape[1:])))
        else:
            value = torch.zeros(shape)
        out[name] = value.to(torch.float16)
    return out


def build_clip(comfy_dir: Path) -> dict[str, torch.Tensor]:
    sd = clip_state_dict(comfy_dir)
    got = tensors_digest(sd)
    if got != CLIP_SHA256:
        raise RuntimeError(
            f"the rebuilt CLIP-L has sha256 {got}, the reference bits {CLIP_SHA256}: this machine's float conversion "
            "is not the IEEE-exact one the demo model relies on (please report it)"
        )
    return sd


# The circles VAE --------------------------------------------------------------------------------------------------


def _taesd(comfy_dir: Path | None = None):
    from comfy.taesd.taesd import TAESD

    return TAESD()


@torch.no_grad()
def vae_encoder_state_dict() -> dict[str, torch.Tensor]:
    """The analytic encoder: latent c (0..2) = 5 * (8x8 mean of colour c) - 2.5, latent 3 = 0 (float32)."""
    taesd = _taesd()
    enc = taesd.taesd_encoder
    sd = {k: torch.zeros_like(v) for k, v in enc.state_dict().items()}
    first = enc[0]
    w = torch.zeros_like(first.weight)
    for c in range(3):
        w[c, c, 1, 1] = 1.0  # copy R, G, B into channels 0..2 (inputs are >= 0, so every ReLU passes them)
    sd["0.weight"] = w
    for i, layer in enumerate(enc):
        if isinstance(layer, torch.nn.Conv2d) and layer.stride == (2, 2):
            # 3x3, stride 2, padding 1: output i reads input rows 2i-1, 2i, 2i+1 -> taps 1, 2 are rows 2i, 2i+1
            avg = torch.zeros_like(layer.weight)
            for c in range(layer.weight.shape[0]):
                avg[c, c, 1:3, 1:3] = 0.25
            sd[f"{i}.weight"] = avg
    last = len(enc) - 1
    out = torch.zeros_like(enc[last].weight)
    bias = torch.zeros_like(enc[last].bias)
    for c in range(3):
        out[c, c, 1, 1] = 2 * LATENT_RANGE
        bias[c] = -LATENT_RANGE
    sd[f"{last}.weight"], sd[f"{last}.bias"] = out, bias
    return {"taesd_encoder." + k: v for k, v in sd.items()}


def circle_batch(rng: np.random.Generator, batch: int, size: int) -> tuple[torch.Tensor, list]:
    from controlstack.training.data import draw_circle, random_circle

    circles = [random_circle(rng, size) for _ in range(batch)]
    images = [np.asarray(draw_circle(c, size)[1], dtype=np.float32) / 255.0 for c in circles]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), circles


def circle_iou(images: torch.Tensor, circles: list) -> tuple[float, float]:
    """Mean IoU of the drawn circle (pixels nearer the fill than the background) and mean abs colour error."""
    from controlstack.training.data import COLOURS, draw_circle

    ious, errs = [], []
    size = images.shape[-1]
    for img, c in zip(images, circles, strict=True):
        px = img.detach().float().permute(1, 2, 0).numpy() * 255
        fill, bg = np.array(COLOURS[c.fill], float), np.array(COLOURS[c.background], float)
        made = np.linalg.norm(px - bg, axis=-1) > np.linalg.norm(px - fill, axis=-1)
        yy, xx = np.mgrid[0:size, 0:size] + 0.5
        truth = (xx - c.cx) ** 2 + (yy - c.cy) ** 2 <= c.radius**2
        ious.append((made & truth).sum() / max(1, (made | truth).sum()))
        errs.append(np.abs(px - np.asarray(draw_circle(c, size)[1], float)).mean() / 255)
    return float(np.mean(ious)), float(np.mean(errs))


def train_vae_decoder(
    steps: int, seed: int = 5, size: int = 64, batch: int = 16
) -> tuple[dict, float, float]:
    """Train TAESD's decoder on the analytic encoder's latents of synthetic circles -> (state dict, IoU, error)."""
    torch.manual_seed(seed)
    taesd = _taesd()
    taesd.taesd_encoder.load_state_dict(
        {k[len("taesd_encoder.") :]: v for k, v in vae_encoder_state_dict().items()}
    )
    dec = taesd.taesd_decoder
    for m in dec.modules():  # ComfyUI's ops skip weight init: give every conv torch's default one
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.Conv2d.reset_parameters(m)
    opt = torch.optim.Adam(dec.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        images, _ = circle_batch(rng, batch, size)
        with torch.no_grad():
            e = taesd.taesd_encoder(images)
        e = e + 0.05 * torch.randn_like(e)  # the UNet's latents are never exact
        loss = torch.nn.functional.mse_loss(dec(e), images)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        images, circles = circle_batch(np.random.default_rng(seed + 1000), 64, size)
        out = dec(taesd.taesd_encoder(images)).clamp(0, 1)
    iou, err = circle_iou(out, circles)
    return {"taesd_decoder." + k: v.detach() for k, v in dec.state_dict().items()}, iou, err


def vae_state_dict(decoder: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    sd = {**vae_encoder_state_dict(), **decoder}
    sd["vae_scale"] = torch.tensor(VAE_SCALE)
    sd["vae_shift"] = torch.tensor(0.0)
    return {"first_stage_model." + k: v.to(torch.float16).contiguous() for k, v in sd.items()}


# int8 storage -----------------------------------------------------------------------------------------------------


def quantize_int8(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Float tensors of rank >= 2 with >= 4096 elements -> int8 per output channel + fp16 scales; others fp16."""
    out = {}
    for k, v in sd.items():
        if v.is_floating_point() and v.ndim >= 2 and v.numel() >= INT8_MIN_ELEMENTS:
            rows = v.float().reshape(v.shape[0], -1)
            scale = (rows.abs().amax(dim=1) / 127).to(torch.float16)
            scale = torch.where(scale == 0, torch.ones_like(scale), scale)
            q = torch.round(rows / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
            out[k] = q.reshape(v.shape).contiguous()
            out[k + ".int8_scale"] = scale.contiguous()
        else:
            out[k] = (v.to(torch.float16) if v.is_floating_point() else v).contiguous()
    return out


def dequantize_int8(packed: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for k, v in packed.items():
        if k.endswith(".int8_scale"):
            continue
        scale = packed.get(k + ".int8_scale")
        if scale is None:
            out[k] = v
        else:
            shape = (-1,) + (1,) * (v.ndim - 1)
            out[k] = (v.float() * scale.float().reshape(shape)).to(torch.float16).contiguous()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("command", choices=("vae", "clip-digest"))
    p.add_argument("--comfy-dir", type=Path, required=True)
    p.add_argument("--out", type=Path)
    p.add_argument("--steps", type=int, default=800)
    p.add_argument("--batch", type=int, default=8)
    args = p.parse_args(argv)
    sys.path.insert(0, str(args.comfy_dir))
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = not torch.cuda.is_available()
    if args.command == "clip-digest":
        print(tensors_digest(clip_state_dict(args.comfy_dir)))
        return 0
    from safetensors.torch import save_file

    started = time.perf_counter()
    decoder, iou, err = train_vae_decoder(args.steps, batch=args.batch)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(vae_state_dict(decoder), str(args.out))
    print(
        f"VAE decoder: {args.steps} steps in {time.perf_counter() - started:.0f} s; held-out IoU {iou:.3f}, "
        f"colour error {err:.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
