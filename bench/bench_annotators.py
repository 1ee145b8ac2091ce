"""Benchmark the weight-based annotators: ours vs the reference (controlnet_aux / transformers) on the same weights.

Prints a markdown table of medians (ms) per network:

- ``ours 1``: one 512^2 frame through the node's path (``run_annotator``: to uint8, pad to 64s, one batched
  forward per chunk of 8 frames, post-processing, back to a float tensor), network already loaded.
- ``ref 1``: the reference detector (``scripts/annotator_refs``: controlnet_aux 0.0.10's detector classes, or
  transformers' Depth Anything V2 with the authors' transforms) on the same frame and weights, frame-by-frame as
  the reference runs. The reference helpers build their network from the state dict on each call; that build is
  timed alone (the same call on zero frames) and subtracted, so only the detection counts.
- ``ours 16`` / ``ref 16``: a 16-frame batch (distinct frames); ``1 ratio`` / ``16 ratio``: ref / ours.
- On a CUDA machine, also ours on the GPU in fp32 and fp16 (1 and 16 frames).

Weights are the seeded random ones in the published layouts (the same as the unit tests), so times are real but
the hints are noise. Usage: ``python bench/bench_annotators.py [--quick] [--only hed midas ...] [--reps N]``.
``--quick``: 128^2 frames, batches of 2, one repetition (checks that every case runs; times mean nothing).
Needs the test-only references (``scripts/setup.sh`` installs them). Never asserted in tests; recorded numbers
are in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
sys.path.insert(0, str(REPO / "bench"))

from bench_preprocessors import machine, median_ms  # noqa: E402  (the weight-free table's timing and machine line)
from controlstack.preprocessors.annotators import openpose  # noqa: E402
from controlstack.preprocessors.annotators.common import read_state_dict  # noqa: E402
from controlstack.preprocessors.annotators.run import run_annotator  # noqa: E402


@dataclass(frozen=True)
class Case:
    module: str  # preprocessors/annotators/<module>.py and scripts/annotator_refs/<module>.py
    file: str  # published file name (selects the variant where one module has several)
    ours: dict = field(default_factory=dict)  # detect options (the node's defaults)
    ref: dict = field(default_factory=dict)  # reference_detect options for the same output
    seed_kw: dict = field(default_factory=dict)  # published_state_dict options


CASES: dict[str, Case] = {
    "HED": Case("hed", "ControlNetHED.pth"),
    "PiDiNet (safe)": Case("pidinet", "table5_pidinet.pth", {"safe": True}, {"safe": True}),
    "lineart realistic": Case("lineart", "sk_model.pth"),
    "lineart anime": Case("lineart_anime", "netG.pth"),
    "M-LSD": Case("mlsd", "mlsd_large_512_fp32.pth"),
    "MiDaS DPT-Hybrid": Case("midas", "dpt_hybrid-midas-501f0c75.pt"),
    "Depth Anything V2 small": Case("depth_anything", "depth_anything_v2_vits.pth"),
    "OpenPose body": Case("openpose", "body_pose_model.pth"),
}


def make_frames(n: int, size: int) -> np.ndarray:
    """n distinct size^2 RGB uint8 frames (the repo's photo, shifted per frame)."""
    photo = cv2.cvtColor(
        cv2.imread(str(REPO / "workflows" / "inputs" / "controlstack_photo.png")), cv2.COLOR_BGR2RGB
    )
    side = min(photo.shape[:2])
    photo = cv2.resize(photo[:side, :side], (size, size), interpolation=cv2.INTER_AREA)
    return np.stack([np.roll(photo, 8 * i, axis=1) for i in range(n)])


def load(case: Case, folder: Path) -> tuple[object, dict, Callable]:
    """(our network, the published state dict, our detect function) for a case; the file goes through disk and
    our loader, as in the node."""
    ref = importlib.import_module(f"annotator_refs.{case.module}")
    ours = importlib.import_module(f"controlstack.preprocessors.annotators.{case.module}")
    sd = ref.published_state_dict(0, **case.seed_kw)
    path = folder / case.file
    torch.save(sd, path)
    net = ours.build(read_state_dict(str(path), case.file), case.file)
    if case.module == "openpose":

        def detect(n, x, **kw):
            return openpose.detect_pose(n, None, None, x, **kw)[0]
    else:
        detect = ours.detect
    return net, sd, detect


def reference_call(case: Case, sd: dict) -> Callable[[list[np.ndarray]], object]:
    ref = importlib.import_module(f"annotator_refs.{case.module}")
    if case.module == "openpose":
        return lambda frames: ref.reference_detect({"body": sd}, frames, **case.ref)
    return lambda frames: ref.reference_detect(sd, frames, **case.ref)


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Benchmark ControlStack's weight-based annotators vs the reference."
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 128^2, batches of 2, one repetition"
    )
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--reps", type=int, default=None, help="repetitions per timing (median reported)")
    parser.add_argument("--only", nargs="*", default=None, help="subset of modules (hed pidinet midas ...)")
    parser.add_argument("--no-reference", action="store_true", help="time ours only")
    parser.add_argument(
        "--chunk", type=int, default=None, help="frames per forward (default: the node's choice)"
    )
    args = parser.parse_args()
    if args.quick:
        args.size, args.frames = 128, 2
    reps_one = args.reps or (1 if args.quick else 3)
    reps_batch = args.reps or 1
    frames = make_frames(args.frames, args.size)
    batch = torch.from_numpy(frames).float().div_(255.0)
    cuda = torch.cuda.is_available()

    print(f"# ControlStack annotators vs reference, {datetime.date.today().isoformat()}")
    print(f"# {machine()}" + (f"; GPU {torch.cuda.get_device_name()}" if cuda else "; no GPU"))
    print(
        f"# {args.size}^2 frames, batch of {args.frames}; medians of {reps_one} (1 frame) / {reps_batch} "
        "(batch) runs; seeded random weights in the published layouts\n"
    )
    gpu_cols = " gpu fp32 1 | gpu fp16 1 | gpu fp32 16 | gpu fp16 16 |" if cuda else ""
    print(
        f"| network | ours 1 ms | ref 1 ms | 1 ratio | ours {args.frames} ms | ref {args.frames} ms | {args.frames} ratio |{gpu_cols}"
    )
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|" * 4 if cuda else ""))

    cases = {k: v for k, v in CASES.items() if args.only is None or v.module in args.only}
    with tempfile.TemporaryDirectory() as tmp:
        for name, case in cases.items():
            net, sd, detect = load(case, Path(tmp))
            torch.set_grad_enabled(False)

            def ours(images, net=net, detect=detect, case=case, device="cpu"):
                return run_annotator(
                    lambda x: detect(net, x, **case.ours), images, args.size, device=device, chunk=args.chunk
                )

            t_one = median_ms(lambda: ours(batch[:1]), reps_one)
            t_many = median_ms(lambda: ours(batch), reps_batch)
            cells = [f"{t_one:.0f}", "-", "-", f"{t_many:.0f}", "-", "-"]
            if not args.no_reference:
                call = reference_call(case, sd)
                t_build = median_ms(lambda call=call: call([]), reps_one, warmup=0)
                r_one = median_ms(lambda call=call: call(list(frames[:1])), reps_one) - t_build
                r_many = median_ms(lambda call=call: call(list(frames)), reps_batch) - t_build
                cells = [
                    f"{t_one:.0f}",
                    f"{r_one:.0f}",
                    f"{r_one / t_one:.2f}x",
                    f"{t_many:.0f}",
                    f"{r_many:.0f}",
                    f"{r_many / t_many:.2f}x",
                ]
            if cuda:
                for dtype in (torch.float32, torch.float16):
                    gpu_net = net.to("cuda", dtype)

                    def on_gpu(images, gpu_net=gpu_net):
                        out = ours(images, net=gpu_net, device="cuda")
                        torch.cuda.synchronize()
                        return out

                    cells.append(f"{median_ms(lambda: on_gpu(batch[:1]), reps_one):.1f}")
                    cells.append(f"{median_ms(lambda: on_gpu(batch), reps_one):.1f}")
                cells[-4:] = [cells[-4], cells[-2], cells[-3], cells[-1]]  # fp32 1, fp16 1, fp32 16, fp16 16
                net.to("cpu", torch.float32)
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
