"""Training data: the Fill50K layout, the image-folder layout, and a synthetic Fill50K generator.

Layouts (the two that ControlNet training scripts read):

- Fill50K (lllyasviel/ControlNet ``tutorial_dataset.py``): ``prompt.json`` holds one JSON object per line with
  ``source`` (the hint image), ``target`` (the image to learn) and ``prompt``; paths are relative to the folder.
- Image folder (diffusers ``train_controlnet.py --train_data_dir``): ``metadata.jsonl``, one JSON object per line
  with ``image`` (target), ``conditioning_image`` (hint) and ``text``.

Images are resized (shorter side to the resolution, bicubic) and centre-cropped; the hint comes out in [0, 1]
and the target in [-1, 1], both C x H x W float32, as the two reference scripts give them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

FILL50K_INDEX = "prompt.json"
IMAGEFOLDER_INDEX = "metadata.jsonl"
LAYOUT_KEYS = {
    FILL50K_INDEX: ("source", "target", "prompt"),
    IMAGEFOLDER_INDEX: ("conditioning_image", "image", "text"),
}
"""Index file -> its (hint, target, prompt) keys."""


class DatasetError(ValueError):
    """A training dataset that cannot be read; the message names the file and row."""


@dataclass(frozen=True)
class Row:
    hint: Path
    target: Path
    prompt: str
    where: str
    """``prompt.json line 3``: what an error message names."""


def read_rows(folder: str | Path) -> list[Row]:
    """The rows of a dataset folder in either layout (``prompt.json`` or ``metadata.jsonl``)."""
    folder = Path(folder)
    index = next((folder / name for name in LAYOUT_KEYS if (folder / name).is_file()), None)
    if index is None:
        raise DatasetError(
            f"{folder}: no {FILL50K_INDEX} (Fill50K layout) or {IMAGEFOLDER_INDEX} (image-folder layout) found"
        )
    hint_key, target_key, prompt_key = LAYOUT_KEYS[index.name]
    rows = []
    for n, line in enumerate(index.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{index} line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetError(f"{where}: not a JSON object ({e.msg})") from None
        missing = [k for k in (hint_key, target_key, prompt_key) if not isinstance(obj, dict) or k not in obj]
        if missing:
            raise DatasetError(
                f"{where}: missing {missing}; each line needs {hint_key}, {target_key}, {prompt_key}"
            )
        prompt = obj[prompt_key]
        if isinstance(prompt, list):  # diffusers allows several captions; the reader picks the first
            prompt = prompt[0] if prompt else ""
        rows.append(Row(folder / obj[hint_key], folder / obj[target_key], str(prompt), where))
    if not rows:
        raise DatasetError(f"{index}: the dataset is empty (no rows)")
    return rows


def _open(path: Path, row: Row, what: str) -> Image.Image:
    if not path.is_file():
        raise DatasetError(f"{row.where}: {what} image {path} does not exist")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as e:
        raise DatasetError(f"{row.where}: {what} image {path} cannot be read ({e})") from None


def fit(image: Image.Image, resolution: int) -> np.ndarray:
    """Shorter side to ``resolution`` (bicubic), then the centre ``resolution`` square; H x W x 3 uint8."""
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    if size != (w, h):
        image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return np.asarray(image.crop((left, top, left + resolution, top + resolution)))


def load_example(row: Row, resolution: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(hint in [0, 1], target in [-1, 1], prompt) of one row; 3 x resolution x resolution float32."""
    if resolution <= 0 or resolution % 8:
        raise DatasetError(f"resolution must be a positive multiple of 8, got {resolution}")
    hint, target = _open(row.hint, row, "hint"), _open(row.target, row, "target")
    if hint.size != target.size:
        raise DatasetError(
            f"{row.where}: hint {row.hint.name} is {hint.size[0]}x{hint.size[1]} but target {row.target.name} is "
            f"{target.size[0]}x{target.size[1]}; a pair must have one size"
        )
    h = torch.from_numpy(fit(hint, resolution).copy()).permute(2, 0, 1).float() / 255.0
    t = torch.from_numpy(fit(target, resolution).copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    return h, t, row.prompt


# Synthetic Fill50K ---------------------------------------------------------------------------------------------

COLOURS = {
    "red": (220, 30, 30),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 20),
    "purple": (130, 50, 170),
    "pink": (245, 130, 190),
    "cyan": (40, 200, 220),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "gray": (128, 128, 128),
    "brown": (140, 80, 30),
}
"""Colour names of the synthetic prompts (one word each) and the RGB they are drawn with."""


@dataclass(frozen=True)
class Circle:
    """One synthetic example: centre and radius in pixels, the fill and background colour names."""

    cx: float
    cy: float
    radius: float
    fill: str
    background: str

    @property
    def prompt(self) -> str:
        return f"{self.fill} circle with {self.background} background"


def random_circle(rng: np.random.Generator, size: int) -> Circle:
    """A circle that fits in a ``size`` square with a margin, two different colours."""
    radius = rng.uniform(0.15, 0.35) * size
    margin = radius + 0.05 * size
    cx, cy = rng.uniform(margin, size - margin, 2)
    fill, background = rng.choice(list(COLOURS), 2, replace=False)
    return Circle(float(cx), float(cy), float(radius), str(fill), str(background))


def draw_circle(circle: Circle, size: int) -> tuple[Image.Image, Image.Image]:
    """(hint: white outline on black, target: the filled circle on its background), both ``size`` squares."""
    box = (
        circle.cx - circle.radius,
        circle.cy - circle.radius,
        circle.cx + circle.radius,
        circle.cy + circle.radius,
    )
    hint = Image.new("RGB", (size, size), (0, 0, 0))
    ImageDraw.Draw(hint).ellipse(box, outline=(255, 255, 255), width=max(1, size // 64))
    target = Image.new("RGB", (size, size), COLOURS[circle.background])
    ImageDraw.Draw(target).ellipse(box, fill=COLOURS[circle.fill])
    return hint, target


def write_synthetic_fill50k(folder: str | Path, count: int, size: int = 64, seed: int = 0) -> list[Circle]:
    """Write ``count`` synthetic examples in the Fill50K layout (``source/N.png``, ``target/N.png``,
    ``prompt.json``) into ``folder``; the same seed writes the same files. Returns the circles drawn."""
    if count < 1:
        raise DatasetError(f"count must be at least 1, got {count}")
    folder = Path(folder)
    (folder / "source").mkdir(parents=True, exist_ok=True)
    (folder / "target").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    circles, lines = [], []
    for i in range(count):
        circle = random_circle(rng, size)
        hint, target = draw_circle(circle, size)
        hint.save(folder / "source" / f"{i}.png")
        target.save(folder / "target" / f"{i}.png")
        lines.append(
            json.dumps({"source": f"source/{i}.png", "target": f"target/{i}.png", "prompt": circle.prompt})
        )
        circles.append(circle)
    (folder / FILL50K_INDEX).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return circles
