"""Landmark detection (MTCNN), the resumable landmark cache, and alignment."""

import ast
import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tfface.landmarks import (
    TEMPLATE_5PT,
    Detection,
    FaceDetector,
    LandmarkError,
    align_face,
    annotate_folder,
    default_landmark_cache,
    flip_landmarks,
    load_landmark_cache,
    read_landmark_cache,
    similarity_transform,
    transform_points,
)
from tfface.landmarks import annotate as annotate_module
from tfface.landmarks import cache as cache_module
from tfface.landmarks import detector as detector_module
from tfface.data.source import FaceSource

# --- pure helpers --------------------------------------------------------------


def test_flip_landmarks_mirrors_x_and_swaps_sides():
    lm = np.array([[10, 20], [30, 21], [20, 30], [12, 40], [28, 41]], np.float32)
    flipped = flip_landmarks(lm, width=50)
    np.testing.assert_allclose(flipped[0], [50 - 30, 21])  # old right eye
    np.testing.assert_allclose(flipped[3], [50 - 28, 41])  # old right corner
    assert flipped[0, 0] < flipped[1, 0]  # still image-left first
    np.testing.assert_allclose(flip_landmarks(flipped, 50), lm)


def test_similarity_transform_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 100, (5, 2))
    angle, scale, shift = np.deg2rad(23.0), 1.7, np.array([12.0, -40.0])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    dst = scale * src @ rotation.T + shift
    matrix = similarity_transform(src, dst)
    np.testing.assert_allclose(matrix[:, :2], scale * rotation, atol=1e-4)
    np.testing.assert_allclose(matrix[:, 2], shift, atol=1e-3)
    np.testing.assert_allclose(transform_points(src, matrix), dst, atol=1e-3)


def test_similarity_transform_never_reflects():
    src = TEMPLATE_5PT.astype(np.float64)
    mirrored = src * [-1, 1]
    matrix = similarity_transform(src, mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_similarity_transform_rejects_bad_points():
    with pytest.raises(LandmarkError, match="NaN"):
        similarity_transform(np.full((5, 2), np.nan), TEMPLATE_5PT)
    with pytest.raises(LandmarkError, match="same shape"):
        similarity_transform(TEMPLATE_5PT[:4], TEMPLATE_5PT)


def _blob_image(centre, height=90, width=120):
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    blob = np.exp(-((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) / (2 * 2.0**2))
    return np.repeat((255 * blob).round().astype(np.uint8)[..., None], 3, axis=-1)


def test_align_face_maps_landmarks_onto_the_template():
    size = 64
    # A face rotated by 15 degrees, smaller and off-centre in a 120x90 image.
    angle = np.deg2rad(15)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = (TEMPLATE_5PT * 50) @ rotation.T + [40, 10]
    for k in range(5):
        # Warp one blob per landmark and find where it lands (the warp is
        # linear in the image, so this checks Pillow's pixel convention).
        aligned, matrix = align_face(_blob_image(landmarks[k]), landmarks, size)
        assert aligned.shape == (size, size, 3) and aligned.dtype == np.uint8
        weight = aligned[..., 0].astype(np.float64)
        ys, xs = np.mgrid[0:size, 0:size] + 0.5
        found = np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()
        assert np.abs(found - TEMPLATE_5PT[k] * size).max() < 1.0, k
    np.testing.assert_allclose(transform_points(landmarks, matrix), TEMPLATE_5PT * size, atol=1e-3)


def test_template_is_a_frontal_celeba_layout():
    lm = TEMPLATE_5PT
    assert lm[0, 0] < lm[2, 0] < lm[1, 0]  # nose between the eyes
    assert lm[:2, 1].max() < lm[2, 1] < lm[3:, 1].min()  # eyes, nose, mouth downwards
    np.testing.assert_allclose(flip_landmarks(lm, 1.0), lm, atol=1e-6)  # symmetric


# --- detector input checks (no model needed) -------------------------------------


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((40, 40), np.uint8), "grey or RGBA"),
        (np.zeros((40, 40, 4), np.uint8), "grey or RGBA"),
        (np.zeros((40, 40, 3), np.float32), "dtype float32"),
        (np.zeros((8, 40, 3), np.uint8), "too small"),
    ],
)
def test_detector_rejects_non_rgb_arrays(image, message):
    with pytest.raises(LandmarkError, match=message):
        FaceDetector().detect(image)


