"""SavedModel export: signatures match the Keras model, layout, versions, atomicity."""

import errno
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import keras

from harness import log_syncs_and_moves
from harness import pil_encoded
from harness import small_disk
from harness import rle8_bmp
from tfface.data import image_ops
from tfface.data.image_ops import (
    decode_image,
    encoded_image_side,
    image_format,
    image_size_from_header,
    preprocess_encoded_images,
    preprocess_image,
)
from tfface.export import saved_model as export_lib
from tfface.export.saved_model import (
    ExportError,
    export_saved_model,
    list_versions,
    load_exported,
    load_model_info,
    read_warmup_requests,
)
from tfface.schema import AGE_GROUPS, MULTICLASS, Schema, Task

SIZE = 16


def build_stand_in(size=SIZE, smiling_bias=1.0):
    """A tiny model following the tfface contract (see tfface.export)."""
    keras.utils.set_random_seed(0)
    image = keras.Input(shape=(size, size, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 255)(image)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    smiling = keras.layers.Dense(
        1,
        activation="sigmoid",
        kernel_initializer=keras.initializers.RandomNormal(stddev=0.3),
        bias_initializer=keras.initializers.Constant(smiling_bias),
    )(x)
    smiling = keras.layers.Reshape(())(smiling)
    age = keras.layers.Dense(len(AGE_GROUPS), activation="softmax")(x)
    model = keras.Model(image, {"Smiling": smiling, "age_group": age, "_aux": x})
    model.schema = Schema(
        [
            Task("Smiling", group="mouth", classes=("not_smiling", "smiling")),
            Task("age_group", kind=MULTICLASS, classes=AGE_GROUPS),
        ],
        name="stand_in",
    )
    model.image_size = size
    return model


def png(array):
    return tf.io.encode_png(np.asarray(array, np.uint8)).numpy()


def random_images(count, shapes=None, seed=0):
    rng = np.random.default_rng(seed)
    shapes = shapes or [(SIZE, SIZE)] * count
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


@pytest.fixture(scope="module")
def model():
    return build_stand_in()


@pytest.fixture(scope="module")
def exported(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    path = export_saved_model(model, root, "stand_in")
    loaded, schema = load_exported(path)
    return path, loaded, schema


def expected_outputs(model, float_images):
    outputs = model(np.asarray(float_images, np.float32), training=False)
    return {k: keras.ops.convert_to_numpy(v) for k, v in outputs.items()}


def check_against_keras(result, expected, schema):
    result = {k: v.numpy() for k, v in result.items()}
    p = expected["Smiling"]
    np.testing.assert_allclose(result["Smiling_probabilities"], np.stack([1 - p, p], -1), atol=1e-5)
    np.testing.assert_allclose(result["age_group_probabilities"], expected["age_group"], atol=1e-5)
    smiling_ids = (p >= schema["Smiling"].threshold).astype(np.int64)
    np.testing.assert_array_equal(result["Smiling_class_id"], smiling_ids)
    np.testing.assert_array_equal(
        result["Smiling_label"], [schema["Smiling"].classes[i].encode() for i in smiling_ids]
    )
    age_ids = expected["age_group"].argmax(-1)
    np.testing.assert_array_equal(result["age_group_class_id"], age_ids)
    np.testing.assert_array_equal(result["age_group_label"], [AGE_GROUPS[i].encode() for i in age_ids])
    assert not any(k.startswith("_") for k in result)


# --- image ops -------------------------------------------------------------------------


def test_preprocess_crops_the_centre_square_and_resizes():
    image = np.zeros((10, 30, 3), np.uint8)
    image[:, 10:20] = 255  # only the central 10x10 square is white
    out = preprocess_image(image, 5).numpy()
    assert out.shape == (5, 5, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, 255.0, atol=1e-3)
    tall = np.zeros((30, 10, 3), np.uint8)
    tall[10:20] = 200
    np.testing.assert_allclose(preprocess_image(tall, 4).numpy(), 200.0, atol=1e-3)
    noisy = preprocess_image(np.random.default_rng(0).integers(0, 256, (23, 31, 3), dtype=np.uint8), 8)
    # Whole pixel values: the training pipeline's uint8 cache of it is lossless.
    np.testing.assert_array_equal(noisy.numpy(), np.round(noisy.numpy()))


def test_preprocess_of_a_batch_equals_preprocess_of_each_image():
    batch = np.random.default_rng(1).integers(0, 256, (3, 23, 31, 3), dtype=np.uint8)
    together = preprocess_image(batch, 8)
    assert together.shape == (3, 8, 8, 3)
    for image, out in zip(batch, together.numpy()):
        np.testing.assert_array_equal(out, preprocess_image(image, 8).numpy())


@pytest.mark.parametrize("shapes", [[(23, 31)] * 3, [(23, 31), (8, 8), (40, 12)]], ids=["one size", "mixed sizes"])
def test_preprocess_encoded_images_equals_decoding_and_preprocessing_each(shapes):
    rng = np.random.default_rng(2)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    encoded = [tf.io.encode_jpeg(images[0]).numpy()] + [png(i) for i in images[1:]]  # JPEG and PNG mixed
    out = preprocess_encoded_images(tf.constant(encoded), 8, max_side=64).numpy()
    assert out.shape == (3, 8, 8, 3)
    for data, row in zip(encoded, out):
        np.testing.assert_array_equal(row, preprocess_image(decode_image(data), 8).numpy())


def test_preprocess_encoded_images_refuses_an_empty_batch_by_name():
    with pytest.raises(tf.errors.InvalidArgumentError, match="empty batch: send at least one image"):
        preprocess_encoded_images(tf.constant([], tf.string), 8, max_side=64)


def test_decode_image_gives_rgb_uint8_and_rejects_garbage():
    gray = tf.io.encode_png(np.full((6, 4, 1), 7, np.uint8)).numpy()
    image = decode_image(gray).numpy()
    assert image.shape == (6, 4, 3) and image.dtype == np.uint8 and (image == 7).all()
    with pytest.raises(tf.errors.InvalidArgumentError):
        decode_image(b"definitely not an image")


def test_header_sizes_match_the_decoded_sizes():
    image = np.zeros((21, 37, 3), np.uint8)
    encoded = {
        "png": png(image),
        "jpeg": tf.io.encode_jpeg(image).numpy(),
    }
    for fmt, name in (("gif", "GIF"), ("bmp", "BMP"), ("webp", "WEBP")):
        encoded[fmt] = pil_encoded(image, name)
    for fmt, data in encoded.items():
        assert image_format(data) == fmt
        assert image_size_from_header(data) == (21, 37), fmt
        assert encoded_image_side(tf.constant(data)).numpy() == 37, fmt  # the graph's twin
    assert encoded_image_side(tf.constant(b"GIF8")).numpy() == 0  # a header cut short: the decoder decides
    assert image_format(b"hello") is None
    assert image_size_from_header(b"\x89PNG\r\n\x1a\n") is None


def _kinds_of_images():
    """Encoded images of every kind `REFUSED_KINDS` knows, and some it takes."""
    from PIL import Image

    rgb = Image.fromarray(np.random.default_rng(5).integers(0, 255, (20, 30, 3), np.uint8))
    other = Image.fromarray(np.asarray(rgb)[::-1].copy())
    return {
        "png": (pil_encoded(rgb, "PNG"), 0),
        "jpeg": (pil_encoded(rgb, "JPEG"), 0),
        "bmp 24": (pil_encoded(rgb, "BMP"), 0),
        "bmp 32": (pil_encoded(rgb.convert("RGBA"), "BMP"), 0),
        "bmp 8 palette": (pil_encoded(rgb.convert("P"), "BMP"), image_ops.PALETTE_BMP),
        "bmp 8 grey": (pil_encoded(rgb.convert("L"), "BMP"), image_ops.PALETTE_BMP),
        "bmp 1": (pil_encoded(rgb.convert("1"), "BMP"), image_ops.UNREAD_BMP),
        "bmp 8 rle": (rle8_bmp(), image_ops.UNREAD_BMP),
        "webp": (pil_encoded(rgb, "WEBP"), 0),
        "webp lossless": (pil_encoded(rgb, "WEBP", lossless=True), 0),
        "webp animated": (pil_encoded(rgb, "WEBP", save_all=True, append_images=[other]), image_ops.ANIMATED_WEBP),
        "gif": (pil_encoded(rgb, "GIF"), image_ops.GIF),
        "gif animated": (pil_encoded(rgb, "GIF", save_all=True, append_images=[other]), image_ops.GIF),
        "bmp cut short": (b"BM" + b"\0" * 10, 0),
        "empty": (b"", 0),
    }


def test_refused_image_kinds_agree_in_graph_and_in_python():
    cases = _kinds_of_images()
    names = list(cases)
    in_graph = image_ops.refused_image_kind(tf.constant([cases[n][0] for n in names])).numpy().tolist()
    assert dict(zip(names, in_graph)) == {n: cases[n][1] for n in names}
    for name in names:
        reason = image_ops.refused_image_reason(cases[name][0])
        assert reason == image_ops.REFUSED_KINDS.get(cases[name][1]), name
    assert int(image_ops.refused_image_kind(tf.constant(cases["gif"][0]))) == image_ops.GIF  # one image


def test_palette_bmps_decode_to_their_colours():
    """TensorFlow's BMP decoder returns an 8-bit BMP's palette indices as
    grey; training shows its colours, as PIL does (the serving signature
    refuses it, and the client sends it as PNG)."""
    from PIL import Image

    cases = _kinds_of_images()
    adaptive = Image.open(io.BytesIO(cases["png"][0])).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    cases["bmp 8, 16 colours"] = (pil_encoded(adaptive, "BMP"), image_ops.PALETTE_BMP)
    for name in ("bmp 8 palette", "bmp 8 grey", "bmp 8, 16 colours"):
        data = cases[name][0]
        shown = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(image_ops.decode_upright(tf.constant(data)).numpy(), shown, err_msg=name)
    # What the checks above could tell: the bare decoder's grey indices.
    palette_bmp = cases["bmp 8 palette"][0]
    shown = np.asarray(Image.open(io.BytesIO(palette_bmp)).convert("RGB"))
    assert np.abs(decode_image(palette_bmp).numpy().astype(int) - shown).mean() > 10


# --- export ------------------------------------------------------------------------------


def test_export_layout_assets_and_schema(exported, model):
    path, loaded, schema = exported
    assert path.name == "1" and path.parent.name == "stand_in"
    assert (path / "saved_model.pb").is_file()
    assert Schema.load(path / "assets" / "schema.json") == model.schema
    assert schema == model.schema
    info = load_model_info(path)
    assert info["image_size"] == SIZE and info["version"] == 1 and "tfface_version" in info
    assert sorted(loaded.signatures) == ["schema", "serving_default", "serving_uint8"]
    assert [p.name for p in path.parent.iterdir()] == ["1"]  # no temp dir left


def test_uint8_signature_matches_keras(exported, model):
    _, loaded, schema = exported
    images = np.stack(random_images(3))
    result = loaded.signatures["serving_uint8"](images_uint8=tf.constant(images))
    check_against_keras(result, expected_outputs(model, images.astype(np.float32)), schema)


@pytest.mark.parametrize("shapes", [[(20, 31)] * 3, [(20, 31), (SIZE, SIZE), (45, 17)]], ids=["one size", "mixed sizes"])
def test_bytes_signature_matches_keras_on_decoded_preprocessed_images(exported, model, shapes):
    _, loaded, schema = exported
    images = random_images(3, shapes=shapes, seed=1)
    encoded = [png(i) for i in images]
    result = loaded.signatures["serving_default"](images=tf.constant(encoded))
    preprocessed = np.stack([preprocess_image(decode_image(b), SIZE).numpy() for b in encoded])
    check_against_keras(result, expected_outputs(model, preprocessed), schema)


def test_schema_signature_returns_the_schema_and_export_info(exported, model):
    import tfface

    path, loaded, _ = exported
    outputs = loaded.signatures["schema"](unused=tf.constant([0, 0], tf.int32))
    out = outputs["schema_json"].numpy()
    assert out.shape == (2,)
    assert Schema.from_json(out[0].decode()) == model.schema
    info = json.loads(outputs["export_info_json"].numpy()[1].decode())
    assert info == {
        "tfface_version": tfface.__version__, "image_size": SIZE, "max_image_side": 4096, "applies_exif_orientation": True
    }
    assert {k: v for k, v in load_model_info(path).items() if k in info} == info  # the asset says the same


@pytest.fixture(scope="module")
def strict_export(model, tmp_path_factory):
    """An export with a stricter Smiling threshold and a 32-pixel size limit."""
    strict = model.schema.with_thresholds({"Smiling": 0.9})
    root = tmp_path_factory.mktemp("strict")
    path = export_saved_model(model, root, "strict", schema=strict, max_image_side=32, warmup_images=[])
    loaded, schema = load_exported(path)
    return path, loaded, schema


def test_bytes_signature_rejects_garbage_and_oversized_images(strict_export):
    path, loaded, _ = strict_export
    serve = loaded.signatures["serving_default"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="image file format"):
        serve(images=tf.constant([b"garbage"]))
    # Every format is refused from its header, before decoding: a small
    # file can decode to gigabytes.
    bigs = {"png": png(np.zeros((8, 40, 3))), "jpeg": tf.io.encode_jpeg(np.zeros((40, 8, 3), np.uint8)).numpy()}
    for fmt, options in (("BMP", {}), ("WEBP", {"lossless": True}), ("WEBP", {"lossless": False})):
        bigs[f"{fmt} {options}"] = pil_encoded(np.zeros((8, 40, 3), np.uint8), fmt, **options)
    for fmt, big in bigs.items():
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"maximum side of 32 pixels \(header\)"):
            serve(images=tf.constant([big]))
    ok = serve(images=tf.constant([png(np.zeros((32, 20, 3)))]))
    assert ok["Smiling_label"].shape == (1,)
    # Kinds TensorFlow decodes wrongly or at great cost are refused, named,
    # whatever their size, before any image of the request is decoded.
    for name, (data, kind) in _kinds_of_images().items():
        if kind:
            with pytest.raises(tf.errors.InvalidArgumentError, match=r"does not take these images.*\[0 %d\]" % kind):
                serve(images=tf.constant([png(np.zeros((32, 20, 3))), data]))
    assert not (path / "assets.extra").exists()  # warmup_images=[] writes none


def test_thresholds_from_the_schema_decide_binary_labels(exported, strict_export):
    _, loaded, _ = exported
    _, strict_loaded, strict_schema = strict_export
    images = tf.constant(np.stack(random_images(4, seed=2)))
    p = loaded.signatures["serving_uint8"](images_uint8=images)["Smiling_probabilities"].numpy()[:, 1]
    assert ((p > 0.5) & (p < 0.9)).all()  # the stand-in's bias puts p in between
    assert strict_schema["Smiling"].threshold == 0.9
    before = loaded.signatures["serving_uint8"](images_uint8=images)
    after = strict_loaded.signatures["serving_uint8"](images_uint8=images)
    assert set(before["Smiling_label"].numpy()) == {b"smiling"}
    assert set(after["Smiling_label"].numpy()) == {b"not_smiling"}
    np.testing.assert_array_equal(after["Smiling_class_id"].numpy(), 0)
    np.testing.assert_allclose(
        after["Smiling_probabilities"].numpy(), before["Smiling_probabilities"].numpy(), atol=1e-6
    )


def test_versions_increment_and_existing_versions_are_refused(model, tmp_path):
    import stat

    previous = os.umask(0o022)
    try:
        first = export_saved_model(model, tmp_path, "m", version=3, warmup_images=[])
    finally:
        os.umask(previous)
    # Readable by a server running as another user (mkdtemp alone gives 0700).
    assert stat.S_IMODE(first.stat().st_mode) == 0o755
    second = export_saved_model(model, tmp_path, "m", warmup_images=[])
    assert (first.name, second.name) == ("3", "4")  # default: one past the highest
    with pytest.raises(FileExistsError, match="never overwritten"):
        export_saved_model(model, tmp_path, "m", version=3, warmup_images=[])
    assert list_versions(tmp_path / "m") == [3, 4]
    assert [p.name for p in (tmp_path / "m").iterdir() if not p.name.isdigit()] == []
    assert load_model_info(tmp_path / "m")["version"] == 4  # the model folder resolves to the latest


def test_versions_are_what_tf_serving_reads_them_as(model, tmp_path):
    import shutil

    from tfface.export.saved_model import MAX_VERSION

    # TF Serving reads folder names as int64: a larger version would never be served.
    with pytest.raises(ExportError, match="version must be an integer in 1..9223372036854775807"):
        export_saved_model(model, tmp_path, "m", version=MAX_VERSION + 1, warmup_images=[])
    last = export_saved_model(model, tmp_path, "m", version=MAX_VERSION, warmup_images=[])
    with pytest.raises(ExportError, match="beyond int64"):  # the default would be one past it
        export_saved_model(model, tmp_path, "m", warmup_images=[])
    assert list_versions(tmp_path / "m") == [MAX_VERSION]
    # "007" is version 7 to TF Serving, which serves one of two such folders; "²" and "١٢" are none.
    shutil.copytree(last, tmp_path / "m2" / "007")
    for name in ("²", "١٢"):
        (tmp_path / "m2" / name).mkdir()
    assert list_versions(tmp_path / "m2") == [7]
    with pytest.raises(FileExistsError, match="never overwritten"):
        export_saved_model(model, tmp_path, "m2", version=7, warmup_images=[])
    assert export_saved_model(model, tmp_path, "m2", warmup_images=[]).name == "8"


def test_an_export_that_finishes_second_takes_the_next_version(model, tmp_path, monkeypatch):
    # Another export of the same name completes while this one writes: this
    # one takes the next free version instead of failing (or overwriting).
    real_write = export_lib.write_warmup_requests

    def meanwhile(path, *args, **kwargs):
        if not list_versions(tmp_path / "m"):
            export_saved_model(model, tmp_path, "m", warmup_images=[])  # the other export
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(export_lib, "write_warmup_requests", meanwhile)
    path = export_saved_model(model, tmp_path, "m")
    assert path.name == "2" and list_versions(tmp_path / "m") == [1, 2]
    assert load_model_info(path)["version"] == 2
    assert load_model_info(tmp_path / "m", version=1)["version"] == 1
    # A version asked for by number is still never overwritten.
    monkeypatch.setattr(
        export_lib, "write_warmup_requests",
        lambda path, *a, **k: (export_saved_model(model, tmp_path, "m", version=5, warmup_images=[]), real_write(path, *a, **k)),
    )
    with pytest.raises(FileExistsError, match="5 appeared while exporting"):
        export_saved_model(model, tmp_path, "m", version=5)
    assert list_versions(tmp_path / "m") == [1, 2, 5]


def test_failure_mid_export_leaves_nothing_behind(model, tmp_path, monkeypatch):
    def explode(*args, **kwargs):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(export_lib, "write_warmup_requests", explode)
    with pytest.raises(RuntimeError, match="simulated"):
        export_saved_model(model, tmp_path, "fresh")
    assert not (tmp_path / "fresh").exists()  # the folder it created is gone too

    class HalfWrittenArchive:
        def write_out(self, filepath, **kwargs):
            (Path(filepath) / "saved_model.pb").write_bytes(b"partial")
            raise OSError("connection to the file server lost (simulated)")

    monkeypatch.setattr(export_lib, "build_export_archive", lambda *a, **k: HalfWrittenArchive())
    (tmp_path / "kept" / "1").mkdir(parents=True)
    with pytest.raises(OSError, match="simulated"):
        export_saved_model(model, tmp_path, "kept")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["1"]


def test_a_full_disk_is_named_as_the_export_not_a_temporary_variables_file(model, tmp_path):
    # TensorFlow writes the variables and the warm-up file: its error named
    # ".tmp-export-.../variables/variables_temp/part-...tempstate123".
    with small_disk(tmp_path / "disk", "64k") as disk:
        (disk / "m" / "1").mkdir(parents=True)
        expected = r"No space left on device, writing a new version in .*m \(nothing was added\)"
        with pytest.raises(OSError, match=expected) as caught:
            export_saved_model(model, disk, "m")
        assert caught.value.errno == errno.ENOSPC and ".tmp-export-" not in str(caught.value)
        assert sorted(p.name for p in (disk / "m").iterdir()) == ["1"]


def test_every_file_of_a_version_is_on_disk_before_its_rename(model, tmp_path, monkeypatch):
    """Without fsync, a power cut can keep the rename and lose the files' contents:
    TF Serving would then find a complete-looking version of empty files."""
    events = log_syncs_and_moves(monkeypatch, "rename")
    path = export_saved_model(model, tmp_path, "m")
    renames = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == str(path)]
    assert len(renames) == 1
    tmp = events[renames[0]][1]
    synced_before = {e[1] for e in events[: renames[0]] if e[0] == "sync"}
    written = [p for p in path.rglob("*")]
    assert any(p.name == "saved_model.pb" for p in written) and any(p.name == "tf_serving_warmup_requests" for p in written)
    for item in written:
        assert os.path.join(tmp, os.path.relpath(item, path)) in synced_before, item
    assert tmp in synced_before
    assert ("sync", str(path.parent)) in events[renames[0]:]  # the rename itself


