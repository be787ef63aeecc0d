"""Synthetic faces: deterministic, labelled, and the labels are visible."""

import csv

import numpy as np
import pytest

from tfface.data import synthetic
from tfface.data.source import FaceSource
from tfface.data.synthetic import (
    LANDMARK_COLUMNS,
    generate_synthetic_faces,
    write_synthetic_folder,
)
from tfface.schema import SYNTHETIC_ATTRIBUTES, synthetic_schema

SIZE = 64


@pytest.fixture(scope="module")
def faces():
    return generate_synthetic_faces(500, SIZE, seed=0)


# --- pixel probes placed with the landmarks --------------------------------------


def _frame(landmarks):
    """Eye distance, unit vector along the eyes, unit vector 'up the face'."""
    left, right = landmarks[0].astype(np.float64), landmarks[1].astype(np.float64)
    d = np.linalg.norm(right - left)
    along = (right - left) / d
    up = np.array([along[1], -along[0]])
    return d, along, up


def _probe(image, centre, along, up, d, half_along, half_up):
    """Pixels on a 7x7 grid of a box in face-aligned coordinates."""
    a, b = np.meshgrid(np.linspace(-half_along, half_along, 7), np.linspace(-half_up, half_up, 7))
    pts = centre + (a.reshape(-1, 1) * along + b.reshape(-1, 1) * up) * d
    pts = np.clip(np.rint(pts).astype(int), 0, image.shape[0] - 1)
    return image[pts[:, 1], pts[:, 0]].astype(np.float64)


def _luminance(pixels):
    return pixels @ np.array([0.299, 0.587, 0.114])


# --- tests ---------------------------------------------------------------------


def test_same_seed_same_bytes():
    a = generate_synthetic_faces(20, 48, seed=5, num_workers=1)
    b = generate_synthetic_faces(20, 48, seed=5, num_workers=1)
    assert a.images.tobytes() == b.images.tobytes()
    np.testing.assert_array_equal(a.landmarks, b.landmarks)
    for name in a.columns:
        np.testing.assert_array_equal(a.columns[name], b.columns[name])
    np.testing.assert_array_equal(a.identities, b.identities)


def test_worker_count_does_not_change_the_result(monkeypatch):
    monkeypatch.setattr(synthetic, "_CHUNK", 8)  # several chunks from few images
    one = generate_synthetic_faces(30, 32, seed=2, num_workers=1)
    two = generate_synthetic_faces(30, 32, seed=2, num_workers=2)
    assert one.images.tobytes() == two.images.tobytes()
    np.testing.assert_array_equal(one.landmarks, two.landmarks)
    np.testing.assert_array_equal(one.columns["Male"], two.columns["Male"])


def test_different_seed_differs_and_prefix_is_stable():
    a = generate_synthetic_faces(12, 48, seed=0)
    b = generate_synthetic_faces(12, 48, seed=1)
    assert not np.array_equal(a.images, b.images)
    longer = generate_synthetic_faces(16, 48, seed=0)
    assert longer.images[:12].tobytes() == a.images.tobytes()
    np.testing.assert_array_equal(longer.identities[:12], a.identities)


def test_shapes_dtypes_and_source_fields(faces):
    n = len(faces)
    assert isinstance(faces, FaceSource)
    assert faces.format == "synthetic" and faces.name == "synthetic"
    assert faces.images.shape == (n, SIZE, SIZE, 3) and faces.images.dtype == np.uint8
    assert faces.landmarks.shape == (n, 5, 2) and faces.landmarks.dtype == np.float32
    assert faces.identities.shape == (n,) and np.issubdtype(faces.identities.dtype, np.integer)
    assert faces.partition is None and faces.image_paths is None
    np.testing.assert_array_equal(faces.image_sizes, np.full((n, 2), SIZE))
    assert faces.images.std() > 20  # not blank


def test_identities_repeat_three_to_five_times(faces):
    _, counts = np.unique(faces.identities, return_counts=True)
    assert counts[:-1].min() >= 3 and counts.max() <= 5  # the last one may be cut off
    # A person keeps their sex and skin but photos differ.
    for identity in np.unique(faces.identities)[:20]:
        rows = np.flatnonzero(faces.identities == identity)
        assert len(set(faces.columns["Male"][rows])) == 1
        assert len(set(faces.columns["Pale_Skin"][rows])) == 1
        assert not np.array_equal(faces.images[rows[0]], faces.images[rows[1]])