def test_mtcnn_is_imported_lazily():
    # Statically (a subprocess import of TensorFlow takes too long): no
    # landmarks module imports mtcnn at module level.
    package = Path(detector_module.__file__).parent
    for source in package.glob("*.py"):
        for node in ast.parse(source.read_text()).body:
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "mtcnn" for n in names), source.name
    assert FaceDetector()._mtcnn is None  # constructing does not load it either


def test_the_cache_and_annotate_names_still_import_from_the_detector_module():
    # They lived in tfface.landmarks.detector before the cache and annotating
    # a folder got modules of their own.
    moved = {
        cache_module: (
            "CACHE_COLUMNS", "LEGACY_CACHE_COLUMNS", "ORIENTATION_COLUMN", "REHASH_WARNING_THRESHOLD",
            "STAMPED_CACHE_COLUMNS", "STAMP_COLUMNS", "STATUS_NO_FACE", "STATUS_OK", "STATUS_UNREADABLE",
            "default_landmark_cache", "file_stamp", "is_landmark_cache_header", "load_landmark_cache", "logger",
            "read_landmark_cache",
        ),
        annotate_module: ("AnnotationReport", "annotate_folder"),
    }
    for module, names in moved.items():
        for name in names:
            assert getattr(detector_module, name) is getattr(module, name), name
            assert name in dir(detector_module)
    with pytest.raises(AttributeError):
        detector_module.no_such_name


# --- the real detector -------------------------------------------------------------


@pytest.fixture(scope="module")
def mtcnn_detector():
    return FaceDetector()


