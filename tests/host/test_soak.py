"""Soak and interrupt through a real ComfyUI server: many stacked prompts on one server, and an interrupted run.

The soak queues N_PROMPTS prompts, each with two ControlStack ApplyHints stacked on one MODEL (the random SD1.5
checkpoint and ControlNets), at the smallest useful cost: 64x64 pixels (8x8 latent), 1 step, cfg 1.0 (ComfyUI then
skips the uncond pass), SaveLatent instead of a VAE decode. The seed and the strengths change on every prompt, so
ComfyUI's node cache answers none of them: every prompt re-patches the MODEL and runs both ControlNets through the
sampler. At this size a prompt costs what reading the fp32 weights costs (on 2 CPUs about 0.7 s for the UNet and
0.35 s per ControlNet), so a third ControlNet would add a quarter to the time and nothing to what is tested (the
interrupt test uses the same two: loading a third file would cost more than its prompts). It asserts that every
prompt succeeds with its own finite latent, that the server's RSS grows by less than RSS_GROWTH_LIMIT after the
warm-up, and that the first prompt, run again at the end, is bit-identical.

The interrupt test stops a longer stacked prompt in the middle of sampling (seen on the websocket's progress
messages) and then requires a prompt run before the interrupt to come out bit-identical.

Figures go to stdout (pytest -s) and to .artifacts/soak.json.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import threading
import time
import uuid
from typing import Any

import aiohttp
import host
import psutil
import pytest
import torch
from graphs import entry_latent, stacked_graph, status_message, write_hint_images

N_PROMPTS = int(os.environ.get("CONTROLSTACK_SOAK_PROMPTS", "200"))
WARMUP = 20
"""Prompts before the RSS baseline: the first loads the checkpoint and the ControlNets, the next settle the
allocator and ComfyUI's caches."""
RSS_GROWTH_LIMIT = 0.05
HINTS = ("cs_soak_hint_a.png", "cs_soak_hint_b.png")
SECONDS_PER_PROMPT = 10
"""Generous bound for the waits (a prompt takes ~1.4 s on 2 idle CPUs), so that only a hang fails them."""
SOAK_JSON = host.REPO / ".artifacts" / "soak.json"


@pytest.fixture(scope="module")
def hints(comfy_server) -> tuple[str, ...]:
    write_hint_images(comfy_server, HINTS, seed=14)
    return HINTS


def _soak_graph(i: int) -> dict[str, Any]:
    """Prompt i of the soak: its own seed and strengths, so no node below SaveLatent can come from the cache."""
    strengths = (0.5 + (i % 50) / 100, 1.0 - (i % 40) / 100)
    return stacked_graph(HINTS, strengths, steps=1, seed=1000 + i, cfg=1.0)


def _rss(proc: psutil.Process) -> int:
    return proc.memory_info().rss


