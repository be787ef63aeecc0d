"""Five-point landmarks: detection (MTCNN, offline), the per-dataset landmark
cache, face-part masks, alignment.

`mtcnn` is imported only when a `FaceDetector` first runs.
"""

from tfface.landmarks.alignment import (
    TEMPLATE_5PT,
    align_face,
    similarity_transform,
    transform_points,
)
from tfface.landmarks.annotate import (
    AnnotationReport,
    annotate_folder,
)
from tfface.landmarks.cache import (
    default_landmark_cache,
    load_landmark_cache,
    read_landmark_cache,
)
from tfface.landmarks.detector import (
    FLIP_PERMUTATION,
    LANDMARK_NAMES,
    Detection,
    FaceDetector,
    LandmarkError,
    flip_landmarks,
    primary_face,
)
from tfface.landmarks.group_masks import (
    GROUP_NAMES,
    group_masks_numpy,
    group_masks_tf,
    overlay_masks_png,
)

__all__ = [
    "AnnotationReport",
    "Detection",
    "FLIP_PERMUTATION",
    "FaceDetector",
    "GROUP_NAMES",
    "LANDMARK_NAMES",
    "LandmarkError",
    "TEMPLATE_5PT",
    "align_face",
    "annotate_folder",
    "default_landmark_cache",
    "flip_landmarks",
    "group_masks_numpy",
    "group_masks_tf",
    "load_landmark_cache",
    "overlay_masks_png",
    "primary_face",
    "read_landmark_cache",
    "similarity_transform",
    "transform_points",
]
