"""Synthetic faces: the package's built-in, download-free labelled data.

Every image is a cartoon face drawn with PIL on a supersampled canvas. Each
label in `tfface.schema.SYNTHETIC_ATTRIBUTES` (plus `age`) has a visible
correlate in the pixels (rims around the eyes, red lips, a tie below the
chin, ...), so a model can really learn them, and the labels are correlated
like real ones (beards only on men, gray hair mostly on older people, ...).

Each synthetic person (identity) appears in 3-5 images with different pose,
scale, lighting, background and expression, so identity-disjoint splits are
meaningful. Image `i` is drawn from a random generator seeded with
`(seed, i)` and its person's traits from `(seed, identity)`, so the output is
byte-identical for any `num_workers`.

Landmarks are exact: they go through the same geometric transform as the
drawing. Coordinates are pixel (x, y) with pixel centres on integers, i.e.
landmark (x, y) lies on pixel `images[n, round(y), round(x)]`.
"""

from __future__ import annotations

import concurrent.futures
import csv
import math
import multiprocessing
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from tfface.atomic_files import replaced_folder
from tfface.data.source import LANDMARK_COLUMNS, FaceSource
from tfface.schema import SYNTHETIC, SYNTHETIC_ATTRIBUTES

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG"}

# Random streams: (seed, stream, index) seeds one generator.
_IDENTITY_SIZES_STREAM = 0
_IDENTITY_STREAM = 1
_IMAGE_STREAM = 2

# Images per worker task; small enough to balance two cores.
_CHUNK = 250

_SKIN_TONES = np.array(
    [
        (72, 46, 34),
        (118, 78, 56),
        (160, 112, 82),
        (196, 150, 116),
        (222, 180, 150),
    ],
    dtype=np.float64,
)
_PALE_SKIN = np.array((247, 228, 216), dtype=np.float64)
_HAIR_COLOURS = {
    "black": (28, 24, 26),
    "brown": (100, 62, 34),
    "blond": (226, 188, 112),
    "gray": (190, 190, 192),
    "red": (160, 64, 30),
}
_TIE_COLOURS = ((190, 20, 30), (25, 40, 140), (20, 110, 60), (120, 20, 110), (230, 180, 30))
_IRIS_COLOURS = ((60, 36, 20), (96, 62, 36), (60, 100, 150), (70, 110, 70), (100, 105, 110))


# --- public API ---------------------------------------------------------------


def generate_synthetic_faces(
    num_images: int,
    image_size: int = 64,
    seed: int = 0,
    num_workers: int | None = None,
) -> FaceSource:
    """Draws `num_images` labelled synthetic faces in memory.

    Args:
        num_images: how many images (>= 1).
        image_size: side of the square images in pixels (>= 32).
        seed: non-negative int; the same seed gives byte-identical output.
        num_workers: processes to draw with; None picks one per CPU core for
            large requests. The result does not depend on it.

    Returns:
        A `FaceSource` with `format="synthetic"`, uint8 `images` of shape
        (N, S, S, 3), `landmarks` (N, 5, 2) in `LANDMARK_NAMES` order ("left"
        = image left), `identities` (N,) and raw 0/1 label `columns` named as
        in `tfface.schema.SYNTHETIC_ATTRIBUTES`, plus `age` in years (1-90).
    """
    num_images = _check_int("num_images", num_images, minimum=1)
    image_size = _check_int("image_size", image_size, minimum=32)
    seed = _check_int("seed", seed, minimum=0)
    if num_workers is None:
        num_workers = 1 if num_images < 2 * _CHUNK else min(8, os.cpu_count() or 1)
    num_workers = _check_int("num_workers", num_workers, minimum=1)

    identities = _identity_of_each_image(seed, num_images)
    images = np.empty((num_images, image_size, image_size, 3), np.uint8)
    landmarks = np.empty((num_images, 5, 2), np.float32)
    columns = {name: np.empty((num_images,), np.int32) for name in SYNTHETIC_ATTRIBUTES}
    columns["age"] = np.empty((num_images,), np.int32)

    chunks = [
        (seed, image_size, start, identities[start : start + _CHUNK])
        for start in range(0, num_images, _CHUNK)
    ]
    num_workers = min(num_workers, len(chunks))
    if num_workers == 1:
        results = map(_render_chunk, chunks)
        _collect(results, images, landmarks, columns)
    else:
        # fork: workers start at once and need nothing re-imported.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        context = multiprocessing.get_context(method)
        with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
            _collect(pool.map(_render_chunk, chunks), images, landmarks, columns)

    return FaceSource(
        name="synthetic",
        format=SYNTHETIC,
        columns=columns,
        images=images,
        identities=identities.astype(np.int64),
        landmarks=landmarks,
        partition=None,
        image_sizes=np.full((num_images, 2), image_size, np.int32),
    )


