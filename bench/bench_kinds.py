"""Per-step cost of every control kind inside a real ComfyUI 0.3.75 host: none vs built-in vs ControlStack.

One process, one card, the method of bench_controlnet.py (host sampler, euler, CFG batch of 2, one warm-up run, median
of whole runs / steps, CUDA events): per kind, the host without control, ComfyUI's built-in path where the host has
one (T2I-Adapter, Control-LoRA, Union), and ControlStack eager and with CUDA-graph replay (LLLite runs inside the
host's attention layers: eager only). Union with two typed hints compares the built-in's two chained applies
(two forwards) with ControlStack's single multi-condition forward.

    .venv/bin/python bench/bench_kinds.py            # GPU: SD1.5 512^2 (T2I) and SDXL 1024^2 (every kind)
    .venv/bin/python bench/bench_kinds.py --tiny     # CPU smoke test: SD1.5 T2I at 64^2, 2 steps

Random weights in the published layouts (key sets from scripts/make_random_control_files.py), built in memory.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "scripts"))

from bench_controlnet import (  # noqa: E402
    DEFAULT_COMFY,
    apply_builtin,
    conditioning,
    import_host,
    print_table,
    random_,
    random_unet,
    run_case,
    say,
)
from numerics import rel_err  # noqa: E402

UNION_TYPE_A, UNION_TYPE_B = 1, 3  # depth, canny


def random_sd(shapes: dict[str, tuple[int, ...]], device: torch.device, seed: int, up_scale: float = 1.0):
    g = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for k, shape in shapes.items():
        t = random_(torch.empty(shape, device=device), g) if shape else torch.zeros((), device=device)
        sd[k] = t * up_scale if k.endswith(".up") else t
    return sd


SHAPES: dict[str, dict[str, tuple[int, ...]]] = {}
"""Key -> shape sets taken from diffusers classes (T2I-Adapter XL, Union); `--shapes FILE` caches them for machines
without diffusers (the GPU machine)."""


def diffusers_shapes(name: str) -> dict[str, tuple[int, ...]]:
    if name not in SHAPES:
        import make_random_control_files as files

        build = {
            "t2i_xl": files.t2i_sdxl_diffusers_shapes,
            "union": lambda: files.union_shapes(full_size=True),
        }
        SHAPES[name] = build[name]()
    return SHAPES[name]


def load_shapes(path: Path) -> None:
    """Read the shape cache, or write it where diffusers is importable."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        data = json.loads(path.read_text())
        SHAPES.update({k: {n: tuple(s) for n, s in v.items()} for k, v in data.items()})
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({k: diffusers_shapes(k) for k in ("t2i_xl", "union")}))


def cases(comfy_dir: Path, family: str, device: torch.device):
    """(name, state dict builder, union types per apply or None)."""
    import make_random_control_files as files

    if family == "sd1":
        return [
            (
                "T2I-Adapter (full)",
                lambda: random_sd(files.t2i_sd15_shapes(comfy_dir, light=False), device, 1),
                None,
            )
        ]
    return [
        ("T2I-Adapter XL", lambda: random_sd(diffusers_shapes("t2i_xl"), device, 2), None),
        (
            "Control-LoRA r8",
            lambda: random_sd(files.control_lora_shapes(comfy_dir), device, 3, files.CONTROL_LORA_UP_SCALE),
            None,
        ),
        ("Union, 1 hint", lambda: random_sd(diffusers_shapes("union"), device, 4), (UNION_TYPE_A,)),
        (
            "Union, 2 hints",
            lambda: random_sd(diffusers_shapes("union"), device, 4),
            (UNION_TYPE_A, UNION_TYPE_B),
        ),
        ("LLLite", lambda: random_sd(files.lllite_shapes(comfy_dir), device, 5), None),
    ]


class StackTimer:
    """Host-side (CPU wall) time in ControlStack's stack per UNet call: control() plus attention_patch()."""

    def __init__(self) -> None:
        self.durations: list[float] = []

    def __enter__(self):
        from controlstack.controlnet.stack import StackRun

        self.originals = (StackRun.control, StackRun.attention_patch)
        timer = self

        def timed(fn):
            def wrapper(self, *args, **kwargs):
                t0 = time.perf_counter()
                try:
                    return fn(self, *args, **kwargs)
                finally:
                    timer.durations.append(time.perf_counter() - t0)

            return wrapper

        StackRun.control = timed(self.originals[0])
        StackRun.attention_patch = timed(self.originals[1])
        return self

    def __exit__(self, *exc):
        from controlstack.controlnet.stack import StackRun

        StackRun.control, StackRun.attention_patch = self.originals