class _PeakRss(threading.Thread):
    """Samples a process's RSS every `period` s until stopped; keeps the peak."""

    def __init__(self, proc: psutil.Process, period: float = 0.5):
        super().__init__(daemon=True)
        self.proc, self.period, self.peak = proc, period, _rss(proc)
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.period):
            self.peak = max(self.peak, _rss(self.proc))

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def _wait_all(server: host.ComfyServer, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
    """Wait until every queued prompt has left the queue, then return their /history entries (missing = {})."""
    deadline = time.monotonic() + timeout
    while True:
        queue = server.get("/queue").json()
        if not queue["queue_running"] and not queue["queue_pending"]:
            break
        if not server.running:
            raise host.HostError(f"ComfyUI died during the soak; log {server.log_path}")
        if time.monotonic() > deadline:
            raise host.HostError(f"{len(queue['queue_pending'])} prompts still queued after {timeout:.0f} s")
        time.sleep(0.5)
    history = server.get(f"/history?max_items={len(ids) + 1000}", timeout=60).json()
    return {pid: history.get(pid, {}) for pid in ids}


def _failure(entry: dict[str, Any]) -> str | None:
    """Why a finished prompt does not count as a success, or None."""
    status = entry.get("status") or {}
    if status.get("status_str") != "success" or not status.get("completed"):
        error = status_message(entry, "execution_error") or {}
        return f"status {status.get('status_str')}: {error.get('exception_message', 'no history entry')}"
    if not entry.get("outputs", {}).get("30", {}).get("latents"):
        return "no SaveLatent output"
    if "10" in (status_message(entry, "execution_cached") or {}).get("nodes", []):
        return "the KSampler came from the cache"
    return None


def _seconds(entry: dict[str, Any]) -> float:
    """Execution time of a prompt from its history's execution_start / execution_success timestamps (ms)."""
    start = status_message(entry, "execution_start")["timestamp"]
    return (status_message(entry, "execution_success")["timestamp"] - start) / 1000


def test_soak_stacked_prompts_no_failure_flat_rss(comfy_server, hints):
    proc = psutil.Process(comfy_server.proc.pid)
    graphs = [_soak_graph(i) for i in range(N_PROMPTS)]
    rss_start = _rss(proc)
    t0 = time.perf_counter()
    ids = [comfy_server.queue(g) for g in graphs[:WARMUP]]
    entries = _wait_all(comfy_server, ids, timeout=120 + WARMUP * SECONDS_PER_PROMPT)  # + loading the models
    rss_warm = _rss(proc)
    t_warm = time.perf_counter() - t0

    sampler = _PeakRss(proc)
    sampler.start()
    t1 = time.perf_counter()
    later = [comfy_server.queue(g) for g in graphs[WARMUP:]]
    entries |= _wait_all(comfy_server, later, timeout=len(later) * SECONDS_PER_PROMPT)
    t_soak = time.perf_counter() - t1
    rss_peak = sampler.stop()
    rss_end = _rss(proc)
    ids += later

    failures = {i: why for i, pid in enumerate(ids) if (why := _failure(entries[pid]))}
    latents = {i: entry_latent(comfy_server, entries[pid]) for i, pid in enumerate(ids) if i not in failures}
    per_prompt = [_seconds(entries[pid]) for i, pid in enumerate(ids) if i >= WARMUP and i not in failures]

    # Prompt 0 once more, after everything: the sampler must run again (ComfyUI dropped it from its cache when
    # the next prompt started) and give the same numbers as the first time.
    again = comfy_server.run(_soak_graph(0), timeout=300)
    assert _failure(again) is None, _failure(again)

    growth = (rss_end - rss_warm) / rss_warm
    figures = {
        "prompts": N_PROMPTS,
        "warmup_prompts": WARMUP,
        "failures": len(failures),
        "rss_start_mib": round(rss_start / 2**20, 1),
        "rss_after_warmup_mib": round(rss_warm / 2**20, 1),
        "rss_end_mib": round(rss_end / 2**20, 1),
        "rss_peak_after_warmup_mib": round(rss_peak / 2**20, 1),
        "rss_growth_after_warmup": round(growth, 4),
        "warmup_seconds": round(t_warm, 1),
        "soak_seconds": round(t_soak, 1),
        "seconds_per_prompt_median": round(statistics.median(per_prompt), 3) if per_prompt else None,
        "seconds_per_prompt_max": round(max(per_prompt), 3) if per_prompt else None,
    }
    SOAK_JSON.parent.mkdir(parents=True, exist_ok=True)
    SOAK_JSON.write_text(json.dumps(figures, indent=2) + "\n")
    print("\nsoak: " + ", ".join(f"{k}={v}" for k, v in figures.items()))

    assert not failures, (
        f"{len(failures)} of {N_PROMPTS} prompts failed, first: {next(iter(failures.items()))}"
    )
    assert all(t.shape == (1, 4, 8, 8) and torch.isfinite(t).all() for t in latents.values())
    distinct = {t.numpy().tobytes() for t in latents.values()}
    assert len(distinct) == N_PROMPTS, "every prompt has its own seed and strengths, so its own latent"
    assert torch.equal(entry_latent(comfy_server, again), latents[0]), "prompt 0 changed after the soak"
    assert growth < RSS_GROWTH_LIMIT, f"server RSS grew {growth:.1%} after the warm-up: {figures}"


# ------------------------------------------------------------------------------------------------ interrupt

INTERRUPT_STEPS = 12
INTERRUPT_AFTER_STEP = 3


async def _interrupt_while_sampling(server: host.ComfyServer, graph: dict[str, Any]) -> tuple[str, int]:
    """Queue `graph` for a websocket client, POST /interrupt once the sampler reports INTERRUPT_AFTER_STEP steps
    done, and wait for the interrupt to be reported. Returns the prompt id and the last step reported."""
    client_id = uuid.uuid4().hex
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"ws://127.0.0.1:{server.port}/ws?clientId={client_id}") as ws:
            async with session.post(
                server.url + "/prompt", json={"prompt": graph, "client_id": client_id}
            ) as r:
                assert r.status == 200, await r.text()
                prompt_id = (await r.json())["prompt_id"]
            step, interrupted = 0, False
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    continue  # binary frames are latent previews
                event = json.loads(msg.data)
                data = event.get("data", {})
                if data.get("prompt_id") != prompt_id:
                    continue
                if event["type"] == "progress" and data.get("node") == "10":
                    step = data["value"]
                    if step >= INTERRUPT_AFTER_STEP and not interrupted:
                        async with session.post(server.url + "/interrupt", json={"prompt_id": prompt_id}):
                            interrupted = True
                elif event["type"] in ("execution_interrupted", "execution_success", "execution_error"):
                    return prompt_id, step
    raise host.HostError("the websocket closed before the prompt ended")


