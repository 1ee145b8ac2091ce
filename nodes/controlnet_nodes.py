"""The four ControlStack nodes. Thin: inputs and outputs here, the work in controlnet/ and nodes/patcher.py."""

from __future__ import annotations

import os

import folder_paths

from ..controlnet import ControlNetError
from ..controlnet.stack import LAYER_NAMES, MAX_LAYER_SCALE, PROMPT_DECAY
from ..controlnet.union import UNION_TYPES
from ..preprocessors.hint import image_to_hint
from ..preprocessors.resize import RESIZE_MODES
from . import patcher
from .inputs import check_window
from .ui import hint_preview_sender, render_report, save_temp_images

CATEGORY = "ControlStack"
LAYERS = list(LAYER_NAMES)
UNION_FUSIONS = {"reference": True, "ComfyUI built-in": False}
"""Union fusion maths -> StackEntry.latent_token."""
SCALE_MODES = {
    "balanced": "balanced",
    "prompt is more important": "prompt",
    "ControlNet is more important": "control",
    "soft weights": "prompt",
    "custom": "balanced",
}
"""ControlScale mode -> StackEntry.mode. "soft weights" is "prompt is more important" with its own base, flip and
uncond multiplier (A1111's soft injection, Advanced-ControlNet's Scaled Soft Weights)."""


def layer_names(num_residuals: int) -> list[str]:
    """in_00 .. in_NN, middle: 13 names for SD1.x/SD2.x, 10 for SDXL."""
    return LAYERS[: num_residuals - 1] + ["middle"]


class LoadControlNet:
    DESCRIPTION = (
        "Load a control file from the controlnet models folder: ControlNets (SD1.x, SD2.x, SDXL; original, "
        "diffusers or 'difference' layouts), ControlNet Union / ProMax, Control-LoRAs, T2I-Adapters and "
        "ControlNet-LLLite; .safetensors, .pth, .ckpt or .bin. The kind is read from the tensors. Pickles never "
        "run code."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CS_CONTROLNET",)
    RETURN_NAMES = ("control_net",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "control_net_name": (
                    folder_paths.get_filename_list("controlnet"),
                    {
                        "tooltip": "A ControlNet file in ComfyUI's models/controlnet folder (or an extra model path)."
                    },
                )
            },
            "optional": {
                "model": (
                    "MODEL",
                    {
                        "tooltip": "The base model, for 'difference' ControlNets (ControlNet - base UNet) and "
                        "Control-LoRAs (built from the model's own UNet). Optional for Control-LoRAs: without it they "
                        "are merged with the model they are applied to."
                    },
                )
            },
        }

    @classmethod
    def IS_CHANGED(cls, control_net_name: str | None = None, **_links) -> str | float:
        """The file's size and modification time: a file replaced on disk under the same name is loaded again on
        the next prompt instead of being served from the host's cache (ComfyUI compares this value between runs)."""
        if control_net_name is None:
            # The host passes constants only: a linked name is unknown here. NaN never equals itself, so the
            # host treats the node as changed (its own convention) and load() runs.
            return float("nan")
        try:
            st = os.stat(_control_net_path(control_net_name))
        except (ControlNetError, OSError):
            return ""  # load() reports the missing file with its message
        return f"{st.st_size}:{st.st_mtime_ns}"

    def load(self, control_net_name: str, model=None):
        return (patcher.load_host_controlnet(_control_net_path(control_net_name), base_model=model),)


def _control_net_path(control_net_name: str) -> str:
    """The full path of a file of the controlnet models folder (or an extra model path), as the host resolves it."""
    path = folder_paths.get_full_path("controlnet", control_net_name)
    if path is None:
        folders = ", ".join(folder_paths.get_folder_paths("controlnet")) or "(none configured)"
        raise ControlNetError(
            f"control_net_name: '{control_net_name}' is not in the controlnet models folders (searched: {folders}); "
            "put the file there or add a folder in extra_model_paths.yaml"
        )
    return path


