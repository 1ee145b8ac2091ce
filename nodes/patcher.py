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
import math
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import comfy.model_management
import comfy.model_patcher
import comfy.ops
import comfy.patcher_extension
import torch

from ..controlnet import ControlNetError
from ..controlnet.compiled import CompiledForwards
from ..controlnet.control_lora import control_lora_family
from ..controlnet.graphs import StepGraphs
from ..controlnet.kinds import KIND_NAMES, file_kind, load_control
from ..controlnet.loading import read_tensors
from ..controlnet.stack import ResidualStack, StackEntry, StackRun, StepControl, Window, kind_of
from ..preprocessors.resize import fit_image, fit_mask

log = logging.getLogger(__name__)

KEY = "controlstack"
WrappersMP = comfy.patcher_extension.WrappersMP
CallbacksMP = comfy.patcher_extension.CallbacksMP

FAMILY_NAMES = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}


@dataclass(frozen=True, eq=False)
class HostControlNet:
    """What LoadControlNet hands to ApplyHint: a control module and the host's ModelPatcher around it.

    A Control-LoRA loaded without a MODEL is *pending* (`module` None): it is merged with the model it is applied to,
    once per model (`merged`), because its ControlNet is that model's own encoder weights plus the file's deltas.
    """

    module: torch.nn.Module | None
    patcher: comfy.model_patcher.ModelPatcher | None
    name: str
    kind: str = "controlnet"
    source: object = None
    """The file path of a pending Control-LoRA."""
    union_type: int | None = None
    latent_token: bool = True
    merged: dict = field(default_factory=dict)
    """Pending Control-LoRA: id(base UNet) -> (weak ref to the UNet, merged HostControlNet)."""

    @property
    def family(self) -> str:
        assert self.module is not None
        return self.module.family

    @property
    def kind_name(self) -> str:
        return KIND_NAMES.get(self.kind, self.kind)


@dataclass(frozen=True)
class HostStorage:
    """How the host keeps a control module: the dtype its weights are stored in, the dtype it computes in (None:
    the same), and the host's layer classes for that pair (``comfy.ops``: per-layer casting, partial loading)."""

    dtype: torch.dtype
    compute_dtype: torch.dtype | None
    operations: type

    @classmethod
    def for_file(cls, source, name: str) -> HostStorage:
        """The host's choice for a control file, as its built-in ControlNet loader makes it: the storage dtype from
        the file's real parameter count and weight dtype (and the host's --fp16-unet / --bf16-unet ... flags)."""
        t = read_tensors(source, name)
        params = sum(math.prod(shape) for shape in t.shapes.values())
        floats = [d for d in t.dtypes.values() if d is not None and d.is_floating_point]
        weight_dtype = max(set(floats), key=floats.count) if floats else None
        dtype = comfy.model_management.unet_dtype(
            model_params=params,
            supported_dtypes=[torch.float16, torch.bfloat16, torch.float32],
            weight_dtype=weight_dtype,
        )
        return cls.for_dtype(dtype)

    @classmethod
    def for_model(cls, model) -> HostStorage:
        """A Control-LoRA's storage: its weights are computed (base + up @ down), and the built-in ``ControlLora``
        adds the delta in the model's compute dtype at every call; rounding the merged weights to an fp16 storage
        would differ from it by ~4e-4 (measured on SDXL with --fp16-unet), so they are kept in the compute dtype."""
        base = model.model
        return cls.for_dtype(base.manual_cast_dtype or base.get_dtype())

    @classmethod
    def for_dtype(cls, dtype: torch.dtype) -> HostStorage:
        # Where the device cannot compute in the storage dtype (fp16 on a CPU, fp8), the host casts per layer.
        compute = comfy.model_management.unet_manual_cast(dtype, comfy.model_management.get_torch_device())
        return cls(dtype, compute, comfy.ops.pick_operations(dtype, compute))


