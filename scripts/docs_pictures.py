"""Draw the pictures of docs/schedules.md that are not a report image: per-frame strengths and context windows.

    .venv/bin/python scripts/docs_pictures.py          # writes docs/img/frame_strengths.png, context_windows.png

The third picture, docs/img/schedule_fade_report.png, is the control report of the shipped workflow:
``python scripts/host.py run workflows/api/controlstack_sd15_schedule_fade.json --out /tmp/fade`` and copy its
``*_report_*.png``.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from controlstack.controlnet.schedule import FrameRange, FrameStrengths

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "img"
BG, FG, BAR, WIN = (24, 24, 24), (230, 230, 230), (236, 150, 60), (70, 160, 220)
CELL = 22
LEFT = 120


def _text(img: np.ndarray, text: str, x: int, y: int, scale: float = 0.4) -> None:
    cv2.putText(img, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, FG, 1, cv2.LINE_AA)


def frame_strengths_picture() -> np.ndarray:
    """The shipped controlstack_sd15_frame_keyframes workflow's strengths, one bar per frame of the batch."""
    strengths = FrameStrengths(
        (FrameRange(0, 7, 1.0, 1.0, "hold"), FrameRange(8, 15, 1.0, 0.0, "linear")), 1.0
    ).resolve(16)
    height = 60
    img = np.full((height + 50, LEFT + 16 * CELL + 10, 3), BG, np.uint8)
    _text(img, "frames 0-7 hold 1.0, 8-15 linear 1.0 -> 0.0", 4, 14)
    for i, s in enumerate(strengths):
        x = LEFT + i * CELL
        top = 24 + int(round((1 - s) * height))
        if s > 0:
            img[top : 24 + height, x + 3 : x + CELL - 3] = BAR
        _text(img, str(i), x + 4, 24 + height + 16, 0.35)
    _text(img, "strength", 4, 24 + height // 2)
    _text(img, "frame", 4, 24 + height + 16)
    return img  # RGB


def context_windows_picture(frames: int = 24, length: int = 8, overlap: int = 4) -> np.ndarray:
    """Windows of `length` frames sliding by length - overlap: each UNet call holds one window, and each entry
    gives it the hint / mask / frame-strength rows of exactly those frames."""
    stride = length - overlap
    starts = list(range(0, frames - length + 1, stride))
    img = np.full((30 + CELL * len(starts) + 24, LEFT + frames * CELL + 10, 3), BG, np.uint8)
    _text(img, f"{frames} frames, windows of {length}, overlap {overlap}", 4, 14)
    for row, start in enumerate(starts):
        y = 24 + row * CELL
        _text(img, f"call {row + 1}: rows {start}-{start + length - 1}", 4, y + 15, 0.35)
        for f in range(frames):
            x = LEFT + f * CELL
            colour = WIN if start <= f < start + length else (48, 48, 48)
            img[y + 3 : y + CELL - 3, x + 2 : x + CELL - 2] = colour
    y = 24 + len(starts) * CELL + 14
    for f in range(0, frames, 2):
        _text(img, str(f), LEFT + f * CELL + 4, y, 0.35)
    return img  # RGB


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for name, picture in (
        ("frame_strengths.png", frame_strengths_picture()),
        ("context_windows.png", context_windows_picture()),
    ):
        cv2.imwrite(str(OUT / name), picture[..., ::-1])
        print(OUT / name)


if __name__ == "__main__":
    main()