def _real_face():
    """skimage's astronaut, else a real UTKFace image, else skip."""
    try:
        import skimage.data

        return skimage.data.astronaut()
    except ImportError:
        pass
    data = Path(os.environ.get("TFFACE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    images = data / "utkface" / "images"
    path = images / "20_0_0_20170104020603909.jpg.chip.jpg"
    if not path.is_file():
        candidates = sorted(images.glob("2*_*.jpg")) if images.is_dir() else []
        if not candidates:
            pytest.skip("no face image: scikit-image is not installed and UTKFace data is absent")
        path = candidates[0]
    return np.asarray(Image.open(path).convert("RGB"))


def test_detector_finds_one_face_with_ordered_landmarks(mtcnn_detector):
    faces = mtcnn_detector.detect(_real_face())
    assert len(faces) == 1
    face = faces[0]
    assert face.confidence > 0.9
    lm = face.landmarks
    assert lm.shape == (5, 2) and lm.dtype == np.float32
    assert lm[0, 0] < lm[1, 0] and lm[3, 0] < lm[4, 0]  # image-left first
    assert lm[:2, 1].max() < lm[2, 1] < lm[3:, 1].min()  # eyes above nose above mouth
    x, y, w, h = face.box
    assert x <= lm[:, 0].min() and lm[:, 0].max() <= x + w


def test_annotate_folder_lists_an_image_without_a_face(tmp_path, mtcnn_detector):
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(grey)
    report = annotate_folder([grey], tmp_path / "cache.csv", detector=mtcnn_detector, verbose=False)
    assert report.no_face == ["grey.png"] and report.num_found == 0
    row = read_landmark_cache(tmp_path / "cache.csv")["grey.png"]
    assert row["status"] == "no_face" and row["left_eye_x"] == ""
    assert np.isnan(load_landmark_cache(tmp_path / "cache.csv", ["grey.png"])).all()


# --- the landmark cache, with a fake detector ------------------------------------------


class FakeDetector:
    """'Finds' a face in bright images; its landmarks encode the brightness."""

    def __init__(self, fail_on_call=None):
        self.calls = 0
        self.seen = 0
        self.fail_on_call = fail_on_call

    def detect_batch(self, images):
        self.calls += 1
        if self.calls == self.fail_on_call:
            raise KeyboardInterrupt("killed")
        self.seen += len(images)
        results = []
        for image in images:
            level = float(image.mean())
            if level < 100:
                results.append([])
            else:
                lm = TEMPLATE_5PT * 30 + level / 10
                results.append([Detection(box=(1.0, 2.0, 20.0, 25.0), confidence=0.99, landmarks=lm)])
        return results


def _write_images(folder, levels):
    paths = []
    for i, level in enumerate(levels):
        path = folder / f"{i:03d}.png"
        Image.fromarray(np.full((32, 32, 3), level, np.uint8)).save(path)
        paths.append(path)
    return paths


def _expected(level):
    return TEMPLATE_5PT * 30 + level / 10


def test_cache_write_resume_and_reload(tmp_path):
    levels = [200, 50, 150, 210, 60]  # images 1 and 4 have "no face"
    paths = _write_images(tmp_path, levels)
    cache = tmp_path / "out" / "landmarks.csv"

    # A run killed during its second batch keeps the first batch.
    with pytest.raises(KeyboardInterrupt):
        annotate_folder(paths, cache, detector=FakeDetector(fail_on_call=2), batch_size=2, verbose=False)
    assert sorted(read_landmark_cache(cache)) == ["000.png", "001.png"]

    # Resuming detects only the rest.
    fake = FakeDetector()
    report = annotate_folder(paths, cache, detector=fake, batch_size=2, verbose=False)
    assert fake.seen == 3 and report.num_new == 3
    assert report.no_face == ["001.png", "004.png"] and report.num_found == 3

    ids = [p.name for p in paths] + ["unknown.png"]
    landmarks = load_landmark_cache(cache, ids)
    assert landmarks.shape == (6, 5, 2) and landmarks.dtype == np.float32
    for i, level in enumerate(levels):
        if level >= 100:
            np.testing.assert_allclose(landmarks[i], _expected(level), atol=0.01)
        else:
            assert np.isnan(landmarks[i]).all()
    assert np.isnan(landmarks[5]).all()

    # A third run has nothing to do.
    fake = FakeDetector()
    annotate_folder(paths, cache, detector=fake, verbose=False)
    assert fake.seen == 0


def test_annotate_folder_limit(tmp_path):
    paths = _write_images(tmp_path, [200, 200, 200])
    fake = FakeDetector()
    report = annotate_folder(paths, tmp_path / "c.csv", detector=fake, limit=2, verbose=False)
    assert fake.seen == 2 and report.num_images == 2
    assert sorted(read_landmark_cache(tmp_path / "c.csv")) == ["000.png", "001.png"]


def test_cache_drops_a_torn_last_line_and_redoes_it(tmp_path):
    paths = _write_images(tmp_path, [200, 180])
    cache = tmp_path / "landmarks.csv"
    annotate_folder(paths[:1], cache, detector=FakeDetector(), verbose=False)
    with open(cache, "a") as f:
        f.write("001.png,ok,1,32,32,1.0")  # killed mid-write: no newline
    fake = FakeDetector()
    annotate_folder(paths, cache, detector=fake, verbose=False)
    assert fake.seen == 1
    landmarks = load_landmark_cache(cache, ["000.png", "001.png"])
    np.testing.assert_allclose(landmarks[1], _expected(180), atol=0.01)
    assert cache.read_text().count("001.png") == 1


def test_a_kill_just_after_a_newline_inside_a_quoted_id_is_a_torn_line(tmp_path):
    paths = _write_images(tmp_path, [200, 180])
    ids = ["first\nface.png", "second\nface.png"]
    cache = tmp_path / "landmarks.csv"
    annotate_folder(paths[:1], cache, image_ids=ids[:1], detector=FakeDetector(), verbose=False)
    with open(cache, "a") as f:
        f.write('"second\n')  # the file ends with a newline, inside the quoted id
    table = cache_module.read_cache_table(cache)
    assert list(table.index) == ids[:1] and table.torn
    fake = FakeDetector()
    annotate_folder(paths, cache, image_ids=ids, detector=fake, verbose=False)
    assert fake.seen == 1
    assert sorted(read_landmark_cache(cache)) == sorted(ids)
    np.testing.assert_allclose(load_landmark_cache(cache, ids)[1], _expected(180), atol=0.01)


def test_unreadable_images_are_listed_not_dropped(tmp_path):
    paths = _write_images(tmp_path, [200])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    report = annotate_folder(paths + [broken], tmp_path / "c.csv", detector=FakeDetector(), verbose=False)
    assert report.unreadable == ["broken.jpg"] and report.num_found == 1
    assert read_landmark_cache(tmp_path / "c.csv")["broken.jpg"]["status"] == "unreadable"


def test_a_foreign_csv_is_not_taken_for_a_cache(tmp_path):
    other = tmp_path / "other.csv"
    other.write_text("image_id,age\nx.jpg,3\n")
    with pytest.raises(LandmarkError, match="other.csv:1"):
        load_landmark_cache(other, ["x.jpg"])
    with pytest.raises(FileNotFoundError):
        load_landmark_cache(tmp_path / "missing.csv", ["x.jpg"])


def test_a_one_line_file_without_newline_is_refused_and_kept(tmp_path):
    paths = _write_images(tmp_path, [200])
    notes = tmp_path / "notes.txt"
    notes.write_text("important notes, no trailing newline")
    with pytest.raises(LandmarkError, match="notes.txt:1: not a tfface landmark cache"):
        annotate_folder(paths, notes, detector=FakeDetector(), verbose=False)
    assert notes.read_text() == "important notes, no trailing newline"
    # A header torn mid-write is still a cache to finish.
    torn = tmp_path / "torn.csv"
    torn.write_text(",".join(cache_module.CACHE_COLUMNS)[:12])
    annotate_folder(paths, torn, detector=FakeDetector(), verbose=False)
    assert sorted(read_landmark_cache(torn)) == ["000.png"]


def test_default_landmark_cache_location(tmp_path, monkeypatch):
    monkeypatch.delenv("TFFACE_CACHE_DIR", raising=False)
    data = tmp_path / "my_faces"
    data.mkdir()
    assert default_landmark_cache(data) == data / "landmarks_mtcnn.csv"

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(cache_module.os, "access", lambda *args: False)  # read-only
    path = default_landmark_cache(data)
    assert path.parent == tmp_path / "cache" / "tfface" / "landmarks"
    assert path.name.startswith("my_faces-") and path.suffix == ".csv"
    # Same name, other folder: another cache.
    (tmp_path / "b" / "my_faces").mkdir(parents=True)
    assert default_landmark_cache(tmp_path / "b" / "my_faces") != path


def test_changed_and_unreadable_images_are_detected_again(tmp_path):
    paths = _write_images(tmp_path, [200, 150, 210, 220])
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"")  # empty for now
    cache = tmp_path / "c.csv"
    annotate_folder(paths + [broken], cache, detector=FakeDetector(), verbose=False)
    ids = [p.name for p in paths]

    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(paths[0])  # another face, same name and size
    Image.fromarray(np.full((48, 32, 3), 150, np.uint8)).save(paths[1])  # resized
    os.utime(paths[2], ns=(1, 1))  # a copy that changed only the time: same bytes
    Image.fromarray(np.full((32, 32, 3), 230, np.uint8)).save(broken)  # fixed
    for path in (paths[0], paths[1]):  # a filesystem with coarse times: only size or hash can tell
        os.utime(path, ns=(1, 1))

    # Until annotated again, changed images have no landmarks and are named.
    changed = []
    landmarks = load_landmark_cache(cache, ids, paths, changed)
    assert changed == ["000.png", "001.png"]
    assert np.isnan(landmarks[:2]).all() and np.isfinite(landmarks[2:]).all()

    fake = FakeDetector()
    report = annotate_folder(paths + [broken], cache, detector=fake, verbose=False)
    assert fake.seen == 3 and report.num_new == 3 and report.unreadable == []
    landmarks = load_landmark_cache(cache, ids + ["broken.png"], paths + [broken])
    np.testing.assert_allclose(landmarks[0], _expected(120), atol=0.01)
    np.testing.assert_allclose(landmarks[4], _expected(230), atol=0.01)
    assert read_landmark_cache(cache)["001.png"]["height"] == "48"
    assert cache.read_text().count("000.png") == 1  # the stale row is gone, not shadowed


def test_an_older_cache_without_file_stamps_is_read_and_upgraded(tmp_path):
    paths = _write_images(tmp_path, [200, 210])
    cache = tmp_path / "c.csv"
    annotate_folder(paths, cache, detector=FakeDetector(), verbose=False)
    legacy = len(cache_module.LEGACY_CACHE_COLUMNS)
    lines = [",".join(line.split(",")[:legacy]) for line in cache.read_text().splitlines()]
    cache.write_text("\n".join(lines) + "\n")  # as written before the stamp columns
    np.testing.assert_allclose(load_landmark_cache(cache, ["000.png"], paths[:1])[0], _expected(200), atol=0.01)

    Image.fromarray(np.full((40, 32, 3), 170, np.uint8)).save(paths[1])  # resized since
    fake = FakeDetector()
    annotate_folder(paths, cache, detector=fake, verbose=False)
    assert fake.seen == 1  # only the image whose size no longer matches its row
    assert cache.read_text().splitlines()[0] == ",".join(cache_module.CACHE_COLUMNS)
    rows = read_landmark_cache(cache)
    assert rows["000.png"]["file_size"] == str(paths[0].stat().st_size)  # stamped in the upgrade
    np.testing.assert_allclose(load_landmark_cache(cache, ["001.png"], paths[1:])[0], _expected(170), atol=0.01)


def test_a_folder_cache_wins_over_the_cache_dir(tmp_path, monkeypatch):
    data = tmp_path / "faces"
    data.mkdir()
    (data / "landmarks_mtcnn.csv").write_text(",".join(cache_module.CACHE_COLUMNS) + "\n")
    monkeypatch.setenv("TFFACE_CACHE_DIR", str(tmp_path / "cache"))
    # The readers take the folder's own cache first, so annotate extends that one.
    assert default_landmark_cache(data) == data / "landmarks_mtcnn.csv"


def test_cli_annotate_keys_images_in_subfolders_by_their_path(tmp_path, monkeypatch, capsys):
    from tfface.cli import main as cli_main
    from tfface.data.sources import open_source

    root = tmp_path / "faces"
    ids = ["a/0.png", "b/0.png"]  # the same file name in two subfolders
    for image_id, level in zip(ids, (200, 240)):
        (root / "images" / image_id).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), level, np.uint8)).save(root / "images" / image_id)
    (root / "attributes.csv").write_text("image_id,Smiling\n" + "".join(f"{i},1\n" for i in ids))
    monkeypatch.delenv("TFFACE_CACHE_DIR", raising=False)
    monkeypatch.setattr(annotate_module, "FaceDetector", FakeDetector)

    assert cli_main(["data", "annotate", str(root)]) == 0
    landmarks = open_source(root).landmarks
    np.testing.assert_allclose(landmarks[0], _expected(200), atol=0.01)
    np.testing.assert_allclose(landmarks[1], _expected(240), atol=0.01)

    # A folder with its own landmarks file: training reads that one, so
    # detecting into another file is refused unless asked for by --cache.
    from tfface.data.source import LANDMARK_COLUMNS

    (root / "landmarks.csv").write_text(",".join(["image_id", *LANDMARK_COLUMNS]) + "\n")
    capsys.readouterr()
    assert cli_main(["data", "annotate", str(root)]) == 2
    assert "has its own landmarks in landmarks.csv" in capsys.readouterr().err
    assert cli_main(["data", "annotate", str(root), "--cache", str(tmp_path / "elsewhere.csv")]) == 0
    assert "landmarks: " + str(tmp_path / "elsewhere.csv") in capsys.readouterr().out