def test_every_attribute_labelled_with_both_values(faces):
    assert set(faces.columns) == set(SYNTHETIC_ATTRIBUTES) | {"age"}
    for name in SYNTHETIC_ATTRIBUTES:
        values = faces.columns[name]
        assert set(np.unique(values)) == {0, 1}, name
        assert 0.03 <= values.mean() <= 0.97, (name, values.mean())
    age = faces.columns["age"]
    assert age.min() >= 1 and age.max() <= 90 and len(np.unique(age)) > 30
    np.testing.assert_array_equal(faces.columns["Young"], (age < 40).astype(int))


def test_schema_encodes_the_columns(faces):
    labels = synthetic_schema().encode_labels("synthetic", faces.columns, len(faces))
    for task in synthetic_schema():
        assert labels[task.name].shape == (len(faces),)
        assert (labels[task.name] != -1).all(), task.name
    assert labels["age_group"].max() >= 7  # some 60+


def test_label_correlations(faces):
    c = faces.columns
    female = c["Male"] == 0
    assert (c["No_Beard"][female] == 1).all()
    assert (c["Goatee"][female] == 0).all() and (c["Mustache"][female] == 0).all()
    bald = c["Bald"] == 1
    assert (c["Bangs"][bald] == 0).all()
    for hair in ("Black_Hair", "Blond_Hair", "Brown_Hair", "Gray_Hair"):
        assert (c[hair][bald] == 0).all()
    hair_colours = c["Black_Hair"] + c["Blond_Hair"] + c["Brown_Hair"] + c["Gray_Hair"]
    assert hair_colours.max() == 1
    assert c["Male"][bald].mean() == 1.0
    assert c["age"][c["Gray_Hair"] == 1].mean() > c["age"].mean() + 10
    assert c["Wearing_Lipstick"][female].mean() > 5 * c["Wearing_Lipstick"][~female].mean()
    smiling = c["Smiling"] == 1
    assert c["Mouth_Slightly_Open"][smiling].mean() > c["Mouth_Slightly_Open"][~smiling].mean() + 0.2


def test_landmarks_inside_and_in_face_order(faces):
    lm = faces.landmarks
    assert np.isfinite(lm).all()
    assert lm.min() >= 0 and lm.max() <= SIZE - 1
    left_eye, right_eye, nose, left_mouth, right_mouth = (lm[:, k] for k in range(5))
    assert (left_eye[:, 0] < right_eye[:, 0]).all()
    assert (left_mouth[:, 0] < right_mouth[:, 0]).all()
    eyes_y = (left_eye[:, 1] + right_eye[:, 1]) / 2
    assert (eyes_y < nose[:, 1]).all()
    assert (nose[:, 1] < (left_mouth[:, 1] + right_mouth[:, 1]) / 2).all()
    eye_distance = np.linalg.norm(right_eye - left_eye, axis=1)
    assert eye_distance.min() > 0.12 * SIZE and eye_distance.max() < 0.4 * SIZE


def test_eye_landmarks_lie_on_the_drawn_eyes(faces):
    """The iris under the landmark is darker than the cheek below; 2 px off it mostly is not."""

    def hit_rate(shift):
        hits = []
        for image, lm, glasses in zip(faces.images, faces.landmarks, faces.columns["Eyeglasses"]):
            if glasses:
                continue
            lum = _luminance(image.astype(np.float64))
            d, _, up = _frame(lm)
            for eye in lm[:2]:
                x, y = np.rint(eye + (0, shift)).astype(int)
                iris = lum[y - 1 : y + 2, x - 1 : x + 2].min()
                cx, cy = np.rint(eye - up * 0.5 * d).astype(int)
                cheek = np.median(lum[cy - 1 : cy + 2, cx - 1 : cx + 2])
                hits.append(iris < cheek - 15)
        return np.mean(hits)

    assert hit_rate(0) > 0.95
    assert hit_rate(2) < 0.75


