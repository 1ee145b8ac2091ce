"""The patcher: the ONLY module of ControlStack that touches ComfyUI internals.

It hooks a ControlStack `ResidualStack` into the host's frozen UNet through public ModelPatcher hooks, never by
monkeypatching:

- an APPLY_MODEL wrapper (key "controlstack") computes the stack's residuals for each UNet call and hands them to the
  UNet as its `control` argument (merged with any `control` the built-in ControlNet path already supplies); the
  UNet adds them to its skip connections and middle block (`apply_control` in openaimodel.py);
- an OUTER_SAMPLE wrapper brackets each sampling run: the stack maps start/end percents to noise levels with the
  model's own schedule, fits and encodes each hint once, and frees its buffers at the end;
- the ControlNets are ModelPatchers registered with `set_additional_models`, so the host's model management loads,
  casts and offloads them together with the model (`--lowvram`, offload keep working).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import torch

from ..controlnet import ControlNetError, load_controlnet
from ..controlnet.stack import ResidualStack, StackEntry
from ..preprocessors.resize import fit_image, fit_mask

log = logging.getLogger(__name__)

KEY = "controlstack"
WrappersMP = comfy.patcher_extension.WrappersMP

FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}


@dataclass(frozen=True, eq=False)
class HostControlNet:
    """What LoadControlNet hands to ApplyHint: the ControlNet module and the host's ModelPatcher around it."""

    module: torch.nn.Module
    patcher: comfy.model_patcher.ModelPatcher
    name: str

    @property
    def family(self) -> str:
        return self.module.family


def load_host_controlnet(source, name: str | None = None, base_model=None) -> HostControlNet:
    """Load a ControlNet (file path or state dict) for the host: in the dtype the host picks for UNets, on the
    offload device; the host's model management moves it to the GPU while sampling. `base_model` (a MODEL) gives
    the base UNet weights that "difference" ControlNets need."""
    name = name or os.path.basename(str(source))
    params = 361_279_120  # an SD1.5 ControlNet; only steers the host's dtype choice
    dtype = comfy.model_management.unet_dtype(
        model_params=params, supported_dtypes=[torch.float16, torch.bfloat16, torch.float32]
    )
    # Where the host stores UNet weights in a dtype the device cannot compute in (fp16 on a CPU), it casts per
    # layer; our ControlNet has no per-layer casting, so it is loaded in the compute dtype instead.
    compute_dtype = comfy.model_management.unet_manual_cast(dtype, comfy.model_management.get_torch_device())
    dtype = compute_dtype or dtype
    base_unet = None
    if base_model is not None:
        base_unet = base_model.model_state_dict(filter_prefix="diffusion_model.")
    module = load_controlnet(
        source,
        dtype=dtype,
        device=comfy.model_management.unet_offload_device(),
        name=name,
        base_unet=base_unet,
    )
    module.eval().requires_grad_(False)
    patcher = comfy.model_patcher.ModelPatcher(
        module,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )
    return HostControlNet(module, patcher, name)


def model_family(model: comfy.model_patcher.ModelPatcher) -> tuple[str | None, str]:
    """(ControlStack family or None, a human name) of a host MODEL, from its UNet configuration."""
    config = model.model.model_config
    unet = config.unet_config
    name = type(config).__name__
    context = unet.get("context_dim")
    if unet.get("in_channels") == 4 and unet.get("model_channels") == 320:
        if context == 768 and not unet.get("adm_in_channels"):
            return "sd1", name
        if context == 1024 and not unet.get("adm_in_channels"):
            return "sd2", name
        if context == 2048 and unet.get("adm_in_channels") == 2816:
            return "sdxl", name
    return None, name


def _stack_of(model: comfy.model_patcher.ModelPatcher) -> tuple[ResidualStack, dict]:
    wrappers = model.get_wrappers(WrappersMP.APPLY_MODEL, KEY)
    if wrappers:
        return wrappers[0].stack, wrappers[0].previews
    return ResidualStack(), {}


def stack_of(model: comfy.model_patcher.ModelPatcher) -> ResidualStack:
    """The ControlStack stack a MODEL carries (empty when none)."""
    return _stack_of(model)[0]


def apply_hint(
    model: comfy.model_patcher.ModelPatcher,
    controlnet: HostControlNet,
    entry_args: dict,
    preview: Callable[[torch.Tensor, torch.Tensor | None], None] | None = None,
) -> comfy.model_patcher.ModelPatcher:
    """A clone of `model` whose stack has one more entry. Refuses a ControlNet that does not fit the model."""
    family, model_name = model_family(model)
    if family != controlnet.family:
        raise ControlNetError(
            f"control_net: '{controlnet.name}' is an {FAMILY_NAMES[controlnet.family]} ControlNet, but the model is "
            f"{FAMILY_NAMES.get(family or '', 'not an SD1.x / SD2.x / SDXL UNet')} ({model_name}): "
            f"pick a ControlNet made for this model"
        )
    stack, previews = _stack_of(model)
    entry = StackEntry(controlnet=controlnet.module, **entry_args)
    stack = stack.with_entry(entry)
    previews = dict(previews)
    if preview is not None:
        previews[entry.label] = preview

    patched = model.clone()
    wrapper = StackWrapper(stack, previews)
    for kind, fn in ((WrappersMP.APPLY_MODEL, wrapper), (WrappersMP.OUTER_SAMPLE, wrapper.outer_sample)):
        patched.remove_wrappers_with_key(kind, KEY)
        patched.add_wrapper_with_key(kind, KEY, fn)
    models = [m for m in patched.get_additional_models_with_key(KEY) if m.model is not controlnet.module]
    patched.set_additional_models(KEY, [*models, controlnet.patcher])
    return patched