class ShapeRecordingDetector(FakeDetector):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def detect_batch(self, images):
        self.shapes += [image.shape for image in images]
        return super().detect_batch(images)


def test_landmarks_are_detected_upright_and_older_rows_of_rotated_images_are_redone(tmp_path):
    """Landmarks live in the image as shown (EXIF rotation applied), where the
    pipeline puts them; a 0.2.0 cache detected a rotated image on its side."""
    plain = tmp_path / "000.png"
    Image.fromarray(np.full((32, 48, 3), 200, np.uint8)).save(plain)
    rotated = tmp_path / "001.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 48 high and 32 wide, shown 32 high and 48 wide
    Image.fromarray(np.full((48, 32, 3), 210, np.uint8)).save(rotated, exif=exif)
    paths, ids = [plain, rotated], ["000.png", "001.png"]
    cache = tmp_path / "c.csv"
    fake = ShapeRecordingDetector()
    annotate_folder(paths, cache, detector=fake, verbose=False)
    assert fake.shapes == [(32, 48, 3), (32, 48, 3)]
    rows = read_landmark_cache(cache)
    assert (rows["001.png"]["exif_orientation"], rows["001.png"]["height"], rows["001.png"]["width"]) == ("6", "32", "48")
    assert rows["000.png"]["exif_orientation"] == "1"
    assert np.isfinite(load_landmark_cache(cache, ids, paths)).all()

    # The same cache as tfface 0.2.0 wrote it: no orientation column.
    stamped = len(cache_module.STAMPED_CACHE_COLUMNS)
    cache.write_text("\n".join(",".join(line.split(",")[:stamped]) for line in cache.read_text().splitlines()) + "\n")
    changed = []
    landmarks = load_landmark_cache(cache, ids, paths, changed)
    assert changed == ["001.png"]  # may have been detected on its side: left out and named
    assert np.isfinite(landmarks[0]).all() and np.isnan(landmarks[1]).all()

    fake = ShapeRecordingDetector()
    annotate_folder(paths, cache, detector=fake, verbose=False)
    assert fake.shapes == [(32, 48, 3)]  # only the rotated image is detected again
    assert cache.read_text().splitlines()[0] == ",".join(cache_module.CACHE_COLUMNS)
    rows = read_landmark_cache(cache)
    assert rows["000.png"]["exif_orientation"] == "1" and rows["001.png"]["exif_orientation"] == "6"


