"""Seeded random annotator files in their published layouts and names, for the host tests and the shipped workflow.

    python scripts/make_random_annotator_files.py --models-dir BASE/models [--check]

Writes ``models/annotators/<published name>`` (torch pickles, as published) from each network's reference
(scripts/annotator_refs: the reference classes' key names and shapes, seeded random values), then a stamp
``.controlstack_random.json`` holding the format version, each file's seed and size. ``--check`` loads every file
built with ControlStack's own loader (``read_state_dict`` + ``build``), so a layout drift fails here, at set-up.
Prints one JSON line: {"built": [...], "build_s": seconds}.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

VERSION = "2"
ANNOTATOR_FILES: dict[str, tuple[str, int, dict]] = {
    "depth_anything_v2_vits.pth": ("depth_anything", 400, {}),
    "body_pose_model.pth": ("openpose", 401, {"network": "body"}),
    "hand_pose_model.pth": ("openpose", 402, {"network": "hand"}),
    "facenet.pth": ("openpose", 403, {"network": "face"}),
}
"""Published file name -> (module of preprocessors/annotators and scripts/annotator_refs, seed, options of its
``published_state_dict``). Only what the shipped workflow and the host tests read; the unit tests build every
other network in memory."""
STAMP = ".controlstack_random.json"


def stamp_ok(folder: Path) -> bool:
    """Every file present with the size the stamp recorded (a half-written build is rebuilt)."""
    try:
        stamp = json.loads((folder / STAMP).read_text())
    except (OSError, ValueError):
        return False
    if stamp.get("version") != VERSION:
        return False
    files = stamp.get("files", {})
    for name, (_, seed, _options) in ANNOTATOR_FILES.items():
        entry = files.get(name)
        path = folder / name
        if (
            not entry
            or entry.get("seed") != seed
            or not path.is_file()
            or path.stat().st_size != entry.get("size")
        ):
            return False
    return True


def build(folder: Path, check: bool) -> list[str]:
    import torch  # here, not at the top: the stamp check of an up-to-date folder starts no torch

    folder.mkdir(parents=True, exist_ok=True)
    built = []
    files = {}
    for name, (module, seed, options) in ANNOTATOR_FILES.items():
        ref = importlib.import_module(f"annotator_refs.{module}")
        sd = ref.published_state_dict(seed, **options)
        path = folder / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(sd, tmp)
        tmp.replace(path)
        built.append(name)
        files[name] = {"seed": seed, "size": path.stat().st_size}
        if check:
            from controlstack.preprocessors.annotators.common import read_state_dict

            net_module = importlib.import_module(f"controlstack.preprocessors.annotators.{module}")
            builder = net_module.build
            builder(read_state_dict(str(path), name), name)
    (folder / STAMP).write_text(json.dumps({"version": VERSION, "files": files}, indent=1))
    return built


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models-dir", type=Path, required=True)
    ap.add_argument("--check", action="store_true", help="load each built file with ControlStack's loader")
    args = ap.parse_args()
    folder = args.models_dir / "annotators"
    t0 = time.perf_counter()
    built = [] if stamp_ok(folder) else build(folder, args.check)
    print(json.dumps({"built": built, "build_s": round(time.perf_counter() - t0, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