def _history_entry(server: host.ComfyServer, prompt_id: str, timeout: float) -> dict[str, Any]:
    """The /history entry of a prompt, waiting for it: the websocket reports the end before the history has it."""
    deadline = time.monotonic() + timeout
    while (entry := server.get(f"/history/{prompt_id}").json().get(prompt_id)) is None:
        if time.monotonic() > deadline:
            raise host.HostError(f"prompt {prompt_id} not in /history {timeout:.0f} s after it ended")
        time.sleep(0.1)
    return entry


def test_interrupt_mid_sampling_then_bit_identical(comfy_server, hints):
    # cfg 6 (cond and uncond passes) and two steps: the reference exercises more of the stack than a soak prompt.
    reference_graph = stacked_graph(HINTS, (0.9, 0.7), steps=2, seed=77, cfg=6.0)
    reference = entry_latent(comfy_server, comfy_server.run(reference_graph, timeout=300))

    long_graph = stacked_graph(HINTS, (1.1, 0.6), steps=INTERRUPT_STEPS, seed=78, cfg=1.0)
    t0 = time.perf_counter()
    prompt_id, step = asyncio.run(asyncio.wait_for(_interrupt_while_sampling(comfy_server, long_graph), 300))
    seconds = time.perf_counter() - t0
    print(f"\ninterrupt: sampler stopped after step {step} of {INTERRUPT_STEPS} ({seconds:.1f} s)")
    entry = _history_entry(comfy_server, prompt_id, timeout=60)
    interrupted = status_message(entry, "execution_interrupted")
    assert interrupted is not None and interrupted["node_id"] == "10", entry["status"]
    assert INTERRUPT_AFTER_STEP <= step < INTERRUPT_STEPS, "the interrupt must land in the middle of sampling"

    again_graph = stacked_graph(HINTS, (0.9, 0.7), steps=2, seed=77, cfg=6.0)  # a new output file name
    again = comfy_server.run(again_graph, timeout=300)
    assert "10" not in status_message(again, "execution_cached")["nodes"], "the sampler must run again"
    assert torch.equal(entry_latent(comfy_server, again), reference)
