"""Every shipped API-format workflow runs through a real ComfyUI server's /prompt and writes its images."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import cv2
import host
import make_random_annotator_files
import make_random_models
import numpy as np
import pytest
from controlstack.controlnet.stack import PROMPT_DECAY
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
API = sorted((REPO / "workflows" / "api").glob("*.json"))
SDXL_MARKER = "controlstack_random_sdxl"
"""Every random SDXL file (checkpoint, ControlNet, T2I, Control-LoRA, Union, LLLite) has this in its name."""


BUILT_MODELS = {
    "sd15": {
        host.CHECKPOINT,
        *host.CONTROLNETS,
        *host.CONTROL_FILES["sd15"],
        *make_random_annotator_files.ANNOTATOR_FILES,
    },
    "circles": {host.CIRCLES_CHECKPOINT, host.CIRCLES_CONTROLNET},
    "sdxl": {
        make_random_models.SDXL_CHECKPOINT_NAME,
        make_random_models.SDXL_CONTROLNET_NAME,
        *host.CONTROL_FILES["sdxl"],
    },
}
"""Per family, every model file the harness builds (checkpoint, ControlNets, other control kinds)."""
KIND_MARKERS = {
    "_t2i_": "t2i_adapter",
    "_control_lora_": "control_lora",
    "_union_": "union",
    "_lllite": "lllite",
}
"""The harness's file names say the kind of the random control file they hold (classic ControlNet otherwise)."""


ANNOTATOR_NODES = {
    "ControlStackHEDPreprocessor",
    "ControlStackPiDiNetPreprocessor",
    "ControlStackLineartPreprocessor",
    "ControlStackAnimeLineartPreprocessor",
    "ControlStackMLSDPreprocessor",
    "ControlStackMiDaSPreprocessor",
    "ControlStackDepthAnythingV2Preprocessor",
    "ControlStackOpenPosePreprocessor",
}
"""Preprocessor nodes that read an annotator file (their file inputs are model files the harness must build)."""


@dataclass(frozen=True)
class Entry:
    """One ApplyHint of a workflow's stack, as the sampler's MODEL input reaches it."""

    kind: str
    file: str
    hint: str
    """The hint's source: a LoadImage file name, or "<preprocessor class>(<its LoadImage file>)"."""
    window: tuple[float, float]
    scales: tuple[str, tuple[float, ...]] | None
    union_type: str | None
    schedule: tuple[tuple[float, float, str], ...] = ()
    """Strength keyframes (percent, strength, interpolation), first to last."""
    frame_strengths: tuple[tuple[int, int, float, float, str], ...] = ()
    """Frame ranges (first, last, strength_from, strength_to, interpolation), first to last."""


@dataclass(frozen=True)
class Summary:
    family: str
    sampler: str
    entries: tuple[Entry, ...]
    """Applied first to last (the order of the chain from the checkpoint to the sampler)."""
    models: frozenset[str]
    images: frozenset[str]
    report_saved: bool
    batch: int = 1
    """The sampler's latent batch (EmptyLatentImage's batch_size)."""


def _source(graph: dict, link: list) -> tuple[str, dict]:
    node_id = str(link[0])
    return node_id, graph[node_id]


def _hint_source(graph: dict, link: list) -> str:
    _, node = _source(graph, link)
    if node["class_type"] == "LoadImage":
        return node["inputs"]["image"]
    return f"{node['class_type']}({_hint_source(graph, node['inputs']['image'])})"


def _chain(graph: dict, link: list | None, fields: tuple[str, ...]) -> tuple[tuple, ...]:
    """The values of `fields` of each node of a `previous` chain (keyframes, frame ranges), first to last."""
    out = []
    while link is not None:
        _, node = _source(graph, link)
        out.append(tuple(node["inputs"][f] for f in fields))
        link = node["inputs"].get("previous")
    return tuple(reversed(out))


