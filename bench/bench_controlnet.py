"""Per-step cost of stacked ControlNets inside a real ComfyUI 0.3.75 host: none vs built-in vs ControlStack.

One process, one card: the host without ControlNets, the host's built-in ControlNet path (ControlNetApplyAdvanced),
and ControlStack (eager, and with CUDA-graph replay — the default on CUDA) sample the same random full-size models
with the host's own sampler (euler, CFG batch of 2). Per-step time is the median over repeats of a whole sampling
run divided by its steps, timed with CUDA events after a warm-up run; the table prints ms/step, the ratio to the
host without ControlNets, peak GPU memory, and ControlStack's host-side (Python) time per ControlNet per step (the
median over calls, timed after the warm-up run). ControlStack's graph cache outlives a run, so only the warm-up run
captures: its extra time over a timed run is the "first run" column. The "+ report" rows sample with the Sampler
node's control report recorder (the report is measured inside the replayed step) and give its latent's difference
to the same stack sampled without the report (0 expected).

    .venv/bin/python bench/bench_controlnet.py            # GPU: SD1.5 512^2 (N = 1, 2, 3) and SDXL 1024^2 (N = 1, 2)
    .venv/bin/python bench/bench_controlnet.py --tiny     # CPU smoke test: SD1.5 at 64^2, 2 steps, N = 2

Models are seeded random weights built in memory (nothing downloaded, nothing written).
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
DEFAULT_COMFY = REPO / ".host" / "comfyui"
sys.path.insert(0, str(REPO / "scripts"))
from numerics import rel_err  # noqa: E402  (scripts/numerics.py: the comparison the tests assert on)

SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}  # fmt: skip
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}  # fmt: skip


def import_host(comfy_dir: Path):
    """Import ComfyUI's modules in this process (CPU mode when there is no GPU)."""
    sys.path.insert(0, str(comfy_dir))
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True
    import comfy.controlnet
    import comfy.model_management
    import comfy.patcher_extension
    import comfy.sample
    import comfy.sd

    return comfy


def apply_builtin(positive, negative, control_net, image, strength, start, end):
    """What ComfyUI's ControlNetApplyAdvanced node does (nodes.py), without importing nodes.py (and its video deps)."""
    hint = image.movedim(-1, 1)
    out, cnets = [], {}
    for conditioning in (positive, negative):
        c = []
        for t in conditioning:
            d = t[1].copy()
            prev = d.get("control", None)
            if prev in cnets:
                c_net = cnets[prev]
            else:
                c_net = control_net.copy().set_cond_hint(hint, strength, (start, end))
                c_net.set_previous_controlnet(prev)
                cnets[prev] = c_net
            d["control"] = c_net
            d["control_apply_to_uncond"] = False
            c.append([t[0], d])
        out.append(c)
    return out[0], out[1]


T0 = time.perf_counter()


def say(msg: str) -> None:
    print(f"[bench {time.perf_counter() - T0:7.1f} s] {msg}", file=sys.stderr, flush=True)