def test_image_sizes_are_those_of_the_upright_image(tmp_path):
    from tfface.data.sources import read_image_sizes

    exif = Image.Exif()
    exif[0x0112] = 8
    Image.fromarray(np.zeros((48, 32, 3), np.uint8)).save(tmp_path / "a.jpg", exif=exif)
    Image.fromarray(np.zeros((48, 32, 3), np.uint8)).save(tmp_path / "b.jpg")
    source = FaceSource(name="s", format="celeba", columns={}, image_paths=np.array([str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]))
    assert read_image_sizes(source).tolist() == [[32, 48], [48, 32]]


# --- file times changed, bytes not (a copy that did not keep times) --------------------


def _count_digests(monkeypatch):
    calls = []
    digest = cache_module._file_digest
    monkeypatch.setattr(cache_module, "_file_digest", lambda data: calls.append(1) or digest(data))
    return calls


def test_annotate_records_the_new_time_of_an_unchanged_image_so_reads_stop_hashing_it(tmp_path, monkeypatch):
    paths = _write_images(tmp_path, [200, 210, 220])
    ids = [p.name for p in paths]
    cache = tmp_path / "c.csv"
    annotate_folder(paths, cache, detector=FakeDetector(), verbose=False)
    os.utime(paths[1], ns=(10**18, 10**18))  # touched: same bytes, another time
    hashed = _count_digests(monkeypatch)
    expected = load_landmark_cache(cache, ids, paths)
    assert len(hashed) == 1 and np.isfinite(expected).all()  # checked by its bytes, and kept

    fake = FakeDetector()
    annotate_folder(paths, cache, detector=fake, verbose=False)
    assert fake.seen == 0  # not detected again: only its time is recorded
    assert read_landmark_cache(cache)["001.png"]["file_mtime_ns"] == str(10**18)
    hashed.clear()
    np.testing.assert_array_equal(load_landmark_cache(cache, ids, paths), expected)
    assert hashed == []  # the next read is stat-only


