"""Soft masks of the eight MGMTN face-part groups, drawn from five landmarks.

MGMTN guides each attribute group with a spatial mask of the face part the
group's attributes live on (eyes for Eyeglasses, the band above the brows for
Bangs, beside the face for Earrings, ...). With only five landmarks there is
no segmentation, so each part is a union of ellipses placed in a face frame:

* origin at the eye midpoint, x axis along the eye line (left eye -> right
  eye), y axis perpendicular to it, pointing down the face (so the masks
  rotate with the head);
* unit length `scale` = the inter-ocular distance (IOD), floored at
  eye-to-mouth distance / 1.2 so a turned head (whose IOD shrinks) keeps
  face-sized masks.

Every shape is mirror-symmetric about the face's vertical axis, so masks of
a flipped image (landmarks flipped with left/right swapped) are the flipped
masks. Values are in [0, 1]: 1 inside, 0 outside, with a linear ramp across
the boundary (`EDGE`) so that small masks (32x32 inputs) stay smooth.

The geometry is written once against a tiny array-ops shim and run with
NumPy (`group_masks_numpy`, pixel landmarks, any image size) or TensorFlow
(`group_masks_tf`, landmarks as fractions of a square model input, usable in
a `tf.data` map), so the two implementations agree by construction.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorflow as tf

from tfface.atomic_files import atomic_path
from tfface.schema import GROUPS

GROUP_NAMES = GROUPS

# Width of the soft boundary, in units of an ellipse's normalised radius.
EDGE = 0.2
# The scale is max(IOD, eye-to-mouth distance / this): CelebA's ratio
# eye-to-mouth / IOD has median 1.05 and 95th percentile 1.29 (yawed faces).
EYE_MOUTH_PER_IOD = 1.2

# A plausible frontal face (fractions of a square crop; = alignment template)
# that stands in for missing landmarks before their masks are zeroed.
_PLACEHOLDER = np.array(
    [[0.39, 0.51], [0.61, 0.51], [0.50, 0.64], [0.40, 0.74], [0.60, 0.74]], np.float32
)

# Colours for `overlay_masks_png`, one per group.
GROUP_COLORS = (
    (0, 160, 255),  # eyes
    (255, 220, 0),  # nose
    (255, 40, 40),  # mouth
    (255, 120, 200),  # cheeks
    (0, 220, 120),  # ears
    (170, 90, 255),  # lower_face
    (255, 140, 0),  # hair
    (0, 255, 255),  # whole_face
)


# A row of landmarks all equal to this marks a face without landmarks (the
# pipeline's marker); so does any NaN. A point merely outside the image, as
# the centre crop or an augmentation leaves it, is drawn where it falls: a
# negative coordinate used to blank every mask of a face cut off on the left
# or top (and of a face cut off on the right once flipped).
MISSING_MARK = -1.0


class _NumpyOps:
    stack = staticmethod(np.stack)
    sqrt = staticmethod(np.sqrt)
    maximum = staticmethod(np.maximum)

    @staticmethod
    def clip01(x):
        return np.clip(x, 0.0, 1.0)

    @staticmethod
    def valid_rows(lm):
        with np.errstate(invalid="ignore"):
            return np.all(np.isfinite(lm), axis=(1, 2)) & ~np.all(lm == MISSING_MARK, axis=(1, 2))

    @staticmethod
    def where_rows(valid, a, b):
        return np.where(valid[:, None, None], a, b)

    @staticmethod
    def cast(x):
        return np.asarray(x, np.float32)


class _TFOps:
    stack = staticmethod(tf.stack)
    sqrt = staticmethod(tf.sqrt)
    maximum = staticmethod(tf.maximum)

    @staticmethod
    def clip01(x):
        return tf.clip_by_value(x, 0.0, 1.0)

    @staticmethod
    def valid_rows(lm):
        return tf.reduce_all(tf.math.is_finite(lm), axis=[1, 2]) & ~tf.reduce_all(tf.equal(lm, MISSING_MARK), axis=[1, 2])

    @staticmethod
    def where_rows(valid, a, b):
        return tf.where(valid[:, None, None], a, b)

    @staticmethod
    def cast(x):
        return tf.cast(x, tf.float32)


def _ellipses(lm, ops):
    """Ellipse parameters (B, K) for the K shapes the groups are made of.

    Returns centre x, centre y, unit "down" direction (dx, dy), semi-axis
    along that direction and semi-axis across it, all in pixel units of the
    landmarks, plus the frame (centre, down axis, scale) for half-planes.
    """
    left_eye, right_eye, nose = lm[:, 0], lm[:, 1], lm[:, 2]
    mouth_left, mouth_right = lm[:, 3], lm[:, 4]
    centre = (left_eye + right_eye) * 0.5
    mouth = (mouth_left + mouth_right) * 0.5
    eye_line = right_eye - left_eye
    iod = ops.sqrt(eye_line[:, 0] ** 2 + eye_line[:, 1] ** 2)
    eye_mouth = mouth - centre
    em = ops.sqrt(eye_mouth[:, 0] ** 2 + eye_mouth[:, 1] ** 2)
    scale = ops.maximum(ops.maximum(iod, em / EYE_MOUTH_PER_IOD), 1e-6)
    # Frame axes: ux along the eye line (image-right), dn down the face.
    ux = eye_line[:, 0] / ops.maximum(iod, 1e-6)
    uy = eye_line[:, 1] / ops.maximum(iod, 1e-6)
    dn_x, dn_y = -uy, ux

    def at(anchor, across, down):
        """anchor + (across, down) * scale in the face frame -> (x, y)."""
        return (
            anchor[:, 0] + (across * ux + down * dn_x) * scale,
            anchor[:, 1] + (across * uy + down * dn_y) * scale,
        )

    shapes = []  # (cx, cy, dir_x, dir_y, semi_down, semi_across)

    def frame_ellipse(anchor, across, down, semi_down, semi_across):
        cx, cy = at(anchor, across, down)
        shapes.append((cx, cy, dn_x, dn_y, semi_down * scale, semi_across * scale))

    # 0, 1 eyes: the eye and its brow, a little above the eye point.
    frame_ellipse(left_eye, -0.02, -0.12, 0.32, 0.34)
    frame_ellipse(right_eye, 0.02, -0.12, 0.32, 0.34)
    # 2 nose bridge: from between the eyes to the tip, along that line.
    bridge_top_x, bridge_top_y = at(centre, 0.0, 0.02)
    bx, by = nose[:, 0] - bridge_top_x, nose[:, 1] - bridge_top_y
    blen = ops.maximum(ops.sqrt(bx**2 + by**2), 1e-6)
    shapes.append(
        (
            (bridge_top_x + nose[:, 0]) * 0.5,
            (bridge_top_y + nose[:, 1]) * 0.5,
            bx / blen,
            by / blen,
            blen * 0.5 + 0.06 * scale,
            0.16 * scale,
        )
    )
    # 3 nose tip and nostrils, down to just below the tip.
    frame_ellipse(nose, 0.0, 0.03, 0.18, 0.28)
    # 4 mouth: lips and the mustache band above them.
    mouth_vec = mouth_right - mouth_left
    half_width = ops.sqrt(mouth_vec[:, 0] ** 2 + mouth_vec[:, 1] ** 2) * 0.5 / scale
    cx, cy = at(mouth, 0.0, -0.1)
    shapes.append((cx, cy, dn_x, dn_y, 0.32 * scale, (half_width + 0.2) * scale))
    # 5, 6 cheeks: below each eye, beside the nose.
    frame_ellipse(centre, -0.6, 0.58, 0.28, 0.27)
    frame_ellipse(centre, 0.6, 0.58, 0.28, 0.27)
    # 7, 8 ears: outside the face between eye and nose height (lobes lower).
    frame_ellipse(centre, -1.15, 0.35, 0.5, 0.26)
    frame_ellipse(centre, 1.15, 0.35, 0.5, 0.26)
    # 9 lower face: chin and jaw below the mouth, down the neck to where a
    # necklace or the knot of a necktie sits.
    frame_ellipse(mouth, 0.0, 0.95, 1.05, 0.85)
    # 10 inner face (what hair excludes; its top is the hairline).
    frame_ellipse(centre, 0.0, 0.45, 1.2, 0.98)
    # 11 head (face plus hair).
    frame_ellipse(centre, 0.0, -0.15, 1.75, 1.5)
    # 12 whole face down to the chin.
    frame_ellipse(centre, 0.0, 0.35, 1.35, 1.02)
    columns = [ops.stack([s[i] for s in shapes], axis=1) for i in range(6)]
    return columns, (centre, dn_x, dn_y, scale)


def _masks(lm, xs, ys, extent, ops):
    """(B, H, W, 8) masks for landmarks (B, 5, 2) at pixel centres xs, ys.

    `extent` is the image's (width, height) in the landmarks' units.
    """
    valid = ops.valid_rows(lm)
    placeholder = (_PLACEHOLDER * np.asarray(extent, np.float32))[None]
    lm = ops.where_rows(valid, lm, ops.cast(placeholder))
    (cx, cy, dir_x, dir_y, semi_down, semi_across), frame = _ellipses(lm, ops)
    # Broadcast to (B, H, W, K): x varies along W, y along H.
    dx = xs[None, None, :, None] - cx[:, None, None, :]
    dy = ys[None, :, None, None] - cy[:, None, None, :]
    along = (dx * dir_x[:, None, None, :] + dy * dir_y[:, None, None, :]) / semi_down[:, None, None, :]
    across = (dy * dir_x[:, None, None, :] - dx * dir_y[:, None, None, :]) / semi_across[:, None, None, :]
    radius = ops.sqrt(along**2 + across**2)
    inside = ops.clip01(0.5 + (1.0 - radius) / EDGE)
    (
        eye_l, eye_r, bridge, tip, mouth, cheek_l, cheek_r,
        ear_l, ear_r, lower, inner_face, head, face,
    ) = [inside[..., k] for k in range(13)]
    # Hair stops at the sides a little below the nose (below is jaw/neck).
    centre, dn_x, dn_y, scale = frame
    down = (
        (xs[None, None, :] - centre[:, None, None, 0]) * dn_x[:, None, None]
        + (ys[None, :, None] - centre[:, None, None, 1]) * dn_y[:, None, None]
    ) / scale[:, None, None]
    above_jaw = ops.clip01(0.5 + (0.9 - down) / EDGE)
    groups = [
        ops.maximum(eye_l, eye_r),
        ops.maximum(bridge, tip),
        mouth,
        ops.maximum(cheek_l, cheek_r),
        ops.maximum(ear_l, ear_r),
        lower,
        head * (1.0 - inner_face) * above_jaw,
        ops.maximum(head, face),
    ]
    masks = ops.stack(groups, axis=-1)
    return masks * ops.cast(valid)[:, None, None, None]


def group_masks_numpy(landmarks, height: int, width: int) -> np.ndarray:
    """float32 (H, W, 8) group masks for pixel landmarks (5, 2) of an H x W image.

    Landmarks with a NaN, or all -1, give all-zero masks; points outside the
    image are drawn where they fall.
    """
    lm = np.asarray(landmarks, np.float32)
    if lm.shape != (5, 2):
        raise ValueError(f"landmarks must have shape (5, 2) (x, y per point), got {lm.shape}")
    if int(height) < 1 or int(width) < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    xs = np.arange(int(width), dtype=np.float32) + 0.5
    ys = np.arange(int(height), dtype=np.float32) + 0.5
    return _masks(lm[None], xs, ys, (width, height), _NumpyOps)[0].astype(np.float32)


def group_masks_tf(landmarks, size: int) -> tf.Tensor:
    """float32 group masks for landmarks given as fractions of a square image.

    Args:
        landmarks: (B, 5, 2) or (5, 2) (x, y) in [0, 1] of the model input
            (after any crop/flip/resize), possibly outside [0, 1] for a face
            the crop cuts; rows with a NaN or all -1 mean missing and give
            all-zero masks.
        size: side of the square masks, in pixels (a Python int).

    Returns:
        (B, size, size, 8), or (size, size, 8) for (5, 2) input, so it can
        be called per example inside a `tf.data` map.
    """
    size = int(size)
    if size < 1:
        raise ValueError(f"mask size must be a positive int, got {size}")
    lm = tf.convert_to_tensor(landmarks, tf.float32)
    if lm.shape.rank not in (2, 3) or lm.shape[-2:] != (5, 2):
        raise ValueError(f"landmarks must have shape (B, 5, 2) or (5, 2), got {lm.shape}")
    single = lm.shape.rank == 2
    if single:
        lm = lm[None]
    masks = _group_masks_graph(lm, size)
    return masks[0] if single else masks


@tf.function(reduce_retracing=True)
def _group_masks_graph(lm, size):
    # A graph: ~1 ms per example at 32x32 on a CPU, against ~50 ms eagerly
    # (the masks are ~200 tiny ops). Inside a tf.data map it is inlined.
    grid = (tf.range(size, dtype=tf.float32) + 0.5) / float(size)
    return _masks(lm, grid, grid, (1.0, 1.0), _TFOps)


def overlay_masks_png(images, landmarks, path, panel_width: int = 96) -> Path:
    """Saves a grid: one row per face, one column per group, for eyeballing.

    Each panel tints the face with one group's mask and marks the five
    landmarks. Rows whose landmarks are missing show the face untinted.

    Args:
        images: uint8 (N, H, W, 3).
        landmarks: (N, 5, 2) pixel (x, y) in those images.
        path: output .png file.
        panel_width: width of each panel in pixels (height keeps the aspect).
    """
    from PIL import Image, ImageDraw

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: the mask picture is a PNG file (name it .png)")
    images = np.asarray(images)
    landmarks = np.asarray(landmarks, np.float32)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {images.shape}")
    if landmarks.shape != (len(images), 5, 2):
        raise ValueError(f"landmarks must have shape ({len(images)}, 5, 2), got {landmarks.shape}")
    n, height, width = images.shape[:3]
    panel_height = int(round(panel_width * height / width))
    title_height = 14
    canvas = Image.new("RGB", (panel_width * len(GROUP_NAMES), title_height + panel_height * n), "white")
    draw = ImageDraw.Draw(canvas)
    for g, name in enumerate(GROUP_NAMES):
        draw.text((g * panel_width + 3, 1), name, fill=(0, 0, 0))
    factor = panel_width / width
    for i in range(n):
        masks = group_masks_numpy(landmarks[i], height, width)
        face = images[i].astype(np.float32)
        for g in range(len(GROUP_NAMES)):
            alpha = 0.55 * masks[..., g : g + 1]
            tinted = face * (1 - alpha) + np.array(GROUP_COLORS[g], np.float32) * alpha
            panel = Image.fromarray(tinted.round().astype(np.uint8)).resize(
                (panel_width, panel_height), Image.BILINEAR
            )
            pd = ImageDraw.Draw(panel)
            for k, (x, y) in enumerate(landmarks[i]):
                if np.isfinite(x) and np.isfinite(y):
                    x, y = x * factor, y * factor
                    colour = (255, 255, 255) if k != 2 else (255, 0, 0)
                    pd.ellipse((x - 1.5, y - 1.5, x + 1.5, y + 1.5), fill=colour, outline=(0, 0, 0))
            canvas.paste(panel, (g * panel_width, title_height + i * panel_height))
    path.parent.mkdir(parents=True, exist_ok=True)
    # A 256-colour palette keeps the picture small enough to commit.
    picture = canvas.quantize(colors=256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
    with atomic_path(path, suffix=".png") as tmp:
        picture.save(tmp, optimize=True)
    return path
