"""The workflow converter on API graphs (pure; tests/host/test_convert_renders_same.py proves the converted graphs render the
same latents through a real server)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
from acn_nodes import keyframe, latent_keyframe
from controlstack.controlnet.stack import LAYER_NAMES
from controlstack.convert import workflow as cw
from controlstack.preprocessors.resize import BUILTIN_RESIZE


def graph() -> dict:
    """Checkpoint "1", prompts "2" / "3", latent "4", hint "6", KSampler "10" on "1"'s MODEL."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "m.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a house", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "LoadImage", "inputs": {"image": "hint.png"}},
        "10": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "seed": 1,
                "steps": 2,
                "cfg": 6.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "denoise": 1.0,
            },
        },
    }


def advanced(g: dict, nid: str, pos: list, neg: list, cn: str = "cn.safetensors", **kw) -> tuple[list, list]:
    g[nid + "0"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": cn}}
    g[nid] = {
        "class_type": "ControlNetApplyAdvanced",
        "inputs": {
            "positive": pos,
            "negative": neg,
            "control_net": [nid + "0", 0],
            "image": ["6", 0],
            "strength": 1.0,
            "start_percent": 0.0,
            "end_percent": 1.0,
            **kw,
        },
    }
    return [nid, 0], [nid, 1]


def apply_positive(g: dict, nid: str, cond: list, strength: float = 1.0) -> list:
    g[nid + "0"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "p.safetensors"}}
    g[nid] = {
        "class_type": "ControlNetApply",
        "inputs": {
            "conditioning": cond,
            "control_net": [nid + "0", 0],
            "image": ["6", 0],
            "strength": strength,
        },
    }
    return [nid, 0]


def sample(g: dict, pos: list, neg: list) -> dict:
    g["10"]["inputs"]["positive"], g["10"]["inputs"]["negative"] = pos, neg
    return g


def stack_of(prompt: dict, sampler: str = "10") -> list[dict]:
    """The ApplyHint nodes reaching the sampler, first applied first."""
    out = []
    link = prompt[sampler]["inputs"]["model"]
    while prompt[link[0]]["class_type"] == cw.CS_APPLY:
        out.append(prompt[link[0]])
        link = prompt[link[0]]["inputs"]["model"]
    return list(reversed(out))


def mode_of(prompt: dict, apply: dict) -> str:
    scales = apply["inputs"].get("scales")
    return "balanced" if scales is None else prompt[scales[0]]["inputs"]["mode"]


def test_one_advanced_apply_becomes_one_balanced_apply_hint():
    g = graph()
    pos, neg = advanced(g, "7", ["2", 0], ["3", 0], strength=0.7, start_percent=0.1, end_percent=0.8)
    original = copy.deepcopy(sample(g, pos, neg))
    result = cw.convert_api(g)
    assert g == original, "the input graph is not changed"
    out = result.prompt
    assert not {"7", "70"} & set(out), "the built-in apply and loader are gone"
    assert out["10"]["inputs"]["positive"] == ["2", 0] and out["10"]["inputs"]["negative"] == ["3", 0]
    (apply,) = stack_of(out)
    assert apply["inputs"]["model"] == ["1", 0] and apply["inputs"]["image"] == ["6", 0]
    assert (
        apply["inputs"]["strength"],
        apply["inputs"]["start_percent"],
        apply["inputs"]["end_percent"],
    ) == (
        0.7,
        0.1,
        0.8,
    )
    assert apply["inputs"]["resize_mode"] == BUILTIN_RESIZE and "scales" not in apply["inputs"]
    loader = out[apply["inputs"]["control_net"][0]]
    assert loader == {
        "class_type": cw.CS_LOAD,
        "inputs": {"control_net_name": "cn.safetensors"},
        "_meta": {"title": "ControlNetLoader"},
    }
    assert result.removed == ["7", "70"]
    assert set(result.placed_near.values()) == {"7", "70"}
    assert len(result.report.converted) == 1 and not result.report.unchanged


def test_a_chain_keeps_its_order_and_drops_strength_zero():
    g = graph()
    pos, neg = advanced(g, "7", ["2", 0], ["3", 0], cn="a.safetensors", end_percent=0.6)
    pos, neg = advanced(g, "8", pos, neg, cn="b.safetensors", strength=0.0)
    pos, neg = advanced(g, "9", pos, neg, cn="c.safetensors", start_percent=0.3)
    out = cw.convert_api(sample(g, pos, neg)).prompt
    names = [out[a["inputs"]["control_net"][0]]["inputs"]["control_net_name"] for a in stack_of(out)]
    assert names == ["a.safetensors", "c.safetensors"]
    assert not {"7", "8", "9", "70", "80", "90"} & set(out)