def test_attributes_are_visible_near_the_landmarks(faces):
    c = faces.columns
    redness, eye_dark, hair = [], [], []
    t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
    for image, lm in zip(faces.images, faces.landmarks):
        d, along, up = _frame(lm)
        mouth = (lm[3] + lm[4]) / 2
        lips = _probe(image, mouth - up * 0.08 * d, along, up, d, 0.2, 0.1)
        redness.append(np.mean(lips[:, 0] - (lips[:, 1] + lips[:, 2]) / 2))
        ring = np.concatenate(
            [eye + (np.cos(t)[:, None] * along * 0.31 - np.sin(t)[:, None] * up * 0.24) * d for eye in lm[:2]]
        )
        ring = np.clip(np.rint(ring).astype(int), 0, SIZE - 1)
        eye_dark.append(255 - _luminance(image[ring[:, 1], ring[:, 0]].astype(np.float64)).mean())
        top = _probe(image, (lm[0] + lm[1]) / 2 + up * 1.5 * d, along, up, d, 0.15, 0.08)
        hair.append(_luminance(top).mean())
    redness, eye_dark, hair = map(np.array, (redness, eye_dark, hair))

    lipstick = c["Wearing_Lipstick"] == 1
    assert redness[lipstick].mean() > redness[~lipstick].mean() + 25
    glasses = c["Eyeglasses"] == 1
    assert eye_dark[glasses].mean() > eye_dark[~glasses].mean() + 25
    no_hat = c["Wearing_Hat"] == 0
    blond = hair[(c["Blond_Hair"] == 1) & no_hat]
    black = hair[(c["Black_Hair"] == 1) & no_hat]
    assert blond.mean() > black.mean() + 80
    assert np.median(blond) > np.percentile(black, 90)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="num_images"):
        generate_synthetic_faces(0)
    with pytest.raises(ValueError, match="image_size"):
        generate_synthetic_faces(4, image_size=8)
    with pytest.raises(TypeError, match="seed"):
        generate_synthetic_faces(4, seed=1.5)
    with pytest.raises(ValueError, match="num_workers"):
        generate_synthetic_faces(4, num_workers=0)


def test_write_folder_round_trip(tmp_path):
    source = generate_synthetic_faces(7, 32, seed=3)
    out = write_synthetic_folder(source, tmp_path / "synthetic")
    images = sorted(p.name for p in (out / "images").iterdir())
    assert images == [f"{i:06d}.png" for i in range(1, 8)]
    with open(out / "attributes.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 7
    assert list(rows[0]) == ["image_id", *SYNTHETIC_ATTRIBUTES, "age"]
    assert [int(r["Male"]) for r in rows] == source.columns["Male"].tolist()
    assert [int(r["age"]) for r in rows] == source.columns["age"].tolist()
    with open(out / "identities.csv", newline="") as f:
        identities = list(csv.DictReader(f))
    assert [int(r["identity"]) for r in identities] == source.identities.tolist()
    with open(out / "landmarks.csv", newline="") as f:
        landmarks = list(csv.DictReader(f))
    assert list(landmarks[0]) == ["image_id", *LANDMARK_COLUMNS]
    assert float(landmarks[2]["nose_y"]) == pytest.approx(source.landmarks[2, 2, 1], abs=0.01)
    from PIL import Image

    with Image.open(out / "images" / "000004.png") as im:
        np.testing.assert_array_equal(np.asarray(im), source.images[3])
    # Nothing left beside the folder.
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic"]


def test_write_folder_jpeg_and_existing_empty_folder(tmp_path):
    source = generate_synthetic_faces(3, 32, seed=3)
    (tmp_path / "out").mkdir()
    out = write_synthetic_folder(source, tmp_path / "out", image_format="jpg")
    assert sorted(p.name for p in (out / "images").iterdir()) == ["000001.jpg", "000002.jpg", "000003.jpg"]
    with pytest.raises(ValueError, match="image_format"):
        write_synthetic_folder(source, tmp_path / "other", image_format="gif")


def test_write_folder_refuses_to_overwrite(tmp_path):
    source = generate_synthetic_faces(3, 32, seed=3)
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_synthetic_folder(source, out)
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_write_folder_rejects_bad_images(tmp_path):
    source = generate_synthetic_faces(3, 32, seed=3)
    source.images = source.images[:, :, :, :2]
    with pytest.raises(ValueError, match="uint8"):
        write_synthetic_folder(source, tmp_path / "bad")
    assert list(tmp_path.iterdir()) == []


def test_write_folder_failure_leaves_nothing(tmp_path, monkeypatch):
    from PIL import Image

    source = generate_synthetic_faces(3, 32, seed=3)
    real_save = Image.Image.save
    calls = []

    def save_then_fail(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        write_synthetic_folder(source, tmp_path / "broken")
    assert list(tmp_path.iterdir()) == []


def test_a_request_too_large_for_memory_ends_in_one_line(tmp_path, monkeypatch, capsys):
    import tfface.data.synthetic as synthetic_lib
    from tfface.cli import main

    def too_large(*args, **kwargs):
        raise MemoryError("Unable to allocate 140. GiB for an array")

    monkeypatch.setattr(synthetic_lib, "generate_synthetic_faces", too_large)
    code = main(["data", "generate", "--out", str(tmp_path / "faces"), "--num-images", "5", "--image-size", "100000"])
    assert code == 2
    err = capsys.readouterr().err
    assert "tfface data: error: out of memory (Unable to allocate 140. GiB" in err and "Traceback" not in err
    assert not (tmp_path / "faces").exists()
