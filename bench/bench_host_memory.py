"""Memory of a real ComfyUI server holding stacked ControlNets: ControlStack next to the built-in.

Each row starts a fresh server (the random SD1.5 models of `scripts/host.py models`), runs one tiny prompt and
reads the server process's resident memory (VmRSS) and peak (VmHWM) from /proc:

- "no control": checkpoint + KSampler only (the baseline every other row is compared with);
- "ControlStack x N": N stacked ControlStack ApplyHints;
- "built-in x N": ComfyUI's ControlNetLoader + ControlNetApplyAdvanced chain with the same files.

    .venv/bin/python bench/bench_host_memory.py [--controlnets 2] [--server-args "--fp16-unet"]

`--fp16-unet` makes the host store UNet weights in fp16 and compute in fp32 layer by layer on the CPU: the case
where ControlNets built from the host's operation classes are stored in fp16 too (issue 14, item 4).
Linux only (/proc). Prints a table; nothing is asserted.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "tests" / "host")]

import host  # noqa: E402
from graphs import add_builtin, add_controlstack, base_graph, set_sampler  # noqa: E402

FILES = ("controlstack_random_sd15_canny.safetensors", "controlstack_random_sd15_depth.safetensors",
         "controlstack_random_sd15_scribble.safetensors")  # fmt: skip
HINT = "controlstack_canny_hint.png"


def _proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def graph(kind: str, n: int) -> dict:
    g = base_graph(HINT, size=64, steps=1)
    if kind == "controlstack":
        model = ["1", 0]
        for i in range(n):
            model = add_controlstack(g, f"5{i}", FILES[i % len(FILES)], ["6", 0], model)
        return set_sampler(g, model=model)
    if kind == "builtin":
        cond = (["2", 0], ["3", 0])
        for i in range(n):
            cond = add_builtin(g, f"5{i}", FILES[i % len(FILES)], ["6", 0], cond)
        return set_sampler(g, cond=cond)
    return set_sampler(g)


def measure(kind: str, n: int, server_args: list[str]) -> tuple[float, float, float]:
    """(RSS GiB, peak RSS GiB, seconds) of a fresh server after one prompt."""
    with host.ComfyServer(extra_args=server_args) as server:
        t0 = time.perf_counter()
        server.run(graph(kind, n), timeout=900)
        seconds = time.perf_counter() - t0
        assert server.proc is not None
        pid = server.proc.pid
        rss, hwm = _proc_kib(pid, "VmRSS"), _proc_kib(pid, "VmHWM")
    return rss / 2**20, hwm / 2**20, seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--controlnets", type=int, default=2)
    ap.add_argument(
        "--server-args", default="--fp16-unet", help="extra ComfyUI arguments (default: %(default)s)"
    )
    ap.add_argument("--rows", default="none,controlstack,builtin")
    args = ap.parse_args()
    server_args = shlex.split(args.server_args)
    host.build_models(host.resolve_base_dir(), comfy_dir=host.resolve_comfy_dir())
    rows = []
    for kind in args.rows.split(","):
        n = 0 if kind == "none" else args.controlnets
        rss, hwm, seconds = measure(kind, n, server_args)
        rows.append((kind, n, rss, hwm, seconds))
        print(f"  measured {kind} x{n}: RSS {rss:.2f} GiB", flush=True)
    base = next((r[2] for r in rows if r[0] == "none"), None)
    print(f"\nserver args: {' '.join(server_args) or '(none)'}; CPU; one prompt 64x64, 1 step")
    print("| row | ControlNets | RSS GiB | peak GiB | RSS over no control, GiB | prompt s |")
    print("|---|---|---|---|---|---|")
    for kind, n, rss, hwm, seconds in rows:
        extra = "" if base is None else f"{rss - base:+.2f}"
        print(f"| {kind} | {n} | {rss:.2f} | {hwm:.2f} | {extra} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