def test_which_rows_a_controlnet_reaches_follows_the_host():
    # ControlNetApply last on the positive prompt and no ControlNet on the negative: the host copies the positive's
    # ControlNets to the negative (control_apply_to_uncond), so everything is balanced
    g = graph()
    pos, neg = advanced(g, "7", ["2", 0], ["3", 0])
    pos = apply_positive(g, "8", pos)
    g["3b"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "x", "clip": ["1", 1]}}
    out = cw.convert_api(sample(g, pos, ["3b", 0])).prompt
    assert [mode_of(out, a) for a in stack_of(out)] == ["balanced", "balanced"]
    # alone on the positive prompt: copied too
    g = graph()
    out = cw.convert_api(sample(g, apply_positive(g, "8", ["2", 0]), ["3", 0])).prompt
    assert [mode_of(out, a) for a in stack_of(out)] == ["balanced"]
    # the negative has a ControlNet: nothing is copied, ControlNetApply reaches the cond rows only
    g = graph()
    pos, neg = advanced(g, "7", ["2", 0], ["3", 0])
    out = cw.convert_api(sample(g, apply_positive(g, "8", pos), neg)).prompt
    assert [mode_of(out, a) for a in stack_of(out)] == ["balanced", cw.MODE_CONTROL]
    scale = out[stack_of(out)[1]["inputs"]["scales"][0]]["inputs"]
    assert all(scale[n] == 1.0 for n in LAYER_NAMES) and scale["uncond_multiplier"] == 1.0
    # an advanced apply whose negative output is not used (Advanced never sets the flag): cond rows only
    g = graph()
    pos, _ = advanced(g, "7", ["2", 0], ["3", 0])
    out = cw.convert_api(sample(g, pos, ["3", 0])).prompt
    assert [mode_of(out, a) for a in stack_of(out)] == [cw.MODE_CONTROL]


def test_difference_loader_keeps_its_model_and_union_type_maps():
    g = graph()
    g["70"] = {
        "class_type": "DiffControlNetLoader",
        "inputs": {"model": ["1", 0], "control_net_name": "d.pth"},
    }
    g["71"] = {"class_type": "SetUnionControlNetType", "inputs": {"control_net": ["70", 0], "type": "depth"}}
    pos, neg = advanced(g, "7", ["2", 0], ["3", 0])
    g["7"]["inputs"]["control_net"] = ["71", 0]
    del g["70"]  # advanced() made a plain loader "70"; use the difference one
    g["70"] = {
        "class_type": "DiffControlNetLoader",
        "inputs": {"model": ["1", 0], "control_net_name": "d.pth"},
    }
    out = cw.convert_api(sample(g, pos, neg)).prompt
    (apply,) = stack_of(out)
    union = out[apply["inputs"]["control_net"][0]]
    assert union["class_type"] == cw.CS_UNION
    assert union["inputs"]["control_type"] == "depth" and union["inputs"]["fusion"] == cw.FUSION_BUILTIN
    loader = out[union["inputs"]["control_net"][0]]
    assert loader["class_type"] == cw.CS_LOAD and loader["inputs"] == {
        "control_net_name": "d.pth",
        "model": ["1", 0],
    }
    assert not {"70", "71"} & set(out)


def test_two_samplers_on_one_model_share_one_chain():
    g = graph()
    pos, neg = advanced(g, "7", ["2", 0], ["3", 0])
    sample(g, pos, neg)
    g["11"] = copy.deepcopy(g["10"])
    g["11"]["inputs"]["latent_image"] = ["10", 0]
    out = cw.convert_api(g).prompt
    assert out["10"]["inputs"]["model"] == out["11"]["inputs"]["model"]
    assert len([n for n in out.values() if n["class_type"] == cw.CS_APPLY]) == 1


def _refused(g: dict, match: str) -> None:
    result = cw.convert_api(g)
    assert result.prompt == g, "a refused sampler's graph is left exactly as it was"
    assert not result.report.converted
    assert any(match in line for line in result.report.unchanged), result.report.unchanged


