"""Benchmark the preprocessors on the CPU: one 512^2 frame, and a 64-frame batch vs a frame-by-frame loop.

Prints a markdown table of medians (ms). Columns:

- ``fn 512^2``: the bare per-image function on a 512 x 512 uint8 array (no conversions).
- ``node 512^2``: what a node does for one frame: IMAGE tensor in -> validate, to uint8, resize/pad to the
  resolution (512: no-op), run, back to a float tensor.
- ``batch 64``: the same for a 64-frame batch in one call (thread pool over frames).
- ``loop 64``: 64 single-frame calls of the node path, then ``torch.cat`` (what a frame-by-frame pack does).
- ``speedup``: loop / batch.

Usage: ``python bench/bench_preprocessors.py [--quick] [--frames 64] [--size 512] [--reps N]``.
``--quick`` (CI smoke test): 128^2 frames, a batch of 4, 2 repetitions; checks everything runs, times mean
nothing. Never asserted in tests (see docs/benchmarks.md for recorded numbers).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable

import controlstack.preprocessors as P
import cv2
import numpy as np
import torch
from skimage import data

# name -> (per-image function, its keyword arguments); defaults of the nodes.
CASES: dict[str, tuple[Callable, dict]] = {
    "canny": (P.canny, {"low_threshold": 100, "high_threshold": 200}),
    "lineart_standard": (P.lineart_standard, {}),
    "scribble (xdog)": (P.scribble, {}),
    "threshold": (P.threshold, {}),
    "binary (otsu)": (P.binary, {}),
    "invert": (P.invert, {}),
    "color": (P.color, {}),
    "shuffle": (P.shuffle, {"seed": 0}),
    "tile": (P.tile, {}),
}


def median_ms(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def make_frames(n: int, size: int) -> tuple[np.ndarray, torch.Tensor]:
    """n distinct size^2 frames (the astronaut photo, shifted per frame) as uint8 numpy and an IMAGE tensor."""
    photo = cv2.resize(data.astronaut(), (size, size), interpolation=cv2.INTER_AREA)
    frames = np.stack([np.roll(photo, 8 * i, axis=1) for i in range(n)])
    return frames, torch.from_numpy(frames).float().div_(255.0)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {P.default_workers()} usable cores (os.cpu_count={os.cpu_count()}), load avg {load:.1f} at start; "
        f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"OpenCV {cv2.__version__} ({cv2.getNumThreads()} threads), numpy {np.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark ControlStack preprocessors (CPU).")
    parser.add_argument("--quick", action="store_true", help="CI smoke test: tiny sizes, 2 reps")
    parser.add_argument("--frames", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--reps", type=int, default=None, help="repetitions per timing (median reported)")
    parser.add_argument("--only", nargs="*", default=None, help="subset of preprocessor names")
    parser.add_argument("--no-resize", action="store_true", help="skip the fit_image table")
    args = parser.parse_args()
    if args.quick:
        args.frames, args.size = 4, 128
    reps_one = args.reps or (2 if args.quick else 30)
    reps_batch = args.reps or (2 if args.quick else 5)

    frames, batch = make_frames(args.frames, args.size)
    one_u8, one = frames[0], batch[:1].clone()
    mask = torch.zeros(1, args.size, args.size)
    mask[:, args.size // 4 : args.size // 2] = 1.0

    print(f"# ControlStack preprocessors, {datetime.date.today().isoformat()}")
    print(f"# {machine()}")
    print(
        f"# {args.size}^2 frames, batch of {args.frames}; medians of {reps_one} (single) / {reps_batch} (batch) runs\n"
    )
    print(
        f"| preprocessor | fn {args.size}^2 ms | node {args.size}^2 ms | batch {args.frames} ms | loop {args.frames} ms | speedup |"
    )
    print("|---|---:|---:|---:|---:|---:|")

    res = args.size
    cases = {k: v for k, v in CASES.items() if args.only is None or k.split()[0] in args.only}
    for name, (fn, kw) in cases.items():
        t_fn = median_ms(lambda fn=fn, kw=kw: fn(one_u8, **kw), reps_one)
        t_node = median_ms(lambda fn=fn, kw=kw: P.run_preprocessor(fn, one, res, **kw), reps_one)
        t_batch = median_ms(lambda fn=fn, kw=kw: P.run_preprocessor(fn, batch, res, **kw), reps_batch)

        def loop(fn=fn, kw=kw):
            return torch.cat(
                [P.run_preprocessor(fn, batch[i : i + 1], res, workers=1, **kw) for i in range(len(batch))]
            )

        t_loop = median_ms(loop, reps_batch)
        print(
            f"| {name} | {t_fn:.2f} | {t_node:.2f} | {t_batch:.1f} | {t_loop:.1f} | {t_loop / t_batch:.2f}x |",
            flush=True,
        )

    if args.only is None or "inpaint" in args.only:
        # Inpaint takes a mask as well, so it runs through its own entry point (run_inpaint); no bare-function column.
        t_node = median_ms(lambda: P.run_inpaint(one, mask, res), reps_one)
        t_batch = median_ms(lambda: P.run_inpaint(batch, mask, res), reps_batch)
        t_loop = median_ms(
            lambda: torch.cat([P.run_inpaint(batch[i : i + 1], mask, res) for i in range(len(batch))]),
            reps_batch,
        )
        print(f"| inpaint | - | {t_node:.2f} | {t_batch:.1f} | {t_loop:.1f} | {t_loop / t_batch:.2f}x |")

    if not args.no_resize:
        bench_resize(batch, reps_batch)


def bench_resize(batch: torch.Tensor, reps: int) -> None:
    """fit_image on the whole batch (to 1.5x the size, 3:4 portrait) per mode, on the CPU and, if present, CUDA."""
    h = batch.shape[1]
    th, tw = (3 * h) // 2, (9 * h) // 8
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(
        f"\n| fit_image {tuple(batch.shape)} -> {th}x{tw} | " + " | ".join(f"{d} ms" for d in devices) + " |"
    )
    print("|---|" + "---:|" * len(devices))
    for mode in P.RESIZE_MODES:
        cells = []
        for dev in devices:
            x = batch.to(dev)

            def run(x=x, mode=mode, dev=dev):
                P.fit_image(x, tw, th, mode)
                if dev == "cuda":
                    torch.cuda.synchronize()

            cells.append(f"{median_ms(run, reps):.1f}")
        print(f"| {mode} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