def test_contract_violations_are_named(model, tmp_path):
    with pytest.raises(ExportError, match="must not be all digits"):
        export_saved_model(model, tmp_path, "123")
    with pytest.raises(ExportError, match="must start with"):
        export_saved_model(model, tmp_path, "../evil")
    wrong = Schema([Task("Smiling"), Task("Eyeglasses")])
    with pytest.raises(ExportError, match="Eyeglasses"):
        export_saved_model(model, tmp_path, "m", schema=wrong)
    wrong_classes = Schema([Task("Smiling"), Task("age_group", kind=MULTICLASS, classes=("a", "b"))])
    with pytest.raises(ExportError, match="age_group"):
        export_saved_model(model, tmp_path, "m", schema=wrong_classes)
    assert not (tmp_path / "m").exists()
    with pytest.raises(FileNotFoundError, match="model file not found: .*missing.keras"):
        export_saved_model(tmp_path / "missing.keras", tmp_path, "m")


def test_a_model_path_is_loaded_and_exported(model, tmp_path, monkeypatch):
    from tfface.models import saving

    loaded = []
    monkeypatch.setattr(saving, "load_model", lambda path: loaded.append(path) or model)
    path = export_saved_model(tmp_path / "run" / "model.keras", tmp_path, "m", warmup_images=[])
    assert loaded == [tmp_path / "run" / "model.keras"]
    assert load_model_info(path)["tasks"] == ["Smiling", "age_group"]