class ApplyHint:
    DESCRIPTION = (
        "Stack a control file onto a MODEL while sampling from start_percent to end_percent: ControlNet, Union, "
        "Control-LoRA residuals go to the UNet's skip connections, T2I-Adapter features to its input blocks, LLLite "
        "terms to its attention inputs. Chain several to stack any number, of any kinds. Hints of one Union model "
        "(typed with ControlNet Union Type) with the same window, scales and mask run as one multi-condition pass."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to control (SD1.x, SD2.x or SDXL)."}),
                "control_net": ("CS_CONTROLNET", {"tooltip": "From Load ControlNet (ControlStack)."}),
                "image": (
                    "IMAGE",
                    {
                        "tooltip": "The hint: an edge map, depth map, pose, scribble... RGB in [0,1]; an inpaint "
                        "hint's -1 (masked) pixels are kept."
                    },
                ),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 10.0,
                        "step": 0.01,
                        "tooltip": "Multiplies every residual. 0 switches this ControlNet off.",
                    },
                ),
                "start_percent": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.001,
                        "tooltip": "Sampling progress at which this ControlNet starts.",
                    },
                ),
                "end_percent": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.001,
                        "tooltip": "Sampling progress at which this ControlNet stops.",
                    },
                ),
                "resize_mode": (
                    list(RESIZE_MODES),
                    {
                        "tooltip": "How the hint is fitted to the generation size: stretch, crop the overflow, or pad."
                    },
                ),
            },
            "optional": {
                "mask": ("MASK", {"tooltip": "Where the ControlNet acts (1) and where not (0)."}),
                "scales": (
                    "CS_SCALES",
                    {"tooltip": "Per-layer multipliers and mode from ControlNet Layer Scales."},
                ),
                "schedule": (
                    "CS_SCHEDULE",
                    {"tooltip": "A strength curve over sampling progress from Strength Keyframe nodes."},
                ),
                "frame_strengths": (
                    "CS_FRAME_STRENGTHS",
                    {"tooltip": "Per-frame (per-latent) strengths from Frame Strengths nodes."},
                ),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def apply(
        self,
        model,
        control_net,
        image,
        strength,
        start_percent,
        end_percent,
        resize_mode,
        mask=None,
        scales=None,
        schedule=None,
        frame_strengths=None,
        unique_id=None,
    ):
        start_percent, end_percent = check_window(start_percent, end_percent)
        control_net = patcher.resolve_for_model(control_net, model)
        mode, layer_scales, soft = "balanced", None, {}
        if scales is not None:
            mode = scales["mode"]
            if scales["custom"] is not None:
                custom = scales["custom"]
                n = control_net.module.num_residuals
                layer_scales = tuple(custom[: n - 1]) + (custom[-1],)
            soft = scales.get("soft", {})
        entry = {
            **soft,
            "schedule": schedule,
            "frame_strengths": frame_strengths,
            "hint": image_to_hint(image),
            "strength": float(strength),
            "start_percent": float(start_percent),
            "end_percent": float(end_percent),
            "scales": layer_scales,
            "mode": mode,
            "mask": None if mask is None else (mask[None] if mask.ndim == 2 else mask).float(),
            "resize_mode": resize_mode,
            "label": str(unique_id) if unique_id is not None else control_net.name,
        }
        preview = hint_preview_sender(str(unique_id)) if unique_id is not None else None
        return (patcher.apply_hint(model, control_net, entry, preview),)


class UnionType:
    DESCRIPTION = (
        "Give a ControlNet Union / ProMax model the control type of the hint it is applied with (like ComfyUI's "
        "SetUnionControlNetType). Apply several typed copies of one Union model with Apply ControlNet Hint: hints with "
        "the same window, scales and mask run in ONE forward (ProMax multi-condition), each with its own strength. "
        "tile and repaint need a ProMax file."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CS_CONTROLNET",)
    RETURN_NAMES = ("control_net",)
    FUNCTION = "set_type"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "control_net": ("CS_CONTROLNET", {"tooltip": "A ControlNet Union / ProMax model."}),
                "control_type": (
                    ["auto", *UNION_TYPES],
                    {
                        "tooltip": "What the hint shows. auto: no type (the model guesses), as ComfyUI's built-in."
                    },
                ),
            },
            "optional": {
                "fusion": (
                    list(UNION_FUSIONS),
                    {
                        "tooltip": "reference: the model's own maths (xinsir / diffusers: the noisy latent is a token "
                        "of the fusion transformer). ComfyUI built-in: without that token, to reproduce the built-in "
                        "node's images."
                    },
                ),
            },
        }

    def set_type(self, control_net, control_type, fusion="reference"):
        if control_type != "auto" and control_type not in UNION_TYPES:
            raise ControlNetError(
                f"control_type: expected auto or one of {list(UNION_TYPES)}, got {control_type!r}"
            )
        if fusion not in UNION_FUSIONS:
            raise ControlNetError(f"fusion: expected one of {list(UNION_FUSIONS)}, got {fusion!r}")
        union_type = None if control_type == "auto" else UNION_TYPES[control_type]
        return (patcher.with_union_type(control_net, union_type, UNION_FUSIONS[fusion]),)