def bench_family(comfy, comfy_dir, family, size, steps, repeats, device, rows):
    from controlstack.nodes import patcher

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    say(f"{family}: building a random UNet")
    model = random_unet(comfy, family, device, dtype)
    latent = torch.zeros(1, 4, size // 8, size // 8)
    positive, negative = conditioning(family, 1, 1), conditioning(family, 1, 2)
    hints = [torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    label = f"{family} {size}^2"
    say(f"{family}: timing the host without control")
    # twice: the first run of a fresh process also warms the GPU's clocks and the allocator
    run_case(comfy, model, positive, negative, latent, steps, 1, device)
    base_s, base_peak, _ = run_case(comfy, model, positive, negative, latent, steps, repeats, device)
    rows.append({"case": label, "variant": "host, no control", "n": 0, "ms": base_s * 1e3, "ratio": 1.0,
                 "peak_gib": base_peak})  # fmt: skip

    for name, build, union_types in cases(comfy_dir, family, device):
        say(f"{family}: {name}: building the file")
        sd = build()
        n = len(union_types or (None,))
        ref = None
        if "LLLite" not in name:
            pos, neg = positive, negative
            cn = comfy.controlnet.load_controlnet_state_dict({k: v.clone() for k, v in sd.items()})
            for i in range(n):
                c = cn.copy()
                if union_types:
                    c.set_extra_arg("control_type", [union_types[i]])
                pos, neg = apply_builtin(pos, neg, c, hints[i], 1.0, 0.0, 1.0)
            say(f"{family}: {name}: built-in")
            s, peak, ref = run_case(comfy, model, pos, neg, latent, steps, repeats, device)
            rows.append({"case": label, "variant": f"{name}: built-in", "n": n, "ms": s * 1e3, "ratio": s / base_s,
                         "peak_gib": peak})  # fmt: skip
            del pos, neg, cn, c
        host_cn = patcher.load_host_controlnet(sd, name=f"random {name}", base_model=model)
        patched = model
        for i in range(n):
            typed = host_cn
            if union_types:
                # the built-in's maths (no latent token) so the two are comparable number for number
                typed = patcher.with_union_type(host_cn, union_types[i], latent_token=False)
            entry = {"hint": hints[i].movedim(-1, 1).contiguous(), "label": f"{name} {i}"}
            patched = patcher.apply_hint(patched, typed, entry)
        wrapper = patched.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, patcher.KEY)[0]
        modes = [("ControlStack eager", False)]
        if device.type == "cuda" and "LLLite" not in name:
            modes.append(("ControlStack + CUDA graphs", True))
        for variant, graphs in modes:
            wrapper.use_cuda_graphs = graphs
            say(f"{family}: {name}: {variant}")
            with StackTimer() as timer:
                s, peak, out = run_case(comfy, patched, positive, negative, latent, steps, repeats, device)
            row = {"case": label, "variant": f"{name}: {variant}", "n": n, "ms": s * 1e3, "ratio": s / base_s,
                   "peak_gib": peak, "host_ms_per_cn": statistics.median(timer.durations) * 1e3 / n}  # fmt: skip
            if ref is not None:
                row["rel_err_vs_builtin"] = rel_err(out, ref)
            rows.append(row)
        del patched, wrapper, host_cn, sd
        comfy.model_management.unload_all_models()
        comfy.model_management.soft_empty_cache()
    say(f"{family}: the host without control again (drift check)")
    again_s, _, _ = run_case(comfy, model, positive, negative, latent, steps, repeats, device)
    rows.append({"case": label, "variant": "host, no control (again, at the end)", "n": 0, "ms": again_s * 1e3,
                 "ratio": again_s / base_s, "peak_gib": float("nan")})  # fmt: skip
    del model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--comfy-dir", type=Path, default=Path(os.environ.get("CONTROLSTACK_COMFY_DIR", DEFAULT_COMFY))
    )
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: SD1.5 T2I at 64^2, 2 steps")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument(
        "--shapes", type=Path, help="diffusers key/shape cache: written where diffusers is installed"
    )
    p.add_argument("--only-shapes", action="store_true", help="write the --shapes cache and exit")
    args = p.parse_args(argv)
    if args.shapes:
        load_shapes(args.shapes)
        if args.only_shapes:
            return 0

    torch.manual_seed(0)
    comfy = import_host(args.comfy_dir)
    device = comfy.model_management.get_torch_device()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows: list[dict] = []
    plan = [("sd1", 64, 2, 1)] if args.tiny else [("sd1", 512, args.steps, args.repeats),
                                                   ("sdxl", 1024, args.steps, args.repeats)]  # fmt: skip
    for family, size, steps, repeats in plan:
        bench_family(comfy, args.comfy_dir, family, size, steps, repeats, device, rows)
        print_table(rows, device_name)
        if args.json:
            args.json.write_text(json.dumps({"device": device_name, "date": time.strftime("%Y-%m-%d"),
                                             "torch": torch.__version__, "rows": rows}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
