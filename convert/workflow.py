"""Convert ControlNet graphs built on ComfyUI's built-in nodes into ControlStack graphs (API format).

The built-in nodes put control on the conditioning path: each apply node copies the CONDITIONING it is given and
attaches a ControlNet to it, and the sampler runs each cond's ControlNets with the UNet rows of that cond.
ControlStack puts control on the model path: Apply ControlNet Hint patches the MODEL the sampler gets. For one
sampler, the two are the same when every ControlNet sits on the whole positive (and negative) prompt:

- a chain of apply nodes directly in front of a sampler's positive / negative inputs (built-in nodes only, nothing
  between them and the sampler) becomes a chain of Apply ControlNet Hint nodes on the sampler's MODEL, in the same
  order, with the same strength, window and hint, and the built-in's hint fitting (`BUILTIN_RESIZE`);
- which UNet rows each ControlNet reaches follows the host's rules exactly (comfy/samplers.py,
  ``apply_empty_x_to_equal_area``): an apply node seen by both prompts is "balanced"; one seen by the positive prompt
  only reaches the cond rows only ("ControlNet is more important", uncond rows x 0) -- unless the last apply node on
  the positive prompt is the old ``ControlNetApply`` (it sets ``control_apply_to_uncond``) and the negative prompt
  has no ControlNet at all, in which case the host copies the positive's ControlNets to the negative: all balanced;
- strength 0 makes a built-in apply node a pass-through, so it is dropped;
- loaders become Load ControlNet ("difference" loaders keep their MODEL), ``SetUnionControlNetType`` becomes
  ControlNet Union Type with the built-in's fusion maths.

Everything else is left as it is and named in the report with the reason: control on a part of the conditioning
(areas, combined / concatenated conds, anything between an apply node and the sampler), on the negative prompt
only, a ControlNet whose outputs also feed a node that is not converted, DiT models and ControlNets (by file name), a strength from another node, Advanced-ControlNet's nodes. A sampler is converted completely or not
at all, so a graph never mixes both paths for one sampler (the host's uncond rule would then change).

Pure Python on the JSON (no host import; the constants come from their homes in controlnet/ and preprocessors/): used by the CLI (``python -m controlstack.convert``) and by
the server route behind the frontend's menu command (nodes/routes.py), which applies the same result to the open
graph (web/convert.js).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..controlnet.stack import LAYER_NAMES, MAX_LAYER_SCALE, PROMPT_DECAY
from ..preprocessors.resize import BUILTIN_RESIZE

Link = list  # [node id, output slot]
Prompt = dict[str, dict[str, Any]]

SAMPLERS = {
    "KSampler": ("model", "positive", "negative"),
    "KSamplerAdvanced": ("model", "positive", "negative"),
    "SamplerCustom": ("model", "positive", "negative"),
    "CFGGuider": ("model", "positive", "negative"),
}
"""Nodes that sample a MODEL with a positive and a negative prompt: (model input, positive input, negative input)."""
APPLY_ADVANCED = "ControlNetApplyAdvanced"
APPLY_POSITIVE = "ControlNetApply"
APPLY_BOTH = {
    APPLY_ADVANCED: (),
    "ACN_AdvancedControlNetApply_v2": (),
    "ACN_AdvancedControlNetApply": (2,),
}
"""Apply nodes on both prompts (outputs: positive 0, negative 1) -> their extra MODEL pass-through outputs
(Advanced-ControlNet's deprecated apply node returns its model_optional input)."""
APPLY_SINGLE = {
    APPLY_POSITIVE: (),
    "ACN_AdvancedControlNetApplySingle_v2": (1,),
    "ACN_AdvancedControlNetApplySingle": (1,),
}
"""Apply nodes on one prompt (input `conditioning`, output 0) that set ``control_apply_to_uncond`` (the host copies
their ControlNet to a negative prompt that has none) -> their extra outputs (model_opt)."""
APPLY_NODES = (*APPLY_BOTH, *APPLY_SINGLE)
LOADERS = {
    "ControlNetLoader": (False, "control_net_name"),
    "DiffControlNetLoader": (True, "control_net_name"),
    "ACN_ControlNetLoaderAdvanced": (False, "cnet"),
    "ACN_DiffControlNetLoaderAdvanced": (True, "cnet"),
    "ControlNetLoaderAdvanced": (False, "control_net_name"),
    "DiffControlNetLoaderAdvanced": (True, "control_net_name"),
}
"""ControlNet loaders -> (whether they take the base MODEL: "difference" files, the input naming the file)."""
ACN_OPTIONS = {"mask_optional": "an attention mask"}
"""Advanced-ControlNet's optional inputs that are not converted: a node with one connected stays (ControlStack has
masks of its own, but no conversion of Advanced-ControlNet's is proven the same yet)."""
ACN_KEYFRAMES_INPUTS = ("timestep_kf", "_tk_opt", "tk_optional", "timestep_keyframe")
"""Advanced-ControlNet's TIMESTEP_KEYFRAME inputs: on an apply node (`timestep_kf`, it wins) or on a loader (the
ControlNet carries them to every apply node that uses it; `tk_optional` / `timestep_keyframe` on the deprecated
loaders)."""
ACN_TIMESTEP_KEYFRAME = "TimestepKeyframe"
ACN_LATENT_KEYFRAME = "LatentKeyframe"
ACN_DEFAULT_NULL_STRENGTH = 0.0
"""The null_latent_kf_strength of the keyframe Advanced-ControlNet puts at 0 % when none is there (and of the
one a weights node's TK_SHORTCUT carries): the strength of the latents no latent keyframe names."""
ACN_KEYFRAME_UNCONVERTED = {
    "cn_weights": "weights that change with the keyframe",
    "control_net_weights": "weights that change with the keyframe",
    "latent_keyframe": "latent keyframes",
    "mask_optional": "a mask",
}
"""Timestep Keyframe inputs (and their old names) whose keyframe is not converted when connected."""
ACN_SOFT_WEIGHTS = {"ACN_ScaledSoftControlNetWeights", "ScaledSoftControlNetWeights"}
"""Scaled Soft Weights: layer i x base_multiplier^(n-1-i), the middle 1.0 -- ControlStack's "soft weights". The
deprecated node's flip_weights is ignored by Advanced-ControlNet itself (1.5.6 nodes_deprecated.py), so the
conversion does not flip either."""
ACN_LAYER_WEIGHTS = {"ACN_SoftControlNetWeightsSD15", "ACN_CustomControlNetWeightsSD15"}
"""Per-layer weights output_0..output_11 (shallow first, as ControlStack's in_00..in_11) and middle_0."""
ACN_WEIGHTS = ACN_SOFT_WEIGHTS | ACN_LAYER_WEIGHTS
T2I_MARKERS = ("t2i", "adapter")
"""File-name marks of T2I-Adapters: Advanced-ControlNet weighs their layers its own way, so weights on one are not
converted."""
UNION_TYPE = "SetUnionControlNetType"
ADVANCED_CONTROLNET = {
    "ACN_SparseCtrlLoaderAdvanced",
    "ACN_SparseCtrlMergedLoaderAdvanced",
    "ACN_ControlNet++LoaderAdvanced",
    "ACN_ControlNet++LoaderSingle",
    "ACN_AnimaLLLiteLoaderAdvanced",
    "ACN_ReferenceControlNet",
    "ACN_ReferencePreprocessor",
    "ACN_CtrLoRALoader",
    "TimestepKeyframe",
    "ACN_TimestepKeyframeInterpolation",
    "ACN_TimestepKeyframeFromStrengthList",
    "LatentKeyframe",
    "LatentKeyframeGroup",
    "LatentKeyframeTiming",
    "LatentKeyframeBatchedGroup",
    "ACN_ScaledSoftControlNetWeights",
    "ScaledSoftControlNetWeights",
    "ACN_SoftControlNetWeightsSD15",
    "SoftControlNetWeights",
    "ACN_CustomControlNetWeightsSD15",
    "CustomControlNetWeights",
    "ACN_SoftT2IAdapterWeights",
    "SoftT2IAdapterWeights",
    "ACN_CustomT2IAdapterWeights",
    "CustomT2IAdapterWeights",
    "ACN_DefaultUniversalWeights",
    "ScaledSoftMaskedUniversalWeights",
}
"""ComfyUI-Advanced-ControlNet's other nodes (keyframes, weights, SparseCtrl, ControlNet++, reference, ...):
reported, not converted (docs/convert.md)."""

DIT_MARKERS = (
    "sd3",
    "flux",
    "hunyuan",
    "qwen",
    "hidream",
    "wan2",
    "wan_",
    "cosmos",
    "auraflow",
    "lumina",
    "chroma",
)
"""File-name marks of DiT models and their ControlNets (the converter sees names only; a DiT file that slips through
is still refused, with its name, by Load ControlNet when the graph runs)."""

CS_LOAD = "ControlStackLoadControlNet"
CS_UNION = "ControlStackUnionType"
CS_APPLY = "ControlStackApplyHint"
CS_SCALE = "ControlStackControlScale"
CS_KEYFRAME = "ControlStackStrengthKeyframe"
CS_FRAMES = "ControlStackFrameStrengths"
MODE_CONTROL = "ControlNet is more important"
MODE_SOFT = "soft weights"
MODE_CUSTOM = "custom"
FUSION_BUILTIN = "ComfyUI built-in"


class Refused(Exception):
    """A sampler's control that has no model-path equivalent; the message says why."""


@dataclass
class Report:
    """What the conversion did: per sampler converted, per node left unchanged with the reason."""

    converted: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"converted: {len(self.converted)}, left unchanged: {len(self.unchanged)}"]
        lines += [f"  converted  {c}" for c in self.converted]
        lines += [f"  unchanged  {u}" for u in self.unchanged]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, list[str]]:
        return {"converted": list(self.converted), "unchanged": list(self.unchanged)}