def check_new_dataset_folder(out_dir) -> None:
    """A dataset is written to a new (or empty) folder, never over files;
    callers check before generating, which can take a while."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        if not out_dir.is_dir():
            raise FileExistsError(f"{out_dir} exists and is not a folder")
        if any(out_dir.iterdir()):
            raise FileExistsError(f"{out_dir} already exists and is not empty; refusing to overwrite it")


def write_synthetic_folder(source: FaceSource, out_dir, image_format: str = "png") -> Path:
    """Writes an in-memory source as a CelebA-format folder.

    Layout: `images/<image_id>`, `attributes.csv` (image_id, the labelled
    CelebA attributes, age), `identities.csv` (image_id, identity) and
    `landmarks.csv` (image_id + official CelebA landmark columns). The folder
    is written beside `out_dir` and renamed at the end, so a failure never
    leaves a half-written dataset. Refuses a non-empty existing `out_dir`.

    Returns:
        The written folder.
    """
    out_dir = Path(out_dir)
    key = str(image_format).lower().lstrip(".")
    if key not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")
    if source.images is None:
        raise ValueError("write_synthetic_folder needs a source with in-memory images (source.images is None)")
    images = np.asarray(source.images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"source.images must be uint8 of shape (N, H, W, 3), got {images.dtype} {images.shape}"
        )
    check_new_dataset_folder(out_dir)

    n = len(source)
    image_ids = [f"{i + 1:06d}.{key}" for i in range(n)]
    attribute_names = [a for a in SYNTHETIC_ATTRIBUTES if a in source.columns]
    extra = ["age"] if "age" in source.columns else []

    # Written beside out_dir and swapped in whole (checked empty above).
    with replaced_folder(out_dir, may_replace=lambda name: False, marker="attributes.csv") as tmp:
        (tmp / "images").mkdir()
        for image_id, image in zip(image_ids, source.images):
            Image.fromarray(image).save(tmp / "images" / image_id, IMAGE_FORMATS[key])
        with open(tmp / "attributes.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["image_id", *attribute_names, *extra])
            values = np.stack([np.asarray(source.columns[c]) for c in attribute_names + extra], 1)
            for image_id, row in zip(image_ids, values.tolist()):
                # A missing label (-1) is an empty cell, as the reader wants.
                writer.writerow([image_id, *("" if v < 0 else v for v in row)])
        if source.identities is not None:
            with open(tmp / "identities.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["image_id", "identity"])
                for image_id, identity in zip(image_ids, np.asarray(source.identities).tolist()):
                    writer.writerow([image_id, identity])
        if source.landmarks is not None:
            with open(tmp / "landmarks.csv", "w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["image_id", *LANDMARK_COLUMNS])
                flat = np.asarray(source.landmarks, np.float64).reshape(n, 10)
                for image_id, row in zip(image_ids, flat.tolist()):
                    writer.writerow([image_id, *(f"{v:.2f}" for v in row)])
    return out_dir


# --- orchestration ------------------------------------------------------------


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _identity_of_each_image(seed: int, num_images: int) -> np.ndarray:
    """Consecutive runs of 3-5 images per person (prefix-stable in N)."""
    rng = np.random.default_rng([seed, _IDENTITY_SIZES_STREAM])
    sizes = rng.integers(3, 6, size=num_images // 3 + 1)
    return np.repeat(np.arange(len(sizes)), sizes)[:num_images]


def _collect(results, images, landmarks, columns):
    for start, chunk_images, chunk_landmarks, chunk_columns in results:
        stop = start + len(chunk_images)
        images[start:stop] = chunk_images
        landmarks[start:stop] = chunk_landmarks
        for name, values in chunk_columns.items():
            columns[name][start:stop] = values


def _render_chunk(args):
    seed, size, start, identities = args
    n = len(identities)
    images = np.empty((n, size, size, 3), np.uint8)
    landmarks = np.empty((n, 5, 2), np.float32)
    columns = {name: np.empty((n,), np.int32) for name in (*SYNTHETIC_ATTRIBUTES, "age")}
    person_cache = {}
    for j, identity in enumerate(identities.tolist()):
        if identity not in person_cache:
            person_cache[identity] = _person(np.random.default_rng([seed, _IDENTITY_STREAM, identity]))
        rng = np.random.default_rng([seed, _IMAGE_STREAM, start + j])
        face = _face(person_cache[identity], rng)
        images[j], landmarks[j] = _render(face, size, rng)
        for name in columns:
            columns[name][j] = face["labels"][name]
    return start, images, landmarks, columns


# --- sampling: who is this person, what does this photo show -------------------


def _person(rng: np.random.Generator) -> dict:
    """Traits that stay fixed across one identity's images."""
    p = {}
    p["male"] = bool(rng.random() < 0.45)
    band = rng.choice(4, p=(0.12, 0.55, 0.20, 0.13))
    p["age"] = int(rng.integers(*((1, 18), (18, 40), (40, 60), (60, 91))[band]))
    age, male = p["age"], p["male"]
    child = age < 14

    p["pale"] = bool(rng.random() < 0.07)
    tone = rng.beta(2.0, 1.3)  # 0 darkest .. 1 lightest non-pale tone
    p["tone"] = tone
    if p["pale"]:
        skin = _PALE_SKIN + rng.uniform(-6, 4, 3)
    else:
        x = tone * (len(_SKIN_TONES) - 1)
        i = min(int(x), len(_SKIN_TONES) - 2)
        skin = _SKIN_TONES[i] + (x - i) * (_SKIN_TONES[i + 1] - _SKIN_TONES[i]) + rng.uniform(-8, 8, 3)
    p["skin"] = np.clip(skin, 0, 255)

    # Head shape: children rounder, men a wider jaw, the old a longer face.
    p["a"] = rng.uniform(0.92, 1.02) + (0.03 if male else 0.0)
    p["b"] = rng.uniform(1.24, 1.34) * (0.93 if child else 1.0) * (1.03 if age >= 60 else 1.0)
    p["jaw"] = (0.05 if male else 0.15) + rng.uniform(-0.03, 0.03) - (0.05 if child else 0.0)
    p["eye_x"] = rng.uniform(0.36, 0.42)
    p["eye_r"] = rng.uniform(0.13, 0.155) * (1.15 if child else 1.0)
    p["iris"] = np.array(_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))], np.float64)
    p["nose_y"] = rng.uniform(0.44, 0.52) * (0.92 if child else 1.0)
    p["nose_w"] = rng.uniform(0.08, 0.12) * (0.85 if child else 1.0)
    p["mouth_y"] = rng.uniform(0.80, 0.86) * (0.95 if child else 1.0)
    p["mouth_w"] = rng.uniform(0.25, 0.32) * (0.85 if child else 1.0)
    p["lip_t"] = rng.uniform(0.045, 0.07) + (0.0 if male else 0.012)
    p["brow_t"] = rng.uniform(0.05, 0.075) + (0.02 if male else 0.0)

    # Hair: bald mostly older men; gray mostly the old; dark skin, dark hair.
    bald_p = 0.0 if not male else (0.35 if age >= 40 else 0.1 if age >= 25 else 0.0)
    p["bald"] = bool(rng.random() < bald_p)
    gray_p = 0.55 if age >= 60 else 0.25 if age >= 45 else 0.06 if age >= 30 else 0.0
    if rng.random() < gray_p:
        colour = "gray"
    else:
        probs = np.array([0.36, 0.30, 0.12 if male else 0.30, 0.12])
        if not p["pale"] and tone < 0.35:
            probs = np.array([0.85, 0.1, 0.02, 0.03])
        colour = ("black", "brown", "blond", "red")[rng.choice(4, p=probs / probs.sum())]
    p["hair_colour"] = colour
    base = np.array(_HAIR_COLOURS[colour], np.float64)
    if colour == "red" and rng.random() < 0.3:  # dyed: no CelebA hair colour
        base = np.array([(120, 40, 120), (200, 80, 130), (40, 90, 160)][rng.integers(3)], np.float64)
    jitter = rng.uniform(-14, 14, 3) if colour in ("black", "gray") else rng.uniform(-22, 22, 3)
    p["hair"] = np.clip(base + jitter + (rng.uniform(-12, 12) if colour == "gray" else 0), 0, 255)
    if colour == "gray":
        p["hair"][:] = p["hair"].mean()
    length_p = (0.8, 0.15, 0.05) if male else (0.05, 0.25, 0.7)
    p["hair_length"] = ("short", "medium", "long")[rng.choice(3, p=length_p)]
    p["hair_t"] = rng.uniform(0.09, 0.2)
    p["hairline"] = rng.uniform(-0.98, -0.84)
    p["hairline_k"] = rng.uniform(0.25, 0.5)
    p["bangs"] = (not p["bald"]) and bool(rng.random() < (0.07 if male else 0.24))

    # Facial hair (men >= 16): none, full beard, goatee, mustache only.
    kind = "none"
    if male and age >= 16:
        kind = ("none", "beard", "goatee", "mustache")[rng.choice(4, p=(0.56, 0.20, 0.15, 0.09))]
    p["beard"] = kind == "beard"
    p["goatee"] = kind == "goatee"
    p["mustache"] = kind == "mustache" or (kind == "beard" and rng.random() < 0.5) or (
        kind == "goatee" and rng.random() < 0.4
    )
    facial = p["hair"] if colour != "red" or rng.random() < 0.5 else np.array(_HAIR_COLOURS["brown"], float)
    if p["bald"]:
        facial = np.array(_HAIR_COLOURS[("black", "brown", "gray")[rng.integers(3)]], np.float64)
    # Beards read as a dark lower face, even for light hair.
    p["facial_hair"] = np.clip(facial * (0.55 if facial.mean() > 120 else 0.8), 0, 255)
    p["brow"] = np.clip(p["hair"] * 0.6 if colour not in ("blond", "gray") else p["hair"] * 0.55, 0, 255)
    if p["bald"]:
        p["brow"] = p["facial_hair"] * 0.8

    # Accessory habits: how likely each photo shows them.
    adult = age >= 16
    p["glasses_p"] = 0.9 if rng.random() < (0.24 if age >= 45 else 0.10) else 0.01
    p["glasses_frame"] = np.array(
        [(15, 15, 15), (50, 30, 20), (20, 25, 60), (70, 70, 75)][rng.integers(4)], np.float64
    )
    p["glasses_shape"] = ("round", "rect")[rng.integers(2)]
    p["sunglasses"] = bool(rng.random() < 0.15)
    if not male and age >= 14:
        p["lipstick_p"] = 0.9 if rng.random() < 0.8 else 0.05
    else:
        p["lipstick_p"] = 0.005 if male else 0.02
    p["earrings_p"] = (0.85 if rng.random() < (0.45 if not male else 0.06) else 0.02) if age >= 8 else 0.0
    p["tie_p"] = (0.7 if rng.random() < (0.30 if male else 0.02) else 0.01) if adult else 0.0
    p["rosy_p"] = 0.75 if rng.random() < (0.16 if not male else 0.05) else 0.01
    p["hat_p"] = 0.0 if p["bald"] else 0.085
    return p


