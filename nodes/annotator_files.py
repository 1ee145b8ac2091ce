"""Where annotator files are found: ComfyUI's ``annotators`` model folder, then comfyui_controlnet_aux's downloads.

Nothing is ever downloaded. The ``annotators`` folder (``models/annotators``) is registered with ``folder_paths``, so
``extra_model_paths.yaml`` entries named ``annotators`` add folders the same way as for any model type. Users of
comfyui_controlnet_aux already have the files in its checkpoint folder (``custom_nodes/comfyui_controlnet_aux/ckpts``,
the ``annotator_ckpts_path`` of its ``config.yaml``, or ``$AUX_ANNOTATOR_CKPTS_PATH``), laid out by model repository
(``lllyasviel/Annotators/ControlNetHED.pth``) or as a Hugging Face cache; those are searched for the published file
names, so the files are used where they are.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import folder_paths

from ..preprocessors.annotators.common import AnnotatorFileError

FOLDER = "annotators"
EXTENSIONS = {".pth", ".pt", ".safetensors", ".bin", ".ckpt"}
AUX_PREFIX = "controlnet_aux/"
"""Combo values of files found in comfyui_controlnet_aux's folders start with this (then the path under its root)."""
_AUX_PACK = "comfyui_controlnet_aux"
_MAX_DEPTH = 8  # ckpts/<org>/<repo>/... or models--org--repo/snapshots/<hash>/<sub>/file


def register_folder() -> None:
    """``models/annotators`` as a ComfyUI model folder (kept after any folders extra_model_paths.yaml added)."""
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER))
    exts = folder_paths.folder_names_and_paths[FOLDER][1]
    if isinstance(exts, set):
        exts.update(EXTENSIONS)


def annotator_folders() -> list[str]:
    return folder_paths.get_folder_paths(FOLDER)


def aux_roots() -> list[Path]:
    """comfyui_controlnet_aux's checkpoint folders that exist, in the order that pack itself would use them."""
    roots: list[Path] = []
    env = os.environ.get("AUX_ANNOTATOR_CKPTS_PATH")
    if env:
        roots.append(Path(env))
    for custom in folder_paths.get_folder_paths("custom_nodes"):
        pack = Path(custom) / _AUX_PACK
        configured = _configured_ckpts(pack / "config.yaml")
        if configured is not None:
            roots.append(configured if configured.is_absolute() else pack / configured)
        roots.append(pack / "ckpts")
    seen, out = set(), []
    for r in roots:
        key = os.path.normcase(os.path.abspath(r))
        if key not in seen and r.is_dir():
            seen.add(key)
            out.append(r)
    return out


def _configured_ckpts(config: Path) -> Path | None:
    """``annotator_ckpts_path`` of comfyui_controlnet_aux's config.yaml (one ``key: value`` line; no YAML library)."""
    try:
        text = config.read_text(encoding="utf-8")
    except OSError:
        return None
    m = re.search(r"^annotator_ckpts_path:\s*['\"]?([^'\"#\n]+?)['\"]?\s*(?:#.*)?$", text, re.MULTILINE)
    return Path(m.group(1).strip()) if m else None


def _walk(root: Path, names: set[str]) -> Iterable[Path]:
    """Files under ``root`` named one of ``names`` (depth-limited: a checkpoint tree, not a disk)."""
    base = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        if len(Path(dirpath).parts) - base >= _MAX_DEPTH:
            dirnames.clear()
        dirnames.sort()
        for f in sorted(filenames):
            if f in names:
                yield Path(dirpath) / f


def choices(published: Sequence[str]) -> list[str]:
    """What a node's file combo lists: the published names first (always, so a shared workflow validates and a
    missing file fails with the folders searched), then every other file of the annotators folders, then the
    published names found in comfyui_controlnet_aux's folders (as ``controlnet_aux/<path under its root>``)."""
    found = [f for f in folder_paths.get_filename_list(FOLDER) if f not in published]
    names = set(published)
    aux = []
    for root in aux_roots():
        aux.extend(AUX_PREFIX + p.relative_to(root).as_posix() for p in _walk(root, names))
    return list(dict.fromkeys([*published, *found, *aux]))


def resolve(option: str, network: str, value: str, source: str) -> str:
    """The full path of a combo value, or an :class:`AnnotatorFileError` naming the file and every folder searched.

    A bare published name (``ControlNetHED.pth``) is looked up in the annotators folders (also in sub-folders,
    e.g. ``lllyasviel/Annotators/``), then in comfyui_controlnet_aux's folders, so the default works wherever the
    file is.
    """
    if value.startswith(AUX_PREFIX):
        rel = value[len(AUX_PREFIX) :]
        # only paths under the roots: the combo lists no others, and a hand-edited "../" never leaves them
        inside = ".." not in Path(rel).parts and not Path(rel).is_absolute()
        for root in aux_roots() if inside else []:
            p = root / rel
            if p.is_file():
                return str(p)
    else:
        p = folder_paths.get_full_path(FOLDER, value)
        if p is not None:
            return p
        name = Path(value).name
        for f in folder_paths.get_filename_list(FOLDER):
            if Path(f).name == name:
                p = folder_paths.get_full_path(FOLDER, f)
                if p is not None:
                    return p
        for root in aux_roots():
            for p in _walk(root, {name}):
                return str(p)
    searched = [*annotator_folders(), *(str(r) for r in aux_roots())]
    aux_default = [str(Path(c) / _AUX_PACK / "ckpts") for c in folder_paths.get_folder_paths("custom_nodes")]
    folders = "; ".join(dict.fromkeys([*searched, *aux_default])) or "(none configured)"
    raise AnnotatorFileError(
        f"{option}: {network} file '{value}' not found. Searched: {folders}. Nothing is downloaded: get "
        f"{Path(value).name} from {source} and put it in {annotator_folders()[0]} (or a folder named 'annotators' "
        "in extra_model_paths.yaml)."
    )