def _wrap(module: torch.nn.Module, name: str, storage: HostStorage, **kw) -> HostControlNet:
    module.eval().requires_grad_(False)
    if storage.compute_dtype is not None:
        module.compute_dtype = storage.compute_dtype
    patcher = comfy.model_patcher.ModelPatcher(
        module,
        load_device=comfy.model_management.get_torch_device(),
        offload_device=comfy.model_management.unet_offload_device(),
    )
    return HostControlNet(module, patcher, name, kind=kind_of(module), **kw)


class HostAnnotator:
    """An annotator network (HED, MiDaS, OpenPose ...) held by the host's model management, like a model.

    The module sits on the offload device between uses; :meth:`on_device` asks the host to load it
    (``load_models_gpu``: it frees other models' memory first and unloads this one again when something larger
    needs the room), so annotators follow ``--lowvram`` / ``--novram`` / cache eviction like checkpoints do.
    """

    def __init__(self, module: torch.nn.Module, name: str) -> None:
        module.eval().requires_grad_(False)
        self.name = name
        self.patcher = comfy.model_patcher.ModelPatcher(
            module,
            load_device=comfy.model_management.get_torch_device(),
            offload_device=comfy.model_management.unet_offload_device(),
        )

    @property
    def device(self) -> torch.device:
        return self.patcher.load_device

    def on_device(self) -> torch.nn.Module:
        """The module, loaded on the host's compute device for this call."""
        comfy.model_management.load_models_gpu([self.patcher])
        return self.patcher.model


def load_host_controlnet(source, name: str | None = None, base_model=None) -> HostControlNet:
    """Load any control file (ControlNet, Union, Control-LoRA, T2I-Adapter, LLLite) for the host: built from the
    host's operation classes and stored in the dtype the host picks (as its built-in ControlNet), on the offload
    device, so the host's model management casts, partially loads and offloads it like its own models.
    `base_model` (a MODEL) gives the base UNet weights that "difference" ControlNets and Control-LoRAs need; a
    Control-LoRA loaded without it is merged when it is applied to a model."""
    name = name or os.path.basename(str(source))
    kind = file_kind(source, name)
    if kind == "control_lora" and base_model is None:
        return HostControlNet(None, None, name, kind="control_lora", source=source)
    base_unet = None
    if base_model is not None and kind in ("controlnet", "control_lora"):
        if kind == "control_lora":
            _check_control_lora_family(source, name, base_model)
        base_unet = base_model.model_state_dict(filter_prefix="diffusion_model.")
    storage = (
        HostStorage.for_model(base_model) if kind == "control_lora" else HostStorage.for_file(source, name)
    )
    module = load_control(
        source,
        dtype=storage.dtype,
        device=comfy.model_management.unet_offload_device(),
        name=name,
        base_unet=base_unet,
        operations=storage.operations,
    )
    return _wrap(module, name, storage)


def _check_control_lora_family(source, name: str, model) -> None:
    family, model_name = model_family(model)
    lora_family = control_lora_family(read_tensors(source, name).shapes)
    if family != lora_family:
        raise ControlNetError(
            f"control_net: '{name}' is a Control-LoRA for {FAMILY_NAMES.get(lora_family, lora_family)}, but the model "
            f"is {FAMILY_NAMES.get(family or '', 'not an SD1.x / SD2.x / SDXL UNet')} ({model_name}): pick a "
            "Control-LoRA made for this model"
        )


def resolve_for_model(controlnet: HostControlNet, model) -> HostControlNet:
    """The HostControlNet to apply to `model`: a pending Control-LoRA is merged with the model's UNet (once per
    model), everything else is returned as is."""
    if controlnet.module is not None:
        return controlnet
    unet = model.model.diffusion_model
    hit = controlnet.merged.get(id(unet))
    if hit is not None and hit[0]() is unet:
        return hit[1]
    _check_control_lora_family(controlnet.source, controlnet.name, model)
    merged = load_host_controlnet(controlnet.source, controlnet.name, base_model=model)
    merged = replace(merged, union_type=controlnet.union_type, latent_token=controlnet.latent_token)
    controlnet.merged.clear()  # keep one merged copy: a new model replaces the previous one
    controlnet.merged[id(unet)] = (weakref.ref(unet), merged)
    return merged