@dataclass
class Conversion:
    prompt: Prompt
    """The converted API graph (the input is not changed)."""
    report: Report
    placed_near: dict[str, str]
    """New node id -> the original node it stands for (the frontend puts it there)."""
    removed: list[str]
    """Original node ids no longer in the graph."""


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _name(prompt: Prompt, node_id: str) -> str:
    node = prompt[node_id]
    title = node.get("_meta", {}).get("title")
    return f"{node['class_type']} (node {node_id}{f', {title!r}' if title and title != node['class_type'] else ''})"


def _consumers(prompt: Prompt) -> dict[tuple[str, int], list[tuple[str, str]]]:
    out: dict[tuple[str, int], list[tuple[str, str]]] = {}
    for nid, node in prompt.items():
        for name, value in node.get("inputs", {}).items():
            if _is_link(value):
                out.setdefault((str(value[0]), value[1]), []).append((nid, name))
    return out


def _upstream(prompt: Prompt, link: Link) -> Iterable[str]:
    """Every node id the value of `link` is computed from (itself included)."""
    seen: set[str] = set()
    todo = [str(link[0])]
    while todo:
        nid = todo.pop()
        if nid in seen or nid not in prompt:
            continue
        seen.add(nid)
        todo += [str(v[0]) for v in prompt[nid].get("inputs", {}).values() if _is_link(v)]
    return seen