def summarize(graph: dict) -> Summary:
    """What a workflow does, read from its API graph: the stack that reaches the sampler, the files it uses."""
    samplers = [n for n in graph.values() if n["class_type"] in ("KSampler", "ControlStackSampler")]
    assert len(samplers) == 1, "one sampler per shipped workflow"
    sampler = samplers[0]
    entries = []
    _, node = _source(graph, sampler["inputs"]["model"])
    while node["class_type"] == "ControlStackApplyHint":
        inputs = node["inputs"]
        _, cn = _source(graph, inputs["control_net"])
        union_type = None
        if cn["class_type"] == "ControlStackUnionType":
            union_type = cn["inputs"]["control_type"]
            _, cn = _source(graph, cn["inputs"]["control_net"])
        assert cn["class_type"] == "ControlStackLoadControlNet", cn
        file = cn["inputs"]["control_net_name"]
        scales = None
        if "scales" in inputs:
            _, sc = _source(graph, inputs["scales"])
            layer_values = tuple(
                v for k, v in sorted(sc["inputs"].items()) if k.startswith("in_") or k == "middle"
            )
            scales = (sc["inputs"]["mode"], layer_values)
        kind = next((k for marker, k in KIND_MARKERS.items() if marker in file), "controlnet")
        window = (inputs["start_percent"], inputs["end_percent"])
        schedule = _chain(graph, inputs.get("schedule"), ("percent", "strength", "interpolation"))
        frames = _chain(
            graph,
            inputs.get("frame_strengths"),
            ("first_frame", "last_frame", "strength_from", "strength_to", "interpolation"),
        )
        hint = _hint_source(graph, inputs["image"])
        entries.append(Entry(kind, file, hint, window, scales, union_type, schedule, frames))
        _, node = _source(graph, inputs["model"])
    assert node["class_type"] == "CheckpointLoaderSimple", node
    ckpt = node["inputs"]["ckpt_name"]
    models = {
        n["inputs"][k] for n in graph.values() for k in ("ckpt_name", "control_net_name") if k in n["inputs"]
    }
    models |= {  # the annotator files a run reads (OpenPose's hand / face files only when included)
        v
        for n in graph.values()
        if n["class_type"] in ANNOTATOR_NODES
        for k, v in n["inputs"].items()
        if k in ("model", "body_model")
        or (k in ("hand_model", "face_model") and n["inputs"][f"include_{k[:4]}"])
    }
    sampler_id = next(k for k, n in graph.items() if n is sampler)
    report_saved = any(
        n["class_type"] == "SaveImage" and n["inputs"]["images"] == [sampler_id, 1] for n in graph.values()
    )
    return Summary(
        family="sdxl" if SDXL_MARKER in ckpt else "circles" if ckpt == host.CIRCLES_CHECKPOINT else "sd15",
        sampler=sampler["class_type"],
        entries=tuple(reversed(entries)),
        models=frozenset(models),
        images=frozenset(n["inputs"]["image"] for n in graph.values() if n["class_type"] == "LoadImage"),
        report_saved=report_saved,
        batch=_source(graph, sampler["inputs"]["latent_image"])[1]["inputs"].get("batch_size", 1),
    )


