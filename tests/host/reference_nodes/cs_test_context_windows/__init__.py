"""Test-side context-window sampling: the two public protocols a ControlNet sees when a video is sampled in windows.

``ContextWindowsReference`` puts a context handler on a MODEL (ComfyUI's ``model_options["context_handler"]``, read
by ``comfy.samplers.calc_cond_batch``). At every step it calls the model on fixed windows of ``context_length``
frames overlapping by ``context_overlap`` (the last window ends at the last frame) and fuses them flat (each frame:
the mean of the windows that hold it). Each call tells controls which frames it holds, as the real handlers do:

- ``animatediff``: ``transformer_options["ad_params"] = {"full_length", "context_length", "sub_idxs"}``, the keys
  AnimateDiff-Evolved exposes and ComfyUI-Advanced-ControlNet reads;
- ``comfyui``: ``transformer_options["context_window"]``, an ``IndexListContextWindow`` (ComfyUI 0.3.75's own
  handler, whose ``set_step`` fails on an SD1.x frame batch, so it is not used as is).

It shares no code with ControlStack. Loaded by the host tests only.
"""

from __future__ import annotations

import comfy.context_windows as cw
import torch


def windows(frames: int, length: int, overlap: int) -> list[list[int]]:
    stride = max(length - overlap, 1)
    starts = list(range(0, max(frames - length, 0) + 1, stride))
    if starts[-1] + length < frames:
        starts.append(frames - length)
    return [list(range(s, min(s + length, frames))) for s in starts]


class WindowHandler(cw.IndexListContextHandler):
    def __init__(self, length: int, overlap: int, protocol: str) -> None:
        super().__init__(
            cw.get_matching_context_schedule(cw.ContextSchedules.STATIC_STANDARD),
            cw.get_matching_fuse_method(cw.ContextFuseMethods.FLAT),
            context_length=length,
            context_overlap=overlap,
            dim=0,
        )
        self.protocol = protocol

    def execute(self, calc_cond_batch, model, conds, x_in, timestep, model_options):
        frames = x_in.shape[0]
        final = [torch.zeros_like(x_in) for _ in conds]
        counts = torch.zeros(frames, 1, 1, 1, dtype=x_in.dtype, device=x_in.device)
        options = model_options["transformer_options"]
        try:
            for idxs in windows(frames, self.context_length, self.context_overlap):
                window = cw.IndexListContextWindow(idxs, dim=0)
                if self.protocol == "animatediff":
                    options["ad_params"] = {
                        "full_length": frames,
                        "context_length": len(idxs),
                        "sub_idxs": idxs,
                    }
                else:
                    options["context_window"] = window
                sub_conds = [self.get_resized_cond(c, x_in, window) for c in conds]
                out = calc_cond_batch(model, sub_conds, x_in[idxs], timestep[idxs], model_options)
                for f, o in zip(final, out, strict=True):
                    f[idxs] += o
                counts[idxs] += 1
        finally:
            options.pop("ad_params", None)
            options.pop("context_window", None)
        return [f / counts for f in final]


class ContextWindowsReference:
    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "context_length": ("INT", {"default": 8, "min": 1, "max": 1000}),
                "context_overlap": ("INT", {"default": 4, "min": 0, "max": 1000}),
                "protocol": (["animatediff", "comfyui"],),
            }
        }

    def patch(self, model, context_length, context_overlap, protocol):
        patched = model.clone()
        patched.model_options["context_handler"] = WindowHandler(context_length, context_overlap, protocol)
        return (patched,)


NODE_CLASS_MAPPINGS = {"CSTestContextWindows": ContextWindowsReference}
