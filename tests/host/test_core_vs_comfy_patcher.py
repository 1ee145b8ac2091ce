"""The patcher (nodes/patcher.py) inside ComfyUI's own sampler, imported (no server).

- ``merge_control``: ControlStack's per-call control merged into a ``control`` dict the built-in ControlNet path
  already made, with numbers (sums per slot, None slots, the pop order of "input", new lists).
- Run state: a sampling run's ``StackRun`` reaches every UNet call of THAT run through the guider's per-run
  ``transformer_options`` (hints encoded once per run, nothing kept on the stack or the MODEL), the control report's
  observer is per MODEL clone and sees only its own runs, and a UNet call made outside any sampling run falls back
  to a one-call run with the same numbers.

The MODEL is a small SD1.x-family UNet (one level, SD1.5's widths, so the family check passes) with random weights,
built with ComfyUI's own classes; the ControlNet has the same layout, every weight random (zero convs too).
"""

from __future__ import annotations

import sys

import host
import pytest
import torch

sys.path.insert(0, str(host.resolve_comfy_dir()))
from comfy.cli_args import args  # noqa: E402

args.cpu = True
import comfy.model_base  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.patcher_extension  # noqa: E402
import comfy.supported_models  # noqa: E402
from controlstack.controlnet import ControlNetConfig, build_controlnet  # noqa: E402
from controlstack.controlnet.stack import StepControl  # noqa: E402
from controlstack.nodes import patcher  # noqa: E402

sys.path.insert(0, str(host.REPO / "tests" / "unit"))
from cn_helpers import randomize_  # noqa: E402