def test_what_has_no_model_path_equivalent_is_left_unchanged_and_named():
    # control on a part of the conditioning: an area between the apply node and the sampler
    g = graph()
    pos, neg = advanced(g, "7", ["2", 0], ["3", 0])
    g["12"] = {
        "class_type": "ConditioningSetArea",
        "inputs": {"conditioning": pos, "width": 32, "height": 32, "x": 0, "y": 0, "strength": 1.0},
    }
    _refused(sample(g, ["12", 0], neg), "control on a part of the conditioning")
    # control on one of two combined positive prompts
    g = graph()
    pos, neg = advanced(g, "7", ["2", 0], ["3", 0])
    g["12"] = {
        "class_type": "ConditioningCombine",
        "inputs": {"conditioning_1": pos, "conditioning_2": ["2", 0]},
    }
    _refused(sample(g, ["12", 0], neg), "ConditioningCombine (node 12)")
    # the negative prompt only
    g = graph()
    _refused(sample(g, ["2", 0], apply_positive(g, "8", ["3", 0])), "acts on the negative prompt only")
    # a ControlNet feeding a second sampler that cannot be converted (its positive goes through an area)
    g = graph()
    pos, neg = advanced(g, "7", ["2", 0], ["3", 0])
    sample(g, pos, neg)
    g["12"] = {
        "class_type": "ConditioningSetArea",
        "inputs": {"conditioning": pos, "width": 32, "height": 32, "x": 0, "y": 0, "strength": 1.0},
    }
    g["11"] = copy.deepcopy(g["10"])
    g["11"]["inputs"]["positive"] = ["12", 0]
    _refused(g, "also feeds ConditioningSetArea (node 12), which is not converted")
    # a DiT ControlNet (by its file name; a VAE input alone is not one: SD ControlNets ignore it)
    g = graph()
    pos, neg = advanced(
        g, "7", ["2", 0], ["3", 0], cn="sd3.5_large_controlnet_canny.safetensors", vae=["1", 2]
    )
    _refused(sample(g, pos, neg), "a DiT model or ControlNet")
    g = graph()
    pos, neg = advanced(g, "7", ["2", 0], ["3", 0], vae=["1", 2])
    assert cw.convert_api(sample(g, pos, neg)).report.converted
    # a ControlNet from a node the converter does not know
    g = graph()
    pos, neg = advanced(g, "7", ["2", 0], ["3", 0])
    g["70"] = {"class_type": "ACN_SparseCtrlLoaderAdvanced", "inputs": {"sparsectrl_name": "x"}}
    g["7"]["inputs"]["control_net"] = ["70", 0]
    _refused(sample(g, pos, neg), "not a loader the converter knows")
    # a strength computed by another node
    g = graph()
    pos, neg = advanced(g, "7", ["2", 0], ["3", 0], strength=["99", 0])
    g["99"] = {"class_type": "PrimitiveFloat", "inputs": {"value": 0.5}}
    _refused(sample(g, pos, neg), "strength comes from another node")


def _without_titles(prompt: dict) -> dict:
    return {nid: {k: v for k, v in node.items() if k != "_meta"} for nid, node in prompt.items()}


def _as_acn(g: dict, renames: dict[str, str]) -> dict:
    """`g` with its built-in ControlNet nodes swapped for Advanced-ControlNet's (`renames`: built-in -> ACN type);
    the ACN loaders of 1.5.6-1.5.8 name their file input `cnet`."""
    g = copy.deepcopy(g)
    for node in g.values():
        if node["class_type"] in renames:
            node["class_type"] = renames[node["class_type"]]
            if node["class_type"].startswith("ACN_") and "Loader" in node["class_type"]:
                node["inputs"]["cnet"] = node["inputs"].pop("control_net_name")
    return g


