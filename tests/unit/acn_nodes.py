"""Advanced-ControlNet 1.5.6 keyframe nodes in API form, for the converter's unit tests and
scripts/check_against_advanced_controlnet.py (the inputs as its INPUT_TYPES name them; its defaults for the rest)."""

from __future__ import annotations


def keyframe(
    g: dict,
    nid: str,
    start: float,
    strength: float,
    guarantee: int = 1,
    prev: str | None = None,
    null: float = 0.0,
) -> list:
    """A Timestep Keyframe node `nid` in `g` (after `prev`); returns its output link."""
    g[nid] = {
        "class_type": "TimestepKeyframe",
        "inputs": {
            "start_percent": start,
            "strength": strength,
            "null_latent_kf_strength": null,
            "inherit_missing": True,
            "guarantee_steps": guarantee,
            **({"prev_timestep_kf": [prev, 0]} if prev else {}),
        },
    }
    return [nid, 0]


def latent_keyframe(g: dict, nid: str, index: int, strength: float, prev: str | None = None) -> list:
    """A Latent Keyframe node `nid` in `g` (after `prev`); returns its output link."""
    g[nid] = {
        "class_type": "LatentKeyframe",
        "inputs": {
            "batch_index": index,
            "strength": strength,
            **({"prev_latent_kf": [prev, 0]} if prev else {}),
        },
    }
    return [nid, 0]