def test_warmup_file_holds_prediction_logs_that_run(exported):
    """One record per signature at least: unwarmed, the first uint8 request of a
    64 px export took 150 ms against 3 ms."""
    path, loaded, _ = exported
    records = read_warmup_requests(path / "assets.extra" / "tf_serving_warmup_requests")
    by_signature = {}
    for record in records:
        request = record.predict_log.request
        assert request.model_spec.name == "stand_in"
        by_signature.setdefault(request.model_spec.signature_name, []).append(request)
    assert sorted(by_signature) == ["schema", "serving_default", "serving_uint8"]
    for request in by_signature["serving_default"]:
        images = tf.make_ndarray(request.inputs["images"])
        assert all(image_format(b) == "jpeg" for b in images)
    for signature, requests in by_signature.items():
        for request in requests:
            inputs = {name: tf.make_ndarray(tensor) for name, tensor in request.inputs.items()}
            assert list(inputs) == [export_lib.SIGNATURE_INPUTS[signature]]
            out = loaded.signatures[signature](**inputs)
            assert all(v.shape[0] == len(next(iter(inputs.values()))) for v in out.values())


def test_saved_model_cli_runs_the_uint8_signature(exported, tmp_path):
    path, loaded, _ = exported
    images = np.stack(random_images(2, seed=3))
    np.save(tmp_path / "x.npy", images)
    # The module form runs under this interpreter (the `saved_model_cli`
    # console script may be a slower shim or belong to another Python).
    command = [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
    command += [
        "run", "--dir", str(path), "--tag_set", "serve", "--signature_def", "serving_uint8",
        "--inputs", f"images_uint8={tmp_path / 'x.npy'}", "--outdir", str(tmp_path / "out"),
    ]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    probabilities = np.load(tmp_path / "out" / "age_group_probabilities.npy")
    expected = loaded.signatures["serving_uint8"](images_uint8=tf.constant(images))
    np.testing.assert_allclose(probabilities, expected["age_group_probabilities"].numpy(), atol=1e-6)


def test_an_interrupt_wrapped_by_tensorflow_ends_export_as_interrupted(monkeypatch, capsys, tmp_path):
    import tfface.export.saved_model as saved_model_lib
    import tfface.models.saving as saving_lib
    from tfface.cli import main

    def wrapped_interrupt(*args, **kwargs):
        raise RuntimeError(
            "pybind11::error_already_set: MISMATCH of original and normalized active exception types: "
            "ORIGINAL InvalidArgumentError REPLACED BY KeyboardInterrupt"
        )

    monkeypatch.setattr(saving_lib, "load_model", lambda path: object())
    monkeypatch.setattr(saved_model_lib, "export_saved_model", wrapped_interrupt)
    argv = ["export", "--model", "m.keras", "--name", "faces", "--export-root", str(tmp_path)]
    assert main(argv) == 130
    assert "interrupted" in capsys.readouterr().err

    def other_failure(*args, **kwargs):
        raise RuntimeError("something else")

    monkeypatch.setattr(saved_model_lib, "export_saved_model", other_failure)
    with pytest.raises(RuntimeError, match="something else"):
        main(argv)


def test_cli_export_sets_the_largest_image_side_served(model, monkeypatch, tmp_path, capsys):
    """Photos beyond 4096 px were refused with no way to raise the limit from the CLI."""
    from tfface.cli import main
    from tfface.models import saving as saving_lib

    monkeypatch.setattr(saving_lib, "load_model", lambda path: model)
    argv = ["export", "--model", "m.keras", "--name", "faces", "--export-root", str(tmp_path), "--max-image-side", "40"]
    assert main(argv) == 0
    path = tmp_path / "faces" / "1"
    assert f"exported to {path}" in capsys.readouterr().out
    assert load_model_info(path)["max_image_side"] == 40
    serve = load_exported(path)[0].signatures["serving_default"]
    assert serve(images=tf.constant([png(np.zeros((40, 8, 3)))]))["Smiling_label"].shape == (1,)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"maximum side of 40 pixels \(header\)"):
        serve(images=tf.constant([png(np.zeros((41, 8, 3)))]))


