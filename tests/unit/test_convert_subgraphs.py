"""The UI converter on workflows with subgraphs (the frontend's 0.4 format: ``definitions.subgraphs``, object links,
boundary nodes -10 / -20). The browser test converts a subgraph the real frontend made and compares graphToPrompt()
with the API conversion of the flattened original."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from controlstack.convert import convert_ui
from controlstack.convert import workflow as cw
from ui_graph_helpers import ui_node as _node

SUB_ID = "6a1f3c2e-0000-4000-8000-00000000cafe"


def _link(i: int, origin: int, origin_slot: int, target: int, target_slot: int, kind: str) -> dict:
    """A link in a subgraph's object form."""
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    return dict(zip(keys, (i, origin, origin_slot, target, target_slot, kind), strict=True))


def _slot(name: str, kind: str, link_ids: list[int]) -> dict:
    """A subgraph input / output slot."""
    return {"id": f"slot-{name}", "name": name, "type": kind, "linkIds": link_ids}


def workflow(cond_leaves: bool = False) -> dict[str, Any]:
    """Root: checkpoint 1, prompts 2 / 3, latent 4, image 6 -> subgraph instance 20 -> VAEDecode 7 -> SaveImage 8.
    Subgraph: KSampler 10 behind ControlNetApplyAdvanced 12 (loader 11) on the subgraph's model and prompts.
    `cond_leaves`: the apply node's positive output also leaves the subgraph (its second output)."""
    root_links = [
        [1, 1, 0, 20, 0, "MODEL"],
        [2, 1, 1, 2, 0, "CLIP"],
        [3, 1, 1, 3, 0, "CLIP"],
        [4, 2, 0, 20, 1, "CONDITIONING"],
        [5, 3, 0, 20, 2, "CONDITIONING"],
        [6, 4, 0, 20, 3, "LATENT"],
        [7, 6, 0, 20, 4, "IMAGE"],
        [8, 20, 0, 7, 0, "LATENT"],
        [9, 1, 2, 7, 1, "VAE"],
        [10, 7, 0, 8, 0, "IMAGE"],
    ]
    root_nodes = [
        _node(
            1,
            "CheckpointLoaderSimple",
            [],
            [("MODEL", "MODEL", [1]), ("CLIP", "CLIP", [2, 3]), ("VAE", "VAE", [9])],
            ["m.safetensors"],
        ),
        _node(
            2, "CLIPTextEncode", [("clip", "CLIP", 2)], [("CONDITIONING", "CONDITIONING", [4])], ["a house"]
        ),
        _node(
            3, "CLIPTextEncode", [("clip", "CLIP", 3)], [("CONDITIONING", "CONDITIONING", [5])], ["blurry"]
        ),
        _node(4, "EmptyLatentImage", [], [("LATENT", "LATENT", [6])], [64, 64, 1]),
        _node(6, "LoadImage", [], [("IMAGE", "IMAGE", [7]), ("MASK", "MASK", [])], ["hint.png", "image"]),
        _node(
            20,
            SUB_ID,
            [
                ("model", "MODEL", 1),
                ("positive", "CONDITIONING", 4),
                ("negative", "CONDITIONING", 5),
                ("latent", "LATENT", 6),
                ("image", "IMAGE", 7),
            ],
            [("LATENT", "LATENT", [8])] + ([("CONDITIONING", "CONDITIONING", [])] if cond_leaves else []),
            [],
        ),
        _node(7, "VAEDecode", [("samples", "LATENT", 8), ("vae", "VAE", 9)], [("IMAGE", "IMAGE", [10])], []),
        _node(8, "SaveImage", [("images", "IMAGE", 10)], [], ["cs"]),
    ]
    sub_links = [
        _link(30, -10, 0, 10, 0, "MODEL"),
        _link(31, -10, 1, 12, 0, "CONDITIONING"),
        _link(32, -10, 2, 12, 1, "CONDITIONING"),
        _link(33, -10, 3, 10, 3, "LATENT"),
        _link(34, -10, 4, 12, 3, "IMAGE"),
        _link(35, 11, 0, 12, 2, "CONTROL_NET"),
        _link(36, 12, 0, 10, 1, "CONDITIONING"),
        _link(37, 12, 1, 10, 2, "CONDITIONING"),
        _link(38, 10, 0, -20, 0, "LATENT"),
    ]
    apply_pos = [36] + ([39] if cond_leaves else [])
    if cond_leaves:
        sub_links.append(_link(39, 12, 0, -20, 1, "CONDITIONING"))
    sub_nodes = [
        _node(
            10,
            "KSampler",
            [
                ("model", "MODEL", 30),
                ("positive", "CONDITIONING", 36),
                ("negative", "CONDITIONING", 37),
                ("latent_image", "LATENT", 33),
            ],
            [("LATENT", "LATENT", [38])],
            [7, "fixed", 2, 6.0, "euler", "normal", 1.0],
        ),
        _node(11, "ControlNetLoader", [], [("CONTROL_NET", "CONTROL_NET", [35])], ["cn.safetensors"]),
        _node(
            12,
            "ControlNetApplyAdvanced",
            [
                ("positive", "CONDITIONING", 31),
                ("negative", "CONDITIONING", 32),
                ("control_net", "CONTROL_NET", 35),
                ("image", "IMAGE", 34),
                ("vae", "VAE", None),
            ],
            [("positive", "CONDITIONING", apply_pos), ("negative", "CONDITIONING", [37])],
            [0.8, 0.1, 0.9],
        ),
    ]
    subgraph = {
        "id": SUB_ID,
        "version": 1,
        "state": {"lastGroupId": 0, "lastNodeId": 12, "lastLinkId": 39, "lastRerouteId": 0},
        "revision": 0,
        "config": {},
        "name": "Controlled sampler",
        "inputNode": {"id": -10, "bounding": [0, 0, 120, 140]},
        "outputNode": {"id": -20, "bounding": [900, 0, 120, 60]},
        "inputs": [
            _slot("model", "MODEL", [30]),
            _slot("positive", "CONDITIONING", [31]),
            _slot("negative", "CONDITIONING", [32]),
            _slot("latent", "LATENT", [33]),
            _slot("image", "IMAGE", [34]),
        ],
        "outputs": [_slot("LATENT", "LATENT", [38])]
        + ([_slot("CONDITIONING", "CONDITIONING", [39])] if cond_leaves else []),
        "widgets": [],
        "nodes": sub_nodes,
        "groups": [],
        "links": sub_links,
        "extra": {},
    }
    return {
        "id": "00000000-0000-4000-8000-000000000001",
        "revision": 0,
        "last_node_id": 20,
        "last_link_id": 10,
        "nodes": root_nodes,
        "links": root_links,
        "groups": [],
        "definitions": {"subgraphs": [subgraph]},
        "config": {},
        "extra": {},
        "version": 0.4,
    }


