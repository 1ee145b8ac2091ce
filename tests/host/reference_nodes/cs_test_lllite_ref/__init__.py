"""Test-side reference for ControlNet-LLLite: kohya's formula applied through ComfyUI's attention-patch hooks.

Written from kohya-ss/sd-scripts ``networks/control_net_lllite.py`` (``LLLiteModule.forward``: the wrapped Linear
gets ``x + up(mid(cat[cond_emb, down(x)])) * multiplier``; ``conditioning1`` embeds the hint, rescaled to [-1, 1],
once) and registered with the ModelPatcher's public ``set_model_attn1_patch`` / ``set_model_attn2_patch``, the way
ComfyUI-Advanced-ControlNet does. It shares no code with ControlStack, so the host test comparing the two can fail.
Only even latent sizes (multiples of 4) are supported; the test uses those. Loaded by the host tests only.
"""

from __future__ import annotations

import re

import folder_paths
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

_NAME = re.compile(
    r"^lllite_unet_(?:input_blocks_(\d+)|(middle)_block)_1_transformer_blocks_(\d+)_(attn[12])_to_([qkv])$"
)


def _embed(w: dict, hint: torch.Tensor) -> torch.Tensor:
    """conditioning1: k4/s4 conv, then (depth 1) k2/s2, (depth 2) k4/s4, (depth 3) k4/s4 + k2/s2; ReLU between."""
    x = hint
    convs = sorted(
        int(k.split(".")[1]) for k in w if k.startswith("conditioning1.") and k.endswith(".weight")
    )
    for n, i in enumerate(convs):
        weight = w[f"conditioning1.{i}.weight"]
        stride = weight.shape[-1]  # kohya's convs have kernel == stride
        x = F.conv2d(x, weight, w[f"conditioning1.{i}.bias"], stride=stride)
        if n != len(convs) - 1:
            x = F.relu(x)
    return x.flatten(2).transpose(1, 2)  # B x (h*w) x C


class LLLiteReference:
    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "lllite_name": (folder_paths.get_filename_list("controlnet"),),
                "image": ("IMAGE",),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}),
            }
        }

    def apply(self, model, lllite_name, image, strength):
        sd = {
            k: v.float() for k, v in load_file(folder_paths.get_full_path("controlnet", lllite_name)).items()
        }
        modules: dict[tuple, dict] = {}
        for key, value in sd.items():
            name, _, param = key.partition(".")
            m = _NAME.match(name)
            block = ("middle", 0) if m.group(2) else ("input", int(m.group(1)))
            modules.setdefault((block, int(m.group(3)), m.group(4), m.group(5)), {})[param] = value
        hint = image.movedim(-1, 1).float() * 2.0 - 1.0
        cond = {k: _embed(w, hint) for k, w in modules.items()}

        def delta(key, x, extra):
            w = modules[key]
            c = cond[key]
            c = c.repeat(x.shape[0] // c.shape[0], 1, 1).to(x)
            h = F.relu(F.linear(x, w["down.0.weight"].to(x), w["down.0.bias"].to(x)))
            h = F.relu(F.linear(torch.cat([c, h], dim=2), w["mid.0.weight"].to(x), w["mid.0.bias"].to(x)))
            return F.linear(h, w["up.0.weight"].to(x), w["up.0.bias"].to(x)) * strength

        def patch(attn):
            def fn(q, k, v, extra):
                where = (tuple(extra["block"]), extra.get("block_index", 0), attn)
                out = {"q": q, "k": k, "v": v}
                for role, x in (("q", q), ("k", k), ("v", v)):
                    key = (*where, role)
                    if key in modules:
                        out[role] = x + delta(key, x, extra)
                return out["q"], out["k"], out["v"]

            return fn

        patched = model.clone()
        patched.set_model_attn1_patch(patch("attn1"))
        patched.set_model_attn2_patch(patch("attn2"))
        return (patched,)


NODE_CLASS_MAPPINGS = {"CSTestLLLiteReference": LLLiteReference}
