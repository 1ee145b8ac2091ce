"""Write the hint images the example workflows load (workflows/inputs/controlstack_*_hint.png).

Made from scikit-image's public-domain sample photo (astronaut), so nothing is downloaded. Run once; the PNGs are
committed (small).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from skimage import data

OUT = Path(__file__).resolve().parents[1] / "workflows" / "inputs"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    photo = cv2.resize(data.astronaut(), (512, 512), interpolation=cv2.INTER_AREA)
    gray = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    edges = cv2.Canny(gray, 100, 200)
    Image.fromarray(np.stack([edges] * 3, -1)).save(OUT / "controlstack_canny_hint.png", optimize=True)
    # a depth-like map: heavily blurred luminance, near = bright (what depth ControlNets expect)
    depth = cv2.GaussianBlur(gray, (0, 0), 12)
    depth = cv2.normalize(depth, None, 0, 255, cv2.NORM_MINMAX)
    Image.fromarray(np.stack([depth] * 3, -1)).save(OUT / "controlstack_depth_hint.png", optimize=True)
    # a scribble: coarse edges, thickened, white on black; 384x512 so "resize and fill" has work to do
    coarse = cv2.Canny(cv2.GaussianBlur(gray, (0, 0), 3), 30, 60)
    scribble = cv2.dilate(coarse, np.ones((3, 3), np.uint8))[64:448]
    Image.fromarray(np.stack([scribble] * 3, -1)).save(OUT / "controlstack_scribble_hint.png", optimize=True)


if __name__ == "__main__":
    main()