def _sub(ui: dict) -> dict:
    return ui["definitions"]["subgraphs"][0]


def _check_links(graph: dict) -> None:
    """Every link is listed at both ends (node slots, or the boundary's linkIds), and nothing else is."""
    links = {int(x["id"] if isinstance(x, dict) else x[0]): x for x in graph["links"]}
    nodes = {n["id"]: n for n in graph["nodes"]}

    def parts(x):
        return (
            (x["origin_id"], x["origin_slot"], x["target_id"], x["target_slot"])
            if isinstance(x, dict)
            else tuple(x[1:5])
        )

    for lid, x in links.items():
        o, os_, t, ts = parts(x)
        if o == -10:
            assert lid in graph["inputs"][os_]["linkIds"], lid
        else:
            assert lid in (nodes[o]["outputs"][os_]["links"] or []), lid
        if t == -20:
            assert lid in graph["outputs"][ts]["linkIds"], lid
        else:
            assert nodes[t]["inputs"][ts]["link"] == lid, lid
    for n in nodes.values():
        for i in n["inputs"]:
            assert i["link"] is None or i["link"] in links, (n["id"], i)
        for o in n["outputs"]:
            assert all(x in links for x in o["links"] or []), (n["id"], o)
    for side in ("inputs", "outputs"):
        for s in graph.get(side, []):
            assert all(x in links for x in s["linkIds"]), s