def test_a_reader_warns_once_naming_annotate_when_many_images_are_hashed(tmp_path, caplog, monkeypatch):
    from tfface.data.sources import read_annotate_cache

    many = cache_module.REHASH_WARNING_THRESHOLD + 2
    (tmp_path / "images").mkdir()
    paths = _write_images(tmp_path / "images", [200] * many)
    ids = [p.name for p in paths]
    cache = tmp_path / "c.csv"
    annotate_folder(paths, cache, detector=FakeDetector(), verbose=False)
    before = cache.read_bytes()
    for path in paths:
        os.utime(path, ns=(10**18, 10**18))
    hashed = _count_digests(monkeypatch)
    problems = []
    with caplog.at_level("WARNING"):
        landmarks = read_annotate_cache(cache, tmp_path, ids, problems)
    assert np.isfinite(landmarks).all() and problems == []  # nothing changed: no landmarks lost
    assert len(hashed) == many
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert f"{many} image(s)" in warnings[0] and f"`tfface data annotate {tmp_path}`" in warnings[0]
    assert cache.read_bytes() == before  # readers never write

    # A few hashed files are not worth a warning; load_landmark_cache alone warns too.
    caplog.clear()
    with caplog.at_level("WARNING"):
        read_annotate_cache(cache, tmp_path, ids[:2], [])
        load_landmark_cache(cache, ids, paths)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "tfface data annotate" in warnings[0], warnings


