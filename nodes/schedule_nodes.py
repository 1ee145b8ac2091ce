"""Nodes that build strength schedules and per-frame strengths for Apply ControlNet Hint. Thin: the maths is
controlnet/schedule.py."""

from __future__ import annotations

from ..controlnet.schedule import INTERPOLATIONS, MAX_STRENGTH, FrameRange, FrameStrengths, Keyframe, Schedule

CATEGORY = "ControlStack/schedules"


def _where(cls: type, unique_id) -> str:
    return f"{cls.DISPLAY} (node {unique_id})" if unique_id is not None else cls.DISPLAY


class StrengthKeyframe:
    DISPLAY = "Strength Keyframe"
    DESCRIPTION = (
        "One keyframe of a strength schedule over sampling progress: from `percent` on, the ControlNet's residuals "
        "are multiplied by `strength` (on top of its strength, mode and layer scales), then `interpolation` leads "
        "to the next keyframe (hold: stay until it). Chain keyframes in order of percent through `previous` and "
        "plug the last into Apply ControlNet Hint's `schedule`. Before the first keyframe the multiplier is 1. "
        "Steps where it is 0 do not run the ControlNet."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CS_SCHEDULE",)
    RETURN_NAMES = ("schedule",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "percent": (
                    "FLOAT",
                    {
                        "default": 0.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.001,
                        "tooltip": "Sampling progress at which this keyframe takes effect (0 = first step).",
                    },
                ),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": MAX_STRENGTH,
                        "step": 0.01,
                        "tooltip": "Multiplier of the residuals from this keyframe on.",
                    },
                ),
                "interpolation": (
                    list(INTERPOLATIONS),
                    {
                        "tooltip": "How the multiplier goes on to the next keyframe's strength: hold (a step at "
                        "the next keyframe), linear, ease-in, ease-out, ease-in-out."
                    },
                ),
                "guarantee_steps": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 10000,
                        "tooltip": "Keep this keyframe for at least this many steps once it takes effect, even "
                        "if later keyframes' percents have passed.",
                    },
                ),
            },
            "optional": {
                "previous": ("CS_SCHEDULE", {"tooltip": "The keyframes before this one."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def build(self, percent, strength, interpolation, guarantee_steps, previous=None, unique_id=None):
        keyframe = Keyframe(
            float(percent),
            float(strength),
            interpolation,
            int(guarantee_steps),
            _where(type(self), unique_id),
        )
        return (Schedule((keyframe,)) if previous is None else previous.then(keyframe),)


class FrameStrengthsNode:
    DISPLAY = "Frame Strengths"
    DESCRIPTION = (
        "Per-frame strengths for a batch (video frames, per-latent keyframes): frames first_frame..last_frame "
        "(inclusive; -1 is the last frame) go from strength_from to strength_to along `interpolation`; frames no "
        "range names get other_frames. Chain several through `previous` (a later range overrides an earlier one; "
        "the last node's other_frames counts) and plug the last into Apply ControlNet Hint's `frame_strengths`. "
        "Applied to every batch row of the frame, cond and uncond alike, and to the frames of each context window."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CS_FRAME_STRENGTHS",)
    RETURN_NAMES = ("frame_strengths",)
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        frame = {
            "min": -100000,
            "max": 100000,
            "tooltip": "A frame index (latent in the batch); -1 is the last.",
        }
        strength = {"min": 0.0, "max": MAX_STRENGTH, "step": 0.01}
        return {
            "required": {
                "first_frame": ("INT", {**frame, "default": 0}),
                "last_frame": ("INT", {**frame, "default": -1}),
                "strength_from": (
                    "FLOAT",
                    {**strength, "default": 1.0, "tooltip": "Strength of first_frame."},
                ),
                "strength_to": ("FLOAT", {**strength, "default": 1.0, "tooltip": "Strength of last_frame."}),
                "interpolation": (
                    list(INTERPOLATIONS),
                    {
                        "default": "linear",
                        "tooltip": "From strength_from to strength_to (hold: all at from).",
                    },
                ),
                "other_frames": (
                    "FLOAT",
                    {**strength, "default": 1.0, "tooltip": "Strength of the frames no range names."},
                ),
            },
            "optional": {
                "previous": ("CS_FRAME_STRENGTHS", {"tooltip": "The ranges before this one."}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def build(
        self,
        first_frame,
        last_frame,
        strength_from,
        strength_to,
        interpolation,
        other_frames,
        previous=None,
        unique_id=None,
    ):
        frame_range = FrameRange(
            first_frame,
            last_frame,
            float(strength_from),
            float(strength_to),
            interpolation,
            _where(type(self), unique_id),
        )
        if previous is None:
            return (FrameStrengths((frame_range,), float(other_frames)),)
        return (previous.then(frame_range, float(other_frames)),)


NODE_CLASS_MAPPINGS = {
    "ControlStackStrengthKeyframe": StrengthKeyframe,
    "ControlStackFrameStrengths": FrameStrengthsNode,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "ControlStackStrengthKeyframe": "Strength Keyframe (ControlStack)",
    "ControlStackFrameStrengths": "Frame Strengths (ControlStack)",
}