def _face(person: dict, rng: np.random.Generator) -> dict:
    """One photo of `person`: expression, accessories, pose and labels."""
    f = dict(person)
    f["age"] = int(np.clip(person["age"] + rng.integers(-1, 2), 1, 90))
    f["smiling"] = bool(rng.random() < 0.48)
    f["open"] = bool(rng.random() < (0.65 if f["smiling"] else 0.28))
    f["glasses"] = bool(rng.random() < person["glasses_p"])
    f["lipstick"] = bool(rng.random() < person["lipstick_p"])
    f["earrings"] = bool(rng.random() < person["earrings_p"])
    f["tie"] = bool(rng.random() < person["tie_p"])
    f["rosy"] = bool(rng.random() < person["rosy_p"])
    f["hat"] = bool(rng.random() < person["hat_p"])
    bald = person["bald"]
    colour = person["hair_colour"]
    f["labels"] = {
        "Eyeglasses": f["glasses"],
        "Smiling": f["smiling"],
        "Mouth_Slightly_Open": f["open"],
        "Black_Hair": not bald and colour == "black",
        "Blond_Hair": not bald and colour == "blond",
        "Brown_Hair": not bald and colour == "brown",
        "Gray_Hair": not bald and colour == "gray",
        "Bangs": person["bangs"],
        "Bald": bald,
        "Wearing_Hat": f["hat"],
        "No_Beard": not (person["beard"] or person["goatee"] or person["mustache"]),
        "Goatee": person["goatee"],
        "Mustache": person["mustache"],
        "Wearing_Lipstick": f["lipstick"],
        "Male": person["male"],
        "Pale_Skin": person["pale"],
        "Young": f["age"] < 40,
        "Rosy_Cheeks": f["rosy"],
        "Wearing_Earrings": f["earrings"],
        "Wearing_Necktie": f["tie"],
        "age": f["age"],
    }
    f["labels"] = {k: int(v) for k, v in f["labels"].items()}
    return f