def _with_exif(pixels, orientation, fmt, byte_order=">"):
    """Encoded `pixels` whose EXIF first directory holds two other tags and
    then `orientation`, in either TIFF byte order."""
    import struct

    entries = [(0x010F, 2, 4, b"Can\0"), (0x0110, 2, 4, b"X10\0"), (0x0112, 3, 1, struct.pack(byte_order + "HH", orientation, 0))]
    directory = struct.pack(byte_order + "H", len(entries))
    directory += b"".join(struct.pack(byte_order + "HHI", tag, kind, count) + value for tag, kind, count, value in entries)
    tiff = (b"MM\0*" if byte_order == ">" else b"II*\0") + struct.pack(byte_order + "I", 8) + directory + b"\0" * 4
    return pil_encoded(pixels, fmt, exif=(b"Exif\0\0" if fmt == "JPEG" else b"") + tiff)


def test_exif_orientation_reads_what_pil_reads():
    from tfface.data.image_ops import exif_orientation, file_exif_orientation

    pixels = np.zeros((8, 8, 3), np.uint8)
    encoded = [
        _with_exif(pixels, orientation, fmt, order)
        for fmt in ("JPEG", "PNG") for orientation in range(10) for order in "<>"
    ]
    encoded += [b"", b"\xff\xd8", png(pixels), b"not an image", encoded[13][:30]]  # none, or cut short
    expected = [file_exif_orientation(data) for data in encoded]
    assert expected.count(1) == 2 * 2 * 3 + 5 and set(expected) == set(range(1, 9))  # 0 and 9 are no rotation
    assert exif_orientation(tf.constant(encoded)).numpy().tolist() == expected  # a batch
    assert int(exif_orientation(tf.constant(encoded[12]))) == expected[12]  # one image
    grid = exif_orientation(tf.constant([encoded[12:14], encoded[-2:]])).numpy()
    assert grid.tolist() == [expected[12:14], expected[-2:]]


