"""Face-part group masks: NumPy and TensorFlow agree, land on the right parts,
mirror with the image, and vanish for missing landmarks."""

import numpy as np
import pytest
import tensorflow as tf

from tfface.landmarks import (
    GROUP_NAMES,
    TEMPLATE_5PT,
    flip_landmarks,
    group_masks_numpy,
    group_masks_tf,
    overlay_masks_png,
)
from tfface.schema import GROUPS

SIZE = 64


def _rotate(points, degrees, centre=(0.5, 0.5)):
    angle = np.deg2rad(degrees)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    return ((points - centre) @ rotation.T + centre).astype(np.float32)


# Landmark sets as fractions of a square image: frontal, rotated, smaller and
# off-centre, turned (asymmetric), and a real MTCNN measurement.
LANDMARK_SETS = {
    "template": TEMPLATE_5PT,
    "rotated": _rotate(TEMPLATE_5PT, 20),
    "small_shifted": (TEMPLATE_5PT * 0.7 + np.array([0.05, 0.1])).astype(np.float32),
    "turned": np.array([[0.42, 0.50], [0.62, 0.52], [0.58, 0.64], [0.45, 0.74], [0.61, 0.75]], np.float32),
    "celeba_measured": np.array(
        [[0.3729, 0.5142], [0.6288, 0.5065], [0.4847, 0.5675], [0.4085, 0.7412], [0.5801, 0.7362]], np.float32
    ),
}


def _iou(a, b):
    a, b = a > 0.5, b > 0.5
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def _group(masks, name):
    return masks[..., GROUP_NAMES.index(name)]


def test_group_names_follow_schema():
    assert GROUP_NAMES == GROUPS
    assert GROUP_NAMES[0] == "eyes" and GROUP_NAMES[-1] == "whole_face"


@pytest.mark.parametrize("name", sorted(LANDMARK_SETS))
def test_numpy_and_tf_agree(name):
    fractions = LANDMARK_SETS[name]
    tf_masks = group_masks_tf(fractions[None], SIZE).numpy()[0]
    np_masks = group_masks_numpy(fractions * SIZE, SIZE, SIZE)
    assert tf_masks.shape == np_masks.shape == (SIZE, SIZE, len(GROUP_NAMES))
    assert tf_masks.dtype == np_masks.dtype == np.float32
    for g, group in enumerate(GROUP_NAMES):
        assert np_masks[..., g].max() > 0.5, f"{group} mask is empty"
        assert _iou(np_masks[..., g], tf_masks[..., g]) > 0.95, group


def test_tf_accepts_one_example_and_works_in_tf_data():
    fractions = LANDMARK_SETS["rotated"]
    single = group_masks_tf(fractions, 32)
    assert single.shape == (32, 32, 8)
    dataset = tf.data.Dataset.from_tensor_slices(np.stack([fractions, TEMPLATE_5PT]))
    dataset = dataset.map(lambda lm: group_masks_tf(lm, 32))
    masks = [m.numpy() for m in dataset]
    np.testing.assert_allclose(masks[0], single.numpy(), atol=1e-5)


def test_masks_are_in_range_and_inside_the_image():
    masks = group_masks_numpy(TEMPLATE_5PT * [80, 100], 100, 80)  # non-square
    assert masks.shape == (100, 80, 8)
    assert masks.min() >= 0.0 and masks.max() <= 1.0
    # A face well inside the image: the border rows and columns of the local
    # parts stay empty (nothing wraps around or leaks along an edge).
    local = [GROUP_NAMES.index(g) for g in ("eyes", "nose", "mouth", "cheeks")]
    border = np.concatenate([masks[0], masks[-1], masks[:, 0], masks[:, -1]])
    assert border[:, local].max() == 0.0


def test_masks_sit_on_their_face_parts():
    lm = TEMPLATE_5PT * SIZE
    masks = group_masks_numpy(lm, SIZE, SIZE)

    def value(group, point):
        x, y = np.floor(point).astype(int)
        return _group(masks, group)[y, x]

    for eye in lm[:2]:
        assert value("eyes", eye) == 1.0
        assert value("mouth", eye) == 0.0
    for corner in lm[3:]:
        assert value("mouth", corner) == 1.0
        assert value("eyes", corner) == 0.0
    assert value("nose", lm[2]) == 1.0
    assert value("whole_face", lm[2]) == 1.0

    rows = np.arange(SIZE) + 0.5
    cols = np.arange(SIZE) + 0.5
    eye_y = lm[:2, 1].mean()
    mouth_y = lm[3:, 1].mean()

    def centroid(group):
        m = _group(masks, group)
        return (m.sum(0) @ cols) / m.sum(), (m.sum(1) @ rows) / m.sum()

    hair_x, hair_y = centroid("hair")
    assert hair_y < eye_y  # the hair band is above the eyes
    assert _group(masks, "hair")[int(mouth_y), int(lm[2, 0])] == 0.0  # not on the face
    _, lower_y = centroid("lower_face")
    assert lower_y > mouth_y
    # Ears lie outside the eyes, between eye and mouth height.
    ears = _group(masks, "ears")
    ys, xs = np.nonzero(ears > 0.5)
    left = xs < SIZE / 2
    assert xs[left].max() < lm[0, 0] and xs[~left].min() > lm[1, 0]
    assert eye_y - 2 < ys.mean() < mouth_y
    # Cheeks sit below the eyes, beside the nose tip.
    cheek_x, cheek_y = centroid("cheeks")
    assert eye_y < cheek_y < mouth_y
    assert _group(masks, "cheeks")[int(lm[2, 1]), int(lm[2, 0])] < 0.5