class StackWrapper:
    """One object per patched MODEL: the APPLY_MODEL wrapper itself, and its OUTER_SAMPLE bracket."""

    def __init__(self, stack: ResidualStack, previews: dict | None = None) -> None:
        self.stack = stack
        self.previews = previews or {}
        self.use_cuda_graphs = os.environ.get("CONTROLSTACK_CUDA_GRAPHS", "1") != "0"

    # OUTER_SAMPLE: one sampling run
    def outer_sample(self, executor, *args, **kwargs):
        base_model = executor.class_obj.model_patcher.model
        self.stack.begin_run(
            base_model.model_sampling.percent_to_sigma,
            hint_fitter=self._fit,
            use_cuda_graphs=self.use_cuda_graphs,
        )
        try:
            return executor(*args, **kwargs)
        finally:
            self.stack.end_run()

    # APPLY_MODEL: one UNet call
    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        base_model = executor.class_obj
        sampling = base_model.model_sampling
        dtype = base_model.manual_cast_dtype or base_model.get_dtype()
        xc = sampling.calculate_input(t, x).to(dtype)
        residuals = None
        if len(self.stack):
            residuals = self.stack.residuals(
                xc,
                sampling.timestep(t).float(),
                c_crossattn.to(device=xc.device, dtype=dtype),
                _to(kwargs.get("y"), xc),
                sigma=float(t[0]),
                cond_or_uncond=transformer_options.get("cond_or_uncond") or [0],
                out_dtype=dtype,
            )
        if residuals is not None:
            control = merge_control(control, residuals)
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def _fit(self, entry: StackEntry, kind: str, height: int, width: int) -> torch.Tensor:
        if kind == "mask":
            return fit_mask(entry.mask, width, height, entry.resize_mode)
        hint = fit_image(entry.hint.movedim(1, -1), width, height, entry.resize_mode).movedim(-1, 1)
        send = self.previews.get(entry.label)
        if send is not None:
            mask = None if entry.mask is None else fit_mask(entry.mask, width, height, entry.resize_mode)
            try:
                send(hint, mask)
            except Exception as err:  # a preview must never fail a render
                log.warning("ControlStack: hint preview failed: %s", err)
        return hint


def _to(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.to(device=like.device, dtype=like.dtype)


def merge_control(control: dict | None, residuals: list[torch.Tensor]) -> dict:
    """Add ControlStack's residuals to a `control` dict the built-in path may already have made.

    The UNet pops from the end of each list (deepest skip first), so "output" is ordered shallow -> deep. Lists are
    always new: the UNet's pops must never empty buffers that the stack reuses across steps.
    """
    ours = {"input": [], "middle": [residuals[-1]], "output": list(residuals[:-1])}
    if not control:
        return ours
    merged = {}
    for key in set(ours) | set(control):
        prev, mine = list(control.get(key) or []), ours.get(key, [])
        out = []
        for i in range(max(len(prev), len(mine))):
            a = prev[i] if i < len(prev) else None
            b = mine[i] if i < len(mine) else None
            out.append(b if a is None else a if b is None else a + b.to(a.dtype))
        merged[key] = out
    return merged


def ksample(model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise=1.0):
    """Run the host's own KSampler (the same code path as the KSampler node)."""
    import nodes as comfy_nodes  # ComfyUI's nodes.py (absolute import; ours is the relative package)

    return comfy_nodes.common_ksampler(
        model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent, denoise=denoise
    )[0]


def sampler_choices() -> tuple[list[str], list[str]]:
    import comfy.samplers

    return comfy.samplers.KSampler.SAMPLERS, comfy.samplers.KSampler.SCHEDULERS


def sample_with_report(model, **ksampler_args) -> tuple[dict, list[torch.Tensor]]:
    """KSampler, while recording what each stacked ControlNet applied: (latent, per-entry layers x steps)."""
    from ..controlnet.report import StackRecorder

    stack = stack_of(model)
    recorder = StackRecorder(len(stack))
    stack.observer = recorder
    try:
        latent = ksample(model, **ksampler_args)
    finally:
        stack.observer = None
    return latent, recorder.table([e.controlnet.num_residuals for e in stack.entries])