def model_family(model: comfy.model_patcher.ModelPatcher) -> tuple[str | None, str]:
    """(ControlStack family or None, a human name) of a host MODEL, from its UNet configuration."""
    config = model.model.model_config
    unet = config.unet_config
    name = type(config).__name__
    context = unet.get("context_dim")
    # 4 latent channels, or 9 / 8 for inpainting / instruct-pix2pix UNets, which concatenate a mask and an image
    # latent to the input: the ControlNet still sees the 4-channel latent (the wrapper runs before the concat).
    if unet.get("in_channels") in (4, 8, 9) and unet.get("model_channels") == 320:
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
    """A clone of `model` whose stack has one more entry. Refuses a control file that does not fit the model."""
    family, model_name = model_family(model)
    controlnet = resolve_for_model(controlnet, model)
    assert controlnet.module is not None and controlnet.patcher is not None
    fits = getattr(controlnet.module, "families", (controlnet.family,))
    if family not in fits:
        raise ControlNetError(
            f"control_net: '{controlnet.name}' is an {FAMILY_NAMES[controlnet.family]} {controlnet.kind_name}, but "
            f"the model is {FAMILY_NAMES.get(family or '', 'not an SD1.x / SD2.x / SDXL UNet')} ({model_name}): "
            f"pick a control file made for this model"
        )
    stack, previews = _stack_of(model)
    entry = StackEntry(
        controlnet=controlnet.module,
        union_type=controlnet.union_type,
        latent_token=controlnet.latent_token,
        **entry_args,
    )
    stack = stack.with_entry(entry)
    previews = dict(previews)
    if preview is not None:
        previews[entry.label] = preview

    patched = model.clone()
    wrapper = StackWrapper(stack, previews)
    for kind, fn in ((WrappersMP.APPLY_MODEL, wrapper), (WrappersMP.OUTER_SAMPLE, wrapper.outer_sample)):
        patched.remove_wrappers_with_key(kind, KEY)
        patched.add_wrapper_with_key(kind, KEY, fn)
    # When the host unloads this MODEL to make room (VAE decode, another model), the stack's CUDA graphs go too: their
    # memory pool is freed with the host's own empty-cache that follows, not held until the next run of the stack.
    patched.remove_callbacks_with_key(CallbacksMP.ON_DETACH, KEY)
    patched.add_callback_with_key(CallbacksMP.ON_DETACH, KEY, wrapper.on_detach)
    models = [m for m in patched.get_additional_models_with_key(KEY) if m.model is not controlnet.module]
    patched.set_additional_models(KEY, [*models, controlnet.patcher])
    return patched


def with_union_type(controlnet: HostControlNet, union_type: int | None, latent_token: bool) -> HostControlNet:
    """The same Union model with a control type for the hints it is applied with (None: "auto")."""
    if controlnet.kind not in ("union",):
        raise ControlNetError(
            f"control_net: '{controlnet.name}' is a {controlnet.kind_name}; a control type only applies to "
            "ControlNet Union / ProMax files"
        )
    types = getattr(controlnet.module, "config", None)
    rows = getattr(types, "union_num_control_types", None)
    if union_type is not None and rows is not None and union_type >= rows:
        raise ControlNetError(
            f"control_type: type {union_type} needs a ProMax file with at least {union_type + 1} control types; "
            f"'{controlnet.name}' has {rows}"
        )
    return replace(controlnet, union_type=union_type, latent_token=latent_token)


