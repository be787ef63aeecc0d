"""Export -> LocalModelServer -> ServingClient, over real gRPC on localhost."""

import argparse
import concurrent.futures
import io
import json
import logging
import re
import socket
import threading
import time

import grpc
import numpy as np
import pytest
import tensorflow as tf

import keras

from tensorflow.core.framework import tensor_pb2, tensor_shape_pb2, types_pb2
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    inference_pb2,
    model_pb2,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from harness import pil_encoded
from tfface.export.saved_model import export_saved_model, load_exported
from tfface.schema import AGE_GROUPS, MULTICLASS, Schema, Task
from tfface.serving.client import ServingClient, ServingError, format_results, query_main
from tfface.serving import batcher as batcher_module
from tfface.serving.batcher import Batcher
from tfface.serving.server import LocalModelServer, serve_main

SIZE = 16
MAX_SIDE = 64


def build_stand_in(size=SIZE, seed=0):
    """A tiny model following the tfface contract (see tfface.export)."""
    keras.utils.set_random_seed(seed)
    image = keras.Input(shape=(size, size, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 255)(image)
    x = keras.layers.Conv2D(4, 3, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    smiling = keras.layers.Reshape(())(keras.layers.Dense(1, activation="sigmoid")(x))
    age = keras.layers.Dense(len(AGE_GROUPS), activation="softmax")(x)
    model = keras.Model(image, {"Smiling": smiling, "age_group": age, "_aux": x})
    model.schema = Schema(
        [Task("Smiling", group="mouth"), Task("age_group", kind=MULTICLASS, classes=AGE_GROUPS)],
        name="stand_in",
    )
    model.image_size = size
    return model


def png(array):
    return tf.io.encode_png(np.asarray(array, np.uint8)).numpy()


def animated_webp():
    from PIL import Image

    pixels = np.random.default_rng(3).integers(0, 256, (20, 20, 3), dtype=np.uint8)
    return pil_encoded(pixels, "WEBP", save_all=True, append_images=[Image.fromarray(255 - pixels)])


def uint8_tensor(count=1, **fields):
    """A DT_UINT8 (count, SIZE, SIZE, 3) TensorProto with its values in `fields`."""
    shape = tensor_shape_pb2.TensorShapeProto(dim=[{"size": n} for n in (count, SIZE, SIZE, 3)])
    return tensor_pb2.TensorProto(dtype=types_pb2.DT_UINT8, tensor_shape=shape, **fields)


def random_pngs(count, seed=0):
    rng = np.random.default_rng(seed)
    return [png(rng.integers(0, 256, (rng.integers(10, 40), rng.integers(10, 40), 3))) for _ in range(count)]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved_models")
    model = build_stand_in()
    export_saved_model(model, root, "faces")
    export_saved_model(build_stand_in(seed=1), root, "faces", warmup_images=[])
    loaded, schema = load_exported(root / "faces" / "2")
    server = LocalModelServer(
        root / "faces",
        versions="all",
        version_labels={"stable": 1, "canary": 2},
        batch_timeout_ms=30,
        max_batch_size=8,
        max_image_side=MAX_SIDE,
    )
    port = server.start()
    yield {"root": root, "server": server, "target": f"127.0.0.1:{port}", "loaded": loaded, "schema": schema}
    server.stop()


@pytest.fixture(scope="module")
def stub(deployment):
    channel = grpc.insecure_channel(deployment["target"])
    yield prediction_service_pb2_grpc.PredictionServiceStub(channel)
    channel.close()


def direct(loaded, encoded):
    out = loaded.signatures["serving_default"](images=tf.constant(encoded))
    return {k: v.numpy() for k, v in out.items()}


def request(images=None, model="faces", signature="", key="images", tensor=None, **spec):
    req = predict_pb2.PredictRequest(model_spec=model_pb2.ModelSpec(name=model, signature_name=signature))
    for field, value in spec.items():
        if field == "version":
            req.model_spec.version.value = value
        else:
            setattr(req.model_spec, field, value)
    if tensor is None:
        tensor = tf.make_tensor_proto(images, dtype=tf.string)
    req.inputs[key].CopyFrom(tensor)
    return req


def test_client_predict_matches_the_saved_model(deployment, tmp_path):
    encoded = random_pngs(5)
    path = tmp_path / "face.png"
    path.write_bytes(encoded[0])
    with ServingClient(deployment["target"], model_name="faces") as client:
        results = client.predict([str(path)] + encoded[1:], batch_size=2)
    expected = direct(deployment["loaded"], encoded)
    assert len(results) == 5
    for i, result in enumerate(results):
        assert list(result) == ["Smiling", "age_group"]
        smiling = result["Smiling"]
        np.testing.assert_allclose(
            [smiling["probabilities"]["no"], smiling["probabilities"]["yes"]],
            expected["Smiling_probabilities"][i],
            atol=1e-6,
        )
        assert smiling["label"] == expected["Smiling_label"][i].decode()
        age = result["age_group"]
        np.testing.assert_allclose(list(age["probabilities"].values()), expected["age_group_probabilities"][i], atol=1e-6)
        assert age["label"] == expected["age_group_label"][i].decode()
        assert age["confidence"] == pytest.approx(max(age["probabilities"].values()))
    text = format_results(results, names=[str(path)] + [b""] * 4)
    assert str(path) in text and "age_group" in text and "image #1" in text


def test_uint8_signature_through_the_client(deployment):
    images = np.random.default_rng(4).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    with ServingClient(deployment["target"], model_name="faces", signature="serving_uint8") as client:
        results = client.predict(images)
    expected = deployment["loaded"].signatures["serving_uint8"](images_uint8=tf.constant(images))
    got = np.array([[r["age_group"]["probabilities"][c] for c in AGE_GROUPS] for r in results])
    np.testing.assert_allclose(got, expected["age_group_probabilities"].numpy(), atol=1e-6)
    # One (S, S, 3) array is one face, not SIZE faces of one row each.
    with ServingClient(deployment["target"], model_name="faces", signature="serving_uint8") as client:
        [single] = client.predict(images[1])
    assert single["age_group"]["probabilities"] == pytest.approx(results[1]["age_group"]["probabilities"], abs=1e-6)


def test_metadata_and_status(deployment):
    with ServingClient(deployment["target"], model_name="faces") as client:
        metadata = client.metadata()
        status = client.status()
    assert metadata["model"] == "faces" and metadata["version"] == 2
    assert {"serving_default", "serving_uint8", "schema"} <= set(metadata["signatures"])
    inputs = metadata["signatures"]["serving_default"]["inputs"]
    assert inputs == {"images": {"dtype": "string", "shape": [None]}}
    assert Schema.from_dict(metadata["schema"]) == deployment["schema"]
    assert metadata["export_info"]["applies_exif_orientation"] is True
    assert metadata["signatures"]["schema"]["outputs"] == {
        "schema_json": {"dtype": "string", "shape": [None]}, "export_info_json": {"dtype": "string", "shape": [None]}
    }
    assert [(s["version"], s["state"], s["error_code"]) for s in status] == [
        (1, "AVAILABLE", "OK"),
        (2, "AVAILABLE", "OK"),
    ]
    with ServingClient(deployment["target"], model_name="faces", version_label="stable") as client:
        assert [s["version"] for s in client.status()] == [1]


def test_version_and_label_pick_the_servable(deployment, stub):
    image = random_pngs(1, seed=5)
    for spec, version in (({"version": 1}, 1), ({"version_label": "canary"}, 2), ({}, 2)):
        response = stub.Predict(request(image, **spec), timeout=10)
        assert response.model_spec.version.value == version
    v1 = stub.Predict(request(image, version=1), timeout=10).outputs["age_group_probabilities"]
    v2 = stub.Predict(request(image, version=2), timeout=10).outputs["age_group_probabilities"]
    assert not np.allclose(tf.make_ndarray(v1), tf.make_ndarray(v2))  # different weights


BAD_REQUESTS = {
    "garbage bytes": (lambda: request([b"not an image at all"]), grpc.StatusCode.INVALID_ARGUMENT, "not an encoded image"),
    "corrupt png": (
        lambda: request([b"\x89PNG\r\n\x1a\n" + b"\x00" * 40]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "PNG",
    ),
    # A photo that fails to decode inside a larger request is named.
    "corrupt png among good ones": (
        lambda: request(random_pngs(2) + [b"\x89PNG\r\n\x1a\n" + b"\x00" * 40] + random_pngs(1, seed=9)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "the model refused the input: images[2]: ",
    ),
    "empty batch": (lambda: request([]), grpc.StatusCode.INVALID_ARGUMENT, "empty batch"),
    "wrong dtype": (
        lambda: request(tensor=tf.make_tensor_proto(np.zeros((1,), np.float32))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "must be string, got float32",
    ),
    "a dtype number no dtype has": (
        lambda: request(tensor=tensor_pb2.TensorProto(dtype=999)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "must be string, got dtype enum 999",
    ),
    "wrong shape": (
        lambda: request(
            signature="serving_uint8", key="images_uint8", tensor=tf.make_tensor_proto(np.zeros((1, 8, 8, 3), np.uint8))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "shape [1, 8, 8, 3]",
    ),
    "unknown model": (lambda: request(random_pngs(1), model="nope"), grpc.StatusCode.NOT_FOUND, "'nope'"),
    "unknown version": (lambda: request(random_pngs(1), version=9), grpc.StatusCode.NOT_FOUND, "version 9"),
    "unknown label": (lambda: request(random_pngs(1), version_label="beta"), grpc.StatusCode.NOT_FOUND, "'beta'"),
    "unknown signature": (lambda: request(random_pngs(1), signature="sing"), grpc.StatusCode.NOT_FOUND, "'sing'"),
    "unknown input": (lambda: request(random_pngs(1), key="pictures"), grpc.StatusCode.INVALID_ARGUMENT, "'pictures'"),
    "oversized image": (
        lambda: request([png(np.zeros((MAX_SIDE + 1, 8, 3)))]),
        grpc.StatusCode.INVALID_ARGUMENT,
        f"largest side allowed is {MAX_SIDE}",
    ),
    # One model call's memory grows with its images: a request may hold at
    # most max_batch_size (8 here), as with TF Serving's batching.
    "more images than max_batch_size": (
        lambda: request(random_pngs(1) * 9),
        grpc.StatusCode.INVALID_ARGUMENT,
        "holds 9 images; this server takes at most 8 per request",
    ),
    # make_ndarray would fill these out to the declared shape: thousands of
    # images from a request of a few bytes.
    "fewer strings than the shape": (
        lambda: request(tensor=_declared(tf.make_tensor_proto(random_pngs(1)), [3000])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "declares shape [3000] (3000 values) but carries 1",
    ),
    # The image kinds the serving signature refuses, named before the batch runs.
    "gif": (
        lambda: request(random_pngs(1) + [pil_encoded(np.zeros((20, 20, 3)), "GIF")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "images[1] is a GIF: TensorFlow decodes every frame",
    ),
    "1-bit bmp": (
        lambda: request([pil_encoded(np.zeros((20, 20, 3)), "BMP", mode="1")]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "images[0] is a BMP TensorFlow cannot decode (compressed, or of other than 8, 24 or 32 bits per pixel)",
    ),
    "animated webp": (
        lambda: request([animated_webp()]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "images[0] is an animated WebP",
    ),
    # make_ndarray reads only the dtype's own field: these pixels would be zeros.
    "pixels in the wrong field": (
        lambda: request(
            signature="serving_uint8", key="images_uint8", tensor=uint8_tensor(float_val=[200.0] * (SIZE * SIZE * 3))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'images_uint8' is uint8 but its values are in float_val; uint8 values go in int_val or tensor_content",
    ),
    "pixels in two fields": (
        lambda: request(
            signature="serving_uint8",
            key="images_uint8",
            tensor=uint8_tensor(tensor_content=bytes(SIZE * SIZE * 3), int_val=[7] * (SIZE * SIZE * 3)),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'images_uint8' carries values in both",
    ),
    "strings in tensor_content": (
        lambda: request(
            tensor=tensor_pb2.TensorProto(
                dtype=types_pb2.DT_STRING,
                tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[{"size": 1}]),
                tensor_content=random_pngs(1)[0],
            )
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "input 'images' is string but its values are in tensor_content; string values go in string_val",
    ),
    # As TF Serving: the answer would carry that output twice.
    "an output filtered twice": (
        lambda: _filtered(request(random_pngs(1)), ["Smiling_label", "age_group_label", "Smiling_label"]),
        grpc.StatusCode.INVALID_ARGUMENT,
        "duplicate output tensor alias 'Smiling_label'",
    ),
    "pixels missing": (
        lambda: request(
            signature="serving_uint8",
            key="images_uint8",
            tensor=_declared(tf.make_tensor_proto(np.zeros((0,), np.uint8)), [20000, 16, 16, 3]),
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "declares shape [20000, 16, 16, 3]",
    ),
}


def _filtered(req, names):
    req.output_filter.extend(names)
    return req


def _declared(proto, dims):
    """The tensor with another declared shape (what a hostile client can send)."""
    del proto.tensor_shape.dim[:]
    for size in dims:
        proto.tensor_shape.dim.add(size=size)
    return proto


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_are_refused_and_the_server_keeps_serving(deployment, stub, case):
    make, code, message = BAD_REQUESTS[case]
    with pytest.raises(grpc.RpcError) as info:
        stub.Predict(make(), timeout=10)
    assert info.value.code() == code
    assert message in info.value.details()
    good = stub.Predict(request(random_pngs(2)), timeout=10)
    assert tf.make_ndarray(good.outputs["Smiling_label"]).shape == (2,)


def test_metadata_refuses_unknown_fields(stub):
    req = get_model_metadata_pb2.GetModelMetadataRequest(
        model_spec=model_pb2.ModelSpec(name="faces"), metadata_field=["nonsense"]
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.GetModelMetadata(req, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "nonsense" in info.value.details()


def test_concurrent_requests_are_batched_and_split_back_correctly(deployment, stub):
    server, loaded = deployment["server"], deployment["loaded"]
    payloads = [random_pngs(1 + i % 2, seed=100 + i) for i in range(10)]
    payloads[3] = [b"\x89PNG\r\n\x1a\n" + b"\x01" * 40]  # breaks a merged batch; must only fail itself
    before = len(server.batch_sizes("faces", 2))
    barrier = threading.Barrier(len(payloads))

    def call(images):
        barrier.wait()
        try:
            return stub.Predict(request(images), timeout=20)
        except grpc.RpcError as e:
            return e

    with concurrent.futures.ThreadPoolExecutor(len(payloads)) as pool:
        responses = list(pool.map(call, payloads))
    for i, (images, response) in enumerate(zip(payloads, responses)):
        if i == 3:
            assert response.code() == grpc.StatusCode.INVALID_ARGUMENT
            continue
        expected = direct(loaded, images)
        for key in ("Smiling_probabilities", "age_group_probabilities", "age_group_class_id"):
            np.testing.assert_allclose(tf.make_ndarray(response.outputs[key]), expected[key], atol=1e-5)
    sizes = server.batch_sizes("faces", 2)[before:]
    assert isinstance(sizes, list)
    assert max(sizes) > 2  # some requests were merged
    assert max(sizes) <= server.max_batch_size


def test_without_a_timeout_requests_that_queue_during_a_model_call_form_the_next_batch():
    calls, running, release = [], threading.Event(), threading.Event()

    def model(arrays):  # the first call holds the model until released
        calls.append(len(arrays["x"]))
        if len(calls) == 1:
            running.set()
            assert release.wait(20)
        return {"y": arrays["x"] * 2}

    batcher = Batcher(model, max_batch_size=8, timeout_s=0.0, label="test-batcher")
    results = {}

    def submit(i):
        results[i] = batcher.submit({"x": np.array([i])}, 1, 20)

    threads = [threading.Thread(target=submit, args=(0,))]
    threads[0].start()
    assert running.wait(20)  # the lone first request runs on its own
    threads += [threading.Thread(target=submit, args=(i,)) for i in range(1, 5)]
    for t in threads[1:]:
        t.start()
    deadline = time.monotonic() + 20
    while len(batcher._queue) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for t in threads:
        t.join(20)
    batcher.stop()
    assert calls == [1, 4]
    assert {i: results[i]["y"].tolist() for i in results} == {i: [2 * i] for i in range(5)}


def test_stopping_the_batcher_releases_callers_of_a_running_call_and_queued_ones():
    from tfface.serving.server import RequestError
    from tfface.serving.batcher import Batcher

    running, release = threading.Event(), threading.Event()

    def slow_model(arrays):  # a long call, as a huge batch on a busy CPU
        running.set()
        release.wait(30)
        return {"y": arrays["x"]}

    batcher = Batcher(slow_model, max_batch_size=1, timeout_s=0.0, label="test-batcher-stop")
    errors = {}

    def submit(i):
        try:
            batcher.submit({"x": np.array([i])}, 1, None)  # no deadline
        except RequestError as e:
            errors[i] = e.code

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(2)]
    threads[0].start()
    assert running.wait(20)
    threads[1].start()  # queued behind the running call
    deadline = time.monotonic() + 20
    while len(batcher._queue) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    start = time.monotonic()
    batcher.stop(timeout_s=0.5)
    for t in threads:
        t.join(5)
    try:
        assert not any(t.is_alive() for t in threads)
        assert time.monotonic() - start < 5  # not held until the model call ends (30 s)
        assert errors == {0: grpc.StatusCode.UNAVAILABLE, 1: grpc.StatusCode.UNAVAILABLE}
    finally:
        release.set()


def test_unbatched_server_gives_the_same_answers_and_limits_message_size(deployment):
    images = random_pngs(3, seed=7)
    limit = 64 * 1024
    with LocalModelServer(deployment["root"] / "faces", enable_batching=False, max_message_bytes=limit) as server:
        with ServingClient(server.target, model_name="faces") as client:
            results = client.predict(images)
            huge = png(np.random.default_rng(0).integers(0, 256, (200, 200, 3)))  # ~120 KB
            with pytest.raises(ServingError) as info:
                client.predict([huge])
            assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert len(client.predict(images[:1])) == 1  # still serving
        with grpc.insecure_channel(server.target) as channel:
            corrupt = b"\x89PNG\r\n\x1a\n" + b"\x00" * 40
            with pytest.raises(grpc.RpcError) as info:
                prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(
                    request([images[0], corrupt, images[1]]), timeout=10
                )
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "images[1]: " in info.value.details() and "images[0]" not in info.value.details()
    expected = direct(deployment["loaded"], images)
    got = np.array([[r["Smiling"]["probabilities"]["no"], r["Smiling"]["probabilities"]["yes"]] for r in results])
    np.testing.assert_allclose(got, expected["Smiling_probabilities"], atol=1e-6)
    assert not [t for t in threading.enumerate() if t.name.startswith(server.thread_prefix)]  # clean shutdown


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_client_gives_a_clear_error_when_nothing_listens():
    client = ServingClient(f"127.0.0.1:{free_port()}", model_name="faces", retries=2, backoff_s=0.05, timeout_s=2)
    start = time.monotonic()
    with pytest.raises(ServingError, match="unavailable after 3 attempt") as info:
        client.predict(random_pngs(1))
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - start < 10
    client.close()


def test_client_retries_until_a_late_server_is_up(deployment):
    port = free_port()
    server = LocalModelServer(deployment["root"] / "faces", port=port)
    server.load()
    starter = threading.Timer(0.6, server.start)
    starter.start()
    try:
        with ServingClient(f"127.0.0.1:{port}", model_name="faces", retries=8, backoff_s=0.1) as client:
            results = client.predict(random_pngs(1))
        assert set(results[0]) == {"Smiling", "age_group"}
    finally:
        starter.join()
        server.stop()


def test_client_names_bad_files_before_any_rpc(tmp_path):
    # Nothing listens there: reaching the network would raise ServingError instead.
    client = ServingClient(f"127.0.0.1:{free_port()}", model_name="faces", retries=0)
    missing = tmp_path / "missing.jpg"
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        client.predict([missing])
    with pytest.raises(IsADirectoryError, match=r"is a folder, not an image file"):
        client.predict([tmp_path])
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ValueError, match="notes.txt is not an image"):
        client.predict([str(text)])
    with pytest.raises(ValueError, match="serving_uint8"):
        client.predict([np.zeros((SIZE, SIZE, 3), np.uint8)])
    client.close()


def test_query_main_prints_json_and_fails_cleanly(deployment, tmp_path, capsys):
    path = tmp_path / "a.png"
    path.write_bytes(random_pngs(1)[0])
    args = argparse.Namespace(host=deployment["target"], model="faces", images=[str(path)], json=True)
    assert query_main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed[0]["image"] == str(path)
    assert printed[0]["predictions"]["age_group"]["label"] in AGE_GROUPS
    args = argparse.Namespace(host=deployment["target"], model="nope", images=[str(path)], json=False)
    assert query_main(args) == 1  # the server refused
    assert "NOT_FOUND" in capsys.readouterr().err
    args = argparse.Namespace(host=deployment["target"], model="faces", images=[str(tmp_path / "no.png")], json=False)
    assert query_main(args) == 2  # a bad input, as everywhere in the CLI
    assert "no.png" in capsys.readouterr().err


def test_serve_main_serves_until_stopped(deployment, capsys):
    port = free_port()
    args = argparse.Namespace(model_dir=str(deployment["root"] / "faces"), port=port, host="127.0.0.1")
    stop = threading.Event()
    codes = []
    thread = threading.Thread(target=lambda: codes.append(serve_main(args, stop_event=stop)))
    thread.start()
    try:
        with ServingClient(f"127.0.0.1:{port}", model_name="faces", retries=10, backoff_s=0.1) as client:
            assert client.status()[0]["state"] == "AVAILABLE"
    finally:
        stop.set()
        thread.join(20)
    assert not thread.is_alive() and codes == [0]
    assert f"127.0.0.1:{port}" in capsys.readouterr().out
    bad = argparse.Namespace(model_dir=str(deployment["root"] / "missing"))
    assert serve_main(bad) == 2
    assert "model folder not found" in capsys.readouterr().err


def test_serve_main_takes_version_labels_and_query_picks_by_label(deployment, tmp_path, capsys):
    from tfface.cli import build_parser

    port = free_port()
    args = build_parser().parse_args(
        ["serve", "--model-dir", str(deployment["root"] / "faces"), "--port", str(port),
         "--version-label", "stable=1", "--version-label", "canary=2"]
    )
    stop = threading.Event()
    codes = []
    thread = threading.Thread(target=lambda: codes.append(serve_main(args, stop_event=stop)))
    thread.start()
    try:
        path = tmp_path / "a.png"
        path.write_bytes(random_pngs(1)[0])
        with ServingClient(f"127.0.0.1:{port}", model_name="faces", retries=10, backoff_s=0.1) as client:
            assert sorted(s["version"] for s in client.status()) == [1, 2]  # both labelled versions load
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            labelled = prediction_service_pb2_grpc.PredictionServiceStub(channel)
            for label, version in (("stable", 1), ("canary", 2)):
                response = labelled.Predict(request(random_pngs(1), version_label=label), timeout=10)
                assert response.model_spec.version.value == version
        query = argparse.Namespace(host=f"127.0.0.1:{port}", model="faces", images=[str(path)], json=True, version_label="beta")
        assert query_main(query) == 1
        assert "'beta'" in capsys.readouterr().err
    finally:
        stop.set()
        thread.join(20)
    assert codes == [0]
    twice = build_parser().parse_args(
        ["serve", "--model-dir", str(deployment["root"] / "faces"), "--version-label", "a=1", "--version-label", "a=2"]
    )
    assert serve_main(twice) == 2
    assert "label 'a' is given twice" in capsys.readouterr().err


def test_version_labels_can_be_given_per_model(deployment, tmp_path, capsys):
    import shutil

    from tfface.cli import build_parser

    base = tmp_path / "saved_models"
    for model, versions in (("faces", (1, 2)), ("other", (1,))):
        for version in versions:
            shutil.copytree(deployment["root"] / "faces" / str(version), base / model / str(version))
    server = LocalModelServer(base, port=0, version_labels={"stable": 1, "faces": {"canary": 2, "stable": 2}})
    assert server.labels_of("faces") == {"stable": 2, "canary": 2}  # its own mapping wins
    assert server.labels_of("other") == {"stable": 1}
    server.load()
    assert sorted(server.models["faces"]) == [2] and sorted(server.models["other"]) == [1]
    spec = model_pb2.ModelSpec(name="other", version_label="canary")
    with pytest.raises(Exception, match=r"model 'other' has no version label 'canary' \(labels: \['stable'\]\)"):
        server.resolve(spec)
    assert server.resolve(model_pb2.ModelSpec(name="faces", version_label="canary")).version == 2

    with pytest.raises(ValueError, match=r"version labels name model\(s\) \['fcaes'\], which .* does not hold"):
        LocalModelServer(base, port=0, version_labels={"fcaes": {"stable": 1}}).load()
    with pytest.raises(ValueError, match="version label faces:stable: the version must be a positive integer, got 0"):
        LocalModelServer(base, port=0, version_labels={"faces": {"stable": 0}})

    parse = build_parser().parse_args
    args = parse(["serve", "--model-dir", "m", "--version-label", "faces:canary=2", "--version-label", "stable=1"])
    assert args.version_labels == [("faces", "canary", 2), (None, "stable", 1)]
    for bad in (":canary=2", "faces:=2", "faces:canary"):
        with pytest.raises(SystemExit):
            parse(["serve", "--model-dir", "m", "--version-label", bad])
    twice = parse(["serve", "--model-dir", str(base), "--version-label", "faces:a=1", "--version-label", "faces:a=2"])
    assert serve_main(twice) == 2
    assert "label 'a' is given twice for model 'faces'" in capsys.readouterr().err
    wrong_model = parse(["serve", "--model-dir", str(base), "--port", "0", "--version-label", "nope:a=1"])
    assert serve_main(wrong_model) == 2
    assert "version labels name model(s) ['nope']" in capsys.readouterr().err


def test_serve_refuses_bad_ports_labels_timeouts_and_sides_and_brackets_ipv6():
    from tfface.cli import build_parser

    for bad in (
        ["--port", "99999"], ["--port", "-1"], ["--version-label", "stable"], ["--version-label", "stable=x"],
        ["--batch-timeout-ms", "nan"], ["--batch-timeout-ms", "inf"], ["--batch-timeout-ms", "-1"],
        ["--max-image-side", "0"],
    ):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--model-dir", "m", *bad])
    assert build_parser().parse_args(["serve", "--model-dir", "m", "--batch-timeout-ms", "2.5"]).batch_timeout_ms == 2.5
    with pytest.raises(ValueError, match="port must be in 0..65535"):
        LocalModelServer("m", port=70000)
    with pytest.raises(ValueError, match="batch_timeout_ms must be in 0..60000"):
        LocalModelServer("m", batch_timeout_ms=float("nan"))
    with pytest.raises(ValueError, match="max_image_side must be >= 1"):
        LocalModelServer("m", max_image_side=-5)
    assert LocalModelServer("m", host="::1", port=8500).target == "[::1]:8500"
    assert LocalModelServer("m", host="127.0.0.1", port=8500).target == "127.0.0.1:8500"


def test_an_unknown_signature_is_named_by_the_client(deployment, tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(random_pngs(1)[0])
    with ServingClient(deployment["target"], model_name="faces", signature="bogus") as client:
        with pytest.raises(ServingError, match="has no signature 'bogus'"):
            client.predict([str(path)])


def test_a_newest_version_that_does_not_load_leaves_the_last_good_one(deployment, tmp_path, caplog):
    import shutil

    model_dir = tmp_path / "faces"
    shutil.copytree(deployment["root"] / "faces" / "1", model_dir / "1")
    shutil.copytree(deployment["root"] / "faces" / "1", model_dir / "3")
    shutil.rmtree(model_dir / "3" / "variables")  # a copy cut short
    server = LocalModelServer(model_dir, port=0)
    server.load()
    assert sorted(server.models["faces"]) == [1]
    assert "skipping version 3" in caplog.text
    # With a version label too: the label's version is loaded besides.
    labelled = LocalModelServer(model_dir, port=0, version_labels={"stable": 1})
    labelled.load()
    assert sorted(labelled.models["faces"]) == [1]
    pinned = LocalModelServer(model_dir, port=0, versions=[3])
    with pytest.raises(RuntimeError, match=r"cannot load SavedModel .*3: [^\n]*$"):
        pinned.load()
    labelled_broken = LocalModelServer(model_dir, port=0, version_labels={"canary": 3})
    with pytest.raises(RuntimeError, match=r"cannot load SavedModel .*3"):
        labelled_broken.load()  # a label asks for its version by number


def test_a_certificates_file_that_is_no_pem_is_refused_up_front(tmp_path):
    bad = tmp_path / "bad.pem"
    bad.write_text("garbage")
    with pytest.raises(ValueError, match="bad.pem holds no PEM certificate"):
        ServingClient("localhost:1", model_name="faces", tls=True, root_certificates=str(bad))


def test_a_client_reads_the_class_names_of_the_version_that_answered(tmp_path):
    # A long-lived client read the schema of version 1; the server restarts
    # on version 2, whose classes are named otherwise.
    old = build_stand_in()
    export_saved_model(old, tmp_path, "faces", warmup_images=[])
    new = build_stand_in(seed=1)
    renamed = [f"band{i}" for i in range(len(AGE_GROUPS))]
    new.schema = Schema(
        [Task("Smiling", group="mouth"), Task("age_group", kind=MULTICLASS, classes=renamed)], name="stand_in"
    )
    export_saved_model(new, tmp_path, "faces", warmup_images=[])
    first = LocalModelServer(tmp_path / "faces", versions=[1])
    port = first.start()
    client = ServingClient(f"127.0.0.1:{port}", model_name="faces", retries=20, backoff_s=0.05)
    try:
        [before] = client.predict(random_pngs(1))
        assert before["age_group"]["label"] in AGE_GROUPS
        first.stop()
        with LocalModelServer(tmp_path / "faces", port=port, versions=[2]):
            [after] = client.predict(random_pngs(1))
            metadata = client.metadata()
        assert after["age_group"]["label"] in renamed
        assert set(after["age_group"]["probabilities"]) == set(renamed)
        # The metadata pairs version 2 with its own schema, not the one read first.
        assert metadata["version"] == 2 and metadata["schema"]["tasks"][1]["classes"] == renamed
    finally:
        client.close()
        first.stop()


def test_query_hosts_without_a_port_get_tf_servings_port_and_exif_rotation_is_applied(tmp_path):
    from PIL import Image, ImageOps

    from tfface.serving.client import upright
    from tfface.serving.client import with_default_port

    assert with_default_port("10.0.0.5") == "10.0.0.5:8500"
    assert with_default_port("serving.internal:9000") == "serving.internal:9000"
    assert with_default_port("[::1]") == "[::1]:8500" and with_default_port("::1") == "[::1]:8500"
    assert with_default_port("[::1]:7000") == "[::1]:7000"
    assert with_default_port("dns:///serving:8500") == "dns:///serving:8500"
    assert with_default_port("ipv4:10.0.0.5:9000") == "ipv4:10.0.0.5:9000"
    # gRPC would wrap 84036 to 18500, another server, and retry "abc" for 20 s as unreachable.
    for bad in ("127.0.0.1:84036", "127.0.0.1:abc", "127.0.0.1:0", "127.0.0.1:", ":8500", "[::1]:99999", "host:8500/", " "):
        with pytest.raises(ValueError, match="HOST:PORT with PORT a number in 1..65535|address is empty"):
            with_default_port(bad)

    pixels = np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    plain = pil_encoded(pixels, "JPEG")
    assert upright(plain) == plain  # no EXIF orientation: sent as it is
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    tagged = pil_encoded(pixels, "JPEG", exif=exif)
    turned = np.asarray(Image.open(io.BytesIO(upright(tagged))))
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(tagged))).convert("RGB"))
    assert turned.shape == (50, 40, 3)
    np.testing.assert_array_equal(turned, expected)
    # The client reads it as it is and notes the tag: whether it is turned
    # upright before sending depends on the export (tests/test_client.py).
    path = tmp_path / "phone.jpg"
    path.write_bytes(tagged)
    client = ServingClient("127.0.0.1:1", model_name="faces")
    try:
        sent, tagged_indices = client._read_images([pil_encoded(pixels, "PNG"), str(path)])
    finally:
        client.close()
    assert sent[1] == tagged and tagged_indices == {1}
    assert client.target == "127.0.0.1:1"


def test_the_image_a_refused_batch_holds_is_named(deployment, tmp_path):
    good = random_pngs(2)
    broken = tmp_path / "cut.png"
    broken.write_bytes(good[0][: len(good[0]) // 2])  # a PNG header, then nothing decodable
    with ServingClient(deployment["target"], model_name="faces") as client:
        with pytest.raises(ServingError, match=rf"^{re.escape(str(broken))}: image #1 .*INVALID_ARGUMENT"):
            client.predict([good[0], str(broken), good[1]])
        with pytest.raises(ServingError, match=r"^image #2 for model 'faces' .*INVALID_ARGUMENT"):  # named once
            client.predict([good[0], good[1], broken.read_bytes()])
        assert len(client.predict(good)) == 2  # the server serves on


def test_pixels_in_int_val_or_tensor_content_give_the_same_answer(deployment, stub):
    """The fields a DT_UINT8 tensor may use (TF Serving's clients send either)."""
    pixels = np.random.default_rng(8).integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
    answers = []
    by_field = (uint8_tensor(2, int_val=pixels.reshape(-1).tolist()), uint8_tensor(2, tensor_content=pixels.tobytes()))
    for tensor in by_field:
        response = stub.Predict(request(signature="serving_uint8", key="images_uint8", tensor=tensor), timeout=10)
        answers.append(tf.make_ndarray(response.outputs["age_group_probabilities"]))
    expected = deployment["loaded"].signatures["serving_uint8"](images_uint8=tf.constant(pixels))
    for answer in answers:
        np.testing.assert_allclose(answer, expected["age_group_probabilities"].numpy(), atol=1e-6)
    # A filter naming each output once still answers just those, in its order.
    response = stub.Predict(_filtered(request(random_pngs(1)), ["age_group_label", "Smiling_label"]), timeout=10)
    assert sorted(response.outputs) == ["Smiling_label", "age_group_label"]


def test_the_batcher_remembers_only_the_last_batch_sizes(monkeypatch):
    monkeypatch.setattr(batcher_module, "MAX_BATCH_SIZES_KEPT", 3)
    batcher = Batcher(lambda arrays: {"y": arrays["x"]}, max_batch_size=8, timeout_s=0.0, label="test-batcher")
    try:
        for size in range(1, 6):
            batcher.submit({"x": np.zeros(size)}, size, 20)
    finally:
        batcher.stop()
    assert list(batcher.batch_sizes) == [3, 4, 5]


def test_classify_regress_and_multi_inference_answer_unimplemented_without_a_traceback(deployment, stub, caplog, capfd):
    spec = model_pb2.ModelSpec(name="faces")
    calls = (
        (stub.Classify, classification_pb2.ClassificationRequest(model_spec=spec)),
        (stub.Regress, regression_pb2.RegressionRequest(model_spec=spec)),
        (stub.MultiInference, inference_pb2.MultiInferenceRequest()),
    )
    errors = []
    with caplog.at_level(logging.INFO):
        for method, req in calls:
            with pytest.raises(grpc.RpcError) as info:
                method(req, timeout=10)
            errors.append(info.value)
    assert [e.code() for e in errors] == [grpc.StatusCode.UNIMPLEMENTED] * 3
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert "Traceback" not in capfd.readouterr().err
    assert all("use Predict" in e.details() for e in errors)