@pytest.mark.parametrize(
    "renames",
    [
        {
            "ControlNetApplyAdvanced": "ACN_AdvancedControlNetApply_v2",
            "ControlNetLoader": "ACN_ControlNetLoaderAdvanced",
        },
        {
            "ControlNetApplyAdvanced": "ACN_AdvancedControlNetApply",
            "ControlNetLoader": "ControlNetLoaderAdvanced",
        },
        {
            "ControlNetApply": "ACN_AdvancedControlNetApplySingle_v2",
            "ControlNetLoader": "ACN_ControlNetLoaderAdvanced",
        },
        {
            "ControlNetApply": "ACN_AdvancedControlNetApplySingle",
            "ControlNetLoader": "ControlNetLoaderAdvanced",
        },
        {"DiffControlNetLoader": "ACN_DiffControlNetLoaderAdvanced"},
        {"DiffControlNetLoader": "DiffControlNetLoaderAdvanced"},
    ],
    ids=lambda r: "+".join(r.values()),
)
def test_advanced_controlnet_nodes_convert_like_the_built_in_ones(renames):
    """Advanced-ControlNet's loaders and apply nodes, with none of their masks / keyframes / weights, do what the
    built-in nodes do (nodes_main.py: the same cond copy, strength-0 pass-through, control_apply_to_uncond False on
    both prompts, True for the single-prompt node): their conversion is the built-in graph's (render-tested in
    tests/host/test_convert_renders_same.py), node for node."""
    g = graph()
    pos, neg = advanced(g, "7", ["2", 0], ["3", 0], strength=0.7, start_percent=0.1, end_percent=0.8)
    pos = apply_positive(g, "8", pos, strength=0.6)
    g["70"] = {
        "class_type": "DiffControlNetLoader",
        "inputs": {"model": ["1", 0], "control_net_name": "d.pth"},
    }
    g["7"]["inputs"]["control_net"] = ["70", 0]
    sample(g, pos, neg)
    builtin = cw.convert_api(g)
    acn = cw.convert_api(_as_acn(g, renames))
    assert len(builtin.report.converted) == 1 and not builtin.report.unchanged
    assert not acn.report.unchanged, acn.report.text()
    assert _without_titles(acn.prompt) == _without_titles(builtin.prompt)
    assert acn.removed == builtin.removed


def test_advanced_controlnet_single_apply_keeps_its_window():
    g = graph()
    pos = apply_positive(g, "8", ["2", 0], strength=0.6)
    g["8"]["class_type"] = "ACN_AdvancedControlNetApplySingle_v2"
    g["8"]["inputs"].update(start_percent=0.2, end_percent=0.7)
    (apply,) = stack_of(cw.convert_api(sample(g, pos, ["3", 0])).prompt)
    inputs = apply["inputs"]
    assert (inputs["strength"], inputs["start_percent"], inputs["end_percent"]) == (0.6, 0.2, 0.7)
    assert "scales" not in inputs, "balanced: the host copies it to the negative prompt, which has none"


@pytest.mark.parametrize("option", ["mask_optional"])
def test_advanced_controlnet_options_are_left_unchanged_and_named(option):
    g = _as_acn(graph(), {})
    pos, neg = advanced(g, "7", ["2", 0], ["3", 0])
    g["7"]["class_type"] = "ACN_AdvancedControlNetApply_v2"
    g["7"]["inputs"][option] = ["99", 0]
    g["99"] = {"class_type": "LatentKeyframe", "inputs": {"batch_index": 0, "strength": 1.0}}
    result = cw.convert_api(sample(g, pos, neg))
    assert result.prompt == g and not result.report.converted
    assert any(f"its {option} input is connected" in line for line in result.report.unchanged), (
        result.report.text()
    )
    assert any(line.startswith("LatentKeyframe (node 99)") for line in result.report.unchanged)


def acn_apply(**options) -> dict:
    """One ACN_AdvancedControlNetApply_v2 (node 7, loader 70) on both prompts of the sampler, with `options`."""
    g = _as_acn(graph(), {})
    pos, neg = advanced(g, "7", ["2", 0], ["3", 0], strength=0.8)
    g["7"]["class_type"] = "ACN_AdvancedControlNetApply_v2"
    g["70"] = {"class_type": "ACN_ControlNetLoaderAdvanced", "inputs": {"cnet": "cn.safetensors"}}
    g["7"]["inputs"].update(options)
    return sample(g, pos, neg)


def schedule_of(prompt: dict, apply: dict) -> list[tuple]:
    """The Strength Keyframe chain of a converted apply node, first keyframe first."""
    out, link = [], apply["inputs"].get("schedule")
    while link:
        node = prompt[link[0]]
        assert node["class_type"] == "ControlStackStrengthKeyframe"
        i = node["inputs"]
        out.append((i["percent"], i["strength"], i["interpolation"], i["guarantee_steps"]))
        link = i.get("previous")
    return out[::-1]