@dataclass
class _Chain:
    nodes: list[str]
    """Apply nodes with a nonzero strength, nearest the sampler first."""
    passed: list[str]
    """Every apply node walked through (strength 0 included)."""
    root: Link
    """Where the prompt comes from once the apply nodes are skipped."""


def _strength(prompt: Prompt, nid: str) -> float:
    value = prompt[nid]["inputs"].get("strength", 1.0)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise Refused(f"{_name(prompt, nid)}: its strength comes from another node; set it on the node")
    return float(value)


def _walk(prompt: Prompt, link: Link, side: str) -> _Chain:
    nodes: list[str] = []
    passed: list[str] = []
    while _is_link(link) and str(link[0]) in prompt:
        nid, slot = str(link[0]), link[1]
        node = prompt[nid]
        kind = node["class_type"]
        if kind in APPLY_BOTH:
            if slot not in (0, 1):
                raise Refused(f"{_name(prompt, nid)}: its output {slot} is the {side} prompt")
            if slot != (0 if side == "positive" else 1):
                raise Refused(
                    f"{_name(prompt, nid)}: its {('positive', 'negative')[slot]} output is the {side} prompt"
                )
            nxt = node["inputs"].get("positive" if slot == 0 else "negative")
        elif kind in APPLY_SINGLE:
            if slot != 0:
                raise Refused(f"{_name(prompt, nid)}: its output {slot} is the {side} prompt")
            nxt = node["inputs"].get("conditioning")
        else:
            break
        _check_options(prompt, nid)
        passed.append(nid)
        if _strength(prompt, nid) != 0.0:
            nodes.append(nid)
        link = nxt
    return _Chain(nodes, passed, link)


def _check_options(prompt: Prompt, nid: str) -> None:
    """Advanced-ControlNet's masks, keyframes and weights are not converted: refuse a node that has one."""
    for key, what in ACN_OPTIONS.items():
        if _is_link(prompt[nid]["inputs"].get(key)):
            raise Refused(
                f"{_name(prompt, nid)}: its {key} input is connected ({what}); Advanced-ControlNet's masks, "
                "keyframes and weights are not converted yet (docs/convert.md)"
            )


@dataclass
class _Plan:
    sampler: str
    entries: list[tuple[str, str]]
    """(apply node, "balanced" | "control"), applied first to last."""
    positive: _Chain
    negative: _Chain