@pytest.mark.parametrize("orientation", range(1, 9))
def test_the_serving_preprocessing_turns_images_upright(orientation):
    from PIL import Image, ImageOps

    from tfface.data.image_ops import decode_upright

    upright = np.random.default_rng(4).integers(0, 256, (23, 31, 3), dtype=np.uint8)
    stored = np.asarray(Image.fromarray(upright).transpose(
        {1: Image.Transpose.ROTATE_180, 2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
         4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90,
         7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_270}[orientation]))
    tagged = _with_exif(stored, orientation, "PNG")
    shown = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(tagged))).convert("RGB"))
    if orientation > 1:
        np.testing.assert_array_equal(shown, upright)  # the fixture is what a viewer shows
    np.testing.assert_array_equal(decode_upright(tf.constant(tagged)).numpy(), shown)
    # In a request with an image without EXIF, each is turned as its own tag says.
    out = preprocess_encoded_images(tf.constant([tagged, png(upright)]), 8, max_side=64).numpy()
    np.testing.assert_array_equal(out[0], preprocess_image(shown, 8).numpy())
    np.testing.assert_array_equal(out[1], preprocess_image(upright, 8).numpy())


MODEL_SIZE = 32  # the smallest a tfface model takes


def _tfface_model(kind):
    from tfface.config import ModelConfig
    from tfface.models.build import build_model

    keras.utils.set_random_seed(4)
    small = dict(image_size=MODEL_SIZE, backbone_widths=(8, 16, 32, 64), embedding_dim=16)
    if kind == "gated":
        config = ModelConfig(type="gated", gate="input_conditioned", gate_hidden=8, correlation=True, **small)
    else:
        config = ModelConfig(type="mask_guided", fusion="group_global", mask_channels=(8, 16, 32), **small)
    return build_model("synthetic", config)