def test_advanced_controlnet_timestep_keyframes_become_a_hold_schedule():
    """A chain of Timestep Keyframes -> Strength Keyframes with `hold` (Advanced-ControlNet's keyframes are steps),
    in its order: sorted by start_percent, ties in the order added; guarantee_steps kept; the keyframe nodes go."""
    g = acn_apply(timestep_kf=["93", 0])
    keyframe(g, "91", 0.5, 0.0, guarantee=0)
    keyframe(g, "92", 0.2, 0.4, guarantee=2, prev="91")
    keyframe(g, "93", 0.5, 1.5, guarantee=1, prev="92")
    result = cw.convert_api(g)
    assert not result.report.unchanged, result.report.text()
    (apply,) = stack_of(result.prompt)
    assert schedule_of(result.prompt, apply) == [
        (0.2, 0.4, "hold", 2),
        (0.5, 0.0, "hold", 0),
        (0.5, 1.5, "hold", 1),
    ]
    assert apply["inputs"]["strength"] == 0.8 and "scales" not in apply["inputs"]
    assert {"91", "92", "93"} <= set(result.removed) and not {"91", "92", "93"} & set(result.prompt)
    # a keyframe saved before guarantee_steps existed: int(guarantee_usage) steps
    g = acn_apply(timestep_kf=["91", 0])
    keyframe(g, "91", 0.3, 0.5)
    del g["91"]["inputs"]["guarantee_steps"]
    (apply,) = stack_of(cw.convert_api(g).prompt)
    assert schedule_of(cw.convert_api(g).prompt, apply) == [(0.3, 0.5, "hold", 1)]


def test_loader_keyframes_apply_unless_the_apply_node_has_its_own():
    g = acn_apply()
    g["70"]["inputs"]["_tk_opt"] = keyframe(g, "91", 0.4, 0.5)
    result = cw.convert_api(g)
    (apply,) = stack_of(result.prompt)
    assert schedule_of(result.prompt, apply) == [(0.4, 0.5, "hold", 1)]
    assert "91" in result.removed
    g["7"]["inputs"]["timestep_kf"] = keyframe(g, "92", 0.6, 0.2)
    result = cw.convert_api(g)
    (apply,) = stack_of(result.prompt)
    assert schedule_of(result.prompt, apply) == [(0.6, 0.2, "hold", 1)]
    assert {"91", "92"} <= set(result.removed) and not result.report.unchanged, result.report.text()
    # the deprecated loader's input is tk_optional
    g = acn_apply()
    g["70"] = {
        "class_type": "ControlNetLoaderAdvanced",
        "inputs": {"control_net_name": "cn.safetensors", "tk_optional": keyframe(g, "91", 0.4, 0.5)},
    }
    (apply,) = stack_of(cw.convert_api(g).prompt)
    assert schedule_of(cw.convert_api(g).prompt, apply) == [(0.4, 0.5, "hold", 1)]


def scales_of(prompt: dict, apply: dict) -> dict:
    node = prompt[apply["inputs"]["scales"][0]]
    assert node["class_type"] == "ControlStackControlScale"
    return node["inputs"]


def test_advanced_controlnet_weights_become_layer_scales():
    # Scaled Soft Weights as weights_override -> soft weights with its base and uncond multiplier
    g = acn_apply(weights_override=["95", 0])
    g["95"] = {
        "class_type": "ACN_ScaledSoftControlNetWeights",
        "inputs": {"base_multiplier": 0.7, "uncond_multiplier": 0.5},
    }
    result = cw.convert_api(g)
    (apply,) = stack_of(result.prompt)
    scales = scales_of(result.prompt, apply)
    assert (
        scales["mode"],
        scales["base_multiplier"],
        scales["flip_weights"],
        scales["uncond_multiplier"],
    ) == (
        "soft weights",
        0.7,
        False,
        0.5,
    )
    assert "95" in result.removed and not result.report.unchanged
    # the same node through its TK_SHORTCUT output on timestep_kf: the weights, no schedule
    g = acn_apply(timestep_kf=["95", 1])
    g["95"] = {"class_type": "ACN_ScaledSoftControlNetWeights", "inputs": {"base_multiplier": 0.7}}
    result = cw.convert_api(g)
    (apply,) = stack_of(result.prompt)
    assert scales_of(result.prompt, apply)["base_multiplier"] == 0.7 and "schedule" not in apply["inputs"]
    # the deprecated node: Advanced-ControlNet ignores its flip_weights, so the conversion does too
    g = acn_apply(weights_override=["95", 0])
    g["95"] = {
        "class_type": "ScaledSoftControlNetWeights",
        "inputs": {"base_multiplier": 0.9, "flip_weights": True, "uncond_multiplier": 1.0},
    }
    (apply,) = stack_of(cw.convert_api(g).prompt)
    assert scales_of(cw.convert_api(g).prompt, apply)["flip_weights"] is False
    # per-layer weights: output_i -> in_i (shallow first), middle_0 -> middle; weights_override wins over keyframes'
    g = acn_apply(weights_override=["95", 0], timestep_kf=["96", 1])
    g["95"] = {
        "class_type": "ACN_CustomControlNetWeightsSD15",
        "inputs": {**{f"output_{i}": 0.1 * i for i in range(12)}, "middle_0": 1.5, "uncond_multiplier": 0.25},
    }
    g["96"] = {"class_type": "ACN_ScaledSoftControlNetWeights", "inputs": {"base_multiplier": 0.7}}
    result = cw.convert_api(g)
    (apply,) = stack_of(result.prompt)
    scales = scales_of(result.prompt, apply)
    assert scales["mode"] == "custom" and scales["uncond_multiplier"] == 0.25
    assert [scales[n] for n in LAYER_NAMES] == [0.1 * i for i in range(12)] + [1.5]
    assert {"95", "96"} <= set(result.removed)