def _plan(prompt: Prompt, sid: str) -> _Plan:
    model_in, pos_in, neg_in = SAMPLERS[prompt[sid]["class_type"]]
    inputs = prompt[sid]["inputs"]
    if not all(_is_link(inputs.get(k)) for k in (model_in, pos_in, neg_in)):
        raise Refused("its model or prompts are not connected")
    pos, neg = _walk(prompt, inputs[pos_in], "positive"), _walk(prompt, inputs[neg_in], "negative")
    for chain, side in ((pos, "positive"), (neg, "negative")):
        if chain.passed and not _is_link(chain.root):
            raise Refused(
                f"{_name(prompt, chain.passed[-1])}: its {side} conditioning input is not connected"
            )
    for chain, side in ((pos, "positive"), (neg, "negative")):
        for nid in _upstream(prompt, chain.root):
            kind = prompt[nid]["class_type"]
            if kind in APPLY_NODES or kind in ADVANCED_CONTROLNET:
                between = _name(prompt, str(chain.root[0]))
                raise Refused(
                    f"{_name(prompt, nid)} is applied before {between} on the {side} prompt: control on a part of "
                    "the conditioning (areas, combined or concatenated prompts) has no model-path equivalent"
                )
    only_negative = [n for n in neg.nodes if n not in pos.nodes]
    if only_negative:
        raise Refused(f"{_name(prompt, only_negative[0])} acts on the negative prompt only")
    # DiT ControlNets (their apply node also takes a VAE, but so may an SD one, which ignores it): by file name
    names = [
        (nid, prompt[nid]["inputs"].get(key))
        for nid in _upstream(prompt, inputs[model_in])
        for key in ("ckpt_name", "unet_name")
    ]
    for nid in pos.nodes:
        names += [(src, _file(prompt, src)) for src in _loaders(prompt, nid)]
    for nid, file in names:
        if isinstance(file, str) and any(m in file.lower() for m in DIT_MARKERS):
            raise Refused(
                f"{_name(prompt, nid)} loads {file!r}, a DiT model or ControlNet (Flux, SD3, ...) by its name; "
                "ControlStack runs SD1.x / SD2.x / SDXL control"
            )
    # the host copies the positive prompt's ControlNets to the negative prompt when the negative has none and the
    # last apply node on the positive set control_apply_to_uncond (the single-prompt apply nodes do)
    copied = bool(pos.nodes) and not neg.nodes and prompt[pos.nodes[0]]["class_type"] in APPLY_SINGLE
    entries = [(nid, "balanced" if copied or nid in neg.nodes else "control") for nid in reversed(pos.nodes)]
    return _Plan(sid, entries, pos, neg)


def _file(prompt: Prompt, loader_id: str) -> Any:
    node = prompt[loader_id]
    return node["inputs"].get(LOADERS[node["class_type"]][1]) if node["class_type"] in LOADERS else None


def _loaders(prompt: Prompt, apply_id: str) -> list[str]:
    try:
        return _control_net_sources(prompt, prompt[apply_id]["inputs"].get("control_net"))
    except Refused:
        return []


def _control_net_sources(prompt: Prompt, link: Link) -> list[str]:
    """The built-in nodes a CONTROL_NET link is made by (a loader, maybe a union-type node before it)."""
    if not _is_link(link) or str(link[0]) not in prompt:
        raise Refused("an apply node's control_net is not connected")
    nid = str(link[0])
    kind = prompt[nid]["class_type"]
    if kind == UNION_TYPE:
        return [nid, *_control_net_sources(prompt, prompt[nid]["inputs"]["control_net"])]
    if kind not in LOADERS:
        raise Refused(f"its ControlNet comes from {_name(prompt, nid)}, not a loader the converter knows")
    _check_options(prompt, nid)
    return [nid]


def _literal(prompt: Prompt, nid: str, key: str, default: Any) -> Any:
    value = prompt[nid]["inputs"].get(key, default)
    if _is_link(value):
        raise Refused(f"{_name(prompt, nid)}: its {key} comes from another node; set it on the node")
    return value


@dataclass(frozen=True)
class _AcnControls:
    """What Advanced-ControlNet's keyframes and weights make of one apply node, as ControlStack inputs."""

    keyframes: tuple[tuple[float, float, int], ...] = ()
    """(percent, strength, guarantee_steps), in Advanced-ControlNet's order (stable by start_percent)."""
    frames: tuple[tuple[int, float], ...] = ()
    """Latent keyframes (batch index, strength), in Advanced-ControlNet's order (by batch index)."""
    other_frames: float = ACN_DEFAULT_NULL_STRENGTH
    """The strength of the latents no latent keyframe names."""
    scales: tuple[tuple[str, Any], ...] | None = None
    """ControlScale inputs, or None."""
    sources: tuple[str, ...] = ()
    """The keyframe / weights nodes read."""


