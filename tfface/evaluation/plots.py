"""Evaluation plots, rendered to PNG bytes.

Each function returns the PNG as bytes so `evaluate_model` can render every
picture before writing any file. Matplotlib is used through `Figure`
directly (no pyplot): no global state, no display needed.
"""

from __future__ import annotations

import io

import numpy as np

ACCURACY_COLOUR = "#4C72B0"
BALANCED_COLOUR = "#DD8452"
SUBGROUP_COLOURS = ("#C44E52", "#4C72B0", "#55A868", "#8172B2", "#CCB974", "#64B5CD", "#8C8C8C", "#DA8BC3", "#937860")


def _figure(width, height):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _value(x):
    return np.nan if x is None else float(x)


def task_accuracy_png(tasks: dict) -> bytes:
    """Horizontal bars per task: accuracy and, beside it, balanced accuracy.

    `tasks` is `compute_metrics(...)["tasks"]` (schema order).
    """
    names = list(tasks)
    if not names:
        raise ValueError("no labelled tasks to plot")
    accuracy = [_value(tasks[n]["accuracy"]) for n in names]
    balanced = [_value(tasks[n]["balanced_accuracy"]) for n in names]
    figure = _figure(7.0, 1.2 + 0.32 * len(names))
    axes = figure.add_subplot()
    y = np.arange(len(names))
    height = 0.4
    axes.barh(y - height / 2, accuracy, height, label="accuracy", color=ACCURACY_COLOUR)
    axes.barh(y + height / 2, balanced, height, label="balanced accuracy", color=BALANCED_COLOUR)
    axes.axvline(0.5, color="grey", linestyle="--", linewidth=0.8)
    axes.set_yticks(y, [f"{n} (n={tasks[n]['n_labelled']})" for n in names], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0.0, 1.0)
    axes.set_xlabel("score on labelled images")
    axes.set_title("Per-task accuracy")
    axes.legend(loc="lower right", fontsize=8)
    axes.grid(axis="x", alpha=0.3)
    return _png(figure)


def confusion_png(task_name: str, classes, confusion) -> bytes:
    """Row-normalised confusion matrix (true class down, predicted across),
    with the counts written in the cells."""
    confusion = np.asarray(confusion, np.float64)
    rows = confusion.sum(axis=1, keepdims=True)
    normalised = np.divide(confusion, rows, out=np.zeros_like(confusion), where=rows > 0)
    size = 1.5 + 0.55 * len(classes)
    figure = _figure(size + 1.0, size)
    axes = figure.add_subplot()
    image = axes.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = np.arange(len(classes))
    axes.set_xticks(ticks, list(classes), rotation=45, ha="right", fontsize=8)
    axes.set_yticks(ticks, list(classes), fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(f"{task_name}: confusion (rows sum to 1)")
    for i in range(len(classes)):
        for j in range(len(classes)):
            if confusion[i, j]:
                colour = "white" if normalised[i, j] > 0.5 else "black"
                axes.text(j, i, f"{int(confusion[i, j])}", ha="center", va="center", fontsize=7, color=colour)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    return _png(figure)


def subgroup_png(rows: list, by: str = "gender") -> bytes:
    """Balanced accuracy of each attribute, one bar per subgroup of `by`."""
    rows = [r for r in rows if r["by"] == by]
    if not rows:
        raise ValueError(f"no subgroup rows for {by!r}")
    attributes = list(dict.fromkeys(r["attribute"] for r in rows))
    groups = list(dict.fromkeys(r["subgroup"] for r in rows))
    values = {(r["attribute"], r["subgroup"]): _value(r["balanced_accuracy"]) for r in rows}
    figure = _figure(7.0, 1.2 + (0.12 + 0.1 * len(groups)) * len(attributes))
    axes = figure.add_subplot()
    y = np.arange(len(attributes))
    height = 0.8 / len(groups)
    for k, group in enumerate(groups):
        axes.barh(
            y - 0.4 + height * (k + 0.5),
            [values.get((a, group), np.nan) for a in attributes],
            height,
            label=group,
            color=SUBGROUP_COLOURS[k % len(SUBGROUP_COLOURS)],
        )
    axes.axvline(0.5, color="grey", linestyle="--", linewidth=0.8)
    axes.set_yticks(y, attributes, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0.0, 1.0)
    axes.set_xlabel("balanced accuracy")
    axes.set_title(f"Balanced accuracy by {by.replace('_', ' ')}")
    axes.legend(loc="lower right", fontsize=7, ncol=min(len(groups), 3))
    axes.grid(axis="x", alpha=0.3)
    return _png(figure)


def _upsample(masks, size):
    """(m, m, G) -> (size, size, G), nearest neighbour."""
    index = (np.arange(size) * masks.shape[0] // size).clip(0, masks.shape[0] - 1)
    return masks[index][:, index]


def mask_overlay_png(images, masks, panel: int = 96) -> bytes:
    """Predicted group masks over faces: one row per face; columns are the
    face, all groups (each pixel tinted by its groups' colours) and one
    panel per group.

    Args:
        images: uint8 (N, S, S, 3).
        masks: (N, m, m, 8) predicted masks in [0, 1].
    """
    from PIL import Image, ImageDraw

    from tfface.landmarks.group_masks import GROUP_COLORS
    from tfface.schema import GROUPS

    images = np.asarray(images)
    masks = np.clip(np.asarray(masks, np.float32), 0.0, 1.0)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must have shape (N, S, S, 3), got {images.shape}")
    if masks.ndim != 4 or len(masks) != len(images) or masks.shape[-1] != len(GROUPS):
        raise ValueError(f"masks must have shape ({len(images)}, m, m, {len(GROUPS)}), got {masks.shape}")
    colours = np.asarray(GROUP_COLORS, np.float32)
    titles = ("face", "all groups") + tuple(GROUPS)
    title_height = 14
    canvas = Image.new("RGB", (panel * len(titles), title_height + panel * len(images)), "white")
    draw = ImageDraw.Draw(canvas)
    for c, title in enumerate(titles):
        draw.text((c * panel + 3, 1), title, fill=(0, 0, 0))
    for i, image in enumerate(images):
        face = image.astype(np.float32)
        m = _upsample(masks[i], face.shape[0])
        weight = m.sum(axis=-1, keepdims=True)
        mixed = (m @ colours) / np.maximum(weight, 1e-6)
        alpha = 0.6 * m.max(axis=-1, keepdims=True)
        panels = [face, face * (1 - alpha) + mixed * alpha]
        for g in range(len(GROUPS)):
            a = 0.6 * m[..., g : g + 1]
            panels.append(face * (1 - a) + colours[g] * a)
        for c, array in enumerate(panels):
            tile = Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8))
            canvas.paste(tile.resize((panel, panel), Image.BILINEAR), (c * panel, title_height + i * panel))
    buffer = io.BytesIO()
    # A 256-colour palette keeps the picture small (as in group_masks.py).
    canvas = canvas.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    canvas.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()