CPU = torch.device("cpu")
UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [1],
    "transformer_depth": [1], "channel_mult": [1], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1], "use_temporal_attention": False, "use_temporal_resblock": False,
}  # fmt: skip
STEPS = 2
SAMPLE = {"seed": 3, "steps": STEPS, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal"}


# -- merge_control ------------------------------------------------------------------------------------------------


def full(value: float, dtype=torch.float32) -> torch.Tensor:
    return torch.full((1, 2, 2, 2), value, dtype=dtype)


def values(tensors: list) -> list:
    return [None if t is None else t.flatten()[0].item() for t in tensors]


def test_merge_control_without_builtin_control():
    step = StepControl(output=[full(1), None, full(3)], input=[None, None, None], middle=full(9))
    merged = patcher.merge_control(None, step)
    assert set(merged) == {"output", "middle"}, "no input-path entries: no 'input' list"
    assert values(merged["output"]) == [1, None, 3] and values(merged["middle"]) == [9]
    assert merged["output"] is not step.output, "a new list: the UNet pops from it"
    assert values(patcher.merge_control({}, step)["output"]) == [1, None, 3], "an empty dict is no control"


def test_merge_control_input_is_reversed_for_the_unets_pops():
    """control["input"] is popped from the end after each input block: block 0's tensor must be last."""
    step = StepControl(output=[None, None, None], input=[full(10), None, full(30)], middle=None)
    merged = patcher.merge_control(None, step)
    assert values(merged["input"]) == [30, None, 10]
    assert values(merged["middle"]) == [None]


def test_merge_control_sums_with_the_builtin_per_slot():
    """Slot by slot: both present -> sum (ours cast to the built-in's dtype), one None -> the other; lists of
    different lengths are padded with the longer one's tensors; keys of either side are kept."""
    builtin = {
        "output": [full(0.5, torch.float16), full(0.25, torch.float16), None, full(7, torch.float16)],
        "middle": [full(100)],
        "input": [full(-1)],  # a built-in T2I-Adapter
    }
    before = {k: list(v) for k, v in builtin.items()}
    step = StepControl(output=[full(1), None, full(3)], input=[full(10), full(20)], middle=full(9))
    merged = patcher.merge_control(builtin, step)
    assert values(merged["output"]) == [1.5, 0.25, 3, 7]
    assert merged["output"][0].dtype == torch.float16, "summed in the built-in's dtype"
    assert values(merged["middle"]) == [109]
    assert values(merged["input"]) == [19, 10], "ours reversed (20, 10), summed with the built-in's pop order"
    for key in builtin:  # the built-in's lists are neither emptied nor changed, the merged ones are new
        assert builtin[key] == before[key] and merged[key] is not builtin[key]
    assert merged["output"][1] is builtin["output"][1]  # a slot only the built-in fills is its tensor as is


def test_merge_control_keeps_builtin_keys_we_do_not_fill():
    builtin = {"output": [None, full(2)], "middle": [None], "extra": [full(4)]}
    step = StepControl(output=[full(1), None], input=[None, None], middle=full(5))
    merged = patcher.merge_control(builtin, step)
    assert (
        values(merged["output"]) == [1, 2]
        and values(merged["middle"]) == [5]
        and values(merged["extra"]) == [4]
    )


# -- run state through ComfyUI's sampler ---------------------------------------------------------------------------


class Encodes:
    """Counts hint encodings and forwards of a ControlNet (test-side: forward hooks)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.encode = self.forward = 0
        module.input_hint_block.register_forward_pre_hook(lambda *_: setattr(self, "encode", self.encode + 1))
        module.register_forward_pre_hook(lambda *_: setattr(self, "forward", self.forward + 1))

    def reset(self) -> None:
        self.encode = self.forward = 0


@pytest.fixture(scope="module")
def setup():
    base = comfy.model_base.BaseModel(comfy.supported_models.SD15(UNET), device=CPU)
    randomize_(base.diffusion_model, seed=1)
    model = comfy.model_patcher.ModelPatcher(base, load_device=CPU, offload_device=CPU)
    config = ControlNetConfig(
        "sd1",
        model_channels=320,
        context_dim=768,
        channel_mult=(1,),
        num_res_blocks=(1,),
        transformer_depth=(1,),
        transformer_depth_middle=1,
    )
    cn = randomize_(build_controlnet(config, name="tiny"), seed=2).eval().requires_grad_(False)
    counter = Encodes(cn)
    host_cn = patcher.HostControlNet(
        cn, comfy.model_patcher.ModelPatcher(cn, load_device=CPU, offload_device=CPU), "tiny.safetensors"
    )
    hint = torch.rand(1, 3, 48, 48, generator=torch.Generator().manual_seed(4))  # fitted to 64x64 per run
    patched = patcher.apply_hint(model, host_cn, {"hint": hint, "strength": 0.8, "label": "7"})
    g = torch.Generator().manual_seed(5)
    conds = {
        "positive": [[torch.randn(1, 77, 768, generator=g), {}]],
        "negative": [[torch.randn(1, 77, 768, generator=g), {}]],
        "latent": {"samples": torch.zeros(1, 4, 8, 8)},
    }
    return model, patched, counter, conds


@pytest.fixture(scope="module")
def controlled(setup):
    """One KSampler run of the patched MODEL: (latent, ControlNet forwards, hint encodings) during it."""
    _, patched, counter, conds = setup
    counter.reset()
    out = patcher.ksample(patched, **SAMPLE, **conds)["samples"]
    return out, counter.forward, counter.encode


def test_each_sampling_run_reaches_its_unet_calls_and_leaves_nothing_behind(setup, controlled):
    model, patched, counter, conds = setup
    out, forwards, encodes = controlled
    # cond + uncond in one UNet call per step: one forward per step, ONE hint encoding for the whole run (a call
    # without the run would fall back to a one-call run and encode again)
    assert (forwards, encodes) == (STEPS, 1)
    wrapper = patched.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, patcher.KEY)[0]
    assert vars(wrapper.stack).keys() == {"entries"}, "the shared stack holds no run state"
    for options in (patched.model_options, model.model_options):
        assert patcher.RUN_OPTION not in options.get("transformer_options", {})
        assert patcher.OBSERVER_OPTION not in options.get("transformer_options", {})
    counter.reset()
    again = patcher.ksample(patched, **SAMPLE, **conds)["samples"]
    assert torch.equal(again, out) and counter.encode == 1, "a second run starts from scratch, same numbers"


def test_the_observer_belongs_to_one_model_clone_and_the_report_matches_it(setup, controlled):
    _, patched, _, conds = setup
    plain = controlled[0]  # the same MODEL sampled without an observer
    seen = []
    observed = patched.clone()
    observed.model_options.setdefault("transformer_options", {})[patcher.OBSERVER_OPTION] = (
        lambda idx, sigma, magnitudes, strength: seen.append((idx, sigma, magnitudes.tolist()))
    )
    watched = patcher.ksample(observed, **SAMPLE, **conds)["samples"]
    assert torch.equal(watched, plain), "observing changes nothing"
    assert [s[0] for s in seen] == [0] * STEPS
    sigmas = [s[1] for s in seen]
    assert sigmas == sorted(sigmas, reverse=True) and len(set(sigmas)) == STEPS
    latent, (table,), _ = patcher.sample_with_report(patched, **SAMPLE, **conds)
    assert len(seen) == STEPS, "a run of another clone (same wrapper, same stack) never reaches this observer"
    assert torch.equal(latent["samples"], plain)
    assert patcher.OBSERVER_OPTION not in patched.model_options.get("transformer_options", {}), (
        "report: a clone"
    )
    assert table.shape == (3, STEPS)  # 2 input blocks + the middle block, one column per step
    for col, (_, _, means) in enumerate(seen):
        assert means and min(means) > 0, "the ControlNet applied something: the comparison can fail"
        assert table[:, col].tolist() == pytest.approx(means, rel=1e-6)


def test_a_unet_call_outside_a_sampling_run_falls_back_to_a_one_call_run(setup):
    """No OUTER_SAMPLE (a node driving the UNet itself): the same numbers as inside a run, hint encoded per call."""
    model, patched, counter, _ = setup
    wrapper = patched.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, patcher.KEY)[0]
    g = torch.Generator().manual_seed(6)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 768, generator=g)
    sigma = torch.full((2,), 3.0)
    # the patched MODEL's wrappers in the call's options, as sampler_helpers.prepare_model_patcher puts them, but
    # no sampling run (no OUTER_SAMPLE): e.g. a custom sampler that prepares the model and drives the UNet itself
    options = {"cond_or_uncond": [1, 0]}
    comfy.patcher_extension.merge_nested_dicts(
        options.setdefault("wrappers", {}), patched.wrappers, copy_dict1=False
    )
    base = patched.model
    with torch.no_grad():
        counter.reset()
        outside = base.apply_model(x, sigma, c_crossattn=ctx, transformer_options=options)
        assert counter.encode == 1
        run = wrapper.stack.begin_run(base.model_sampling.percent_to_sigma, hint_fitter=wrapper._fit_quietly)
        inside = base.apply_model(
            x, sigma, c_crossattn=ctx, transformer_options={**options, patcher.RUN_OPTION: run}
        )
        base.apply_model(x, sigma, c_crossattn=ctx, transformer_options={**options, patcher.RUN_OPTION: run})
        run.end()
        assert counter.encode == 2, "inside the run: encoded once for two calls"
        no_control = model.model.apply_model(
            x, sigma, c_crossattn=ctx, transformer_options={"cond_or_uncond": [1, 0]}
        )
    assert torch.equal(outside, inside)
    assert (outside - no_control).abs().mean() > 1e-3


def test_graphs_outlive_a_sampling_run_and_go_when_the_host_unloads_the_model(setup, controlled):
    """Through ComfyUI's own KSampler: the MODEL's graph cache (here with the unit tests' replaying stand-in, on the
    CPU) captures in run 1 and replays every step of run 2, both with the plain run's latent (the light detach that
    the host's load_models_gpu does at each run keeps it), and is dropped when the host unloads the MODEL, as
    free_memory does to make room."""
    from controlstack.controlnet.graphs import StepGraphs
    from test_graphs import TapeCapture

    model, patched, _, conds = setup
    plain = controlled[0]
    entry = patched.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, patcher.KEY)[
        0
    ].stack.entries[0]
    cn = entry.controlnet
    host_cn = patcher.HostControlNet(
        cn, comfy.model_patcher.ModelPatcher(cn, load_device=CPU, offload_device=CPU), "tiny.safetensors"
    )
    graphed = patcher.apply_hint(model, host_cn, {"hint": entry.hint, "strength": 0.8, "label": "7"})
    wrapper = graphed.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, patcher.KEY)[0]
    capture = TapeCapture()
    wrapper.graphs = StepGraphs(capture, device_types=("cpu",))
    first = patcher.ksample(graphed, **SAMPLE, **conds)["samples"]
    assert torch.equal(first, plain) and len(capture.captured) == 1 and capture.replays == STEPS - 1
    second = patcher.ksample(graphed, **SAMPLE, **conds)["samples"]
    assert torch.equal(second, plain)
    assert len(capture.captured) == 1 and capture.replays == 2 * STEPS - 1, (
        "run 2 replayed from its first step"
    )
    assert len(wrapper.graphs) == 1 and not wrapper.graphs.in_use
    graphed.detach()  # unpatch_all=True: what the host's free_memory / unload_all_models do to a loaded MODEL
    assert len(wrapper.graphs) == 0, "unloaded: the graphs are dropped"


def test_the_compiled_path_through_the_host_sampler(setup, controlled):
    """CONTROLSTACK_COMPILE's path (the wrapper's CompiledForwards, here with the unit tests' counting backend):
    the KSampler latent equals the eager one, compiled once and reused by the second run."""
    from controlstack.controlnet.compiled import CompiledForwards
    from test_compiled import CountingBackend

    torch._dynamo.reset()
    _, patched, _, conds = setup
    wrapper = patched.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, patcher.KEY)[0]
    backend = CountingBackend()
    wrapper.compiled = CompiledForwards(backend)
    try:
        for _ in range(2):
            out = patcher.ksample(patched, **SAMPLE, **conds)["samples"]
            assert torch.equal(out, controlled[0])
        assert backend.compiles == 1
    finally:
        wrapper.compiled = None
