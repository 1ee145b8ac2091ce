"""The UI converter on an Advanced-ControlNet graph saved by the frontend: the widget values of its keyframe and
weights nodes are read in their INPUT_TYPES order (Advanced-ControlNet 1.5.6 nodes_keyframes.py / nodes_weight.py,
written out here by hand so a wrong order in convert/ui_format.py fails) and the new ControlStack nodes carry them."""

from __future__ import annotations

from controlstack.convert import convert_ui
from controlstack.convert import workflow as cw
from controlstack.convert.ui_format import CS_NODES, UIGraph
from ui_graph_helpers import ui_node as _node


def workflow() -> dict:
    """Checkpoint 1, prompts 2 / 3, latent 4, hint 6, ACN loader 70 (keyframes 91 -> 92 on its _tk_opt), ACN apply
    7 (Scaled Soft Weights 95 as weights_override, latent keyframes 81 -> 82) -> KSampler 10."""
    links = [
        [1, 1, 0, 10, 0, "MODEL"],
        [2, 1, 1, 2, 0, "CLIP"],
        [3, 1, 1, 3, 0, "CLIP"],
        [4, 2, 0, 7, 0, "CONDITIONING"],
        [5, 3, 0, 7, 1, "CONDITIONING"],
        [6, 70, 0, 7, 2, "CONTROL_NET"],
        [7, 6, 0, 7, 3, "IMAGE"],
        [8, 7, 0, 10, 1, "CONDITIONING"],
        [9, 7, 1, 10, 2, "CONDITIONING"],
        [10, 4, 0, 10, 3, "LATENT"],
        [11, 91, 0, 92, 0, "TIMESTEP_KEYFRAME"],
        [12, 92, 0, 70, 0, "TIMESTEP_KEYFRAME"],
        [13, 95, 0, 7, 7, "CONTROL_NET_WEIGHTS"],
        [14, 81, 0, 82, 0, "LATENT_KEYFRAME"],
        [15, 82, 0, 7, 6, "LATENT_KEYFRAME"],
    ]
    keyframe_inputs = [
        ("prev_timestep_kf", "TIMESTEP_KEYFRAME", None),
        ("cn_weights", "CONTROL_NET_WEIGHTS", None),
        ("latent_keyframe", "LATENT_KEYFRAME", None),
        ("mask_optional", "MASK", None),
    ]
    nodes = [
        _node(
            1, "CheckpointLoaderSimple", [], [("MODEL", "MODEL", [1]), ("CLIP", "CLIP", [2, 3])], ["m.ckpt"]
        ),
        _node(2, "CLIPTextEncode", [("clip", "CLIP", 2)], [("CONDITIONING", "CONDITIONING", [4])], ["a"]),
        _node(3, "CLIPTextEncode", [("clip", "CLIP", 3)], [("CONDITIONING", "CONDITIONING", [5])], ["b"]),
        _node(4, "EmptyLatentImage", [], [("LATENT", "LATENT", [10])], [64, 64, 4]),
        _node(6, "LoadImage", [], [("IMAGE", "IMAGE", [7])], ["hint.png", "image"]),
        _node(
            70,
            "ACN_ControlNetLoaderAdvanced",
            [("_tk_opt", "TIMESTEP_KEYFRAME", 12)],
            [("CONTROL_NET", "CONTROL_NET", [6])],
            ["cn.safetensors"],
        ),
        _node(
            7,
            "ACN_AdvancedControlNetApply_v2",
            [
                ("positive", "CONDITIONING", 4),
                ("negative", "CONDITIONING", 5),
                ("control_net", "CONTROL_NET", 6),
                ("image", "IMAGE", 7),
                ("mask_optional", "MASK", None),
                ("timestep_kf", "TIMESTEP_KEYFRAME", None),
                ("latent_kf_override", "LATENT_KEYFRAME", 15),
                ("weights_override", "CONTROL_NET_WEIGHTS", 13),
                ("vae_optional", "VAE", None),
            ],
            [("positive", "CONDITIONING", [8]), ("negative", "CONDITIONING", [9])],
            [0.8, 0.1, 0.9],
        ),
        # start_percent, strength, null_latent_kf_strength, inherit_missing, guarantee_steps
        _node(
            91,
            "TimestepKeyframe",
            keyframe_inputs,
            [("TIMESTEP_KF", "TIMESTEP_KEYFRAME", [11])],
            [0.0, 0.9, 0.0, True, 2],
        ),
        _node(
            92,
            "TimestepKeyframe",
            [("prev_timestep_kf", "TIMESTEP_KEYFRAME", 11), *keyframe_inputs[1:]],
            [("TIMESTEP_KF", "TIMESTEP_KEYFRAME", [12])],
            [0.4, 0.3, 0.0, True, 3],
        ),
        # base_multiplier, uncond_multiplier
        _node(
            95,
            "ACN_ScaledSoftControlNetWeights",
            [("cn_extras", "CN_WEIGHTS_EXTRAS", None)],
            [("CN_WEIGHTS", "CONTROL_NET_WEIGHTS", [13]), ("TK_SHORTCUT", "TIMESTEP_KEYFRAME", [])],
            [0.7, 0.5],
        ),
        # batch_index, strength
        _node(
            81,
            "LatentKeyframe",
            [("prev_latent_kf", "LATENT_KEYFRAME", None)],
            [("LATENT_KF", "LATENT_KEYFRAME", [14])],
            [1, 0.6],
        ),
        _node(
            82,
            "LatentKeyframe",
            [("prev_latent_kf", "LATENT_KEYFRAME", 14)],
            [("LATENT_KF", "LATENT_KEYFRAME", [15])],
            [-1, 1.4],
        ),
        _node(
            10,
            "KSampler",
            [
                ("model", "MODEL", 1),
                ("positive", "CONDITIONING", 8),
                ("negative", "CONDITIONING", 9),
                ("latent_image", "LATENT", 10),
            ],
            [("LATENT", "LATENT", [])],
            [1, "fixed", 4, 6.0, "euler", "normal", 1.0],
        ),
    ]
    return {"last_node_id": 95, "last_link_id": 15, "nodes": nodes, "links": links, "version": 0.4}