def _acn_controls(prompt: Prompt, apply_id: str) -> _AcnControls:
    """The timestep keyframes and weights Advanced-ControlNet gives the ControlNet of `apply_id`: the apply node's
    `timestep_kf` wins over its loader's keyframes (Advanced-ControlNet's set_timestep_keyframes), its
    `weights_override` over the keyframes' weights (re-applied at every keyframe change)."""
    inputs = prompt[apply_id]["inputs"]
    keyframes_link = inputs.get("timestep_kf")
    if not _is_link(keyframes_link):
        for src in _loaders(prompt, apply_id):
            for key in ACN_KEYFRAMES_INPUTS:
                if _is_link(prompt[src]["inputs"].get(key)):
                    keyframes_link = prompt[src]["inputs"][key]
    found: list[tuple[float, float, int, float]] = []
    weights_link, sources = None, []
    if _is_link(keyframes_link):
        found, weights_link, sources = _acn_keyframes(prompt, keyframes_link)
    if _is_link(inputs.get("weights_override")):
        weights_link = inputs["weights_override"]
    scales = None
    if weights_link is not None:
        scales = _acn_weights(prompt, weights_link, apply_id)
        sources.append(str(weights_link[0]))
    frames: list[tuple[int, float]] = []
    other = ACN_DEFAULT_NULL_STRENGTH
    if _is_link(inputs.get("latent_kf_override")):
        frames = _acn_latent_keyframes(prompt, inputs["latent_kf_override"], sources)
        # the latents no latent keyframe names get the current timestep keyframe's null_latent_kf_strength; Frame
        # Strengths has one value for the run, so every keyframe that can be current must agree
        nulls = {null for *_, null in found}
        if not any(percent == 0.0 for percent, *_ in found):
            nulls.add(ACN_DEFAULT_NULL_STRENGTH)
        if len(nulls) > 1:
            raise Refused(
                f"{_name(prompt, apply_id)}: its latent keyframes' other latents take each timestep keyframe's "
                f"null_latent_kf_strength, which changes during the run ({sorted(nulls)}); not converted"
            )
        other = nulls.pop()
    keyframes = tuple((percent, strength, guarantee) for percent, strength, guarantee, _ in found)
    return _AcnControls(keyframes, tuple(frames), other, scales, tuple(sources))


def _acn_latent_keyframes(prompt: Prompt, link: Link, sources: list[str]) -> list[tuple[int, float]]:
    """A chain of Latent Keyframe nodes -> (batch index, strength) as Advanced-ControlNet's group holds them: a
    later keyframe replaces an earlier one of the same index, sorted by index (negative ones, counted from the
    end, first; so a frame named both ways gets its non-negative keyframe, as in Advanced-ControlNet)."""
    chain = []
    while _is_link(link):
        nid = str(link[0])
        if prompt[nid]["class_type"] != ACN_LATENT_KEYFRAME:
            raise Refused(
                f"its latent keyframes come from {_name(prompt, nid)}; only chains of {ACN_LATENT_KEYFRAME} "
                "nodes are converted (docs/convert.md)"
            )
        chain.append(
            (int(_literal(prompt, nid, "batch_index", 0)), float(_literal(prompt, nid, "strength", 1.0)))
        )
        sources.append(nid)
        inputs = prompt[nid]["inputs"]
        link = inputs.get("prev_latent_kf", inputs.get("prev_latent_keyframe"))
    by_index = dict(reversed(chain))  # the chain was walked last-added first: the last added wins
    return sorted(by_index.items())


def _acn_keyframes(
    prompt: Prompt, link: Link
) -> tuple[list[tuple[float, float, int, float]], Link | None, list[str]]:
    """A chain of Timestep Keyframe nodes -> (percent, strength, guarantee_steps, null_latent_kf_strength) each; a
    weights node's TK_SHORTCUT output (one keyframe at 0 that only carries the weights) -> no keyframes and those
    weights."""
    nid, slot = str(link[0]), link[1]
    kind = prompt[nid]["class_type"]
    if kind in ACN_WEIGHTS and slot == 1:
        return [], [nid, 0], [nid]
    found: list[tuple[float, float, int, float]] = []
    sources: list[str] = []
    while True:
        if kind != ACN_TIMESTEP_KEYFRAME:
            raise Refused(
                f"its timestep keyframes come from {_name(prompt, nid)}; only chains of "
                f"{ACN_TIMESTEP_KEYFRAME} nodes are converted (docs/convert.md)"
            )
        for key, what in ACN_KEYFRAME_UNCONVERTED.items():
            if _is_link(prompt[nid]["inputs"].get(key)):
                raise Refused(
                    f"{_name(prompt, nid)}: its {key} input is connected ({what}), which is not converted yet "
                    "(docs/convert.md)"
                )
        # a keyframe saved before guarantee_steps existed guarantees int(guarantee_usage) (default True) steps
        old_default = int(bool(_literal(prompt, nid, "guarantee_usage", True)))
        found.append(
            (
                float(_literal(prompt, nid, "start_percent", 0.0)),
                float(_literal(prompt, nid, "strength", 1.0)),
                int(_literal(prompt, nid, "guarantee_steps", old_default)),
                float(_literal(prompt, nid, "null_latent_kf_strength", ACN_DEFAULT_NULL_STRENGTH)),
            )
        )
        sources.append(nid)
        prev = prompt[nid]["inputs"].get(
            "prev_timestep_kf", prompt[nid]["inputs"].get("prev_timestep_keyframe")
        )
        if not _is_link(prev):
            break
        nid, kind = str(prev[0]), prompt[str(prev[0])]["class_type"]
    # the group is built first keyframe first; Advanced-ControlNet keeps it sorted by start_percent, ties in the
    # order they were added (utils.get_sorted_list_via_attr)
    found.reverse()
    found.sort(key=lambda k: k[0])
    return found, None, sources


