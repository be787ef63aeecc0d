"""Five-point face landmarks from MTCNN.

MTCNN (the `mtcnn` 1.x package) is TensorFlow-native and ships its weights in
the wheel, so landmarks can be computed offline. It is imported lazily: the
rest of tfface never pays for loading it.

Landmark convention used everywhere in tfface: a (5, 2) float32 array of
pixel (x, y) with the image's top-left corner at (0, 0), in the order
left eye, right eye, nose, left mouth corner, right mouth corner, where
"left" is *image* left (smaller x on a frontal face). Flipping an image
horizontally maps x -> W - x and swaps indices 0<->1 and 3<->4.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np

from tfface.lazy_exports import lazy_exports

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")
# Flipping an image horizontally swaps these landmark indices.
FLIP_PERMUTATION = (1, 0, 2, 4, 3)


class LandmarkError(ValueError):
    """An image, landmark array or landmark cache that cannot be used."""


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detected face.

    Attributes:
        box: (x, y, w, h) in pixels.
        confidence: MTCNN's final-stage face probability.
        landmarks: (5, 2) float32 pixel (x, y) in tfface's order.
    """

    box: tuple
    confidence: float
    landmarks: np.ndarray

    @property
    def area(self) -> float:
        return float(self.box[2] * self.box[3])


def flip_landmarks(landmarks: np.ndarray, width: float) -> np.ndarray:
    """Landmarks of the horizontally flipped image (x -> W - x, left<->right)."""
    landmarks = np.asarray(landmarks, np.float32)
    flipped = landmarks[..., FLIP_PERMUTATION, :].copy()
    flipped[..., 0] = width - flipped[..., 0]
    return flipped


def check_rgb_image(image, what: str = "image") -> np.ndarray:
    """Returns `image` as a uint8 (H, W, 3) array or raises LandmarkError."""
    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise LandmarkError(
            f"{what}: expected a uint8 RGB array of shape (H, W, 3), got dtype {array.dtype}"
            " (convert with np.asarray(PIL.Image.open(path).convert('RGB')))"
        )
    if array.ndim != 3 or array.shape[-1] != 3:
        hint = ""
        if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (1, 4)):
            hint = " (grey or RGBA image: convert it to RGB first)"
        raise LandmarkError(
            f"{what}: expected a uint8 RGB array of shape (H, W, 3), got shape {array.shape}{hint}"
        )
    if min(array.shape[:2]) < 12:
        raise LandmarkError(f"{what}: image of {array.shape[1]}x{array.shape[0]} pixels is too small (MTCNN needs >= 12)")
    return array