def test_cache_reading_keeps_its_errors_and_quoted_ids(tmp_path):
    header = ",".join(cache_module.CACHE_COLUMNS)
    width = len(cache_module.CACHE_COLUMNS)
    ok_row = ["x", "ok", "1", "32", "32", "1", "2", "3", "4", "0.9"] + ["5.5"] * 10 + ["", "", "", "1"]
    cache = tmp_path / "c.csv"
    cache.write_text(header + "\n" + ",".join(ok_row) + "\n" + "y,ok\n")
    with pytest.raises(LandmarkError, match=f"c.csv:3: expected {width} fields, got 2"):
        load_landmark_cache(cache, ["x"])
    # An id with a comma is quoted; a torn last line is left out.
    cache.write_text(header + "\n" + ",".join(['"a,b.png"'] + ok_row[1:]) + "\n" + "y,ok,1,3")
    np.testing.assert_allclose(load_landmark_cache(cache, ["a,b.png", "y"])[0], np.full((5, 2), 5.5))
    assert sorted(read_landmark_cache(cache)) == ["a,b.png"]
    # A bad value fails only the image asked for.
    cache.write_text(header + "\n" + ",".join(ok_row) + "\n" + ",".join(["z"] + ok_row[1:10] + ["oops"] + ok_row[11:]) + "\n")
    assert np.isfinite(load_landmark_cache(cache, ["x"])).all()
    with pytest.raises(LandmarkError, match="bad landmark value in the row of 'z'"):
        load_landmark_cache(cache, ["x", "z"])


# --- rewriting the cache: byte for byte, from the columnar reader ------------------------


def _fields(line):
    return next(csv.reader([line]))


def _lines_by_id(cache):
    header, *lines = cache.read_text().splitlines()
    return header, {_fields(line)[0]: line for line in lines}


def test_annotate_rewrites_kept_rows_byte_for_byte_and_reports_cached_statuses(tmp_path):
    paths = _write_images(tmp_path, [50, 150, 210, 220])  # 000.png has no face
    comma = tmp_path / "a,b.png"  # a quoted id
    Image.fromarray(np.full((32, 32, 3), 230, np.uint8)).save(comma)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    fixed = tmp_path / "fixed.png"
    fixed.write_bytes(b"")
    images = paths + [comma, broken, fixed]
    cache = tmp_path / "c.csv"
    annotate_folder(images, cache, detector=FakeDetector(), verbose=False)
    header, line = _lines_by_id(cache)
    assert line["a,b.png"].startswith('"a,b.png",ok,')

    Image.fromarray(np.full((32, 32, 3), 120, np.uint8)).save(paths[1])  # another face: detected again
    os.utime(paths[2], ns=(10**18, 10**18))  # only the time changed: recorded
    Image.fromarray(np.full((32, 32, 3), 240, np.uint8)).save(fixed)  # unreadable before: detected again
    stale = "003.png" + line["000.png"][len("000.png") :]  # replaced by the later row of 003.png, in its place
    other = "other.png,ok,1,32,32" + ",1.00" * 15 + ",,,,"  # not asked for: kept as it is
    kept_order = ["000.png", "001.png", "002.png", "003.png", "a,b.png", "broken.png", "fixed.png"]
    torn = "zzz.png,ok,1,3"
    cache.write_text("\n".join([header, stale] + [line[i] for i in kept_order] + [other, torn]))

    fake = FakeDetector()
    report = annotate_folder(images, cache, detector=fake, verbose=False)
    assert fake.seen == 2 and report.num_new == 3  # 001.png, fixed.png (and broken.png, still unreadable)
    assert report.no_face == ["000.png"] and report.unreadable == ["broken.png"]  # cached and new statuses

    retimed = _fields(line["002.png"])
    retimed[cache_module.CACHE_COLUMNS.index("file_mtime_ns")] = str(10**18)
    fresh = tmp_path / "fresh.csv"  # the rows detected again, as a first run writes them
    annotate_folder([paths[1], broken, fixed], fresh, detector=FakeDetector(), verbose=False)
    rewritten = [line["003.png"], line["000.png"], ",".join(retimed), line["a,b.png"], other]
    expected = "\n".join([header] + rewritten + fresh.read_text().splitlines()[1:]) + "\n"
    assert cache.read_text() == expected