def random_(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    if t.ndim >= 2:
        fan_in = t[0].numel()
        return t.normal_(0, fan_in**-0.5, generator=g)
    return t.normal_(0, 0.01, generator=g)


def random_unet(comfy, family: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A host MODEL (ModelPatcher) with seeded random weights, detected by the host like a real checkpoint."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    config = SD15_UNET if family == "sd1" else SDXL_UNET
    with torch.device("meta"):
        shell = UNetModel(**config, operations=comfy.ops.disable_weight_init)
    g = torch.Generator(device=device).manual_seed(seed)
    sd = {k: random_(torch.empty(v.shape, device=device), g).to(dtype) for k, v in shell.state_dict().items()}
    del shell
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": dtype})
    del sd
    return model


def random_controlnet_sd(family: str, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """A full-size ControlNet state dict (bare ldm layout), every tensor random (zero convs too)."""
    from controlstack.controlnet import build_controlnet
    from controlstack.controlnet.config import preset

    shell = build_controlnet(preset(family), device="meta")
    g = torch.Generator(device=device).manual_seed(seed)
    return {k: random_(torch.empty(v.shape, device=device), g) for k, v in shell.state_dict().items()}


def conditioning(family: str, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ctx = 768 if family == "sd1" else 2048
    extra = {"pooled_output": torch.randn(batch, 1280, generator=g)} if family == "sdxl" else {}
    return [[torch.randn(batch, 77, ctx, generator=g), extra]]


class Timer:
    """Host-side time spent in ControlStack's stack per call (CPU wall, no device sync)."""

    def __init__(self) -> None:
        self.durations: list[float] = []

    def install(self):
        from controlstack.controlnet.stack import StackRun

        original = StackRun.control
        timer = self

        def timed(self, *args, **kwargs):
            t0 = time.perf_counter()
            out = original(self, *args, **kwargs)
            timer.durations.append(time.perf_counter() - t0)
            return out

        StackRun.control = timed
        return original


def run_case(comfy, model, positive, negative, latent, steps, repeats, device, seed=1):
    """Median seconds per step of a whole sampling run (after one warm-up run), and peak memory."""
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))

    def sample():
        return comfy.sample.sample(
            model, noise, steps, 6.0, "euler", "normal", positive, negative, latent, denoise=1.0,
            disable_pbar=True, seed=seed,
        )  # fmt: skip

    t0 = time.perf_counter()
    out = sample()  # warm-up: loads weights, captures graphs, autotunes
    if device.type == "cuda":
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = sample()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            t0 = time.perf_counter()
            out = sample()
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    run_s = statistics.median(times)
    return run_s / steps, peak, out, first_s - run_s


def bench_family(comfy, family, size, steps, counts, repeats, device, rows):
    from controlstack.nodes import patcher

    dtype = torch.float16 if device.type == "cuda" else torch.float32
    say(f"{family}: building a random UNet")
    model = random_unet(comfy, family, device, dtype)
    latent = torch.zeros(1, 4, size // 8, size // 8)
    positive, negative = conditioning(family, 1, 1), conditioning(family, 1, 2)
    hint = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(3))
    sds = [random_controlnet_sd(family, device, 10 + i) for i in range(max(counts))]
    label = f"{family} {size}^2"

    say(f"{family}: timing the host without ControlNets")
    base_s, base_peak, _, _ = run_case(comfy, model, positive, negative, latent, steps, repeats, device)
    rows.append({"case": label, "variant": "host, no ControlNet", "n": 0, "ms": base_s * 1e3, "ratio": 1.0,
                 "peak_gib": base_peak})  # fmt: skip

    for n in counts:
        # built-in: ControlNetApplyAdvanced chained n times
        pos, neg = positive, negative
        for i in range(n):
            cn = comfy.controlnet.load_controlnet_state_dict({k: v.clone() for k, v in sds[i].items()})
            pos, neg = apply_builtin(pos, neg, cn, hint, 1.0, 0.0, 1.0)
        say(f"{family}: built-in x{n}")
        s, peak, ref, _ = run_case(comfy, model, pos, neg, latent, steps, repeats, device)
        rows.append({"case": label, "variant": "ComfyUI built-in", "n": n, "ms": s * 1e3, "ratio": s / base_s,
                     "peak_gib": peak})  # fmt: skip
        del pos, neg, cn

        # ControlStack: ApplyHint chained n times; eager and CUDA-graph replay
        patched = model
        for i in range(n):
            host_cn = patcher.load_host_controlnet(sds[i], name=f"random_{family}_{i}")
            entry = {"hint": hint.movedim(-1, 1).contiguous(), "label": f"cn{i}"}
            patched = patcher.apply_hint(patched, host_cn, entry)
        wrapper = patched.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, patcher.KEY)[0]
        eager_out = None
        plain_out: dict[bool, torch.Tensor] = {}
        modes = [("ControlStack eager", False, False)]
        if device.type == "cuda":
            modes.append(("ControlStack + CUDA graphs", True, False))
        modes.append((modes[-1][0] + " + report", modes[-1][1], True))
        for name, graphs, report in modes:
            wrapper.use_cuda_graphs = graphs
            say(f"{family}: {name} x{n}")
            sampled = patched
            if report:  # what the Sampler node does (patcher.sample_with_report), kept for every run
                from controlstack.controlnet.report import StackRecorder

                sampled = patched.clone()
                options = sampled.model_options.setdefault("transformer_options", {})
                options[patcher.OBSERVER_OPTION] = StackRecorder(n)
            timer = Timer()
            original = timer.install()
            try:
                s, peak, out, first = run_case(
                    comfy, sampled, positive, negative, latent, steps, repeats, device
                )
            finally:
                from controlstack.controlnet.stack import StackRun

                StackRun.control = original
            # median over calls = the steady state (each run's first call warms up and its second captures)
            host_ms = statistics.median(timer.durations) * 1e3 if timer.durations else float("nan")
            err = rel_err(out, ref)
            row = {"case": label, "variant": name, "n": n, "ms": s * 1e3, "ratio": s / base_s, "peak_gib": peak,
                   "host_ms_per_cn": host_ms / n, "rel_err_vs_builtin": err, "first_run_extra_s": first}  # fmt: skip
            if report:
                row["rel_err_vs_no_report"] = rel_err(out, plain_out[graphs])
            else:
                plain_out[graphs] = out
            if eager_out is None:
                eager_out = out
            elif not report:
                row["rel_err_vs_eager"] = rel_err(out, eager_out)
            rows.append(row)
        del patched, wrapper
    del model, sds
    comfy.model_management.unload_all_models()
    comfy.model_management.soft_empty_cache()


def print_table(rows, device_name):
    print(
        f"\nControlStack benchmark on {device_name}, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}"
    )
    head = f"| {'case':<10} | {'variant':<36} | {'N':>2} | {'ms/step':>8} | {'ratio':>6} | {'peak GiB':>8} | {'host ms/CN/step':>15} | {'first run +s':>12} | {'rel err vs built-in':>30} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        host = f"{r['host_ms_per_cn']:.3f}" if "host_ms_per_cn" in r else ""
        err = f"{r['rel_err_vs_builtin']:.2e}" if "rel_err_vs_builtin" in r else ""
        if "rel_err_vs_eager" in r:
            err += f" ({r['rel_err_vs_eager']:.1e} vs eager)"
        if "rel_err_vs_no_report" in r:
            err += f" ({r['rel_err_vs_no_report']:.1e} vs no report)"
        first = f"{r['first_run_extra_s']:.2f}" if "first_run_extra_s" in r else ""
        print(f"| {r['case']:<10} | {r['variant']:<36} | {r['n']:>2} | {r['ms']:>8.2f} | {r['ratio']:>6.3f} | "
              f"{r['peak_gib']:>8.2f} | {host:>15} | {first:>12} | {err:>30} |")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--comfy-dir", type=Path, default=Path(os.environ.get("CONTROLSTACK_COMFY_DIR", DEFAULT_COMFY))
    )
    p.add_argument("--tiny", action="store_true", help="CPU smoke test: SD1.5 at 64^2, 2 steps, N = 2")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-sdxl", action="store_true")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    comfy = import_host(args.comfy_dir)

    device = comfy.model_management.get_torch_device()
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows: list[dict] = []
    if args.tiny:
        plan = [("sd1", 64, 2, (2,), 1)]
    else:
        plan = [("sd1", 512, args.steps, (1, 2, 3), args.repeats)]
        if not args.skip_sdxl:
            plan.append(("sdxl", 1024, args.steps, (1, 2), args.repeats))
    for family, size, steps, counts, repeats in plan:
        bench_family(comfy, family, size, steps, counts, repeats, device, rows)
        print_table(rows, device_name)  # after each family: a later failure keeps what was measured
        if args.json:
            result = {
                "device": device_name,
                "date": time.strftime("%Y-%m-%d"),
                "torch": torch.__version__,
                "rows": rows,
            }
            args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