FULL = (0.0, 1.0)
SCENARIOS: dict[str, Callable[[Summary], bool]] = {
    # what each shipped workflow is for; the run test below proves each runs, this that each still shows its point
    # the demo: the trained circles model (tests/host/test_circles.py measures that it obeys the hint)
    "controlstack_circles": lambda s: (
        s.family == "circles"
        and [e.kind for e in s.entries] == ["controlnet"]
        and s.entries[0].window == FULL
    ),
    "controlstack_sd15_single": lambda s: (
        [e.kind for e in s.entries] == ["controlnet"] and s.entries[0].window == FULL
    ),
    "controlstack_sd15_stack_windows": lambda s: (
        s.sampler == "KSampler"  # a stacked MODEL in the plain KSampler
        and len(s.entries) >= 2
        and len({e.window for e in s.entries}) == len(s.entries)
        and all(e.window != FULL for e in s.entries)
        and max(e.window[0] for e in s.entries) < min(e.window[1] for e in s.entries)
    ),  # overlapping windows
    "controlstack_sd15_scale_modes": lambda s: (
        {e.scales[0] for e in s.entries if e.scales} >= {"prompt is more important", "custom"}
        and any(e.scales[0] == "custom" and 0.0 in e.scales[1] for e in s.entries if e.scales)
    ),
    # a schedule that fades the control out by 60% with ease-out, then holds it off
    "controlstack_sd15_schedule_fade": lambda s: (
        len(s.entries) == 1
        and s.entries[0].window == FULL
        and s.entries[0].schedule == ((0.0, 1.0, "ease-out"), (0.6, 0.0, "hold"))
    ),
    # a 16-frame batch: frames 0-7 at full strength, 8-15 fading linearly to 0
    "controlstack_sd15_frame_keyframes": lambda s: (
        s.batch == 16
        and len(s.entries) == 1
        and s.entries[0].frame_strengths == ((0, 7, 1.0, 1.0, "hold"), (8, 15, 1.0, 0.0, "linear"))
    ),
    "controlstack_sd15_canny_from_photo": lambda s: (
        [e.hint for e in s.entries] == ["ControlStackCannyPreprocessor(controlstack_photo.png)"]
    ),
    "controlstack_sd15_canny_plus_scribble": lambda s: (
        [e.hint for e in s.entries]
        == [
            "ControlStackCannyPreprocessor(controlstack_photo.png)",
            "ControlStackScribblePreprocessor(controlstack_photo.png)",
        ]
    ),
    # photo -> Depth Anything v2 and OpenPose (weights from the annotators folder) -> two stacked ControlNets
    "controlstack_sd15_depth_pose_from_photo": lambda s: (
        [e.hint for e in s.entries]
        == [
            "ControlStackDepthAnythingV2Preprocessor(controlstack_photo.png)",
            "ControlStackOpenPosePreprocessor(controlstack_photo.png)",
        ]
    ),
    "controlstack_sd15_t2i_depth": lambda s: [e.kind for e in s.entries] == ["t2i_adapter"],
    "controlstack_sdxl": lambda s: s.family == "sdxl" and [e.kind for e in s.entries] == ["controlnet"],
    "controlstack_sdxl_control_lora": lambda s: (
        s.family == "sdxl" and [e.kind for e in s.entries] == ["control_lora"]
    ),
    "controlstack_sdxl_lllite": lambda s: s.family == "sdxl" and [e.kind for e in s.entries] == ["lllite"],
    # ProMax: several hints of ONE Union file with distinct types and one window, so they fuse into one forward
    "controlstack_sdxl_union_promax": lambda s: (
        s.family == "sdxl"
        and len(s.entries) >= 2
        and {e.kind for e in s.entries} == {"union"}
        and len({e.file for e in s.entries}) == 1
        and len({e.union_type for e in s.entries}) == len(s.entries)
        and None not in {e.union_type for e in s.entries}
        and len({e.window for e in s.entries}) == 1
    ),
}


def test_every_scenario_has_a_workflow_and_every_workflow_a_scenario():
    assert {p.stem for p in API} == set(SCENARIOS)


@pytest.mark.parametrize("path", API, ids=[p.stem for p in API])
def test_workflow_shows_its_scenario_with_files_the_harness_builds(path):
    """Static (no server): the stack reaching the sampler is the one the scenario is about, every model file is
    one the harness builds for the checkpoint's family, every input image is shipped, the report is saved."""
    summary = summarize(json.loads(path.read_text()))
    assert SCENARIOS[path.stem](summary), summary
    assert summary.models <= BUILT_MODELS[summary.family], summary.models - BUILT_MODELS[summary.family]
    inputs = {p.name for p in (REPO / "workflows" / "inputs").glob("*.png")}
    assert summary.images <= inputs, summary.images - inputs
    if summary.sampler == "ControlStackSampler":
        assert summary.report_saved, "the Sampler's control report is not saved (nothing checks it then)"
    applied = sum(n["class_type"] == "ControlStackApplyHint" for n in json.loads(path.read_text()).values())
    assert applied == len(summary.entries), "an ApplyHint that does not reach the sampler"


@pytest.mark.parametrize("path", API, ids=[p.stem for p in API])
def test_workflow_matches_object_info(comfy_server, path):
    """Every node type and every input of the workflow exists in the host's /object_info (SDXL included)."""
    info = comfy_server.object_info()
    graph = json.loads(path.read_text())
    for node_id, node in graph.items():
        assert node["class_type"] in info, f"{path.name}: node {node_id} type {node['class_type']} missing"
        spec = info[node["class_type"]]["input"]
        known = {**spec.get("required", {}), **spec.get("optional", {})}
        for name in node["inputs"]:
            assert name in known, f"{path.name}: node {node_id} ({node['class_type']}) has no input {name!r}"


def _needs_sdxl(graph: dict) -> bool:
    return any(
        SDXL_MARKER in v for node in graph.values() for v in node["inputs"].values() if isinstance(v, str)
    )