def frames_of(prompt: dict, apply: dict) -> tuple[list[tuple], set[float]]:
    """The Frame Strengths chain of a converted apply node (first range first) and its other_frames values."""
    out, others, link = [], set(), apply["inputs"].get("frame_strengths")
    while link:
        node = prompt[link[0]]
        assert node["class_type"] == "ControlStackFrameStrengths"
        i = node["inputs"]
        assert i["interpolation"] == "hold" and i["strength_from"] == i["strength_to"]
        out.append((i["first_frame"], i["last_frame"], i["strength_from"]))
        others.add(i["other_frames"])
        link = i.get("previous")
    return out[::-1], others


def test_advanced_controlnet_latent_keyframes_become_frame_strengths():
    """Latent keyframes -> one-frame Frame Strengths ranges in Advanced-ControlNet's order (a re-added index
    replaces the earlier one; sorted by index, so negative ones come first and a frame named both ways gets the
    non-negative one); unnamed latents get the timestep keyframe's null_latent_kf_strength (0 without one)."""
    g = acn_apply(latent_kf_override=["84", 0])
    latent_keyframe(g, "81", 2, 0.5)
    latent_keyframe(g, "82", -1, 0.9, prev="81")
    latent_keyframe(g, "83", 0, 1.2, prev="82")
    latent_keyframe(g, "84", 2, 0.7, prev="83")
    result = cw.convert_api(g)
    assert not result.report.unchanged, result.report.text()
    (apply,) = stack_of(result.prompt)
    assert frames_of(result.prompt, apply) == ([(-1, -1, 0.9), (0, 0, 1.2), (2, 2, 0.7)], {0.0})
    assert {"81", "82", "83", "84"} <= set(result.removed)
    # with timestep keyframes that all say the same null strength (one at 0 %, so the default one never counts)
    g["7"]["inputs"]["timestep_kf"] = keyframe(g, "92", 0.5, 0.5, prev="91")
    keyframe(g, "91", 0.0, 1.0)
    for nid in ("91", "92"):
        g[nid]["inputs"]["null_latent_kf_strength"] = 0.25
    result = cw.convert_api(g)
    (apply,) = stack_of(result.prompt)
    assert frames_of(result.prompt, apply)[1] == {0.25}
    assert schedule_of(result.prompt, apply) == [(0.0, 1.0, "hold", 1), (0.5, 0.5, "hold", 1)]
    # null strengths that change over the run have no Frame Strengths equivalent
    g["91"]["inputs"]["null_latent_kf_strength"] = 0.0
    _refused(g, "which changes during the run ([0.0, 0.25])")
    g["91"]["inputs"]["null_latent_kf_strength"] = 0.25
    g["91"]["inputs"]["start_percent"] = 0.1  # the default keyframe (null 0.0) is current before it
    _refused(g, "which changes during the run ([0.0, 0.25])")