def _acn_weights(prompt: Prompt, link: Link, apply_id: str) -> tuple[tuple[str, Any], ...]:
    """A weights node -> the ControlScale inputs that weigh the layers and the uncond rows the same way."""
    nid = str(link[0])
    node = prompt[nid]
    kind = node["class_type"]
    if kind not in ACN_WEIGHTS or link[1] != 0:
        raise Refused(
            f"its weights come from {_name(prompt, nid)}; converted are {', '.join(sorted(ACN_WEIGHTS))} "
            "(docs/convert.md)"
        )
    if _is_link(node["inputs"].get("cn_extras")):
        raise Refused(f"{_name(prompt, nid)}: its cn_extras input is connected, which is not converted yet")
    for src in _loaders(prompt, apply_id):
        file = _file(prompt, src)
        if isinstance(file, str) and any(m in file.lower() for m in T2I_MARKERS):
            raise Refused(
                f"{_name(prompt, nid)} weighs {file!r}, a T2I-Adapter by its name: Advanced-ControlNet weighs "
                "adapter layers its own way, which is not converted"
            )
    uncond = float(_literal(prompt, nid, "uncond_multiplier", 1.0))
    layers = {name: 1.0 for name in LAYER_NAMES}
    if kind in ACN_SOFT_WEIGHTS:
        mode, base = MODE_SOFT, float(_literal(prompt, nid, "base_multiplier", PROMPT_DECAY))
    else:
        mode, base = MODE_CUSTOM, PROMPT_DECAY
        values = [_literal(prompt, nid, f"output_{i}", 1.0) for i in range(len(LAYER_NAMES) - 1)]
        values.append(_literal(prompt, nid, "middle_0", 1.0))
        for name, value in zip(LAYER_NAMES, values, strict=True):
            if not 0.0 <= float(value) <= MAX_LAYER_SCALE:
                raise Refused(
                    f"{_name(prompt, nid)}: a weight of {value} is outside ControlNet Layer Scales' "
                    f"0..{MAX_LAYER_SCALE}"
                )
            layers[name] = float(value)
    return (
        ("mode", mode),
        *layers.items(),
        ("base_multiplier", base),
        ("flip_weights", False),
        ("uncond_multiplier", uncond),
    )