def _load_ui() -> ModuleType:
    """nodes/ui.py from its file (the nodes package imports the host; ui.py itself needs only numpy / cv2)."""
    spec = importlib.util.spec_from_file_location("controlstack_nodes_ui", REPO / "nodes" / "ui.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


UI = _load_ui()
VIRIDIS = cv2.applyColorMap(np.arange(256, dtype=np.uint8)[:, None], cv2.COLORMAP_VIRIDIS)[:, 0, ::-1].astype(
    int
)
"""The report's colour scale, RGB: entry k is the colour of a cell at k / 255 of the report's peak."""
LAYERS = {"sd15": 13, "sdxl": 10, "circles": 3}  # the circles model's UNet: in_00, in_01, middle
T2I_SD15_LAYERS = [2, 5, 8, 11]


def read_report(path: Path, layers: int, steps: int, exact: bool = True) -> np.ndarray:
    """The numbers a control report image shows: entries x layers x steps, in units of the report's peak.

    Reads the colour at the centre of every cell and finds it on the colour scale: exactly (``exact``: an image
    written with rounding, as the Sampler's own preview) or the nearest entry (SaveImage truncates).
    """
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    block_h = UI.block_height(layers)
    assert img.shape[0] % block_h == 0, (img.shape, block_h)
    ys = UI.TITLE_H + UI.CELL_H // 2 + UI.CELL_H * np.arange(layers)
    xs = UI.LABEL_W + UI.CELL_W // 2 + UI.CELL_W * np.arange(steps)
    blocks = []
    for b in range(img.shape[0] // block_h):
        cells = img[b * block_h + ys][:, xs]  # layers x steps x 3
        dist = ((cells[:, :, None, :] - VIRIDIS[None, None]) ** 2).sum(-1)
        if exact:
            assert (dist.min(-1) == 0).all(), f"{path.name}: block {b} has cells off the colour scale"
        blocks.append(dist.argmin(-1) / 255.0)
    # right of the last step: background, no cell
    assert (img[UI.TITLE_H + UI.CELL_H // 2, UI.LABEL_W + UI.CELL_W * steps + 4] == 24).all()
    return np.stack(blocks)


def read_strengths(path: Path, layers: int, steps: int) -> np.ndarray:
    """The strength strips of a control report: entries x steps, each bar's height as a fraction of a full bar."""
    img = np.asarray(Image.open(path).convert("RGB")).astype(int)
    block_h = UI.block_height(layers)
    strip_bottom = UI.TITLE_H + layers * UI.CELL_H + 2 + UI.STRENGTH_H
    xs = UI.LABEL_W + UI.CELL_W // 2 + UI.CELL_W * np.arange(steps)
    bars = []
    for b in range(img.shape[0] // block_h):
        strip = img[b * block_h + strip_bottom - UI.STRENGTH_H : b * block_h + strip_bottom][:, xs]
        # SaveImage truncates 255 x (v / 255): the bar colour may come back one gray level lower
        coloured = (np.abs(strip - np.array(UI.STRENGTH_COLOUR)) <= 1).all(-1)  # STRENGTH_H x steps
        bars.append(coloured.sum(0) / (UI.STRENGTH_H - 2))
    return np.stack(bars)


def test_report_draws_each_entrys_applied_magnitudes(comfy_server):
    """One ControlNet and one hint applied three times, so the report's numbers are known relative to each other:
    A (strength 1), B (strength 0.5, "prompt is more important": layer i x 0.825^(12 - i)) and C (strength 1 in
    the second half of the run only). The image must show B = 0.5 x 0.825^(12 - i) x A cell by cell, C's columns
    either A's or empty (first one empty), and the brightest colour at the peak."""
    comfy_server.upload_inputs([REPO / "workflows" / "inputs" / "controlstack_canny_hint.png"])
    apply = {"class_type": "ControlStackApplyHint", "inputs": {"control_net": ["5", 0], "image": ["6", 0]}}
    window = {"start_percent": 0.0, "end_percent": 1.0, "resize_mode": "just resize"}
    steps = 4
    graph = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": host.CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a house", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 128, "height": 128, "batch_size": 1}},
        "5": {
            "class_type": "ControlStackLoadControlNet",
            "inputs": {"control_net_name": host.CONTROLNETS[0]},
        },
        "6": {"class_type": "LoadImage", "inputs": {"image": "controlstack_canny_hint.png"}},
        "7": {**apply, "inputs": {**apply["inputs"], **window, "model": ["1", 0], "strength": 1.0}},
        "8": {
            "class_type": "ControlStackControlScale",
            "inputs": {
                "mode": "prompt is more important",
                **{f"in_{i:02d}": 1.0 for i in range(12)},
                "middle": 1.0,
            },
        },
        "9": {
            **apply,
            "inputs": {**apply["inputs"], **window, "model": ["7", 0], "strength": 0.5, "scales": ["8", 0]},
        },
        "11": {
            **apply,
            "inputs": {**apply["inputs"], **window, "model": ["9", 0], "strength": 1.0, "start_percent": 0.5},
        },
        "10": {
            "class_type": "ControlStackSampler",
            "inputs": {
                "model": ["11", 0],
                "seed": 3,
                "steps": steps,
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
    graph["12"] = {
        "class_type": "PreviewImage",
        "inputs": {"images": ["10", 1]},
    }  # an output node, so it runs
    entry = comfy_server.run(graph, timeout=600)
    (shown,) = entry["outputs"]["10"][
        "images"
    ]  # the Sampler's own preview of its report (rounded, exact colours)
    path = comfy_server.base_dir / shown["type"] / shown.get("subfolder", "") / shown["filename"]
    a, b, c = read_report(path, LAYERS["sd15"], steps)
    tol = 2.5 / 255  # each value is drawn as floor(255 x value / peak)
    assert max(a.max(), b.max(), c.max()) == 1.0  # one colour scale: the peak is the brightest colour
    assert (a.max(axis=0) > 0.2).all(), "A runs at every step"
    decay = 0.5 * PROMPT_DECAY ** np.arange(12, -1, -1.0)[:, None]
    assert np.abs(b - decay * a).max() <= tol, np.round(b - decay * a, 3)
    assert b.max() > 0.3  # B is not just zeros within the tolerance
    assert (c[:, 0] == 0).all(), "C's window starts halfway: nothing at the first step"
    active = [col for col in range(steps) if c[:, col].any()]
    assert active and all(np.array_equal(c[:, col], a[:, col]) for col in active), (a, c)
    assert all(not c[:, col].any() for col in range(steps) if col not in active)


@pytest.mark.parametrize("path", API, ids=[p.stem for p in API])
def test_workflow_runs_and_writes_images(request, comfy_server, path):
    graph = json.loads(path.read_text())
    server = request.getfixturevalue("sdxl_host") if _needs_sdxl(graph) else comfy_server
    server.upload_inputs(sorted((REPO / "workflows" / "inputs").glob("*.png")))
    entry = server.run(graph, timeout=900)
    images = server.output_images(entry)
    saved = [p for p in images if "output" in p.parts]
    assert saved, f"{path.name} wrote no images"
    for image in images:
        assert image.is_file()
        pixels = np.asarray(Image.open(image))
        assert pixels.size and pixels.std() > 0, f"{image} is blank"
    summary = summarize(graph)
    if summary.sampler != "ControlStackSampler":
        return
    (report,) = [p for p in saved if "report" in p.name]
    steps = next(n for n in graph.values() if n["class_type"] == summary.sampler)["inputs"]["steps"]
    values = read_report(report, LAYERS[summary.family], steps, exact=False)
    assert len(values) == len(summary.entries), "one report block per stacked entry"
    assert values.max() == 1.0
    strengths = read_strengths(report, LAYERS[summary.family], steps)
    for entry, table, bars in zip(summary.entries, values, strengths, strict=True):
        assert table.any(), f"{entry.file}: nothing reported"
        if entry.scales is not None and entry.scales[0] == "custom":
            custom = entry.scales[1]  # in_00 .. in_11, middle; SDXL's 10 rows are in_00 .. in_08, middle
            zero = [i for i, s in enumerate((*custom[: len(table) - 1], custom[-1])) if s == 0.0]
            assert zero and not table[zero].any(), f"{entry.file}: layers scaled by 0 show a push"
        if entry.schedule:
            # the strip shows the schedule taking effect: full strength first, easing down, then off; steps at
            # strength 0 do not run the ControlNet, so their columns are empty
            assert bars[0] == 1.0 and (np.diff(bars) <= 0).all() and bars[-1] == 0.0, bars
            off = ~table.any(axis=0)  # steps without a push (a bar may round to 0 px just before it stops)
            assert off[-1] and not off[0] and (bars[off] == 0).all() and table[:, bars > 0].all(), (
                bars,
                table,
            )
        if entry.kind == "t2i_adapter" and summary.family == "sd15":
            # an SD1.5 T2I-Adapter adds its four features after in_02, in_05, in_08, in_11 and nowhere else
            assert (
                not np.delete(table, T2I_SD15_LAYERS, axis=0).any()
                and table[T2I_SD15_LAYERS].all(axis=1).all()
            )