def test_advanced_controlnet_keyframes_and_weights_that_are_not_converted_are_named():
    g = acn_apply(latent_kf_override=["81", 0])
    g["81"] = {"class_type": "LatentKeyframeGroup", "inputs": {"index_strengths": "0=1.0"}}
    _refused(g, "only chains of LatentKeyframe nodes are converted")
    g = acn_apply(timestep_kf=["91", 0])
    keyframe(g, "91", 0.3, 0.5)
    g["91"]["inputs"]["latent_keyframe"] = ["99", 0]
    g["99"] = {"class_type": "LatentKeyframe", "inputs": {"batch_index": 0, "strength": 1.0}}
    _refused(g, "its latent_keyframe input is connected (latent keyframes)")
    g = acn_apply(timestep_kf=["91", 0])
    g["91"] = {"class_type": "ACN_TimestepKeyframeInterpolation", "inputs": {"start_percent": 0.0}}
    _refused(g, "only chains of TimestepKeyframe nodes are converted")
    g = acn_apply(weights_override=["95", 0])
    g["95"] = {
        "class_type": "ACN_ScaledSoftControlNetWeights",
        "inputs": {"base_multiplier": 0.7, "cn_extras": ["99", 0]},
    }
    g["99"] = {"class_type": "ACN_ExtrasMiddleMult", "inputs": {}}
    _refused(g, "its cn_extras input is connected")
    g = acn_apply(weights_override=["95", 0])
    g["95"] = {"class_type": "ACN_CustomControlNetWeightsSD15", "inputs": {"output_0": 3.0}}
    _refused(g, "a weight of 3.0 is outside ControlNet Layer Scales' 0..2.0")
    g = acn_apply(weights_override=["95", 0])
    g["70"]["inputs"]["cnet"] = "t2iadapter_depth_sd15v2.pth"
    g["95"] = {"class_type": "ACN_ScaledSoftControlNetWeights", "inputs": {"base_multiplier": 0.7}}
    _refused(g, "a T2I-Adapter by its name")
    g = acn_apply(weights_override=["95", 0])
    g["95"] = {"class_type": "ACN_ScaledSoftControlNetWeights", "inputs": {"base_multiplier": ["99", 0]}}
    g["99"] = {"class_type": "PrimitiveFloat", "inputs": {"value": 0.5}}
    _refused(g, "its base_multiplier comes from another node")
    # weights on a ControlNet that reaches the cond rows only (its negative output is not the sampler's)
    g = acn_apply(weights_override=["95", 0])
    g["95"] = {"class_type": "ACN_ScaledSoftControlNetWeights", "inputs": {"base_multiplier": 0.7}}
    g["10"]["inputs"]["negative"] = ["3", 0]
    _refused(g, "reaches the positive prompt's rows only and has Advanced-ControlNet weights")


def test_advanced_controlnet_deprecated_model_pass_through_is_left_unchanged():
    # the deprecated apply node's model_opt output feeds the sampler's model: it cannot go
    g = graph()
    pos, neg = advanced(g, "7", ["2", 0], ["3", 0], model_optional=["1", 0])
    g["7"]["class_type"] = "ACN_AdvancedControlNetApply"
    g["10"]["inputs"]["model"] = ["7", 2]
    _refused(sample(g, pos, neg), "also feeds KSampler (node 10), which is not converted")


def test_cli_writes_the_conversion_and_prints_the_report(tmp_path):
    g = graph()
    pos, neg = advanced(g, "7", ["2", 0], ["3", 0])
    src, dst = tmp_path / "in.json", tmp_path / "out.json"
    src.write_text(json.dumps(sample(g, pos, neg)))
    run = subprocess.run(
        [sys.executable, "-m", "controlstack.convert", str(src), str(dst)], capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    assert "converted: 1, left unchanged: 0" in run.stdout
    assert json.loads(dst.read_text()) == cw.convert_api(g).prompt
    src.write_text(json.dumps({"nodes": [], "links": []}))  # UI format, nothing to convert
    run = subprocess.run(
        [sys.executable, "-m", "controlstack.convert", str(src), str(dst)], capture_output=True, text=True
    )
    assert run.returncode == 0 and "converted: 0" in run.stdout, run.stderr


@pytest.mark.parametrize("bad", ["[1, 2]", "{", '{"1": {"inputs": {}}}'])
def test_cli_names_what_is_wrong_with_the_file(tmp_path, bad):
    src = tmp_path / "in.json"
    src.write_text(bad)
    run = subprocess.run(
        [sys.executable, "-m", "controlstack.convert", str(src), str(tmp_path / "o.json")],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and str(src) in run.stderr