def test_an_older_cache_is_rewritten_in_the_current_format_byte_for_byte(tmp_path):
    paths = _write_images(tmp_path, [200, 210])
    cache = tmp_path / "c.csv"
    annotate_folder(paths, cache, detector=FakeDetector(), verbose=False)
    header, line = _lines_by_id(cache)
    legacy = len(cache_module.LEGACY_CACHE_COLUMNS)
    older = {i: ",".join(_fields(text)[:legacy]) for i, text in line.items()}
    other = "other.png,no_face,0,32,32" + "," * 15  # not asked for
    cache.write_text("\n".join([",".join(cache_module.LEGACY_CACHE_COLUMNS), older["000.png"], other, older["001.png"]]) + "\n")
    Image.fromarray(np.full((40, 32, 3), 170, np.uint8)).save(paths[1])  # resized: detected again

    annotate_folder(paths, cache, detector=FakeDetector(), verbose=False)
    fresh = tmp_path / "fresh.csv"
    annotate_folder(paths[1:], fresh, detector=FakeDetector(), verbose=False)
    stamped = older["000.png"] + "," + ",".join(cache_module.file_stamp(paths[0])) + ",1"  # still its size: stamped
    expected = "\n".join([header, stamped, other + ",,,,"] + fresh.read_text().splitlines()[1:]) + "\n"
    assert cache.read_text() == expected


def _ok_row(image_id):
    return [image_id, "ok", "1", "32", "32", "1", "2", "3", "4", "0.9"] + ["5.5"] * 10 + ["", "", "", "1"]


def test_a_row_with_a_field_too_many_is_named_even_when_the_next_has_one_too_few(tmp_path):
    width = len(cache_module.CACHE_COLUMNS)
    cache = tmp_path / "c.csv"
    rows = [_ok_row("x"), _ok_row("y") + ["9"], _ok_row("z")[:-1]]  # as many fields in all as three good rows
    cache.write_text("\n".join([",".join(cache_module.CACHE_COLUMNS)] + [",".join(row) for row in rows]) + "\n")
    message = f"c.csv:3: expected {width} fields, got {width + 1}"
    with pytest.raises(LandmarkError, match=message):
        load_landmark_cache(cache, ["x"])
    with pytest.raises(LandmarkError, match=message):
        annotate_folder([], cache, detector=FakeDetector(), verbose=False)


@pytest.mark.parametrize("block_chars", [37, 200, 1 << 20])
def test_quoted_ids_are_read_in_whichever_block_they_fall(tmp_path, block_chars):
    ids = [f"{k:03d}.png" for k in range(6)] + ["a,b.png"] + [f"{k:03d}.png" for k in range(6, 12)]
    lines = [",".join(['"a,b.png"' if i == "a,b.png" else i] + _ok_row(i)[1:]) for i in ids]
    cache = tmp_path / "c.csv"
    cache.write_text("\n".join([",".join(cache_module.CACHE_COLUMNS)] + lines) + "\nzzz.png,ok,1")  # a torn last line
    table = cache_module.read_cache_table(cache, block_chars)
    assert list(table.index) == ids and table.torn
    np.testing.assert_array_equal(table.landmarks, np.full((len(ids), 10), 5.5, np.float32))


def test_an_id_with_a_carriage_return_is_refused_before_the_cache_is_touched(tmp_path):
    paths = _write_images(tmp_path, [200])
    cache = tmp_path / "c.csv"
    annotate_folder(paths, cache, detector=FakeDetector(), verbose=False)
    before = cache.read_bytes()
    with pytest.raises(LandmarkError, match=r"image id 'a\\rb.png' contains a carriage return"):
        annotate_folder(paths, cache, image_ids=["a\rb.png"], detector=FakeDetector(), verbose=False)
    assert cache.read_bytes() == before
