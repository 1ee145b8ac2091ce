"""One-off check (not in CI): Advanced-ControlNet's timestep / latent keyframes and weights vs their ControlStack
conversion, through a real ComfyUI server with both packs loaded, on the random SD1.5 test models.

Advanced-ControlNet is not on PyPI (CI cannot install it) and is GPL-3.0 (its code stays out of this repository), so
bring a checkout yourself; 1.5.6 (commit 2bde95a) is the release that loads on ComfyUI 0.3.75::

    git clone https://github.com/Kosinkadink/ComfyUI-Advanced-ControlNet /tmp/ComfyUI-Advanced-ControlNet
    git -C /tmp/ComfyUI-Advanced-ControlNet checkout 2bde95a
    .venv/bin/python scripts/check_against_advanced_controlnet.py /tmp/ComfyUI-Advanced-ControlNet

Prints one table row per pattern: converted vs Advanced-ControlNet, and Advanced-ControlNet vs the same graph
without its keyframes / weights (so a row shows they changed the render). docs/convert.md holds the last results.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests" / "host"), str(REPO / "tests" / "unit")]

import host  # noqa: E402
import numpy as np  # noqa: E402
from acn_nodes import keyframe, latent_keyframe  # noqa: E402
from controlstack.convert import convert_api  # noqa: E402
from graphs import SD15_CONTROLNETS, base_graph, rel_err, run_latent, set_sampler  # noqa: E402
from PIL import Image  # noqa: E402

HINTS = ("cs_conv_a.png", "cs_conv_b.png")
OPTIONS = ("timestep_kf", "weights_override", "latent_kf_override")


def acn_graph(steps: int = 6, batch: int = 1, **options) -> dict:
    """ACN_AdvancedControlNetApply_v2 (node 7, strength 0.8) with ACN_ControlNetLoaderAdvanced (70) on both prompts."""
    g = base_graph(HINTS[0], steps=steps, batch=batch)
    g["70"] = {"class_type": "ACN_ControlNetLoaderAdvanced", "inputs": {"cnet": SD15_CONTROLNETS[0]}}
    g["7"] = {
        "class_type": "ACN_AdvancedControlNetApply_v2",
        "inputs": {
            "positive": ["2", 0],
            "negative": ["3", 0],
            "control_net": ["70", 0],
            "image": ["6", 0],
            "strength": 0.8,
            "start_percent": 0.0,
            "end_percent": 1.0,
            **options,
        },
    }
    g["10"]["inputs"]["positive"], g["10"]["inputs"]["negative"] = ["7", 0], ["7", 1]
    return g


def soft(g: dict, nid: str, base: float, uncond: float = 1.0) -> None:
    g[nid] = {
        "class_type": "ACN_ScaledSoftControlNetWeights",
        "inputs": {"base_multiplier": base, "uncond_multiplier": uncond},
    }


def cases() -> dict[str, dict]:
    out = {}
    g = acn_graph(timestep_kf=["93", 0])
    keyframe(g, "91", 0.0, 1.0, 1)
    keyframe(g, "92", 0.3, 0.4, 0, "91")
    keyframe(g, "93", 0.6, 0.0, 1, "92")
    out["timestep keyframes on the apply node (0: 1.0, 0.3: 0.4 g0, 0.6: 0.0)"] = g
    g = acn_graph()
    g["70"]["inputs"]["_tk_opt"] = ["92", 0]
    keyframe(g, "91", 0.0, 0.5, 2)
    keyframe(g, "92", 0.5, 1.3, 1, "91")
    out["loader _tk_opt keyframes (0: 0.5 g2, 0.5: 1.3)"] = g
    g = acn_graph(timestep_kf=["93", 0])
    g["70"]["inputs"]["_tk_opt"] = keyframe(g, "91", 0.0, 0.2, 1)
    keyframe(g, "92", 0.2, 1.5, 0)
    keyframe(g, "93", 0.2, 0.6, 3, "92")
    out["apply keyframes win over the loader's; tie at 0.2 in added order, g3"] = g
    g = acn_graph(weights_override=["95", 0])
    soft(g, "95", 0.7, 0.5)
    out["Scaled Soft Weights (base 0.7, uncond 0.5) as weights_override"] = g
    g = acn_graph(weights_override=["95", 0])
    values = np.random.default_rng(5).uniform(0, 2, 13).round(3).tolist()
    g["95"] = {
        "class_type": "ACN_CustomControlNetWeightsSD15",
        "inputs": {
            **{f"output_{i}": values[i] for i in range(12)},
            "middle_0": values[12],
            "uncond_multiplier": 0.3,
        },
    }
    out["ControlNet Custom Weights SD1.5 (random 0..2, uncond 0.3)"] = g
    g = acn_graph(timestep_kf=["95", 1])
    soft(g, "95", 0.6)
    out["Scaled Soft Weights TK_SHORTCUT on timestep_kf (base 0.6)"] = g
    g = acn_graph(timestep_kf=["92", 0], weights_override=["95", 0])
    keyframe(g, "91", 0.0, 1.2, 1)
    keyframe(g, "92", 0.5, 0.3, 1, "91")
    soft(g, "95", 0.8, 0.7)
    g["71"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": SD15_CONTROLNETS[2]}}
    g["16"] = {"class_type": "LoadImage", "inputs": {"image": HINTS[1]}}
    g["8"] = {
        "class_type": "ControlNetApplyAdvanced",
        "inputs": {
            "positive": ["7", 0],
            "negative": ["7", 1],
            "control_net": ["71", 0],
            "image": ["16", 0],
            "strength": 0.7,
            "start_percent": 0.2,
            "end_percent": 0.9,
        },
    }
    g["10"]["inputs"]["positive"], g["10"]["inputs"]["negative"] = ["8", 0], ["8", 1]
    out["keyframes + soft weights, chained with a built-in apply"] = g
    g = acn_graph(steps=4, batch=4, latent_kf_override=["84", 0])
    latent_keyframe(g, "81", 1, 0.6)
    latent_keyframe(g, "82", -1, 1.4, "81")
    latent_keyframe(g, "83", 2, 0.3, "82")
    latent_keyframe(g, "84", 2, 0.8, "83")
    out["latent keyframes (1: 0.6, -1: 1.4, 2: 0.3 then 0.8), batch of 4, others 0"] = g
    g = acn_graph(steps=4, batch=4, latent_kf_override=["82", 0], timestep_kf=["92", 0])
    latent_keyframe(g, "81", 3, 0.5)
    latent_keyframe(g, "82", -1, 1.5, "81")
    keyframe(g, "91", 0.0, 1.0, 1, null=0.25)
    keyframe(g, "92", 0.5, 0.6, 1, "91", null=0.25)
    out["latent keyframes 3 and -1 (the same latent) + timestep keyframes with null 0.25"] = g
    return out


def main(acn_dir: str) -> int:
    server = host.ComfyServer(extra_packs=[acn_dir])
    server.start(timeout=300)
    try:
        rng = np.random.default_rng(31)
        for name in HINTS:
            pixels = rng.integers(0, 256, (56, 80, 3), dtype=np.uint8)  # not the render's shape
            Image.fromarray(pixels).save(Path(server.base_dir) / "input" / name)
        print("| pattern | converted vs ACN | ACN vs without |\n|---|---|---|")
        for title, g in cases().items():
            set_sampler(g)
            result = convert_api(g)
            if result.report.unchanged:
                raise SystemExit(f"{title}: not converted:\n{result.report.text()}")
            acn = run_latent(server, g)
            bare = copy.deepcopy(g)
            for key in OPTIONS:
                bare["7"]["inputs"].pop(key, None)
            bare["70"]["inputs"].pop("_tk_opt", None)
            plain = run_latent(server, set_sampler(bare))
            converted = run_latent(server, set_sampler(result.prompt))
            print(f"| {title} | {rel_err(converted, acn):.2e} | {rel_err(acn, plain):.2e} |", flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    raise SystemExit(main(sys.argv[1]))