class ControlScale:
    DESCRIPTION = (
        "Per-layer multipliers and the control mode for Apply ControlNet Hint. balanced: every layer at strength. "
        f"prompt is more important: layer i x {PROMPT_DECAY}^(12-i), shallow layers fade. ControlNet is more "
        "important: the residuals go to the positive prompt only, so CFG amplifies them. soft weights: layer i x "
        "base_multiplier^(12-i) (flipped: ^i), uncond rows x uncond_multiplier. custom: the in_00..middle "
        "values below "
        "(SDXL uses in_00..in_08 and middle). Every kind takes them: a layer is where the kind acts — ControlNets, "
        "Union and Control-LoRAs every layer; T2I-Adapters in_02/05/08/11 (SDXL in_03/05/08 and middle); LLLite the "
        "attention of in_04/05/07/08 and middle."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CS_SCALES",)
    RETURN_NAMES = ("scales",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        layers = {
            name: (
                "FLOAT",
                {
                    "default": 1.0,
                    "min": 0.0,
                    "max": MAX_LAYER_SCALE,
                    "step": 0.01,
                    "tooltip": f"Multiplier of residual {name} (custom mode).",
                },
            )
            for name in LAYERS
        }
        mode = {
            "tooltip": (
                f"balanced: every layer 1.0 · prompt is more important: layer i x {PROMPT_DECAY}^(12-i) · "
                "ControlNet is more important: cond only, uncond x0 · soft weights: layer i x "
                "base_multiplier^(12-i) · custom: the values below."
            ),
            # Read by web/controlstack.js (the chart's bars and presets), so the names and the decay live here only.
            "controlstack": {"layers": list(LAYERS), "prompt_decay": PROMPT_DECAY},
        }
        soft = {
            "base_multiplier": (
                "FLOAT",
                {
                    "default": PROMPT_DECAY,
                    "min": 0.0,
                    "max": 1.0,
                    "step": 0.001,
                    "tooltip": "soft weights: layer i x base_multiplier^(12-i) (SDXL: ^(9-i)).",
                },
            ),
            "flip_weights": (
                "BOOLEAN",
                {"default": False, "tooltip": "soft weights: reversed, the shallow layers keep most."},
            ),
            "uncond_multiplier": (
                "FLOAT",
                {
                    "default": 1.0,
                    "min": 0.0,
                    "max": 1.0,
                    "step": 0.01,
                    "tooltip": "Multiplies the residuals on the negative prompt's rows (every mode but "
                    "ControlNet is more important, where it is 0).",
                },
            ),
        }
        return {"required": {"mode": (list(SCALE_MODES), mode), **layers}, "optional": soft}

    def build(self, mode, base_multiplier=PROMPT_DECAY, flip_weights=False, uncond_multiplier=1.0, **layers):
        if mode not in SCALE_MODES:
            raise ControlNetError(f"mode: expected one of {list(SCALE_MODES)}, got {mode!r}")
        custom = [float(layers[name]) for name in LAYERS] if mode == "custom" else None
        soft = {"uncond_multiplier": float(uncond_multiplier)}
        if mode == "soft weights":
            soft.update(soft_base=float(base_multiplier), soft_flip=bool(flip_weights))
        return ({"mode": SCALE_MODES[mode], "custom": custom, "soft": soft},)


class Sampler:
    DESCRIPTION = (
        "KSampler plus a control report: a heat map of mean |residual| per layer (rows) and step (columns) for each "
        "stacked ControlNet, so you see what each ControlNet did and when. Plain KSampler works with a stacked "
        "MODEL too."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT", "IMAGE")
    RETURN_NAMES = ("latent", "control_report")
    FUNCTION = "sample"

    @classmethod
    def INPUT_TYPES(cls):
        samplers, schedulers = patcher.sampler_choices()
        return {
            "required": {
                "model": ("MODEL",),
                "seed": (
                    "INT",
                    {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True},
                ),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "sampler_name": (samplers,),
                "scheduler": (schedulers,),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "latent_image": ("LATENT",),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            }
        }

    def sample(
        self, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise
    ):
        latent, tables, strengths = patcher.sample_with_report(
            model,
            seed=seed,
            steps=steps,
            cfg=cfg,
            sampler_name=sampler_name,
            scheduler=scheduler,
            positive=positive,
            negative=negative,
            latent=latent_image,
            denoise=denoise,
        )
        entries = patcher.stack_of(model).entries
        names = [f"#{i + 1} {e.controlnet.name} (node {e.label})" for i, e in enumerate(entries)]
        report = render_report(tables, names, [layer_names(t.shape[0]) for t in tables], strengths)
        return {"ui": {"images": save_temp_images(report, "controlstack_report")}, "result": (latent, report)}


NODE_CLASS_MAPPINGS = {
    "ControlStackLoadControlNet": LoadControlNet,
    "ControlStackApplyHint": ApplyHint,
    "ControlStackControlScale": ControlScale,
    "ControlStackUnionType": UnionType,
    "ControlStackSampler": Sampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ControlStackLoadControlNet": "Load ControlNet (ControlStack)",
    "ControlStackApplyHint": "Apply ControlNet Hint (ControlStack)",
    "ControlStackControlScale": "ControlNet Layer Scales (ControlStack)",
    "ControlStackUnionType": "ControlNet Union Type (ControlStack)",
    "ControlStackSampler": "KSampler + Control Report (ControlStack)",
}