class _Builder:
    def __init__(self, prompt: Prompt, first_new_id: int | None = None) -> None:
        self.prompt = prompt
        self.next_id = max((int(k) for k in prompt if str(k).isdigit()), default=0) + 1
        if first_new_id is not None:
            self.next_id = max(self.next_id, first_new_id)
        self.placed_near: dict[str, str] = {}
        self.memo: dict[Any, Link] = {}

    def add(self, class_type: str, inputs: dict, title: str, near: str) -> str:
        nid = str(self.next_id)
        self.next_id += 1
        self.prompt[nid] = {"class_type": class_type, "inputs": inputs, "_meta": {"title": title}}
        self.placed_near[nid] = near
        return nid

    def control_net(self, link: Link) -> Link:
        """The ControlStack control file for a built-in CONTROL_NET link (one per original node)."""
        src = str(link[0])
        if ("cn", src) in self.memo:
            return self.memo[("cn", src)]
        node = self.prompt[src]
        kind, inputs = node["class_type"], node["inputs"]
        title = node.get("_meta", {}).get("title") or kind
        if kind in LOADERS:
            takes_model, file_input = LOADERS[kind]
            new = {"control_net_name": inputs[file_input]}
            if takes_model:
                new["model"] = inputs["model"]
            out = [self.add(CS_LOAD, new, title, src), 0]
        elif kind == UNION_TYPE:
            inner = self.control_net(inputs["control_net"])
            new = {"control_net": inner, "control_type": inputs.get("type", "auto"), "fusion": FUSION_BUILTIN}
            out = [self.add(CS_UNION, new, title, src), 0]
        else:
            raise Refused(
                f"its ControlNet comes from {_name(self.prompt, src)}, not a loader the converter knows"
            )
        self.memo[("cn", src)] = out
        return out

    def control_scale(self, near: str) -> Link:
        if "scale" not in self.memo:
            inputs = {
                "mode": MODE_CONTROL,
                **{name: 1.0 for name in LAYER_NAMES},
                "base_multiplier": PROMPT_DECAY,
                "flip_weights": False,
                "uncond_multiplier": 1.0,
            }
            self.memo["scale"] = [self.add(CS_SCALE, inputs, "ControlNet is more important", near), 0]
        return self.memo["scale"]

    def layer_scales(self, inputs: tuple[tuple[str, Any], ...], near: str) -> Link:
        """A ControlNet Layer Scales node for Advanced-ControlNet weights (one per distinct setting)."""
        key = ("scales", inputs)
        if key not in self.memo:
            title = f"{dict(inputs)['mode']} (from Advanced-ControlNet)"
            self.memo[key] = [self.add(CS_SCALE, dict(inputs), title, near), 0]
        return self.memo[key]

    def _chain(self, class_type: str, links: list[tuple[dict, str]], near: str) -> Link:
        """Nodes of `class_type` chained through their `previous` input, first first; returns the last."""
        link = None
        for inputs, title in links:
            link = [self.add(class_type, {**inputs, **({"previous": link} if link else {})}, title, near), 0]
        assert link is not None
        return link

    def schedule(self, keyframes: tuple[tuple[float, float, int], ...], near: str) -> Link:
        """A chain of Strength Keyframe nodes (hold: Advanced-ControlNet's keyframes are steps) for `keyframes`."""
        key = ("schedule", keyframes)
        if key not in self.memo:
            nodes = [
                (
                    {"percent": p, "strength": s, "interpolation": "hold", "guarantee_steps": g},
                    f"keyframe at {p:g}",
                )
                for p, s, g in keyframes
            ]
            self.memo[key] = self._chain(CS_KEYFRAME, nodes, near)
        return self.memo[key]

    def frame_strengths(self, frames: tuple[tuple[int, float], ...], other: float, near: str) -> Link:
        """A chain of Frame Strengths nodes, one frame each, for Advanced-ControlNet's latent keyframes."""
        key = ("frames", frames, other)
        if key not in self.memo:
            nodes = [
                (
                    {
                        "first_frame": i,
                        "last_frame": i,
                        "strength_from": s,
                        "strength_to": s,
                        "interpolation": "hold",
                        "other_frames": other,
                    },
                    f"latent {i}",
                )
                for i, s in frames
            ]
            self.memo[key] = self._chain(CS_FRAMES, nodes, near)
        return self.memo[key]

    def model_chain(self, model: Link, entries: list[tuple[str, str]]) -> Link:
        """Apply ControlNet Hint nodes for `entries` on `model` (the same chain is built once per model)."""
        key = ("chain", tuple(model), tuple(entries))
        if key in self.memo:
            return self.memo[key]
        link = model
        for nid, mode in entries:
            node = self.prompt[nid]
            inputs = node["inputs"]
            new = {
                "model": link,
                "control_net": self.control_net(inputs["control_net"]),
                "image": inputs["image"],
                "strength": float(inputs.get("strength", 1.0)),
                "start_percent": float(inputs.get("start_percent", 0.0)),
                "end_percent": float(inputs.get("end_percent", 1.0)),
                "resize_mode": BUILTIN_RESIZE,
            }
            acn = _acn_controls(self.prompt, nid)
            if mode == "control":
                new["scales"] = self.control_scale(nid)
            elif acn.scales is not None:
                new["scales"] = self.layer_scales(acn.scales, nid)
            if acn.keyframes:
                new["schedule"] = self.schedule(acn.keyframes, nid)
            if acn.frames:
                new["frame_strengths"] = self.frame_strengths(acn.frames, acn.other_frames, nid)
            title = node.get("_meta", {}).get("title") or node["class_type"]
            link = [self.add(CS_APPLY, new, title, nid), 0]
        self.memo[key] = link
        return link