# --- drawing -------------------------------------------------------------------


class _Pen:
    """Draws shapes given in face units onto the supersampled canvas.

    Face units: origin at the head centre, x right, y down, eyes at y=0,
    head half-height `b` ~ 1.3. `depth` shifts a point sideways with yaw
    (the nose tip, depth 1, moves most), faking a turned head. Shapes are
    queued and transformed in one batch by `flush` (numpy per shape is slow).
    """

    def __init__(self, draw, centre, scale, angle, yaw, factor):
        self.draw = draw
        self.scale = scale
        self.yaw = yaw
        self.factor = factor
        cos, sin = math.cos(angle), math.sin(angle)
        self.matrix = scale * np.array([[cos, -sin], [sin, cos]])
        self.centre = np.asarray(centre, np.float64)
        self._queue = []  # (points, depth, ink, line width or 0)

    def pixels(self, points, depth=0.0):
        """Face units -> output pixel coords (pixel centres on integers)."""
        pts = np.asarray(points, np.float64).reshape(-1, 2)
        return pts @ self.matrix.T + (self.centre + self.matrix[:, 0] * (self.yaw * depth))

    def flush(self):
        """Draws the queued shapes in order."""
        if not self._queue:
            return
        points = [np.asarray(op[0], np.float64).reshape(-1, 2) for op in self._queue]
        counts = [len(p) for p in points]
        pts = np.concatenate(points)
        pts[:, 0] += self.yaw * np.repeat([op[1] for op in self._queue], counts)
        # Output pixel p covers canvas pixels [p*F, p*F + F); centres align.
        canvas = ((pts @ self.matrix.T + self.centre + 0.5) * self.factor - 0.5).ravel().tolist()
        offset = 0
        for (_, _, ink, width), count in zip(self._queue, counts):
            xy = canvas[offset : offset + 2 * count]
            offset += 2 * count
            if width:
                self.draw.line(xy, fill=ink, width=width, joint="curve")
            else:
                self.draw.polygon(xy, fill=ink)
        self._queue = []

    def polygon(self, points, colour, depth=0.0, alpha=255):
        self._queue.append((points, depth, _ink(colour, alpha), 0))

    def ellipse(self, cx, cy, rx, ry, colour, depth=0.0, alpha=255, min_px=0.0, n=24):
        rx = max(rx, min_px / self.scale)
        ry = max(ry, min_px / self.scale)
        self.polygon(_ellipse_points(cx, cy, rx, ry, n), colour, depth, alpha)

    def line(self, points, colour, width, depth=0.0, alpha=255, min_px=1.0):
        pixels = max(1, int(round(max(width * self.scale, min_px) * self.factor)))
        self._queue.append((points, depth, _ink(colour, alpha), pixels))

    def outline(self, points, colour, width, depth=0.0, alpha=255, min_px=1.0):
        pts = np.asarray(points, np.float64)
        self.line(np.concatenate([pts, pts[:2]]), colour, width, depth, alpha, min_px)