def test_a_sampler_and_its_controlnet_inside_a_subgraph_convert_there():
    ui = workflow()
    converted, result = convert_ui(ui)
    assert ui == workflow(), "the input is not changed"
    assert len(result.report.converted) == 1 and not result.report.unchanged, result.report.text()
    assert result.report.converted[0].startswith("in subgraph 'Controlled sampler': KSampler (node 10)")
    sub = _sub(converted)
    kinds = {n["id"]: n["type"] for n in sub["nodes"]}
    assert not any(k.startswith("ControlNet") for k in kinds.values()), kinds
    (apply,) = [n for n in sub["nodes"] if n["type"] == cw.CS_APPLY]
    (load,) = [n for n in sub["nodes"] if n["type"] == cw.CS_LOAD]
    links = {x["id"]: x for x in sub["links"]}
    assert all(isinstance(x, dict) for x in sub["links"]), "a subgraph keeps object links"
    by_input = {i["name"]: links[i["link"]] for i in apply["inputs"] if i["link"] is not None}
    # ApplyHint reads the subgraph's model and image inputs (slots 0, 4) and the new loader; the sampler reads
    # ApplyHint's MODEL and the subgraph's prompts directly
    assert (by_input["model"]["origin_id"], by_input["model"]["origin_slot"]) == (-10, 0)
    assert (by_input["image"]["origin_id"], by_input["image"]["origin_slot"]) == (-10, 4)
    assert by_input["control_net"]["origin_id"] == load["id"]
    assert load["widgets_values"] == ["cn.safetensors"]
    assert apply["widgets_values"][:3] == [0.8, 0.1, 0.9]
    sampler = next(n for n in sub["nodes"] if n["id"] == 10)
    src = {
        i["name"]: (links[i["link"]]["origin_id"], links[i["link"]]["origin_slot"]) for i in sampler["inputs"]
    }
    assert src == {
        "model": (apply["id"], 0),
        "positive": (-10, 1),
        "negative": (-10, 2),
        "latent_image": (-10, 3),
    }
    _check_links(sub)
    _check_links(converted)
    # new ids are new over the whole workflow, and the counters cover them
    all_nodes = [n["id"] for n in converted["nodes"]] + [n["id"] for n in sub["nodes"]]
    all_links = [x[0] for x in converted["links"]] + list(links)
    assert len(set(all_nodes)) == len(all_nodes) and len(set(all_links)) == len(all_links)
    assert converted["last_node_id"] == sub["state"]["lastNodeId"] == max(all_nodes)
    assert converted["last_link_id"] == sub["state"]["lastLinkId"] == max(all_links)
    assert converted["nodes"] == workflow()["nodes"], "the root graph is not touched"


def test_control_that_leaves_the_subgraph_is_left_unchanged_and_named():
    ui = workflow(cond_leaves=True)
    converted, result = convert_ui(ui)
    assert converted == ui
    assert not result.report.converted
    (why,) = result.report.unchanged
    assert "in subgraph 'Controlled sampler': KSampler (node 10)" in why
    assert 'also feeds Subgraph boundary (node -20, "the subgraph\'s outputs")' in why, why


def test_a_controlnet_from_outside_the_subgraph_is_left_unchanged_and_named():
    ui = workflow()
    sub = _sub(ui)
    # the loader moves to the root graph and its CONTROL_NET comes in as a sixth input
    loader = next(n for n in sub["nodes"] if n["id"] == 11)
    sub["nodes"].remove(loader)
    sub["links"] = [x for x in sub["links"] if x["id"] != 35]
    sub["links"].append(
        {
            "id": 40,
            "origin_id": -10,
            "origin_slot": 5,
            "target_id": 12,
            "target_slot": 2,
            "type": "CONTROL_NET",
        }
    )
    sub["inputs"].append({"id": "slot-cn", "name": "control_net", "type": "CONTROL_NET", "linkIds": [40]})
    next(n for n in sub["nodes"] if n["id"] == 12)["inputs"][2]["link"] = 40
    loader = {**loader, "id": 21, "outputs": [{"name": "CONTROL_NET", "type": "CONTROL_NET", "links": [11]}]}
    ui["nodes"].append(loader)
    next(n for n in ui["nodes"] if n["id"] == 20)["inputs"].append(
        {"name": "control_net", "type": "CONTROL_NET", "link": 11}
    )
    ui["links"].append([11, 21, 0, 20, 5, "CONTROL_NET"])
    before = copy.deepcopy(ui)
    converted, result = convert_ui(ui)
    assert converted == before and not result.report.converted
    (why,) = result.report.unchanged
    assert 'its ControlNet comes from Subgraph boundary (node -10, "the subgraph\'s inputs")' in why, why


