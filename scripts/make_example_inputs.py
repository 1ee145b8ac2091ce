"""Write the example workflows' input photo: workflows/inputs/controlstack_photo.png.

A 512 x 512 RGB crop of scikit-image's "astronaut" sample (Eileen Collins, a NASA photo in the public domain),
taken from the copy inside the scikit-image wheel, so nothing is downloaded. Deterministic: rerunning gives the
same pixels. Usage: ``python scripts/make_example_inputs.py [--out PATH]``.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np
from PIL import Image
from skimage import data

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "workflows" / "inputs" / "controlstack_photo.png"
SIZE = 512


def make_photo() -> np.ndarray:
    """The 512 x 512 x 3 uint8 photo (a centre crop; the astronaut sample is already 512 x 512)."""
    img = data.astronaut()[:, :, :3]
    h, w = img.shape[:2]
    if min(h, w) < SIZE:
        raise ValueError(f"sample photo: expected at least {SIZE}x{SIZE}, got {h}x{w}")
    top, left = (h - SIZE) // 2, (w - SIZE) // 2
    return np.ascontiguousarray(img[top : top + SIZE, left : left + SIZE])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(make_photo(), "RGB").save(args.out, optimize=True)
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