def _ink(colour, alpha=255):
    r, g, b = colour[0], colour[1], colour[2]
    return (
        int(min(max(r, 0.0), 255.0) + 0.5),
        int(min(max(g, 0.0), 255.0) + 0.5),
        int(min(max(b, 0.0), 255.0) + 0.5),
        int(alpha),
    )


_UNIT_CIRCLES = {}


def _ellipse_points(cx, cy, rx, ry, n=28, t0=0.0, t1=2 * math.pi):
    if t0 == 0.0 and t1 == 2 * math.pi:
        if n not in _UNIT_CIRCLES:
            t = np.linspace(0, 2 * math.pi, n, endpoint=False)
            _UNIT_CIRCLES[n] = np.stack([np.cos(t), np.sin(t)], 1)
        return _UNIT_CIRCLES[n] * (rx, ry) + (cx, cy)
    t = np.linspace(t0, t1, n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def _between(x, top, bottom):
    """Polygon between two curves y=top(x) and y=bottom(x)."""
    return np.concatenate([np.stack([x, top], 1), np.stack([x[::-1], bottom[::-1]], 1)])


def _box(x0, x1, y0, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _head_outline(a, b, jaw, n=48):
    """Egg-shaped head: narrower towards the chin by `jaw`."""
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    s = np.sin(t)
    x = a * np.cos(t) * (1 - jaw * np.clip(s, 0, None) ** 2)
    return np.stack([x, b * s], 1)


def _render(f: dict, size: int, rng: np.random.Generator):
    factor = 4 if size <= 96 else 3 if size <= 160 else 2
    big = size * factor
    canvas = Image.new("RGB", (big, big), _ink(rng.uniform(30, 230, 3))[:3])
    draw = ImageDraw.Draw(canvas, "RGBA")
    _background(draw, big, rng)

    a, b, jaw = f["a"], f["b"], f["jaw"]
    fill = rng.uniform(0.45, 0.75)  # head height / image side
    scale = fill * size / (2 * b)
    centre = (
        size * (0.5 + rng.uniform(-0.06, 0.06)),
        size * (0.47 - (fill - 0.45) * 0.2 + rng.uniform(-0.05, 0.05)),
    )
    pen = _Pen(draw, centre, scale, math.radians(rng.uniform(-15, 15)), rng.uniform(-0.16, 0.16), factor)

    skin = f["skin"]
    shade = skin * 0.8

    _body(pen, f, rng)
    if not f["bald"]:
        _hair_back(pen, f)
    # Ears, then the head over their inner half.
    for side in (-1, 1):
        pen.ellipse(side * (a - 0.02), 0.06, 0.13, 0.23, skin * 0.9)
        pen.ellipse(side * (a + 0.02), 0.06, 0.05, 0.12, shade * 0.9, alpha=120)
    pen.polygon(_head_outline(a, b, jaw), skin)
    # Soft side shading gives the head some volume.
    for side in (-1, 1):
        pen.ellipse(side * a * 0.78, 0.25, a * 0.28, b * 0.75, shade, alpha=45)
    if f["bald"]:
        pen.ellipse(-0.25, -0.95, 0.22, 0.12, (255, 255, 255), alpha=55)
    _wrinkles(pen, f)
    if not f["bald"]:
        _hair_front(pen, f, rng)
    _eyes(pen, f)
    _nose(pen, f)
    if f["rosy"]:
        for side in (-1, 1):
            pen.ellipse(side * 0.5, 0.36, 0.2, 0.15, (225, 40, 70), depth=0.4, alpha=80)
            pen.ellipse(side * 0.5, 0.36, 0.13, 0.1, (225, 40, 70), depth=0.4, alpha=90)
    _facial_hair(pen, f, rng)
    corners = _mouth(pen, f)
    if f["earrings"]:
        colour = ((245, 205, 60), (235, 235, 245), (60, 200, 230), (240, 80, 160))[rng.integers(4)]
        for side in (-1, 1):
            pen.ellipse(side * (a + 0.02), 0.3, 0.055, 0.055, colour, min_px=1.0)
            pen.ellipse(side * (a + 0.01), 0.28, 0.02, 0.02, (255, 255, 255), min_px=0.4)
    if f["glasses"]:
        _glasses(pen, f)
    if f["hat"]:
        _hat(pen, f, rng)

    pen.flush()
    image = np.asarray(canvas.reduce(factor), np.float32)
    image = _lighting(image, rng)

    ex = f["eye_x"]
    landmarks = np.concatenate(
        [
            pen.pixels([(-ex, 0.0), (ex, 0.0)], depth=0.5),
            pen.pixels([(0.0, f["nose_y"])], depth=1.0),
            pen.pixels(corners, depth=0.6),
        ]
    )
    return image, landmarks.astype(np.float32)


def _background(draw, big, rng):
    """Clutter: random shapes that the head will partly hide."""
    for _ in range(rng.integers(2, 8)):
        colour = _ink(rng.uniform(0, 255, 3), rng.integers(120, 256))
        kind = rng.integers(4)
        x0, y0 = rng.uniform(-0.2, 1.0, 2) * big
        w, h = rng.uniform(0.1, 0.6, 2) * big
        if kind == 0:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        elif kind == 1:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        elif kind == 2:
            pts = rng.uniform(-0.1, 1.1, (3, 2)) * big
            draw.polygon([tuple(p) for p in pts.tolist()], fill=colour)
        else:
            pts = rng.uniform(0, 1, (2, 2)) * big
            draw.line([tuple(p) for p in pts.tolist()], fill=colour, width=int(rng.integers(2, big // 16 + 3)))


def _body(pen, f, rng):
    """Shoulders, neck and, with `tie`, a collar and necktie."""
    b, skin = f["b"], f["skin"]
    shirt = rng.uniform(20, 235, 3)
    pen.ellipse(0, b + 1.75, 2.2, 1.4, shirt, n=40)
    pen.polygon([(-0.36, 0.6), (0.36, 0.6), (0.4, b + 0.55), (-0.4, b + 0.55)], skin * 0.82)
    if f["tie"] or (f["male"] and rng.random() < 0.3):
        collar = (245, 245, 245) if f["tie"] or rng.random() < 0.5 else shirt * 0.7 + 70
        for side in (-1, 1):
            pen.polygon([(side * 0.42, b + 0.28), (side * 0.05, b + 0.55), (side * 0.5, b + 0.62)], collar)
    if f["tie"]:
        tie = np.array(_TIE_COLOURS[rng.integers(len(_TIE_COLOURS))])
        if np.abs(tie - shirt).sum() < 120:
            tie = 255 - tie
        pen.polygon([(-0.1, b + 0.36), (0.1, b + 0.36), (0.07, b + 0.52), (-0.07, b + 0.52)], tie * 0.8)
        pen.polygon(
            [(-0.07, b + 0.52), (0.07, b + 0.52), (0.17, b + 1.5), (0.0, b + 1.7), (-0.17, b + 1.5)], tie
        )
        pen.line([(-0.14, b + 0.95), (0.15, b + 0.85)], tie * 0.6, 0.05, alpha=160)


def _hair_back(pen, f):
    """Hair mass behind the head: a rim on top, down to the shoulders if long."""
    a, b, t, hair = f["a"], f["b"], f["hair_t"], f["hair"]
    bottom = {"short": -0.15, "medium": 0.75, "long": b + 0.9}[f["hair_length"]]
    top = _ellipse_points(0, 0, a + t, b + t, 40, math.pi, 2 * math.pi)
    wide = a + t + (0.12 if f["hair_length"] == "long" else 0.0)
    x = np.linspace(wide, -wide, 25)
    # Flat ends with rounded corners and a slightly wavy tip line.
    tips = bottom - 0.35 * np.abs(x / wide) ** 6 + 0.04 * np.sin(x * 11)
    side = np.concatenate([[(wide, 0.0)], np.stack([x, tips], 1), [(-wide, 0.0)]])
    pen.polygon(np.concatenate([top, side]), hair)


def _hair_front(pen, f, rng):
    """Hair over the scalp above the hairline; bangs bring it over the forehead."""
    a, b, hair = f["a"], f["b"], f["hair"]
    x = np.linspace(-a, a, 41)
    top = -b * np.sqrt(np.clip(1 - (x / a) ** 2, 0, 1))
    if f["bangs"]:
        teeth = 0.05 * np.abs(((x * 9 + rng.uniform(0, 1)) % 2) - 1)
        edge = -0.36 - teeth + 0.35 * (x / a) ** 4
    else:
        edge = f["hairline"] + f["hairline_k"] * (x / a) ** 2
    # Sideburn region: hair reaches down to y=-0.05 at the temples.
    edge = np.where(np.abs(x) > 0.8 * a, np.maximum(edge, -0.05), edge)
    edge = np.maximum(edge, top)
    outline = np.concatenate([np.stack([x, top], 1), np.stack([x[::-1], edge[::-1]], 1)])
    pen.polygon(outline, hair)
    # A few strands for texture.
    strand = hair * 0.7 if hair.mean() > 60 else hair + 35
    for k in range(5):
        x0 = -0.6 * a + 0.3 * a * k
        path = [(x0 * 0.6, -b * 0.95), (x0, -b * 0.7), (x0 * 1.1, edge[20] - 0.05)]
        pen.line(path, strand, 0.03, alpha=110, min_px=0.6)


def _wrinkles(pen, f):
    """Age lines: forehead, crow's feet, nasolabial folds; darker with age."""
    age = f["age"]
    if age < 38:
        return
    alpha = int(min(230, 90 + (age - 38) * 3.5))
    colour = f["skin"] * 0.55
    count = 2 + (age - 38) // 14
    for k in range(count):
        y = -0.35 - 0.08 * k
        pen.line([(-0.45, y + 0.02), (0, y - 0.02), (0.45, y + 0.02)], colour, 0.03, alpha=alpha, min_px=0.7)
    ex, mw, my = f["eye_x"], f["mouth_w"], f["mouth_y"]
    for side in (-1, 1):
        fold = [(f["nose_w"] + 0.12, f["nose_y"] - 0.05), (mw + 0.08, my - 0.02), (mw + 0.05, my + 0.12)]
        pen.line(np.array(fold) * (side, 1), colour, 0.035, depth=0.5, alpha=alpha, min_px=0.8)
        for dy in (-0.05, 0.04):
            crow = [(ex + 0.18, 0.0), (ex + 0.3, dy)]
            pen.line(np.array(crow) * (side, 1), colour, 0.025, depth=0.4, alpha=alpha, min_px=0.6)
        bag = [(ex - 0.12, 0.13), (ex, 0.17), (ex + 0.12, 0.13)]
        pen.line(np.array(bag) * (side, 1), colour, 0.025, depth=0.5, alpha=alpha, min_px=0.6)


def _eyes(pen, f):
    ex, r = f["eye_x"], f["eye_r"]
    squint = 0.8 if f["smiling"] else 1.0
    for side in (-1, 1):
        cx = side * ex
        # Brow, lid shadow, white, iris, pupil, highlight.
        pen.line(
            [(cx - side * 0.17, -0.22), (cx, -0.28), (cx + side * 0.2, -0.23)],
            f["brow"], f["brow_t"], depth=0.5, min_px=1.0,
        )
        pen.ellipse(cx, -0.02, r * 1.2, r * 0.7, f["skin"] * 0.7, depth=0.5, alpha=110)
        pen.ellipse(cx, 0.0, r, r * 0.5 * squint, (242, 240, 235), depth=0.5)
        pen.ellipse(cx, 0.0, r * 0.45, r * 0.45 * min(1.0, squint + 0.1), f["iris"], depth=0.5, min_px=0.9)
        pen.ellipse(cx, 0.0, r * 0.2, r * 0.2, (10, 10, 10), depth=0.5, min_px=0.5)
        lid = _ellipse_points(cx, 0.0, r, r * 0.5 * squint, 12, math.pi, 2 * math.pi)
        pen.line(lid, (40, 25, 20), 0.025, depth=0.5, min_px=0.6)


def _nose(pen, f):
    y, w, skin = f["nose_y"], f["nose_w"], f["skin"]
    pen.line([(0.04, -0.05), (0.06, y - 0.12)], skin * 0.78, 0.04, depth=0.8, alpha=110, min_px=0.6)
    pen.ellipse(0, y + 0.02, w * 1.1, 0.06, skin * 0.7, depth=1.0, alpha=140)
    pen.ellipse(0, y - 0.02, w * 0.6, 0.05, np.minimum(skin * 1.1 + 10, 255), depth=1.0, alpha=140)
    for side in (-1, 1):
        pen.ellipse(side * w * 0.55, y + 0.04, 0.035, 0.022, skin * 0.35, depth=1.0, min_px=0.5)


def _facial_hair(pen, f, rng):
    a, b, jaw, colour = f["a"], f["b"], f["jaw"], f["facial_hair"]
    my, mw = f["mouth_y"], f["mouth_w"]
    if f["beard"]:
        outline = _head_outline(a * 1.01, b * 1.02, jaw)
        lower = outline[outline[:, 1] > 0.15]
        lower = lower[np.argsort(-lower[:, 0])]  # right to left along the jaw
        cheek = [(0.7 * a, 0.2), (mw + 0.1, my - 0.2)]  # beard's upper edge, right half
        inner = [(-x, y) for x, y in cheek] + [(0, f["nose_y"] + 0.12)] + cheek[::-1]
        pen.polygon(np.concatenate([lower, inner]), colour, alpha=235)
        for _ in range(25):  # stubble texture
            x, y = rng.uniform(-0.6, 0.6), rng.uniform(0.6, 1.2)
            pen.ellipse(x, y, 0.03, 0.03, colour * 0.6, alpha=140)
    if f["goatee"]:
        pen.ellipse(0, b - 0.2, 0.26, 0.22, colour, depth=0.3, alpha=240)
        strip = [(-0.1, my + 0.08), (0.1, my + 0.08), (0.16, b - 0.25), (-0.16, b - 0.25)]
        pen.polygon(strip, colour, depth=0.4, alpha=240)
    if f["mustache"]:
        top, bot = f["nose_y"] + 0.1, my - 0.03
        band = [
            (-mw - 0.05, bot + 0.06),
            (-0.15, top),
            (0.15, top),
            (mw + 0.05, bot + 0.06),
            (mw - 0.05, bot),
            (-mw + 0.05, bot),
        ]
        pen.polygon(band, colour, depth=0.6, alpha=245)


def _mouth(pen, f):
    """Lips and opening; returns the two corners in face units."""
    my, mw, t = f["mouth_y"], f["mouth_w"], f["lip_t"]
    curve = 0.09 if f["smiling"] else 0.012  # corners above the middle
    mw = mw * (1.12 if f["smiling"] else 1.0)
    opening = (0.09 if f["smiling"] else 0.06) if f["open"] else 0.0
    x = np.linspace(-mw, mw, 21)
    u = 1 - (x / mw) ** 2
    centre = my + curve * u
    upper_edge = centre - opening * 0.35 * np.sqrt(u)
    lower_edge = centre + opening * np.sqrt(u)
    if f["lipstick"]:
        lip = np.array((200, 20, 45)) if f["tone"] > 0.3 or f["pale"] else np.array((160, 10, 40))
    else:
        lip = f["skin"] * 0.72 + np.array((30, -6, -4))
    if opening:
        pen.polygon(_between(x, upper_edge, lower_edge), (60, 15, 25), depth=0.6)
        if f["smiling"]:
            teeth = upper_edge + opening * 0.45 * np.sqrt(u)
            pen.polygon(_between(x, upper_edge, teeth), (235, 232, 220), depth=0.6)
    bow = 0.012 * np.cos(x / mw * math.pi * 2) * u  # cupid's bow
    pen.polygon(_between(x, upper_edge - t * 0.9 * np.sqrt(u) - bow, upper_edge), lip, depth=0.6)
    pen.polygon(_between(x, lower_edge, lower_edge + t * 1.1 * np.sqrt(u)), lip * 1.05, depth=0.6)
    if not opening:  # the line where the lips meet
        pen.line(np.stack([x, centre], 1)[2:-2], lip * 0.5, 0.02, depth=0.6, alpha=180, min_px=0.5)
    return [(-mw, my), (mw, my)]


def _glasses(pen, f):
    ex, frame = f["eye_x"], f["glasses_frame"]
    rx, ry = 0.24, 0.18
    for side in (-1, 1):
        cx = side * ex
        if f["glasses_shape"] == "round":
            rim = _ellipse_points(cx, 0.0, rx, ry, 28)
        else:
            corners = [(1, 0.9), (0.95, -1), (-0.95, -1), (-1, 0.9), (-0.8, 1), (0.8, 1)]
            rim = np.array([cx, 0.0]) + np.array(corners) * (side * rx, ry)
        if f["sunglasses"]:
            pen.polygon(rim, (20, 20, 25), depth=0.5, alpha=215)
        else:
            pen.polygon(rim, (200, 220, 235), depth=0.5, alpha=35)
        pen.outline(rim, frame, 0.05, depth=0.5, min_px=1.1)
        pen.line([(cx + side * rx, -0.05), (side * (f["a"] - 0.02), -0.02)], frame, 0.045, depth=0.25, min_px=1.0)
    pen.line([(-ex + rx, -0.04), (0, -0.08), (ex - rx, -0.04)], frame, 0.045, depth=0.55, min_px=1.0)


def _hat(pen, f, rng):
    a, b = f["a"], f["b"]
    colour = rng.uniform(15, 240, 3)
    brim_y = f["hairline"] + 0.02 if not f["bangs"] else -0.5
    kind = rng.integers(3)
    if kind == 0:  # brimmed hat
        crown = np.concatenate([_ellipse_points(0, brim_y, a * 0.92, b + 0.35 + brim_y, 24, math.pi, 2 * math.pi)])
        pen.polygon(crown, colour)
        pen.ellipse(0, brim_y, a + 0.45, 0.12, colour * 0.8)
        pen.polygon(_box(-a * 0.91, a * 0.91, brim_y - 0.18, brim_y - 0.04), colour * 0.45)  # band
    elif kind == 1:  # beanie
        crown = _ellipse_points(0, brim_y + 0.05, a + 0.1, b + 0.25 + brim_y, 28, math.pi, 2 * math.pi)
        pen.polygon(crown, colour)
        pen.polygon(_box(-a - 0.1, a + 0.1, brim_y - 0.15, brim_y + 0.08), colour * 0.75)  # cuff
    else:  # cap with a visor
        crown = _ellipse_points(0, brim_y, a + 0.08, b + 0.2 + brim_y, 28, math.pi, 2 * math.pi)
        pen.polygon(crown, colour)
        side = 1 if rng.random() < 0.5 else -1
        tip = brim_y + 0.22
        visor = [(-0.5 * a, brim_y), (0.6 * a, brim_y), (side * 0.2 + 0.5 * a, tip), (side * 0.2 - 0.6 * a, tip)]
        pen.polygon(visor, colour * 0.7)


def _lighting(image, rng):
    """A light gradient, colour cast and sensor noise on the final image."""
    size = image.shape[0]
    angle = rng.uniform(0, 2 * math.pi)
    strength = rng.uniform(0.0, 0.45)
    coords = (np.arange(size, dtype=np.float32) - size / 2) / size
    ramp = math.cos(angle) * coords[None, :] + math.sin(angle) * coords[:, None]
    gain = (rng.uniform(0.85, 1.12) * (1 + strength * ramp)).astype(np.float32)
    cast = rng.uniform(0.93, 1.07, 3).astype(np.float32)
    image *= gain[..., None]
    image *= cast
    noise = rng.standard_normal(image.shape, dtype=np.float32)
    noise *= np.float32(rng.uniform(1.0, 6.0))
    image += noise
    image += 0.5
    np.maximum(image, 0, out=image)
    np.minimum(image, 255, out=image)
    return image.astype(np.uint8)