@pytest.mark.parametrize("kind", ["gated", "mask_guided"])
def test_a_tfface_model_round_trips_through_each_signature(kind, tmp_path):
    """The real models (not the stand-in): every task's probabilities and
    labels from both signatures equal the Keras model's."""
    model = _tfface_model(kind)
    model.predict(np.zeros((4, MODEL_SIZE, MODEL_SIZE, 3), np.float32), verbose=0)
    moving = [v for v in model.non_trainable_variables if "moving" in v.path]
    assert moving  # batch-norm statistics away from their initial values, as after training
    for variable in moving:
        variable.assign(np.random.default_rng(1).uniform(0.5, 1.5, variable.shape).astype("float32"))
    path = export_saved_model(model, tmp_path, kind, warmup_images=[])
    loaded, schema = load_exported(path)
    assert schema == model.schema
    images = np.stack(random_images(3, shapes=[(MODEL_SIZE, MODEL_SIZE)] * 3, seed=5))
    outputs = model({"image": images.astype(np.float32)}, training=False)
    expected = {k: keras.ops.convert_to_numpy(v) for k, v in outputs.items()}
    results = {
        "serving_uint8": loaded.signatures["serving_uint8"](images_uint8=tf.constant(images)),
        # PNGs at the model's size: the in-graph crop and resize leave them as they are.
        "serving_default": loaded.signatures["serving_default"](images=tf.constant([png(i) for i in images])),
    }
    for signature, result in results.items():
        for task in schema:
            got = result[f"{task.name}_probabilities"].numpy()
            p = expected[task.name]
            want = np.stack([1 - p, p], -1) if task.is_binary else p
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"{signature}: {task.name}")
            ids = (p >= task.threshold).astype(np.int64) if task.is_binary else p.argmax(-1)
            np.testing.assert_array_equal(result[f"{task.name}_class_id"].numpy(), ids)
        assert not any(k.startswith("_") for k in result)
    # Run through these models, oneDNN's CPU batch norm failed an empty batch with
    # "Incompatible shapes: [C] vs. [0,S,S,3]"; both signatures now name the problem.
    empty = {
        "serving_uint8": dict(images_uint8=tf.zeros([0, MODEL_SIZE, MODEL_SIZE, 3], tf.uint8)),
        "serving_default": dict(images=tf.constant([], tf.string)),
    }
    for signature, inputs in empty.items():
        with pytest.raises(tf.errors.InvalidArgumentError, match="empty batch: send at least one image"):
            loaded.signatures[signature](**inputs)


def test_a_mask_guided_model_on_landmark_masks_is_refused_with_the_way_to_export_it(tmp_path):
    from tfface.models.mask_guided_model import landmark_mask_variant

    on_landmarks = landmark_mask_variant(_tfface_model("mask_guided"), True)
    with pytest.raises(ExportError, match=r"it has 2; .*landmark_mask_variant\(model, False\)"):
        export_saved_model(on_landmarks, tmp_path, "m", warmup_images=[])
    assert not (tmp_path / "m").exists()
    path = export_saved_model(landmark_mask_variant(on_landmarks, False), tmp_path, "m", warmup_images=[])
    assert path.name == "1"
