"""Five-point face alignment onto the layout the models were trained on.

Models train on CelebA's aligned images (178x218) centre-cropped to a
178x178 square. A face from elsewhere (a phone photo, UTKFace, a serving
request) should be warped so its five landmarks land where CelebA's do in
that square; `TEMPLATE_5PT` is that layout and `align_face` does the warp
with a similarity transform (rotation, uniform scale, translation: no
shear, no reflection, so faces keep their shape).

Coordinates are continuous pixel (x, y) with the image's top-left corner at
(0, 0) (pixel i spans [i, i + 1)), the same as Pillow's affine transform.
"""

from __future__ import annotations

import numpy as np

from tfface.landmarks.detector import LandmarkError, check_rgb_image

# Mean MTCNN landmarks of 198 celeba_sample faces (000001-000200.jpg; 2 had
# no face) in the 178x178 centre crop, as fractions of the side, made
# mirror-symmetric (left/right pairs averaged) so that flipped faces align
# the same way. Raw means: eyes (0.3885, 0.5132) (0.6058, 0.5133), nose
# (0.4924, 0.6467), mouth (0.3978, 0.7432) (0.5949, 0.7428); the first 30
# images alone give the same to within 0.009.
TEMPLATE_5PT = np.array(
    [
        [0.3914, 0.5133],  # left eye
        [0.6086, 0.5133],  # right eye
        [0.5000, 0.6467],  # nose
        [0.4015, 0.7430],  # left mouth corner
        [0.5985, 0.7430],  # right mouth corner
    ],
    np.float32,
)


def _check_points(points, name: str) -> np.ndarray:
    points = np.asarray(points, np.float64)
    if points.ndim != 2 or points.shape[1] != 2 or len(points) < 2:
        raise LandmarkError(f"{name} must have shape (N >= 2, 2) (x, y per point), got {points.shape}")
    if not np.all(np.isfinite(points)):
        raise LandmarkError(f"{name} contains NaN or infinite values (missing landmarks cannot be aligned)")
    return points


def similarity_transform(src_points, dst_points) -> np.ndarray:
    """The 2x3 similarity matrix that best maps src onto dst (least squares).

    Umeyama (1991): rotation, uniform scale and translation, never a
    reflection. Apply it with `transform_points`.
    """
    src = _check_points(src_points, "src_points")
    dst = _check_points(dst_points, "dst_points")
    if src.shape != dst.shape:
        raise LandmarkError(f"src_points {src.shape} and dst_points {dst.shape} must have the same shape")
    src_mean, dst_mean = src.mean(0), dst.mean(0)
    src_c, dst_c = src - src_mean, dst - dst_mean
    src_var = (src_c**2).sum() / len(src)
    if src_var <= 1e-12:
        raise LandmarkError("src_points are all the same point: no transform can be fitted")
    covariance = dst_c.T @ src_c / len(src)
    u, s, vt = np.linalg.svd(covariance)
    d = np.ones(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        d[-1] = -1.0  # the best fit would reflect: take the best rotation
    rotation = u @ np.diag(d) @ vt
    scale = (s * d).sum() / src_var
    translation = dst_mean - scale * rotation @ src_mean
    return np.concatenate([scale * rotation, translation[:, None]], axis=1).astype(np.float32)


def transform_points(points, matrix) -> np.ndarray:
    """Applies a 2x3 affine matrix to (..., 2) points (NaN stays NaN)."""
    points = np.asarray(points, np.float32)
    matrix = np.asarray(matrix, np.float32)
    if matrix.shape != (2, 3):
        raise LandmarkError(f"matrix must have shape (2, 3), got {matrix.shape}")
    if points.shape[-1] != 2:
        raise LandmarkError(f"points must have shape (..., 2), got {points.shape}")
    return points @ matrix[:, :2].T + matrix[:, 2]


def align_face(image, landmarks, output_size: int = 178, template=TEMPLATE_5PT):
    """Warps a face so its landmarks land on `template * output_size`.

    Args:
        image: uint8 RGB (H, W, 3).
        landmarks: (5, 2) pixel (x, y) in `image`, tfface order.
        output_size: side of the square output.
        template: (5, 2) target positions as fractions of the side.

    Returns:
        (aligned uint8 (S, S, 3), the 2x3 matrix mapping image points to
        aligned points; use `transform_points` to move other points).
        Areas outside the source image are black.
    """
    from PIL import Image

    image = check_rgb_image(image)
    output_size = int(output_size)
    if output_size < 1:
        raise ValueError(f"output_size must be a positive int, got {output_size}")
    landmarks = _check_points(landmarks, "landmarks")
    if landmarks.shape != (5, 2):
        raise LandmarkError(f"landmarks must have shape (5, 2), got {landmarks.shape}")
    matrix = similarity_transform(landmarks, np.asarray(template, np.float64) * output_size)
    # Pillow wants the inverse map: output pixel -> source pixel.
    linear = matrix[:, :2].astype(np.float64)
    inverse = np.linalg.inv(linear)
    offset = -inverse @ matrix[:, 2].astype(np.float64)
    coefficients = (
        inverse[0, 0], inverse[0, 1], offset[0],
        inverse[1, 0], inverse[1, 1], offset[1],
    )
    aligned = Image.fromarray(image).transform(
        (output_size, output_size),
        Image.Transform.AFFINE,
        data=coefficients,
        resample=Image.Resampling.BILINEAR,
        fillcolor=(0, 0, 0),
    )
    return np.asarray(aligned), matrix
