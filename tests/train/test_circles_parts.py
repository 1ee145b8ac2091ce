"""The circles demo model's parts: the exact CLIP-L, the analytic VAE encoder, int8 storage, and the installed files
loading in ComfyUI with the hashes the shipped model was made with."""

from __future__ import annotations

import json

import circles_model
import circles_parts
import host
import numpy as np
import pytest
import torch
from safetensors.torch import load_file


def test_exact_uniform_is_seeded_by_name_and_has_its_std():
    a = circles_parts.exact_uniform(1, "w", (256, 256), 0.5)
    assert torch.equal(a, circles_parts.exact_uniform(1, "w", (256, 256), 0.5))
    assert not torch.equal(a, circles_parts.exact_uniform(1, "v", (256, 256), 0.5))
    assert not torch.equal(a, circles_parts.exact_uniform(2, "w", (256, 256), 0.5))
    assert abs(float(a.mean())) < 0.01 and abs(float(a.std()) - 0.5) < 0.01
    assert float(a.abs().max()) <= 0.5 * 3**0.5


def test_clip_rebuilds_to_the_reference_bits(comfy_dir):
    sd = circles_parts.build_clip(comfy_dir)  # raises, naming both hashes, when a bit differs
    assert len(sd) > 190 and all(k.startswith("cond_stage_model.") for k in sd)
    changed = dict(sd)
    key = next(k for k in sd if k.endswith("token_embedding.weight"))
    changed[key] = sd[key].clone()
    changed[key][0, 0] += 1
    assert circles_parts.tensors_digest(changed) != circles_parts.CLIP_SHA256


def test_analytic_encoder_is_the_8x8_block_mean(comfy_dir):
    taesd = circles_parts._taesd()
    enc = {k[len("taesd_encoder.") :]: v for k, v in circles_parts.vae_encoder_state_dict().items()}
    taesd.taesd_encoder.load_state_dict(enc)
    x = torch.rand(3, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        e = taesd.taesd_encoder(x)
    want = torch.nn.functional.avg_pool2d(x, 8) * 2 * circles_parts.LATENT_RANGE - circles_parts.LATENT_RANGE
    assert torch.allclose(e[:, :3], want, atol=1e-5) and not e[:, 3].any()


def test_int8_round_trip():
    g = torch.Generator().manual_seed(0)
    sd = {
        "w": torch.randn(64, 32, 3, 3, generator=g),
        "b": torch.randn(64, generator=g),
        "i": torch.arange(3),
    }
    sd["w"][5] = 0
    packed = circles_parts.quantize_int8(sd)
    assert packed["w"].dtype == torch.int8 and packed["w.int8_scale"].shape == (64,)
    back = circles_parts.dequantize_int8(packed)
    assert set(back) == set(sd)
    rows = sd["w"].reshape(64, -1)
    err = (back["w"].float().reshape(64, -1) - rows).abs().amax(dim=1)
    assert (err <= rows.abs().amax(dim=1) / 254 * 1.01 + 1e-3).all()
    assert not back["w"][5].any()
    assert torch.equal(back["b"], sd["b"].half()) and torch.equal(back["i"], sd["i"])


@pytest.fixture(scope="module")
def installed(comfy_dir, tmp_path_factory) -> dict:
    return host.build_models(host.resolve_base_dir(), comfy_dir=comfy_dir)


def test_installed_files_match_the_manifest_and_load_in_comfyui(comfy_dir, installed):
    import comfy.sd

    manifest = json.loads(circles_model.MANIFEST.read_text())
    assert circles_model.file_digest(installed["circles_checkpoint"]) == manifest["sha256"]["checkpoint"]
    assert circles_model.file_digest(installed["circles_controlnet"]) == manifest["sha256"]["controlnet"]
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(installed["circles_checkpoint"]))
    assert type(model.model.model_config).__name__ == "SD15"
    assert type(vae.first_stage_model).__name__ == "TAESD"
    from controlstack.training.data import draw_circle, random_circle

    circles = [random_circle(np.random.default_rng(i), 64) for i in range(8)]
    images = torch.stack(
        [torch.from_numpy(np.asarray(draw_circle(c, 64)[1], np.float32) / 255) for c in circles]
    )
    latent = vae.encode(images)  # B x H x W x 3 in [0, 1] -> the raw latent
    mean = torch.nn.functional.avg_pool2d(images.movedim(-1, 1), 8)
    want = (mean * 2 * circles_parts.LATENT_RANGE - circles_parts.LATENT_RANGE) / circles_parts.VAE_SCALE
    assert torch.allclose(latent[:, :3], want, atol=2e-2)
    decoded = vae.decode(latent).movedim(-1, 1)
    iou, err = circles_parts.circle_iou(decoded, circles)
    print(f"circles VAE round trip: IoU {iou:.3f}, colour error {err:.4f}")
    assert iou > 0.9 and err < 0.05
    shipped = sum(p.stat().st_size for p in circles_model.SHIPPED.glob("*.safetensors"))
    assert shipped <= 40 * 2**20, shipped  # the budget for what the repo carries
    assert all(v.dtype == torch.float16 for v in load_file(str(installed["circles_controlnet"])).values())
