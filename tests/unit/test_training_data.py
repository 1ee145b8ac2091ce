"""Training data: both layouts, the fit to the training resolution, the synthetic Fill50K, and bad data naming the row."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from controlstack.training.data import (
    COLOURS,
    DatasetError,
    draw_circle,
    fit,
    load_example,
    read_rows,
    write_synthetic_fill50k,
)
from PIL import Image


def test_synthetic_fill50k_is_seeded_and_draws_what_the_prompt_says(tmp_path):
    a = write_synthetic_fill50k(tmp_path / "a", 6, size=64, seed=3)
    b = write_synthetic_fill50k(tmp_path / "b", 6, size=64, seed=3)
    assert a == b
    assert (tmp_path / "a" / "source" / "5.png").read_bytes() == (
        tmp_path / "b" / "source" / "5.png"
    ).read_bytes()
    rows = read_rows(tmp_path / "a")
    assert [r.prompt for r in rows] == [c.prompt for c in a]
    for row, circle in zip(rows, a, strict=True):
        hint, target, prompt = load_example(row, 64)
        assert prompt == f"{circle.fill} circle with {circle.background} background"
        assert hint.shape == target.shape == (3, 64, 64)
        yy, xx = np.mgrid[:64, :64] + 0.5
        r = np.hypot(xx - circle.cx, yy - circle.cy)
        pixels = ((target.permute(1, 2, 0).numpy() + 1) * 127.5).round()
        assert np.abs(pixels[r < circle.radius - 1.5] - COLOURS[circle.fill]).max() <= 1
        assert np.abs(pixels[r > circle.radius + 1.5] - COLOURS[circle.background]).max() <= 1
        ring = hint[0].numpy()
        assert ring[(np.abs(r - circle.radius) < 0.5)].mean() > 0.5  # the outline is drawn on the circle
        assert ring[r < circle.radius - 3].max() == 0 and ring[r > circle.radius + 3].max() == 0


def test_imagefolder_layout_ranges_and_centre_crop(tmp_path):
    rgb = np.zeros((40, 80, 3), np.uint8)
    rgb[:, 10:70] = (
        255  # white except the outer 10 columns each side: the centre crop of a 2:1 image is all white
    )
    Image.fromarray(rgb).save(tmp_path / "t.png")
    Image.fromarray(rgb).save(tmp_path / "c.png")
    line = {"image": "t.png", "conditioning_image": "c.png", "text": ["a caption", "another"]}
    (tmp_path / "metadata.jsonl").write_text(json.dumps(line) + "\n")
    (row,) = read_rows(tmp_path)
    hint, target, prompt = load_example(row, 16)
    assert prompt == "a caption"
    assert hint.min() >= 0 and hint.max() <= 1 and target.min() >= -1 and target.max() <= 1
    assert torch.allclose(hint, torch.ones_like(hint), atol=0.02)  # only the white centre is left
    assert torch.allclose(target, torch.ones_like(target), atol=0.04)
    assert fit(Image.fromarray(rgb), 16).shape == (16, 16, 3)


def test_bad_data_names_the_row(tmp_path):
    with pytest.raises(DatasetError, match="no prompt.json .* or metadata.jsonl"):
        read_rows(tmp_path)
    (tmp_path / "prompt.json").write_text("\n")
    with pytest.raises(DatasetError, match="empty"):
        read_rows(tmp_path)
    write_synthetic_fill50k(tmp_path, 3, size=32)
    (tmp_path / "source" / "1.png").unlink()
    rows = read_rows(tmp_path)
    with pytest.raises(DatasetError, match=r"prompt.json line 2: hint image .*1.png does not exist"):
        load_example(rows[1], 32)
    (tmp_path / "target" / "2.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"line 3: target image .*2.png cannot be read"):
        load_example(rows[2], 32)
    hint, _ = draw_circle(write_synthetic_fill50k(tmp_path / "x", 1, size=48)[0], 48)
    hint.save(tmp_path / "source" / "0.png")
    with pytest.raises(DatasetError, match=r"line 1: hint 0.png is 48x48 but target 0.png is 32x32"):
        load_example(rows[0], 32)
    with (tmp_path / "prompt.json").open("a") as f:
        f.write('{"source": "source/0.png"}\n')
    with pytest.raises(DatasetError, match=r"line 4: missing \['target', 'prompt'\]"):
        read_rows(tmp_path)
