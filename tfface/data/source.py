"""`FaceSource`: one labelled face dataset, indexed in memory.

Every reader (CelebA-format folder, UTKFace-format folder, synthetic
generator) returns a `FaceSource`. Images are either file paths (decoded
lazily by the tf.data pipeline) or an in-memory uint8 array (synthetic).
Labels are the source's *raw columns* (CelebA attribute names, `age`,
`male`, `race`, ...); the schema turns them into per-task arrays with -1 for
missing (`Schema.encode_labels`), so one source can feed any schema.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np


# Landmark columns as CelebA names them (list_landmarks_align_celeba.txt), in
# FaceSource order: left eye, right eye, nose, left mouth, right mouth.
LANDMARK_COLUMNS = (
    "lefteye_x",
    "lefteye_y",
    "righteye_x",
    "righteye_y",
    "nose_x",
    "nose_y",
    "leftmouth_x",
    "leftmouth_y",
    "rightmouth_x",
    "rightmouth_y",
)


class DataError(ValueError):
    """Bad user data: names the file (and line) at fault."""


def _checked_images(images, name: str) -> np.ndarray:
    """An in-memory image array as the pipeline reads it, or an error that
    says what is wrong (a wrong shape failed deep inside the resize)."""
    images = images if isinstance(images, np.ndarray) else np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"{name}: images must be an array of shape (N, height, width, 3), RGB, got shape {images.shape}"
            + ("; for grayscale stack three channels (np.repeat(images[..., None], 3, axis=-1))" if images.ndim == 3 else "")
            + ("; for RGBA drop the alpha channel (images[..., :3])" if images.ndim == 4 and images.shape[-1] == 4 else "")
        )
    if images.dtype.kind not in "uif":
        raise ValueError(f"{name}: images must be numbers 0-255 (uint8), got dtype {images.dtype}")
    if images.dtype.kind == "f" and images.size and float(np.nanmax(images)) <= 1.0:
        raise ValueError(
            f"{name}: images are floats no larger than 1.0; the pipeline reads pixels as 0-255 "
            "(pass (images * 255).astype(np.uint8))"
        )
    return images


@dataclasses.dataclass
class FaceSource:
    """A labelled face dataset.

    Attributes:
        name: display name (folder name, "synthetic", ...).
        format: "celeba", "utkface" or "synthetic" (see `tfface.schema`).
        columns: raw label column -> array of shape (N,); -1 means missing.
        image_paths: (N,) file paths, or None when `images` is given.
        images: (N, H, W, 3) RGB, 0-255 (uint8 or another number type; read
            from the array itself, not copied), or None when `image_paths` is given.
        identities: (N,) int person ids, or None when unknown.
        landmarks: (N, 5, 2) float32 pixel (x, y) in the *original image*
            as shown (its EXIF orientation applied, as the pipeline decodes it),
            order: left eye, right eye, nose, left mouth corner, right mouth
            corner (subject's left/right as MTCNN reports them, i.e. image
            left first); NaN rows where no face was found. None if unknown.
        partition: (N,) strings "train"/"val"/"test", or None.
        image_sizes: (N, 2) int (height, width), or None if not read yet.
        root: folder the source was read from, if any.
        problems: human-readable notes on what was skipped and why.
    """

    name: str
    format: str
    columns: dict
    image_paths: Optional[np.ndarray] = None
    images: Optional[np.ndarray] = None
    identities: Optional[np.ndarray] = None
    landmarks: Optional[np.ndarray] = None
    partition: Optional[np.ndarray] = None
    image_sizes: Optional[np.ndarray] = None
    root: Optional[str] = None
    problems: list = dataclasses.field(default_factory=list)

    def __post_init__(self):
        if (self.image_paths is None) == (self.images is None):
            raise ValueError("FaceSource needs exactly one of image_paths or images")
        if self.images is not None:
            self.images = _checked_images(self.images, self.name)
        n = len(self)
        for key, values in self.columns.items():
            if len(values) != n:
                raise ValueError(f"column {key!r} has {len(values)} rows, expected {n}")
        for field in ("identities", "landmarks", "partition", "image_sizes"):
            value = getattr(self, field)
            if value is not None and len(value) != n:
                raise ValueError(f"{field} has {len(value)} rows, expected {n}")

    def __len__(self):
        if self.image_paths is not None:
            return len(self.image_paths)
        return len(self.images)

    def subset(self, indices) -> "FaceSource":
        """The rows at `indices` (used for splits)."""
        indices = np.asarray(indices)
        if indices.size == 0:
            indices = indices.astype(np.intp)  # [] is float64, which numpy refuses as an index

        def take(value):
            return None if value is None else np.asarray(value)[indices]

        return dataclasses.replace(
            self,
            columns={k: np.asarray(v)[indices] for k, v in self.columns.items()},
            image_paths=take(self.image_paths),
            images=take(self.images),
            identities=take(self.identities),
            landmarks=take(self.landmarks),
            partition=take(self.partition),
            image_sizes=take(self.image_sizes),
            problems=list(self.problems),
        )