RUN_OPTION = "controlstack_run"
"""transformer_options key of the run in progress: a `_PendingRun` set by OUTER_SAMPLE in the guider's per-run
options (or a `StackRun`), read by every APPLY_MODEL call of that run."""


class _PendingRun:
    """A sampling run whose `StackRun` starts at its first UNet call. OUTER_SAMPLE runs before the host loads the
    guider's MODEL, so the BaseModel's `model_sampling` may still be another MODEL's object patch then (two MODELs
    of one checkpoint, one through ModelSamplingDiscrete: the one loaded last is still applied) or not yet this
    MODEL's. At the first UNet call this MODEL is loaded and `model_sampling` is the one the host samples with --
    the object its built-in ControlNet reads its windows from too."""

    def __init__(self, start: Callable[[Any], StackRun], stack: ResidualStack) -> None:
        self._start = start
        self.stack = stack
        self.run: StackRun | None = None

    def begin(self, sampling: Any) -> StackRun:
        if self.run is None:
            self.run = self._start(sampling)
        return self.run

    def end(self) -> None:
        if self.run is not None:
            self.run.end()


OBSERVER_OPTION = "controlstack_observer"
"""transformer_options key of a control-report observer (`StackRecorder`) for the runs of one MODEL clone."""


class StackWrapper:
    """One object per patched MODEL: the APPLY_MODEL wrapper itself, and its OUTER_SAMPLE bracket.

    It holds no run state: every clone of the MODEL shares it, and two samplers may run it at once. A run lives in
    the guider's per-run options and reaches each UNet call through `transformer_options`.
    """

    def __init__(self, stack: ResidualStack, previews: dict | None = None) -> None:
        self.stack = stack
        self.previews = previews or {}
        self.use_cuda_graphs = os.environ.get("CONTROLSTACK_CUDA_GRAPHS", "1") != "0"
        # The stack's CUDA graphs and the buffers they read outlive a sampling run: the next run of this MODEL (a
        # new seed, the next frame) replays from its first step. Dropped with the MODEL, or when the weights move.
        self.graphs = StepGraphs()
        # Opt-in torch.compile of the ControlNet forwards, kept across runs like the graphs (docs/performance.md).
        self.compiled = CompiledForwards() if os.environ.get("CONTROLSTACK_COMPILE", "0") == "1" else None

    def on_detach(self, model_patcher, unpatch_all: bool) -> None:
        """ON_DETACH callback of the patched MODEL. A full unload (``free_memory``, ``unload_all_models``: the host
        makes room) drops the graphs and the buffers they read. ``unpatch_all=False`` is the light detach that
        ``load_models_gpu`` does at the start of every sampling run, the MODEL staying loaded: keep them."""
        if unpatch_all:
            self.graphs.clear()

    # OUTER_SAMPLE: one sampling run
    def outer_sample(self, executor, *args, **kwargs):
        guider = executor.class_obj
        # CFGGuider.sample has just made `guider.model_options` a per-run copy (create_model_options_clone) and
        # restores the original afterwards; samplers._calc_cond_batch merges its "transformer_options" into the
        # `transformer_options` of every UNet call of this run. So the run is visible to this run's calls only.
        options = guider.model_options.setdefault("transformer_options", {})
        observer = options.get(OBSERVER_OPTION)
        run = _PendingRun(
            lambda sampling: self.stack.begin_run(
                sampling.percent_to_sigma,
                hint_fitter=self._fit,
                use_cuda_graphs=self.use_cuda_graphs,
                observer=observer,
                graphs=self.graphs,
                compiled=self.compiled,
            ),
            self.stack,
        )
        options[RUN_OPTION] = run
        try:
            return executor(*args, **kwargs)
        finally:
            run.end()
            if options.get(RUN_OPTION) is run:
                del options[RUN_OPTION]

    # APPLY_MODEL: one UNet call
    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        if not len(self.stack):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        base_model = executor.class_obj
        sampling = base_model.model_sampling
        run = transformer_options.get(RUN_OPTION)
        call_run = run is None or run.stack is not self.stack
        if call_run:
            run = self._call_run(sampling)
        elif isinstance(run, _PendingRun):
            run = run.begin(sampling)
        try:
            dtype = base_model.manual_cast_dtype or base_model.get_dtype()
            xc = sampling.calculate_input(t, x).to(dtype)
            sigma = float(t[0])
            cond_or_uncond = transformer_options.get("cond_or_uncond") or [0]
            window = context_window(transformer_options)
            step = run.control(
                xc,
                sampling.timestep(t).float(),
                c_crossattn.to(device=xc.device, dtype=dtype),
                _to(kwargs.get("y"), xc),
                sigma=sigma,
                cond_or_uncond=cond_or_uncond,
                out_dtype=dtype,
                window=window,
            )
            if step is not None:
                control = merge_control(control, step)
            patch = run.attention_patch(xc, sigma=sigma, cond_or_uncond=cond_or_uncond, window=window)
            if patch is None:
                return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
            options = with_attention_patch(transformer_options, patch)
            out = executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
            patch.report()  # the LLLite terms this call added, for the control report
            return out
        finally:
            if call_run:
                run.end()

    def _call_run(self, sampling) -> StackRun:
        """A run for one UNet call made outside a sampling run of this MODEL (no OUTER_SAMPLE: a custom node that
        drives the UNet itself, as the built-in ControlNet allows). Falling back rather than failing keeps such
        workflows rendering, with the same numbers as in a run: the windows use the model's own schedule and the
        hints are fitted alike. Only slower (the hints are encoded again for every call), without CUDA graphs, hint
        previews or the control report, which belong to a sampling run."""
        log.debug("ControlStack: a UNet call outside a sampling run of this model; using a one-call run")
        return self.stack.begin_run(
            sampling.percent_to_sigma, hint_fitter=self._fit_quietly, use_cuda_graphs=False
        )

    def _fit(
        self, entry: StackEntry, kind: str, height: int, width: int, preview: bool = True
    ) -> torch.Tensor:
        if kind == "mask":
            return fit_mask(entry.mask, width, height, entry.resize_mode)
        hint = fit_image(entry.hint.movedim(1, -1), width, height, entry.resize_mode).movedim(-1, 1)
        send = self.previews.get(entry.label) if preview else None
        if send is not None:
            mask = None if entry.mask is None else fit_mask(entry.mask, width, height, entry.resize_mode)
            try:
                send(hint, mask)
            except Exception as err:  # a preview must never fail a render
                log.warning("ControlStack: hint preview failed: %s", err)
        return hint

    def _fit_quietly(self, entry: StackEntry, kind: str, height: int, width: int) -> torch.Tensor:
        return self._fit(entry, kind, height, width, preview=False)