class FaceDetector:
    """MTCNN face detector returning tfface-ordered five-point landmarks.

    Args:
        min_face_size: smallest face, in pixels, the image pyramid looks for.
        thresholds: MTCNN's (PNet, RNet, ONet) confidence thresholds.
        retry_padding: when no face is found, detect again on the image
            edge-padded by this fraction of its size on every side (None to
            disable). Tightly cropped faces (UTKFace's 200x200 chips) fill the
            frame and are otherwise sometimes missed; 0.5 recovers them.
        device: TensorFlow device MTCNN runs on.
    """

    def __init__(
        self,
        min_face_size: int = 20,
        thresholds: Sequence[float] = (0.6, 0.7, 0.8),
        retry_padding: Optional[float] = 0.5,
        device: str = "CPU:0",
    ):
        if len(thresholds) != 3:
            raise ValueError(f"thresholds needs 3 values (PNet, RNet, ONet), got {thresholds!r}")
        self.min_face_size = int(min_face_size)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.retry_padding = retry_padding
        self.device = device
        self._mtcnn = None

    @property
    def mtcnn(self):
        """The underlying `mtcnn.MTCNN`, loaded on first use."""
        if self._mtcnn is None:
            try:
                from mtcnn import MTCNN
            except ImportError as e:  # pragma: no cover - a declared dependency
                raise ImportError("landmark detection needs the `mtcnn` package: pip install 'mtcnn>=1.0,<1.1'") from e
            self._mtcnn = MTCNN(device=self.device)
        return self._mtcnn

    def _run(self, images: list) -> list[list[Detection]]:
        """One MTCNN call on a list of RGB arrays."""
        rows = self.mtcnn.detect_faces(
            images,
            box_format="xyxy",
            output_type="numpy",
            min_face_size=self.min_face_size,
            threshold_pnet=self.thresholds[0],
            threshold_rnet=self.thresholds[1],
            threshold_onet=self.thresholds[2],
        )
        rows = np.asarray(rows, np.float64).reshape(-1, 16)
        results = [[] for _ in images]
        for row in rows:
            x1, y1, x2, y2 = row[1:5]
            # Columns 6..10 are the five x's, 11..15 the five y's, already in
            # our order (MTCNN's "left_eye" is the image-left eye).
            landmarks = np.stack([row[6:11], row[11:16]], axis=-1).astype(np.float32)
            results[int(row[0])].append(
                Detection(
                    box=(float(x1), float(y1), float(x2 - x1), float(y2 - y1)),
                    confidence=float(row[5]),
                    landmarks=landmarks,
                )
            )
        for faces in results:
            faces.sort(key=lambda d: -d.confidence)
        return results

    def _retry_padded(self, image: np.ndarray) -> list[Detection]:
        pad = int(round(self.retry_padding * max(image.shape[:2])))
        padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
        faces = self._run([padded])[0]
        shift = np.array([pad, pad], np.float32)
        height, width = image.shape[:2]
        kept = []
        for face in faces:
            x, y, w, h = face.box
            x1, y1 = max(x - pad, 0.0), max(y - pad, 0.0)
            x2, y2 = min(x - pad + w, width), min(y - pad + h, height)
            if x2 <= x1 or y2 <= y1:  # a "face" in the padding only
                continue
            kept.append(
                Detection(
                    box=(x1, y1, x2 - x1, y2 - y1),
                    confidence=face.confidence,
                    landmarks=face.landmarks - shift,
                )
            )
        return kept

    def detect(self, image) -> list[Detection]:
        """Faces in one uint8 RGB (H, W, 3) image, most confident first."""
        return self.detect_batch([image])[0]

    def detect_batch(self, images: Sequence) -> list[list[Detection]]:
        """Faces per image for a list of uint8 RGB images (any sizes).

        Images of one shape go through MTCNN together (~4x faster per image
        than one call each on a CPU, same result). Shapes are never mixed in
        a call: MTCNN would zero-pad them to one size, which changes its
        image pyramid and moves landmarks by several pixels.
        """
        images = [check_rgb_image(im, f"image #{i}") for i, im in enumerate(images)]
        by_shape = {}
        for i, image in enumerate(images):
            by_shape.setdefault(image.shape, []).append(i)
        results = [None] * len(images)
        for indices in by_shape.values():
            for i, faces in zip(indices, self._run([images[i] for i in indices])):
                results[i] = faces
        if self.retry_padding:
            for i, faces in enumerate(results):
                if not faces:
                    results[i] = self._retry_padded(images[i])
        return results


def primary_face(faces: Sequence[Detection]) -> Optional[Detection]:
    """The face a dataset image is about: largest box x confidence (None if none)."""
    if not faces:
        return None
    return max(faces, key=lambda d: d.area * d.confidence)


# --- names that moved to modules of their own ------------------------------------
# The per-dataset landmark cache (`tfface.landmarks.cache`) and annotating a
# folder (`tfface.landmarks.annotate`) used to live in this module; their public
# names still import from here. They load on first use: both modules import
# this one, so importing them here would be a cycle.
_MOVED = {
    name: "tfface.landmarks.cache"
    for name in (
        "CACHE_COLUMNS",
        "LEGACY_CACHE_COLUMNS",
        "ORIENTATION_COLUMN",
        "REHASH_WARNING_THRESHOLD",
        "STAMPED_CACHE_COLUMNS",
        "STAMP_COLUMNS",
        "STATUS_NO_FACE",
        "STATUS_OK",
        "STATUS_UNREADABLE",
        "default_landmark_cache",
        "file_stamp",
        "is_landmark_cache_header",
        "load_landmark_cache",
        "logger",
        "read_landmark_cache",
    )
}
_MOVED.update({name: "tfface.landmarks.annotate" for name in ("AnnotationReport", "annotate_folder")})
__getattr__, __dir__ = lazy_exports(__name__, _MOVED, globals())
