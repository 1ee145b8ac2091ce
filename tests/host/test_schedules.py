"""Control over time and frames through a real ComfyUI server: strength schedules, per-frame strengths and context
windows, against graphs whose result is known another way; and their bad input.

Every graph is fp32 on the CPU at 64x64 pixels (8x8 latent) on the session's random SD1.5 checkpoint and ControlNet
(every weight random, zero convs too), so a schedule, keyframe or window that did nothing or the wrong thing fails.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from graphs import add_controlstack, base_graph, rel_err, run_latent, set_sampler
from host import PromptFailed, PromptRejected
from PIL import Image

SD15_CN = "controlstack_random_sd15_canny.safetensors"
HINT = "cs_sched_hint.png"
VIDEO = "cs_sched_video.gif"
FRAMES = 24


@pytest.fixture(scope="module")
def files(comfy_server, host_models):
    """A hint image and a 24-frame hint video (an animated GIF, which LoadImage reads as a batch) in BASE/input."""
    assert host_models["canny"].name == SD15_CN
    rng = np.random.default_rng(12)
    inputs = Path(comfy_server.base_dir) / "input"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(inputs / HINT)
    frames = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(FRAMES)]
    frames[0].save(inputs / VIDEO, save_all=True, append_images=frames[1:], duration=40, optimize=False)
    return inputs


def keyframes(g: dict, first_node: int, frames: list[tuple]) -> list:
    """A chain of Strength Keyframe nodes (percent, strength, interpolation[, guarantee_steps]); returns its link."""
    prev = None
    for k, spec in enumerate(frames):
        percent, strength, interpolation, *guarantee = spec
        inputs = {
            "percent": percent,
            "strength": strength,
            "interpolation": interpolation,
            "guarantee_steps": guarantee[0] if guarantee else 0,
        }
        if prev is not None:
            inputs["previous"] = prev
        node = str(first_node + k)
        g[node] = {"class_type": "ControlStackStrengthKeyframe", "inputs": inputs}
        prev = [node, 0]
    return prev


def frame_strengths(g: dict, node: str, first: int, last: int, s_from: float, s_to: float, **kw) -> list:
    g[node] = {
        "class_type": "ControlStackFrameStrengths",
        "inputs": {
            "first_frame": first,
            "last_frame": last,
            "strength_from": s_from,
            "strength_to": s_to,
            "interpolation": kw.get("interpolation", "linear"),
            "other_frames": kw.get("other_frames", 1.0),
        },
    }
    return [node, 0]


def test_a_hold_schedule_equals_the_window_it_describes(comfy_server, files):
    """1.0 from 25% to 65% of sampling and 0 outside, as hold keyframes, gives exactly the latent of the window
    0.25..0.65 (6 steps: the ControlNet runs at 40% and 60%); and differs from no control."""
    g = base_graph(HINT, steps=6)
    window = run_latent(
        comfy_server,
        set_sampler(
            g,
            model=add_controlstack(g, "7", SD15_CN, ["6", 0], ["1", 0], start_percent=0.25, end_percent=0.65),
        ),
    )
    g = base_graph(HINT, steps=6)
    sched = keyframes(g, 40, [(0.0, 0.0, "hold"), (0.25, 1.0, "hold"), (0.65, 0.0, "hold")])
    scheduled = run_latent(
        comfy_server,
        set_sampler(g, model=add_controlstack(g, "7", SD15_CN, ["6", 0], ["1", 0], schedule=sched)),
    )
    assert torch.equal(scheduled, window)
    plain = run_latent(comfy_server, base_graph(HINT, steps=6))
    assert rel_err(window, plain) > 1e-3, "the window must change the latent"


def test_a_fade_is_between_full_and_none(comfy_server, files):
    """An ease-out fade to 0 at 60% is neither the full-strength run nor the run that stops at 60%."""
    g = base_graph(HINT, steps=5)
    full = run_latent(
        comfy_server, set_sampler(g, model=add_controlstack(g, "7", SD15_CN, ["6", 0], ["1", 0]))
    )
    g = base_graph(HINT, steps=5)
    cut = run_latent(
        comfy_server,
        set_sampler(g, model=add_controlstack(g, "7", SD15_CN, ["6", 0], ["1", 0], end_percent=0.6)),
    )
    g = base_graph(HINT, steps=5)
    sched = keyframes(g, 40, [(0.0, 1.0, "ease-out"), (0.6, 0.0, "hold")])
    fade = run_latent(
        comfy_server,
        set_sampler(g, model=add_controlstack(g, "7", SD15_CN, ["6", 0], ["1", 0], schedule=sched)),
    )
    assert rel_err(fade, full) > 1e-4 and rel_err(fade, cut) > 1e-4


def test_frame_strengths_equal_each_frame_alone_with_its_strength(comfy_server, files):
    """A batch of 3 latents with frame strengths 1.0, 0.5, 0.0 (linear): frame i equals sampling latent i alone
    (LatentFromBatch keeps its batch index, so its noise) with ApplyHint strength s_i."""
    g = base_graph(HINT, batch=3, steps=2)
    fs = frame_strengths(g, "40", 0, -1, 1.0, 0.0)
    batch = run_latent(
        comfy_server,
        set_sampler(g, model=add_controlstack(g, "7", SD15_CN, ["6", 0], ["1", 0], frame_strengths=fs)),
    )
    assert batch.shape == (3, 4, 8, 8)
    for i, strength in enumerate((1.0, 0.5, 0.0)):
        g = base_graph(HINT, batch=3, steps=2)
        g["41"] = {
            "class_type": "LatentFromBatch",
            "inputs": {"samples": ["4", 0], "batch_index": i, "length": 1},
        }
        g["10"]["inputs"]["latent_image"] = ["41", 0]
        alone = run_latent(
            comfy_server,
            set_sampler(g, model=add_controlstack(g, "7", SD15_CN, ["6", 0], ["1", 0], strength=strength)),
        )
        assert rel_err(batch[i : i + 1], alone) < 1e-4, (i, rel_err(batch[i : i + 1], alone))
    plain = run_latent(comfy_server, base_graph(HINT, batch=3, steps=2))
    assert torch.equal(batch[2], plain[2]), "frame strength 0: exactly no control"
    assert rel_err(batch[0], plain[0]) > 1e-3


def video_graph(*, steps: int = 1) -> dict:
    """base_graph on the 24-frame hint video, a 24-latent batch; frame strengths 1.0 -> 0.2 over the clip."""
    g = base_graph(VIDEO, batch=FRAMES, steps=steps)
    return g


def in_windows(g: dict, model: list, protocol: str) -> dict:
    """The graph with its sampler on `model` sampled in windows of 8 frames overlapping by 4 (the test handler)."""
    g["41"] = {
        "class_type": "CSTestContextWindows",
        "inputs": {"model": model, "context_length": 8, "context_overlap": 4, "protocol": protocol},
    }
    return set_sampler(g, model=["41", 0])


@pytest.mark.parametrize("protocol", ["animatediff", "comfyui"])
def test_context_windows_get_the_rows_of_their_frames(comfy_server, files, protocol):
    """24 frames sampled in windows of 8 overlapping by 4 (a test-side handler speaking the protocol; one Euler
    step, so each frame is the flat fuse -- the mean -- of the denoised windows that hold it) equal, frame for frame,
    the same windows sampled one by one: LatentFromBatch (its noise), ImageFromBatch (its hint rows), frame
    strengths of exactly its frames."""
    fade = (1.0, 0.2)

    def strength(f: int) -> float:
        return fade[0] + (fade[1] - fade[0]) * f / (FRAMES - 1)

    g = video_graph()
    fs = frame_strengths(g, "40", 0, -1, *fade)
    model = add_controlstack(g, "7", SD15_CN, ["6", 0], ["1", 0], frame_strengths=fs)
    windowed = run_latent(comfy_server, in_windows(g, model, protocol), timeout=900)
    assert windowed.shape == (FRAMES, 4, 8, 8)

    starts = [0, 4, 8, 12, 16]
    fused = torch.zeros_like(windowed)
    count = torch.zeros(FRAMES, 1, 1, 1)
    for s in starts:
        g = video_graph()
        g["42"] = {
            "class_type": "LatentFromBatch",
            "inputs": {"samples": ["4", 0], "batch_index": s, "length": 8},
        }
        g["43"] = {
            "class_type": "ImageFromBatch",
            "inputs": {"image": ["6", 0], "batch_index": s, "length": 8},
        }
        g["10"]["inputs"]["latent_image"] = ["42", 0]
        fs = frame_strengths(g, "40", 0, 7, strength(s), strength(s + 7))
        alone = run_latent(
            comfy_server,
            set_sampler(g, model=add_controlstack(g, "7", SD15_CN, ["43", 0], ["1", 0], frame_strengths=fs)),
        )
        fused[s : s + 8] += alone
        count[s : s + 8] += 1
    expected = fused / count
    err = rel_err(windowed, expected)
    assert err < 1e-5, err
    # the hint rows matter: frame 0's hint on every frame is another result
    g = video_graph()
    g["43"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["6", 0], "batch_index": 0, "length": 1}}
    fs = frame_strengths(g, "40", 0, -1, *fade)
    model = add_controlstack(g, "7", SD15_CN, ["43", 0], ["1", 0], frame_strengths=fs)
    shared = run_latent(comfy_server, in_windows(g, model, protocol), timeout=900)
    assert rel_err(shared, windowed) > max(100 * err, 1e-4), (rel_err(shared, windowed), err)


def _still_serves(server) -> None:
    latent = run_latent(server, base_graph(HINT, steps=1, seed=99))
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()


def test_bad_schedules_keyframes_and_windows_fail_clearly(comfy_server, files):
    # keyframes out of order: the node that broke the order is named
    g = base_graph(HINT, steps=2)
    sched = keyframes(g, 40, [(0.6, 1.0, "hold"), (0.3, 0.0, "hold")])
    set_sampler(g, model=add_controlstack(g, "7", SD15_CN, ["6", 0], ["1", 0], schedule=sched))
    with pytest.raises(PromptFailed, match=r"Strength Keyframe \(node 41\): percent 0.3 comes before"):
        run_latent(comfy_server, g)
    _still_serves(comfy_server)
    # a percent outside 0..1: the host's own range check names the input
    g = base_graph(HINT, steps=2)
    sched = keyframes(g, 40, [(1.5, 1.0, "hold")])
    set_sampler(g, model=add_controlstack(g, "7", SD15_CN, ["6", 0], ["1", 0], schedule=sched))
    with pytest.raises(PromptRejected, match="percent"):
        run_latent(comfy_server, g)
    # (NaN, which passes the host's check, is refused for every number input of every node: test_hardening.py)
    # frame strengths made for 16 frames on a batch of 3
    g = base_graph(HINT, batch=3, steps=1)
    fs = frame_strengths(g, "40", 0, 15, 1.0, 0.0)
    set_sampler(g, model=add_controlstack(g, "7", SD15_CN, ["6", 0], ["1", 0], frame_strengths=fs))
    with pytest.raises(
        PromptFailed, match=r"Frame Strengths \(node 40\): frames 0..15 do not fit a batch of 3"
    ):
        run_latent(comfy_server, g)
    _still_serves(comfy_server)
    # a hint video of 5 frames for a 24-frame clip sampled in windows
    g = video_graph()
    g["43"] = {"class_type": "ImageFromBatch", "inputs": {"image": ["6", 0], "batch_index": 0, "length": 5}}
    model = add_controlstack(g, "7", SD15_CN, ["43", 0], ["1", 0])
    in_windows(g, model, "animatediff")
    with pytest.raises(
        PromptFailed, match=r"7: hint: batch of 5 does not fit the context window \(frames 0..7"
    ):
        run_latent(comfy_server, g, timeout=900)
    _still_serves(comfy_server)