@pytest.mark.parametrize("name", sorted(LANDMARK_SETS))
def test_flipped_landmarks_give_mirrored_masks(name):
    lm = LANDMARK_SETS[name] * SIZE
    masks = group_masks_numpy(lm, SIZE, SIZE)
    flipped = group_masks_numpy(flip_landmarks(lm, SIZE), SIZE, SIZE)
    tf_flipped = group_masks_tf(flip_landmarks(LANDMARK_SETS[name], 1.0), SIZE).numpy()
    for g, group in enumerate(GROUP_NAMES):
        assert _iou(flipped[..., g], masks[:, ::-1, g]) > 0.95, group
        assert _iou(tf_flipped[..., g], masks[:, ::-1, g]) > 0.95, group


def test_paired_groups_are_left_right_symmetric():
    masks = group_masks_numpy(TEMPLATE_5PT * SIZE, SIZE, SIZE)  # symmetric face
    for group in ("eyes", "ears", "cheeks"):
        m = _group(masks, group)
        assert _iou(m, m[:, ::-1]) > 0.95, group
        # ... and both halves are there.
        assert m[:, : SIZE // 2].max() == 1.0 and m[:, SIZE // 2 :].max() == 1.0, group


def test_missing_landmarks_give_zero_masks():
    nan_row = np.full((5, 2), np.nan, np.float32)
    negative_row = np.full((5, 2), -1.0, np.float32)
    partly_nan = TEMPLATE_5PT.copy()
    partly_nan[2] = np.nan
    batch = np.stack([TEMPLATE_5PT, nan_row, negative_row, partly_nan])
    masks = group_masks_tf(batch, 32).numpy()
    assert np.isfinite(masks).all()
    assert masks[0].max() == 1.0
    assert masks[1:].max() == 0.0
    assert group_masks_numpy(nan_row, 20, 30).max() == 0.0
    assert group_masks_numpy(negative_row, 20, 30).shape == (20, 30, 8)


def test_a_face_the_crop_cuts_on_any_side_keeps_its_masks():
    # A landmark left of or above the crop made every mask zero while the
    # face still counted as having landmarks (the mask loss trained towards
    # empty masks), and a flip turned a face cut on the right into that.
    shift = TEMPLATE_5PT[:, 0].min() + 0.05  # moves the leftmost point to x = -0.05
    cut_left = TEMPLATE_5PT - [shift, 0.0]
    cut_top = TEMPLATE_5PT - [0.0, TEMPLATE_5PT[:, 1].min() + 0.05]
    cut_right = TEMPLATE_5PT + [1.0 - TEMPLATE_5PT[:, 0].max() + 0.05, 0.0]
    masks = group_masks_tf(np.stack([cut_left, cut_top, cut_right]).astype(np.float32), 32).numpy()
    for i, name in enumerate(["left", "top", "right"]):
        assert masks[i].max() == 1.0 and masks[i][..., -1].mean() > 0.1, name  # drawn, the whole face included
    assert masks[0].sum(axis=(0, 1)).min() > 0  # cut on the left: every group still shows
    # The left-cut face is the right-cut one flipped: its masks are the flipped masks.
    flipped = np.stack([1.0 - cut_right[:, 0], cut_right[:, 1]], axis=1)[[1, 0, 2, 4, 3]]
    np.testing.assert_allclose(group_masks_tf(flipped.astype(np.float32), 32).numpy(), masks[2][:, ::-1], atol=1e-4)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match=r"\(5, 2\)"):
        group_masks_numpy(np.zeros((4, 2)), 10, 10)
    with pytest.raises(ValueError, match=r"\(B, 5, 2\)"):
        group_masks_tf(np.zeros((2, 5, 3), np.float32), 10)


def test_overlay_png_is_written(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (2, 40, 32, 3), dtype=np.uint8)
    landmarks = np.stack([TEMPLATE_5PT * [32, 40], np.full((5, 2), np.nan, np.float32)])
    path = overlay_masks_png(images, landmarks, tmp_path / "masks.png", panel_width=32)
    with Image.open(path) as picture:
        width, height = picture.size
    assert width == 8 * 32 and height > 2 * 40
    with pytest.raises(ValueError, match="landmarks"):
        overlay_masks_png(images, landmarks[:1], tmp_path / "bad.png")


def test_data_masks_scales_other_sizes_and_names_what_it_cannot_use(tmp_path, capsys):
    from PIL import Image

    from tfface.cli import main as cli_main

    folder = tmp_path / "faces"
    assert cli_main(["data", "generate", "--out", str(folder), "--num-images", "6", "--image-size", "32"]) == 0
    images = sorted((folder / "images").iterdir())
    Image.open(images[1]).resize((48, 48)).save(images[1])  # another size: scaled, not left out
    out = tmp_path / "masks.png"
    assert cli_main(["data", "masks", str(folder), "--out", str(out), "--count", "8"]) == 0
    assert "(6 faces at 32x32 pixels)" in capsys.readouterr().out and out.is_file()

    images[0].write_bytes(images[0].read_bytes()[:60])  # cut short
    assert cli_main(["data", "masks", str(folder), "--out", str(tmp_path / "m2.png")]) == 2
    assert f"{images[0]}: cannot read image" in capsys.readouterr().err

    landmarks = folder / "landmarks.csv"
    header = landmarks.read_text().splitlines()[0]
    landmarks.write_text(header + "\n" + "".join(f"{p.name}{',' * 10}\n" for p in images))
    assert cli_main(["data", "masks", str(folder), "--out", str(tmp_path / "m3.png")]) == 2
    assert "none of its 6 images has landmarks" in capsys.readouterr().err
