"""Weight-based annotators through a real ComfyUI server: the files are found where users keep them, the node's hint
equals the reference implementation's on the same file and photo, and a missing, corrupt or wrong file fails the
prompt with a message naming it and the folders searched, while the server keeps serving.

The annotator files are the harness's seeded random ones in the published layouts (scripts/make_random_annotator_files.py).
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from annotator_refs import depth_anything as depth_ref
from annotator_refs import openpose as openpose_ref
from controlstack.preprocessors.annotators.openpose_draw import draw_pose_keypoints, reframe_pose_dict
from controlstack.preprocessors.common import resize_image_with_pad
from host import PromptFailed
from PIL import Image
from test_workflows import ANNOTATOR_NODES

REPO = Path(__file__).resolve().parents[2]
PHOTO = "controlstack_photo.png"
DEPTH_FILE = "depth_anything_v2_vits.pth"
BODY_FILE = "body_pose_model.pth"
HAND_FILE = "hand_pose_model.pth"
FACE_FILE = "facenet.pth"
RESOLUTION = 128


def _annotators_dir(server) -> Path:
    return Path(server.base_dir) / "models" / "annotators"


def _graph(node: str, **inputs) -> dict:
    """LoadImage(photo) -> the annotator node "2" -> PreviewImage "3"."""
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": PHOTO}},
        "2": {
            "class_type": node,
            "inputs": {
                "image": ["1", 0],
                "resolution": RESOLUTION,
                "pixel_perfect": False,
                "target_width": 512,
                "target_height": 512,
                **inputs,
            },
        },
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }


def _depth_graph(model: str = DEPTH_FILE, input_size: int = 518) -> dict:
    return _graph("ControlStackDepthAnythingV2Preprocessor", model=model, input_size=input_size)


def _openpose_graph(hands_and_face: bool) -> dict:
    return _graph(
        "ControlStackOpenPosePreprocessor",
        body_model=BODY_FILE,
        hand_model=HAND_FILE,
        face_model=FACE_FILE,
        include_body=True,
        include_hand=hands_and_face,
        include_face=hands_and_face,
    )


def _run_image(server, graph: dict) -> np.ndarray:
    (path,) = server.output_images(server.run(graph, timeout=600))
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.fixture(scope="module")
def photo(comfy_server, host_models) -> np.ndarray:
    comfy_server.upload_inputs([REPO / "workflows" / "inputs" / PHOTO])
    return np.asarray(Image.open(REPO / "workflows" / "inputs" / PHOTO).convert("RGB"))


def test_object_info_lists_every_annotator_and_its_files(comfy_server, host_models):
    """Every annotator node is registered, its file combo starts with the published names, and the files the
    harness put in models/annotators are there; the test-side list of annotator nodes is the pack's."""
    info = comfy_server.object_info()
    with_files = {
        k
        for k, v in info.items()
        if k.startswith("ControlStack")
        and ({"model", "body_model"} & set(v["input"]["required"]))
        and isinstance(v["input"]["required"].get("model", v["input"]["required"].get("body_model"))[0], list)
    }
    assert with_files == ANNOTATOR_NODES
    depth = info["ControlStackDepthAnythingV2Preprocessor"]["input"]["required"]["model"][0]
    assert depth[:3] == [
        "depth_anything_v2_vits.pth",
        "depth_anything_v2_vitb.pth",
        "depth_anything_v2_vitl.pth",
    ]
    assert (_annotators_dir(comfy_server) / DEPTH_FILE).is_file()
    pose = info["ControlStackOpenPosePreprocessor"]
    assert pose["output"] == ["IMAGE", "POSE_KEYPOINT"]


def test_depth_anything_node_equals_the_reference(comfy_server, photo):
    """The node's hint (photo -> short side 128, padded to 64s, Depth Anything v2 small) equals the reference
    pipeline (the authors' transforms + transformers' model on the same file) within one gray level: the saved PNG
    truncates v / 255 x 255, which can land one level lower."""
    ours = _run_image(comfy_server, _depth_graph())
    sd = torch.load(_annotators_dir(comfy_server) / DEPTH_FILE, map_location="cpu", weights_only=True)
    padded, unpad = resize_image_with_pad(photo, RESOLUTION)
    (ref,) = depth_ref.reference_detect(sd, [padded])
    ref = unpad(ref).astype(int)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1, np.abs(ours - ref).max()
    assert ref.std() > 5, "a flat depth map would make this comparison empty"


def test_files_in_comfyui_controlnet_aux_folders_are_found_and_used(comfy_server, photo):
    """A comfyui_controlnet_aux user's download (custom_nodes/comfyui_controlnet_aux/ckpts/<repo>/<file>) is listed
    as controlnet_aux/<path> and gives the same hint as the file in models/annotators."""
    custom = Path(comfy_server.run_dir) / "custom_nodes" / "comfyui_controlnet_aux"
    target = custom / "ckpts" / "depth-anything" / "Depth-Anything-V2-Small" / DEPTH_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_annotators_dir(comfy_server) / DEPTH_FILE, target)
    try:
        value = "controlnet_aux/depth-anything/Depth-Anything-V2-Small/" + DEPTH_FILE
        info = comfy_server.object_info()
        assert value in info["ControlStackDepthAnythingV2Preprocessor"]["input"]["required"]["model"][0]
        assert np.array_equal(
            _run_image(comfy_server, _depth_graph(value)), _run_image(comfy_server, _depth_graph())
        )
    finally:
        shutil.rmtree(custom)