def context_window(transformer_options: dict) -> Window | None:
    """The frames of the whole latent batch that this UNet call holds when a video is sampled in context windows,
    from the two public protocols: AnimateDiff-Evolved's ``ad_params`` (``sub_idxs``, ``full_length``; the one
    ComfyUI-Advanced-ControlNet reads) and ComfyUI's own ``context_window`` (an ``IndexListContextWindow`` with
    ``index_list``; only along the batch dimension, dim 0, which is where SD1.x / SDXL frames are). None: the call
    holds the whole batch."""
    ad_params = transformer_options.get("ad_params")
    if isinstance(ad_params, dict) and ad_params.get("sub_idxs") is not None:
        total = ad_params.get("full_length")
        return Window(tuple(int(i) for i in ad_params["sub_idxs"]), None if total is None else int(total))
    window = transformer_options.get("context_window")
    indices = getattr(window, "index_list", None)
    if indices is not None and getattr(window, "dim", 0) == 0:
        return Window(tuple(int(i) for i in indices))
    return None


def _to(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    return None if t is None else t.to(device=like.device, dtype=like.dtype)


def with_attention_patch(transformer_options: dict, patch) -> dict:
    """A copy of `transformer_options` whose attention-input patches include `patch` (LLLite), for this call only.

    ComfyUI's BasicTransformerBlock calls every `attn1_patch` / `attn2_patch` with the normed hidden states, the
    key and value inputs and `extra_options` (the block, the transformer index, the activation shape) before it
    projects q, k and v. Copies, never mutation: the options dict is shared by every call of the run.
    """

    def hook(attn: str):
        def fn(n, context, value, extra):
            where = (extra.get("block"), extra.get("block_index", 0))
            return patch(attn, *where, n, context, value, extra.get("activations_shape"))

        return fn

    options = dict(transformer_options)
    patches = {k: list(v) for k, v in options.get("patches", {}).items()}
    for attn in ("attn1", "attn2"):
        patches[f"{attn}_patch"] = [*patches.get(f"{attn}_patch", []), hook(attn)]
    options["patches"] = patches
    return options


def merge_control(control: dict | None, step: StepControl) -> dict:
    """Add ControlStack's control to a `control` dict the built-in path may already have made.

    The UNet pops from the end of each list: "output" is ordered shallow -> deep (the deepest skip is used first),
    "input" is ordered deep -> shallow (block 0 pops first). Lists are always new: the UNet's pops must never empty
    buffers that the stack reuses across steps.
    """
    ours = {"output": list(step.output), "middle": [step.middle]}
    if any(t is not None for t in step.input):
        ours["input"] = list(reversed(step.input))
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


def sample_with_report(model, **ksampler_args) -> tuple[dict, list[torch.Tensor], list[list[float]]]:
    """KSampler, while recording what each stacked ControlNet applied: (latent, per-entry layers x steps, per-entry
    applied strength per step).

    The recorder goes into the options of a clone of `model`, so only this sampling run sees it (OUTER_SAMPLE hands
    it to the run); the stack and the MODEL the graph passed in are left untouched."""
    from ..controlnet.report import StackRecorder

    entries = stack_of(model).entries
    recorder = StackRecorder(len(entries))
    reporting = model.clone()
    reporting.model_options.setdefault("transformer_options", {})[OBSERVER_OPTION] = recorder
    latent = ksample(reporting, **ksampler_args)
    return latent, recorder.table([e.controlnet.num_residuals for e in entries]), recorder.strengths()


# Training (controlstack.training) --------------------------------------------------------------------------------


class TrainingHost:
    """What the trainer needs from ComfyUI for one checkpoint: its frozen UNet, text encoder, VAE and noise schedule.

    The trainer (``controlstack.training``, host-free) drives the same injection path as inference: the ControlNet's
    residuals reach the UNet as its ``control`` argument through ``merge_control`` and ``BaseModel.apply_model``,
    exactly what the APPLY_MODEL wrapper hands it when ApplyHint's stack runs. Load it outside
    ``torch.inference_mode`` (ComfyUI's server runs nodes in it; inference tensors cannot be saved for backward).
    """

    def __init__(self, checkpoint: str, device: torch.device | None = None) -> None:
        import comfy.sd

        out = comfy.sd.load_checkpoint_guess_config(checkpoint, output_vae=True, output_clip=True)
        self.patcher, self.clip, self.vae = out[0], out[1], out[2]
        if self.patcher is None or self.clip is None or self.vae is None:
            raise ControlNetError(
                f"{checkpoint}: not a full checkpoint (it needs a UNet, a text encoder and a VAE)"
            )
        family, name = model_family(self.patcher)
        if family is None:
            raise ControlNetError(
                f"{checkpoint}: ComfyUI detected {name}; ControlNets can be trained for SD1.x, SD2.x and SDXL UNets"
            )
        self.family = family
        self.device = device or comfy.model_management.get_torch_device()
        comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
        self.base = self.patcher.model  # BaseModel: apply_model, model_sampling, latent_format
        self.base.requires_grad_(False)
        self.sampling = self.base.model_sampling

    @property
    def unet(self) -> torch.nn.Module:
        """The UNet itself (ldm ``UNetModel``), whose parameters the trainer may unlock."""
        return self.base.diffusion_model

    @property
    def dtype(self) -> torch.dtype:
        return self.base.manual_cast_dtype or self.base.get_dtype()

    @property
    def sigmas(self) -> torch.Tensor:
        """The model's noise level per training timestep 0..999 (float32, CPU)."""
        return self.sampling.sigmas.detach().float().cpu()

    def controlnet_config(self):
        """The ControlNet architecture that mirrors this UNet's encoder (the paper's "trainable copy")."""
        from ..controlnet.config import ControlNetConfig

        u = self.base.model_config.unet_config
        heads = u.get("num_head_channels", -1)
        return ControlNetConfig(
            family=self.family,
            in_channels=4,
            model_channels=u["model_channels"],
            context_dim=u["context_dim"],
            channel_mult=tuple(u["channel_mult"]),
            num_res_blocks=tuple(u["num_res_blocks"]),
            transformer_depth=tuple(u["transformer_depth"]),
            transformer_depth_middle=u.get("transformer_depth_middle", 1),
            num_heads=-1 if heads != -1 else u.get("num_heads", 8),
            num_head_channels=heads,
            use_linear=bool(u.get("use_linear_in_transformer", False)),
            adm_in_channels=u.get("adm_in_channels"),
        )

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The UNet's tensors that a ControlNet copies (time / label embedding, input blocks, middle block)."""
        prefixes = ("time_embed.", "label_emb.", "input_blocks.", "middle_block.")
        return {k: v for k, v in self.unet.state_dict().items() if k.startswith(prefixes)}

    def encode_prompts(
        self, prompts: list[str], width: int, height: int
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(cross-attention context B x tokens x C, SDXL's adm vector or None) for each prompt, on the device."""
        conds, pooled = [], []
        with torch.no_grad():
            for text in prompts:
                cond, pool = self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True)
                conds.append(cond)
                pooled.append(pool)
        context = torch.cat(conds).to(self.device, torch.float32)
        if self.family != "sdxl":
            return context, None
        y = self.base.encode_adm(pooled_output=torch.cat(pooled), width=width, height=height)
        return context, y.to(self.device, torch.float32)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images B x 3 x H x W in [-1, 1] -> the latents the UNet denoises (VAE encode, then the latent format)."""
        with torch.no_grad():
            raw = self.vae.encode((images.movedim(1, -1) + 1) / 2)
            return self.base.process_latent_in(raw).to(self.device, torch.float32)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """UNet latents -> images B x 3 x H x W in [0, 1] (CPU)."""
        with torch.no_grad():
            return self.vae.decode(self.base.process_latent_out(latents)).movedim(-1, 1).float().cpu()

    def controlnet_inputs(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scaled latent, UNet timesteps) for a ControlNet, as the APPLY_MODEL wrapper computes them."""
        return self.sampling.calculate_input(sigma, x), self.sampling.timestep(sigma).float()

    def denoise(
        self,
        x: torch.Tensor,
        sigma: torch.Tensor,
        context: torch.Tensor,
        residuals: list[torch.Tensor | None] | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The UNet's denoised prediction of ``x`` at noise level ``sigma`` with ControlNet ``residuals`` (shallow
        -> deep, middle last; None entries add nothing) added to its skips and middle block, as in inference."""
        control = None
        if residuals is not None:
            out = [None if r is None else r.to(self.dtype) for r in residuals]
            control = merge_control(
                None, StepControl(output=out[:-1], input=[None] * (len(out) - 1), middle=out[-1])
            )
        kwargs = {} if y is None else {"y": y}
        return self.base.apply_model(x, sigma, c_crossattn=context, control=control, **kwargs)