def convert_api(prompt: Prompt, first_new_id: int | None = None) -> Conversion:
    """Convert an API-format graph; returns the new graph (a copy), the report, and where new nodes belong.
    New nodes get ids from `first_new_id` on (default: after the largest id)."""
    original = prompt
    prompt = json.loads(json.dumps(prompt))
    report = Report()
    samplers = [nid for nid, n in prompt.items() if n.get("class_type") in SAMPLERS]
    plans: dict[str, _Plan] = {}
    refused: dict[str, str] = {}
    for sid in samplers:
        try:
            plan = _plan(prompt, sid)
            for nid, mode in plan.entries:
                _control_net_sources(prompt, prompt[nid]["inputs"]["control_net"])
                if _acn_controls(prompt, nid).scales is not None and mode == "control":
                    raise Refused(
                        f"{_name(prompt, nid)} reaches the positive prompt's rows only and has Advanced-ControlNet "
                        "weights: that combination is not converted yet"
                    )
            if plan.entries or plan.positive.passed or plan.negative.passed:
                plans[sid] = plan
        except Refused as e:
            refused[sid] = str(e)
    # an apply node whose outputs also feed something that is not converted stays, and so do its samplers
    consumers = _consumers(prompt)
    report.unchanged += _unreached(prompt, samplers, consumers)
    changed = True
    while changed:
        changed = False
        allowed = {(sid, SAMPLERS[prompt[sid]["class_type"]][k]) for sid in plans for k in (1, 2)} | {
            (nid, name)
            for p in plans.values()
            for nid in p.positive.passed + p.negative.passed
            for name in ("positive", "negative", "conditioning")
        }
        for sid, plan in list(plans.items()):
            for nid in plan.positive.passed + plan.negative.passed:
                outside = [
                    c for slot in (0, 1, 2) for c in consumers.get((nid, slot), []) if c not in allowed
                ]
                if outside:
                    refused[sid] = (
                        f"{_name(prompt, nid)} also feeds {_name(prompt, outside[0][0])}, which is not converted"
                    )
                    del plans[sid]
                    changed = True
                    break
    builder = _Builder(prompt, first_new_id)
    for sid, plan in plans.items():
        model_in, pos_in, neg_in = SAMPLERS[prompt[sid]["class_type"]]
        inputs = prompt[sid]["inputs"]
        inputs[model_in] = builder.model_chain(inputs[model_in], plan.entries)
        inputs[pos_in], inputs[neg_in] = plan.positive.root, plan.negative.root
        described = ", ".join(
            f"{_name(original, nid)} -> {'balanced' if mode == 'balanced' else MODE_CONTROL!r}"
            for nid, mode in plan.entries
        )
        report.converted.append(
            f"{_name(original, sid)}: {described or 'only strength-0 apply nodes (dropped)'}"
        )
    for sid, why in refused.items():
        report.unchanged.append(f"{_name(original, sid)}: {why}")
    removed = _remove_unused(
        prompt, {nid for p in plans.values() for nid in p.positive.passed + p.negative.passed}
    )
    for nid, node in original.items():
        if nid in prompt and node.get("class_type") in ADVANCED_CONTROLNET:
            report.unchanged.append(
                f"{_name(original, nid)}: Advanced-ControlNet nodes are not converted yet (docs/convert.md)"
            )
    return Conversion(prompt, report, builder.placed_near, sorted(removed, key=_node_key))


def _unreached(prompt: Prompt, samplers: list[str], consumers: dict) -> list[str]:
    """Apply nodes whose conditioning reaches no sampler of this graph (it goes out of a subgraph, into one, or
    nowhere): nothing to convert them with, so they stay; say so."""
    reached: set[str] = set()
    for sid in samplers:
        for key in SAMPLERS[prompt[sid]["class_type"]][1:]:
            if _is_link(prompt[sid]["inputs"].get(key)):
                reached |= set(_upstream(prompt, prompt[sid]["inputs"][key]))
    out = []
    for nid, node in prompt.items():
        if node["class_type"] in APPLY_NODES and nid not in reached:
            goes = sorted({_name(prompt, c) for slot in (0, 1) for c, _ in consumers.get((nid, slot), [])})
            out.append(
                f"{_name(prompt, nid)}: its conditioning reaches no sampler in this graph"
                f"{' (it goes to ' + ', '.join(goes) + ')' if goes else ''}; a sampler and its ControlNet nodes "
                "must be in one graph (the root graph or one subgraph) to convert"
            )
    return out


def _remove_unused(prompt: Prompt, applies: set[str]) -> set[str]:
    """Drop the converted apply nodes, then the loaders / union-type nodes and Advanced-ControlNet keyframe /
    weights nodes they read that nothing reads any more."""
    sources = set()
    for nid in applies:
        try:
            sources.update(_control_net_sources(prompt, prompt[nid]["inputs"].get("control_net")))
            sources.update(_acn_controls(prompt, nid).sources)
        except Refused:
            pass
    # a loader's keyframes that an apply node's own keyframes overrode go with the loader
    for nid in list(sources):
        for key in ACN_KEYFRAMES_INPUTS:
            link = prompt[nid]["inputs"].get(key)
            if _is_link(link):
                sources.update(
                    n
                    for n in _upstream(prompt, link)
                    if prompt[n]["class_type"] in {ACN_TIMESTEP_KEYFRAME, *ACN_WEIGHTS}
                )
    for nid in applies:
        del prompt[nid]
    removed = set(applies)
    while True:
        used = {str(v[0]) for n in prompt.values() for v in n.get("inputs", {}).values() if _is_link(v)}
        drop = [nid for nid in sources - removed if nid not in used]
        if not drop:
            return removed
        removed.update(drop)
        for nid in drop:
            del prompt[nid]


def _node_key(nid: str) -> tuple[int, str]:
    return (int(nid), "") if nid.isdigit() else (1 << 62, nid)
