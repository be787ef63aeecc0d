"""`tfface predict`: detection, alignment, batched scoring and the JSON/PNG output.

One MTCNN detector serves the whole module, wrapped in a cache keyed by
image bytes, so images analysed twice are detected once (MTCNN is the slow
part). The model is tiny and untrained: its probabilities sit near 0.5,
which is what the threshold test needs.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harness import randomize_weights
from harness import small_disk

from tfface.config import ModelConfig
from tfface.landmarks import TEMPLATE_5PT
from tfface.models import GatedMultiTaskModel
from tfface.predict import FaceAnalyzer
from tfface.predict import align_for_model
from tfface.predict import draw_faces
from tfface.predict import expand_inputs
from tfface.predict import predict_faces
from tfface.schema import get_schema

DATA = Path(os.environ.get("TFFACE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
UTKFACE_IMAGES = DATA / "utkface" / "images"
FACE_FILES = ("20_0_0_20170104020603909.jpg.chip.jpg", "20_1_0_20170103163040136.jpg.chip.jpg")
TINY = ModelConfig(image_size=32, backbone_widths=(8, 16, 32, 64), embedding_dim=16)


class CachingDetector:
    """Detects each distinct image once (tests analyse some images twice)."""

    def __init__(self, detector):
        self.detector = detector
        self.cache = {}
        self.calls = 0

    def detect_batch(self, images):
        keys = [hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() + str(im.shape) for im in images]
        todo = [i for i, k in enumerate(keys) if k not in self.cache]
        if todo:
            self.calls += 1
            for i, faces in zip(todo, self.detector.detect_batch([images[i] for i in todo])):
                self.cache[keys[i]] = faces
        return [self.cache[k] for k in keys]


@pytest.fixture(scope="module")
def detector():
    from tfface.landmarks import FaceDetector

    return CachingDetector(FaceDetector())


@pytest.fixture(scope="module")
def model():
    return GatedMultiTaskModel(schema=get_schema("synthetic"), config=TINY)


def _real_faces():
    paths = [UTKFACE_IMAGES / name for name in FACE_FILES]
    if not all(p.is_file() for p in paths):
        paths = sorted(UTKFACE_IMAGES.glob("2*_*.jpg"))[:2] if UTKFACE_IMAGES.is_dir() else []
    if len(paths) < 2:
        pytest.skip("no real faces: UTKFace data is absent (scikit-image is not installed)")
    return [Image.open(p).convert("RGB").resize((120, 120), Image.Resampling.BILINEAR) for p in paths]


def _photo(faces, noisy=True, size=(360, 200)):
    """A background with each face pasted side by side."""
    rng = np.random.default_rng(len(faces))
    if noisy:
        background = rng.normal(150, 25, (size[1], size[0], 3)).clip(0, 255).astype(np.uint8)
    else:
        background = np.full((size[1], size[0], 3), (90, 140, 200), np.uint8)
    canvas = Image.fromarray(background)
    for k, face in enumerate(faces):
        canvas.paste(face, (20 + k * 180, 40))
    return np.asarray(canvas)


@pytest.fixture(scope="module")
def photos():
    faces = _real_faces()
    return [_photo([], noisy=False), _photo(faces[:1], noisy=True), _photo(faces, noisy=False)]


@pytest.fixture(scope="module")
def results(model, detector, photos):
    analyzer = FaceAnalyzer(model, detector=detector, batch_size=32)
    return analyzer.analyze(photos), analyzer.timings


# --- end to end on real faces --------------------------------------------------------


def test_zero_one_and_two_faces_are_found_in_one_model_call(results, photos):
    out, timings = results
    assert [len(r["faces"]) for r in out] == [0, 1, 2]
    assert out[0]["note"] == "no face detected" and "note" not in out[1]
    assert all(r["error"] is None for r in out)
    assert timings["model_calls"] == 1 and timings["faces"] == 3  # all faces of all images, one batch
    for result, photo in zip(out, photos):
        height, width = photo.shape[:2]
        for face in result["faces"]:
            x, y, w, h = face["box"]
            assert 0 <= x < x + w <= width + 1 and 0 <= y < y + h <= height + 1
            lm = np.array(face["landmarks"])
            assert lm.shape == (5, 2)
            assert lm[0, 0] < lm[1, 0] and lm[:2, 1].max() < lm[3:, 1].min()  # eyes left-right, above the mouth
            assert face["detector_confidence"] > 0.9
    # The two faces sit side by side: one box per pasted face.
    assert sorted(f["box"][0] < 180 for f in out[2]["faces"]) == [False, True]


def test_every_task_has_a_label_and_a_confidence(results, model):
    out, _ = results
    face = out[1]["faces"][0]
    json.loads(json.dumps(out))  # JSON-ready
    schema = model.schema
    for task in schema:
        value = face["attributes"][task.name] if task.is_binary else face[task.name]
        assert value["label"] in task.classes
        assert 0.0 <= value["confidence"] <= 1.0
        if task.is_binary:
            p = value["probability"]
            assert value["confidence"] == pytest.approx(p if value["label"] == task.classes[1] else 1 - p, abs=1e-4)
        else:
            probs = value["probabilities"]
            assert list(probs) == list(task.classes)
            assert sum(probs.values()) == pytest.approx(1.0, abs=1e-3)
            assert probs[value["label"]] == max(probs.values())
    assert set(face["attributes"]) == {t.name for t in schema.binary_tasks}


def test_each_face_gets_the_models_answer_for_its_own_aligned_crop(detector, photos):
    # Nothing else ties a face's probabilities to that face: the untrained
    # model answers about the same for any input, so a crop of the wrong
    # face, or no face at all, went unnoticed.
    model = randomize_weights(GatedMultiTaskModel(schema=get_schema("synthetic"), config=TINY))
    faces = FaceAnalyzer(model, detector=detector).analyze([photos[2]])[0]["faces"]
    detections = detector.detect_batch([photos[2]])[0]
    assert len(detections) == len(faces) == 2
    crops = [align_for_model(photos[2], np.asarray(d.landmarks, np.float64), TINY.image_size)[0] for d in detections]
    expected = model.predict_tasks(np.stack(crops).astype(np.float32))
    for row, face in enumerate(faces):
        probs = face["age_group"]["probabilities"]
        assert list(probs.values()) == pytest.approx(expected["age_group"][row].tolist(), abs=2e-4)
        for name in ("Smiling", "gender"):
            assert face["attributes"][name]["probability"] == pytest.approx(float(expected[name][row]), abs=2e-4)
    # The two faces' answers differ by far more than that tolerance.
    assert max(np.abs(v[0] - v[1]).max() for v in expected.values()) > 0.05


def test_thresholds_decide_binary_labels(model, detector, photos, monkeypatch):
    labels = {}
    for threshold in (0.99, 0.01):
        # What a calibrated model carries: the same weights, another threshold.
        monkeypatch.setattr(model, "schema", get_schema("synthetic").with_thresholds({"Smiling": threshold}))
        face = FaceAnalyzer(model, detector=detector).analyze([photos[1]])[0]["faces"][0]
        labels[threshold] = face["attributes"]["Smiling"]
    assert labels[0.99]["probability"] == pytest.approx(labels[0.01]["probability"], abs=1e-5)
    assert (labels[0.99]["label"], labels[0.01]["label"]) == ("no", "yes")


def test_batches_give_the_same_answers(model, detector, photos, results):
    analyzer = FaceAnalyzer(model, detector=detector, batch_size=2)
    out = analyzer.analyze(photos)
    assert analyzer.timings["model_calls"] == 2  # 3 faces in batches of 2
    for mine, reference in zip(out, results[0]):
        for a, b in zip(mine["faces"], reference["faces"]):
            assert a["age_group"]["probabilities"] == pytest.approx(b["age_group"]["probabilities"], abs=1e-4)
            assert a["attributes"]["Smiling"]["probability"] == pytest.approx(
                b["attributes"]["Smiling"]["probability"], abs=1e-4
            )


def test_unreadable_images_are_reported_and_the_run_goes_on(model, detector, photos, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(photos[1]).save(good)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    missing = tmp_path / "missing.jpg"
    out = predict_faces(model, [missing, broken, b"junk", good, np.zeros((5, 5, 3), np.uint8)], detector=detector)
    assert [r["image"] for r in out[:4]] == [str(missing), str(broken), "bytes #2", str(good)]
    assert "file not found" in out[0]["error"] and str(missing) in out[0]["error"]
    assert "not a readable image" in out[1]["error"] and str(broken) in out[1]["error"]
    assert "bytes #2" in out[2]["error"]
    assert out[3]["error"] is None and len(out[3]["faces"]) == 1
    assert "too small" in out[4]["error"]
    assert all(r["faces"] == [] for r in out[:3] + out[4:])
    # One array is one photo, not a sequence of rows.
    single = predict_faces(model, photos[1], detector=detector)
    assert len(single) == 1 and single[0]["error"] is None and len(single[0]["faces"]) == 1


# --- the command line -------------------------------------------------------------------


def test_predict_main_writes_json_lines_and_drawings(model, detector, photos, tmp_path, monkeypatch, capsys):
    import tfface.landmarks.detector as detector_module
    from tfface.cli import main

    folder = tmp_path / "photos"
    (folder / "nested").mkdir(parents=True)
    for name, photo in zip(("none.png", "one.jpg", "nested/two.png"), photos):
        Image.fromarray(photo).save(folder / name, quality=95)
    (folder / "notes.txt").write_text("not an image")
    (folder / "bad.jpg").write_bytes(b"garbage")
    model_path = tmp_path / "model.keras"
    model.save(model_path)
    monkeypatch.setattr(detector_module, "FaceDetector", lambda *a, **k: detector)

    out, draw = tmp_path / "faces.jsonl", tmp_path / "drawn"
    code = main(["predict", str(folder), "--model", str(model_path), "--out", str(out), "--draw", str(draw)])
    assert code == 0  # the unreadable bad.jpg is reported, not fatal
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    by_name = {Path(r["image"]).name: r for r in lines}
    assert set(by_name) == {"bad.jpg", "none.png", "one.jpg", "two.png"}  # notes.txt skipped
    assert [len(by_name[n]["faces"]) for n in ("none.png", "one.jpg", "two.png")] == [0, 1, 2]
    assert by_name["bad.jpg"]["error"] and "bad.jpg" in capsys.readouterr().err
    drawn = sorted(p.name for p in draw.iterdir() if p.name != ".tfface-drawings")
    assert drawn == ["none.png", "one.png", "two.png"]
    with Image.open(draw / "two.png") as image:
        drawing = np.asarray(image.convert("RGB"))
    assert drawing.shape == photos[2].shape and not np.array_equal(drawing, photos[2])
    # Running again replaces the earlier drawings in tfface's own folder...
    assert main(["predict", str(folder), "--model", str(model_path), "--draw", str(draw)]) == 0
    # ...but never a file in a folder it did not draw into (here a user's photo one.png).
    album = tmp_path / "album"
    album.mkdir()
    Image.fromarray(photos[0]).save(album / "one.png")
    before = (album / "one.png").read_bytes()
    assert main(["predict", str(folder / "one.jpg"), "--model", str(model_path), "--draw", str(album)]) == 2
    assert "already holds one.png, which tfface predict did not draw" in capsys.readouterr().err
    assert (album / "one.png").read_bytes() == before

    assert main(["predict", str(tmp_path / "nowhere"), "--model", str(model_path)]) == 2


def test_a_names_list_of_another_length_is_refused_before_any_work(model, detector, photos, monkeypatch):
    analyzer = FaceAnalyzer(model, detector=detector)
    monkeypatch.setattr(analyzer, "_detect_chunk", lambda *a: pytest.fail("detected first"))
    for names in (["a"], ["a", "b", "c"]):
        with pytest.raises(ValueError, match=f"names has {len(names)} entries for 2 images"):
            analyzer.analyze(photos[:2], names=names)
        with pytest.raises(ValueError, match=f"names has {len(names)} entries for 2 images"):
            next(analyzer.analyze_iter(photos[:2], names=names))


def test_expand_inputs(tmp_path):
    (tmp_path / "a.JPG").write_bytes(b"x")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / "b.txt").write_bytes(b"x")
    assert expand_inputs([tmp_path, tmp_path / "gone.png"]) == [tmp_path / "a.JPG", tmp_path / "gone.png"]
    with pytest.raises(FileNotFoundError, match="no input found"):
        expand_inputs([tmp_path / "gone.png"])
    (tmp_path / "a.JPG").unlink()
    with pytest.raises(FileNotFoundError, match="no image files"):
        expand_inputs([tmp_path])


# --- alignment and drawing, no detector ------------------------------------------------------


def test_alignment_puts_a_large_face_on_the_template_without_aliasing():
    size = 32
    # A 1-pixel checkerboard: a plain warp that shrinks it 10x aliases into
    # strong patterns; the antialiased path averages it to flat grey.
    ys, xs = np.mgrid[0:600, 0:600]
    board = ((xs + ys) % 2 * 255).astype(np.uint8)
    image = np.repeat(board[..., None], 3, axis=-1)
    landmarks = TEMPLATE_5PT * 320 + [140, 100]  # a face 10x the output size
    aligned, aligned_landmarks = align_for_model(image, landmarks, size)
    assert aligned.shape == (size, size, 3) and aligned.dtype == np.uint8
    np.testing.assert_allclose(aligned_landmarks, TEMPLATE_5PT * size, atol=0.1)
    assert aligned.std() < 6 and abs(aligned.mean() - 127.5) < 6


def test_draw_faces_marks_boxes(model):
    image = np.full((120, 160, 3), 255, np.uint8)
    result = {"image": "x", "error": None, "faces": [{
        "box": [40.0, 20.0, 50.0, 60.0],
        "landmarks": [[55, 40], [75, 40], [65, 55], [57, 68], [73, 68]],
        "detector_confidence": 0.99,
        "attributes": {t.name: {"label": t.classes[1], "confidence": 0.9, "probability": 0.9}
                       for t in model.schema.binary_tasks},
        "age_group": {"label": "20-29", "confidence": 0.6, "probabilities": {}},
    }]}
    drawn = np.asarray(draw_faces(image, result, model.schema))
    assert drawn.shape == image.shape
    assert (drawn[20, 40:90] != 255).any(axis=-1).all()  # the top edge of the box


def test_wide_greyscale_images_are_scaled_not_clipped_to_white():
    import io

    from tfface.predict import load_image

    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    for array, mode in (((ramp * 65535).astype(np.uint16), "I;16"), (ramp.astype(np.float32), "F")):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="TIFF" if mode == "F" else "PNG")
        assert Image.open(io.BytesIO(buffer.getvalue())).mode == mode
        image = load_image(buffer.getvalue(), mode)
        assert image.dtype == np.uint8 and image.shape == (64, 64, 3)
        # PIL's own RGB conversion would make nearly every pixel 255.
        assert image.min() == 0 and image.max() == 255
        assert abs(int(image[32, 32, 0]) - 128) <= 2


def test_results_cut_short_by_a_full_disk_keep_whole_lines_and_name_the_file(tmp_path, capsys):
    # The notice was lost (closing the file failed again) and the last record
    # was cut off mid-JSON.
    from tfface.predict import _results_file

    with small_disk(tmp_path / "disk", "64k") as disk:
        out = disk / "faces.jsonl"
        record = json.dumps({"image": "x.jpg", "faces": [{"box": [1.0] * 4, "pad": "y" * 700}]})
        written = 0
        with pytest.raises(OSError) as failed:
            with _results_file(out) as stream:
                while True:
                    stream.write(record + "\n")
                    written += 1
        partial = disk / "faces.jsonl.partial"
        assert str(failed.value).startswith(f"[Errno 28] No space left on device, writing {partial}")
        assert f"the results so far are in {partial}" in capsys.readouterr().err
        lines = partial.read_text().splitlines(keepends=True)
        assert 0 < len(lines) <= written and all(line.endswith("\n") for line in lines)
        assert all(json.loads(line) == json.loads(record) for line in lines)
        assert not out.exists()