def _expect_failure(server, graph: dict, *needles: str) -> str:
    with pytest.raises(PromptFailed) as info:
        server.run(graph, timeout=300)
    message = info.value.details.get("exception_message", "")
    for needle in needles:
        assert needle in message, (needle, message)
    return message


def test_missing_corrupt_and_wrong_files_fail_clearly_and_the_server_keeps_serving(comfy_server, photo):
    folder = _annotators_dir(comfy_server)
    # missing: the published name of a file the user does not have
    msg = _expect_failure(
        comfy_server,
        _depth_graph("depth_anything_v2_vitl.pth"),
        "model: Depth Anything V2 file 'depth_anything_v2_vitl.pth' not found",
        str(folder),
        "comfyui_controlnet_aux",
        "huggingface.co/depth-anything",
        "Nothing is downloaded",
    )
    print(msg)
    tag = uuid.uuid4().hex[:6]
    corrupt = folder / f"cs_corrupt_{tag}.pth"
    wrong = folder / f"cs_wrong_{tag}.pth"
    corrupt.write_bytes(os.urandom(4096))
    shutil.copyfile(folder / BODY_FILE, wrong)  # an OpenPose body file given as Depth Anything
    try:
        print(_expect_failure(comfy_server, _depth_graph(corrupt.name), corrupt.name, "corrupt"))
        print(
            _expect_failure(
                comfy_server, _depth_graph(wrong.name), wrong.name, "not a Depth Anything V2 file"
            )
        )
    finally:
        corrupt.unlink()
        wrong.unlink()
    # the next prompt succeeds (another input size, so the host's cache cannot answer it)
    assert _run_image(comfy_server, _depth_graph(input_size=504)).std() > 0


def test_openpose_keypoints_round_trip_through_the_draw_node(comfy_server, photo):
    """OpenPose's POSE_KEYPOINT output drawn again by Draw Pose Keypoints equals the node's own pose image."""
    g = _openpose_graph(hands_and_face=False)
    g["4"] = {
        "class_type": "ControlStackDrawPoseKeypoints",
        "inputs": {
            "pose_keypoint": ["2", 1],
            "draw_body": True,
            "draw_hand": True,
            "draw_face": True,
        },
    }
    g["5"] = {"class_type": "PreviewImage", "inputs": {"images": ["4", 0]}}
    entry = comfy_server.run(g, timeout=600)
    detected, drawn = (np.asarray(Image.open(p).convert("RGB")) for p in comfy_server.output_images(entry))
    assert detected.shape == drawn.shape
    assert (detected > 0).mean() > 0.001, "no pose drawn: the round trip would compare two black images"
    assert np.array_equal(detected, drawn)


def test_openpose_with_hands_and_face_equals_the_reference(comfy_server, photo):
    """With include_hand and include_face the node reads all three files: its pose image is the reference
    detector's poses (body + hands + face, on the same files and padded photo) drawn on the unpadded frame, bit for
    bit as SaveImage stores it. The random weights find people with hands and faces, so the comparison has them."""
    g = _openpose_graph(hands_and_face=True)
    ours = _run_image(comfy_server, g)
    folder = _annotators_dir(comfy_server)
    nets = {
        part: torch.load(folder / name, map_location="cpu", weights_only=True)
        for part, name in (("body", BODY_FILE), ("hand", HAND_FILE), ("face", FACE_FILE))
    }
    padded, unpad = resize_image_with_pad(photo, RESOLUTION)
    _, (pose,) = openpose_ref.reference_detect(nets, [padded], include_hand=True, include_face=True)
    people = pose["people"]
    assert any(p.get("hand_left_keypoints_2d") or p.get("hand_right_keypoints_2d") for p in people), people
    assert any(p.get("face_keypoints_2d") for p in people), people
    h, w = unpad(np.zeros(padded.shape[:2], np.uint8)).shape[:2]
    drawn = draw_pose_keypoints(
        [reframe_pose_dict(pose, h, w)], draw_body=True, draw_hand=True, draw_face=True
    )
    expected = (
        np.clip(255.0 * drawn[0].numpy(), 0, 255).astype(np.uint8).astype(int)
    )  # SaveImage's conversion
    assert ours.shape == expected.shape
    assert np.array_equal(ours, expected), np.abs(ours - expected).max()
    # hands and faces are in the image: drawing the body alone differs
    body_only = draw_pose_keypoints(
        [reframe_pose_dict(pose, h, w)], draw_body=True, draw_hand=False, draw_face=False
    )
    assert not np.array_equal(
        np.clip(255.0 * body_only[0].numpy(), 0, 255).astype(np.uint8).astype(int), ours
    )
