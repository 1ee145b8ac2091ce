"""What the nodes show in the frontend: the control report image and hint previews (temp PNGs)."""

from __future__ import annotations

import cv2
import numpy as np
import torch

CELL_W, CELL_H, LABEL_W, TITLE_H = 24, 12, 56, 18
STRENGTH_H = 26
"""Height of each block's strength strip: one bar per step, the strength the entry was applied with (strength x
its schedule), full height = the report's largest strength (at least 1)."""
STRENGTH_COLOUR = (236, 150, 60)
MIN_WIDTH = 360


def block_height(num_layers: int) -> int:
    """Pixel height of one entry's block: title, one row per layer, the strength strip, a gap."""
    return TITLE_H + num_layers * CELL_H + STRENGTH_H + 6


def strength_scale(strengths: list[list[float]] | None) -> float:
    """The strength a full-height bar stands for: the report's largest applied strength, at least 1."""
    return max([1.0, *(v for row in strengths or [] for v in row)])


def render_report(
    tables: list[torch.Tensor],
    names: list[str],
    layer_names: list[list[str]],
    strengths: list[list[float]] | None = None,
) -> torch.Tensor:
    """Heat map of mean |residual| per layer (rows) x step (columns), one block per stacked ControlNet, with a strip
    under it showing the strength it was applied with at each step (its schedule taking effect).

    One colour scale for the whole report (brightest = strongest push of any ControlNet), so blocks compare.
    Returns a ComfyUI IMAGE (1 x H x W x 3 float).
    """
    peak = max((float(t.max()) for t in tables if t.numel()), default=0.0) or 1.0
    steps = max((t.shape[1] for t in tables), default=1)
    title_w = max((cv2.getTextSize(n, cv2.FONT_HERSHEY_SIMPLEX, 0.4, 1)[0][0] for n in names), default=0)
    width = max(MIN_WIDTH, LABEL_W + steps * CELL_W + 8, title_w + 8)
    full = strength_scale(strengths)
    blocks = []
    for k, (table, name, layers) in enumerate(zip(tables, names, layer_names, strict=True)):
        block = np.full((block_height(table.shape[0]), width, 3), 24, np.uint8)
        cv2.putText(block, name, (4, 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (230, 230, 230), 1, cv2.LINE_AA)
        values = (table.numpy() / peak * 255).clip(0, 255).astype(np.uint8)
        colours = cv2.applyColorMap(values, cv2.COLORMAP_VIRIDIS)[..., ::-1]
        cells = np.repeat(np.repeat(colours, CELL_H, axis=0), CELL_W, axis=1)
        block[TITLE_H : TITLE_H + cells.shape[0], LABEL_W : LABEL_W + cells.shape[1]] = cells
        for row, layer in enumerate(layers):
            y = TITLE_H + row * CELL_H + CELL_H - 2
            cv2.putText(block, layer, (4, y), cv2.FONT_HERSHEY_SIMPLEX, 0.3, (190, 190, 190), 1, cv2.LINE_AA)
        strip_top = TITLE_H + table.shape[0] * CELL_H + 2
        label = f"str {full:g}" if full != 1.0 else "strength"
        cv2.putText(
            block,
            label,
            (4, strip_top + STRENGTH_H - 6),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.3,
            (190, 190, 190),
            1,
            cv2.LINE_AA,
        )
        row = strengths[k] if strengths is not None else []
        for col, value in enumerate(row):
            bar = bar_pixels(value, full)
            if bar:
                x = LABEL_W + col * CELL_W
                block[strip_top + STRENGTH_H - bar : strip_top + STRENGTH_H, x + 3 : x + CELL_W - 3] = (
                    STRENGTH_COLOUR
                )
        blocks.append(block)
    if not blocks:
        blocks = [np.full((TITLE_H + 6, width, 3), 24, np.uint8)]
        cv2.putText(
            blocks[0],
            "no ControlStack ControlNet on this model",
            (4, 13),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.4,
            (230, 230, 230),
            1,
            cv2.LINE_AA,
        )
    image = np.concatenate(blocks, axis=0)
    return torch.from_numpy(image.astype(np.float32) / 255.0)[None]


def bar_pixels(value: float, full: float) -> int:
    """Height in pixels of a strength bar."""
    return int(round(min(max(value / full, 0.0), 1.0) * (STRENGTH_H - 2)))


def save_temp_images(images: torch.Tensor, prefix: str) -> list[dict]:
    """Save IMAGE rows (B x H x W x C in [0, 1], C = 1, 3 or 4) for the frontend; return the ui image records.

    Saved by the host's own PreviewImage node, so the files are named, placed (the temp folder, which the host
    empties at start-up and exit) and described exactly as every other preview."""
    from nodes import PreviewImage  # the host's nodes.py (imported before any pack), not this package

    if images.shape[-1] == 1:  # PIL cannot write an H x W x 1 array
        images = images.expand(*images.shape[:-1], 3)
    return PreviewImage().save_images(images.detach().float().cpu(), filename_prefix=prefix)["ui"]["images"]


def hint_preview_sender(node_id: str):
    """A callback for the patcher: show the fitted hint (and mask) on the ApplyHint node `node_id`."""

    def send(hint: torch.Tensor, mask: torch.Tensor | None) -> None:
        from server import PromptServer

        images = save_temp_images(hint[:1].movedim(1, -1), "controlstack_hint")
        if mask is not None:
            images += save_temp_images(mask[:1, :, :, None].expand(-1, -1, -1, 3), "controlstack_mask")
        PromptServer.instance.send_sync("controlstack.hint_preview", {"node": node_id, "images": images})

    return send