def test_control_in_the_root_graph_in_front_of_a_subgraph_sampler_is_named():
    """The apply node sits in the root graph, the sampler in a subgraph: neither graph has both."""
    ui = workflow()
    sub = _sub(ui)
    # move the apply node's job to the root: root gets loader 21 + apply 22 between the prompts and the instance
    sub["nodes"] = [n for n in sub["nodes"] if n["id"] not in (11, 12)]
    sub["links"] = [x for x in sub["links"] if x["id"] not in (31, 32, 34, 35, 36, 37)]
    sub["links"] += [
        {
            "id": 41,
            "origin_id": -10,
            "origin_slot": 1,
            "target_id": 10,
            "target_slot": 1,
            "type": "CONDITIONING",
        },
        {
            "id": 42,
            "origin_id": -10,
            "origin_slot": 2,
            "target_id": 10,
            "target_slot": 2,
            "type": "CONDITIONING",
        },
    ]
    sub["inputs"][1]["linkIds"], sub["inputs"][2]["linkIds"], sub["inputs"][4]["linkIds"] = [41], [42], []
    sampler = next(n for n in sub["nodes"] if n["id"] == 10)
    sampler["inputs"][1]["link"], sampler["inputs"][2]["link"] = 41, 42
    ui["nodes"] += [
        _node(21, "ControlNetLoader", [], [("CONTROL_NET", "CONTROL_NET", [12])], ["cn.safetensors"]),
        _node(
            22,
            "ControlNetApplyAdvanced",
            [
                ("positive", "CONDITIONING", 13),
                ("negative", "CONDITIONING", 14),
                ("control_net", "CONTROL_NET", 12),
                ("image", "IMAGE", 15),
            ],
            [("positive", "CONDITIONING", [4]), ("negative", "CONDITIONING", [5])],
            [1.0, 0.0, 1.0],
        ),
    ]
    ui["links"] = [x for x in ui["links"] if x[0] not in (4, 5, 7)] + [
        [4, 22, 0, 20, 1, "CONDITIONING"],
        [5, 22, 1, 20, 2, "CONDITIONING"],
        [12, 21, 0, 22, 2, "CONTROL_NET"],
        [13, 2, 0, 22, 0, "CONDITIONING"],
        [14, 3, 0, 22, 1, "CONDITIONING"],
        [15, 6, 0, 22, 3, "IMAGE"],
    ]
    before = copy.deepcopy(ui)
    converted, result = convert_ui(ui)
    assert converted == before and not result.report.converted
    (why,) = result.report.unchanged
    assert why.startswith(
        "ControlNetApplyAdvanced (node 22): its conditioning reaches no sampler in this graph"
    )
    assert "subgraph 'Controlled sampler'" in why, why


@pytest.mark.parametrize("instances", [1, 2])
def test_every_instance_of_a_definition_runs_the_converted_inner_graph(instances):
    """A definition is converted once; a second instance of it (same type) needs nothing more."""
    ui = workflow()
    if instances == 2:
        twin = copy.deepcopy(next(n for n in ui["nodes"] if n["id"] == 20))
        twin["id"] = 25
        for i in twin["inputs"]:
            i["link"] = None
        twin["outputs"][0]["links"] = None
        ui["nodes"].append(twin)
        ui["last_node_id"] = 25
    converted, result = convert_ui(ui)
    assert len(result.report.converted) == 1
    assert [n["type"] for n in converted["nodes"]] == [n["type"] for n in ui["nodes"]]
    assert cw.CS_APPLY in {n["type"] for n in _sub(converted)["nodes"]}