def test_advanced_controlnet_keyframes_weights_and_latent_keyframes_from_a_saved_workflow():
    converted, result = convert_ui(workflow())
    assert len(result.report.converted) == 1 and not result.report.unchanged, result.report.text()
    view = UIGraph(converted).api_view()
    for node in converted["nodes"]:  # the new nodes' widgets, by ControlStack's INPUT_TYPES order
        if node["type"] in CS_NODES:
            widgets = dict(zip(CS_NODES[node["type"]]["widgets"], node["widgets_values"], strict=True))
            view[str(node["id"])]["inputs"].update(widgets)
    kinds = {n["class_type"] for n in view.values()}
    assert not kinds & {"TimestepKeyframe", "LatentKeyframe", "ACN_ScaledSoftControlNetWeights"}, kinds
    (apply,) = [n for n in view.values() if n["class_type"] == cw.CS_APPLY]
    assert (
        apply["inputs"]["strength"],
        apply["inputs"]["start_percent"],
        apply["inputs"]["end_percent"],
    ) == (
        0.8,
        0.1,
        0.9,
    )
    scales = view[apply["inputs"]["scales"][0]]["inputs"]
    assert (scales["mode"], scales["base_multiplier"], scales["uncond_multiplier"]) == (
        "soft weights",
        0.7,
        0.5,
    )
    keyframes, link = [], apply["inputs"]["schedule"]
    while link:
        node = view[link[0]]
        keyframes.append(
            tuple(node["inputs"][k] for k in ("percent", "strength", "interpolation", "guarantee_steps"))
        )
        link = node["inputs"].get("previous")
    assert keyframes[::-1] == [(0.0, 0.9, "hold", 2), (0.4, 0.3, "hold", 3)]
    frames, link = [], apply["inputs"]["frame_strengths"]
    while link:
        node = view[link[0]]
        frames.append(tuple(node["inputs"][k] for k in ("first_frame", "strength_from", "other_frames")))
        link = node["inputs"].get("previous")
    assert frames[::-1] == [(-1, 1.4, 0.0), (1, 0.6, 0.0)]
