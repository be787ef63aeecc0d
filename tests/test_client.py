"""ServingClient: images the signature refuses, 16-bit photos turned upright,
requests split by size, and retries that ride out a server restart."""

import argparse
import io
import json
import struct
import threading
import time
import zlib

import grpc
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from harness import pil_encoded, rle8_bmp
from test_serving import build_stand_in, direct, free_port, png, random_pngs
from tfface.data.image_ops import decode_image, decode_upright, refused_image_reason
from tfface.export.saved_model import export_saved_model, load_exported
from tfface.serving import client as client_module
from tfface.serving.client import ServingClient, ServingError, query_main, sendable, upright
from tfface.serving.server import LocalModelServer


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved_models")
    export_saved_model(build_stand_in(), root, "faces", warmup_images=[])
    loaded, _ = load_exported(root / "faces" / "1")
    server = LocalModelServer(root / "faces", batch_timeout_ms=5)
    port = server.start()
    yield {"root": root, "target": f"127.0.0.1:{port}", "port": port, "loaded": loaded}
    server.stop()


def smiling(results):
    return np.array([[r["Smiling"]["probabilities"]["no"], r["Smiling"]["probabilities"]["yes"]] for r in results])


def rotate_90_exif():
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    return exif


def with_png_exif(data: bytes, exif: Image.Exif) -> bytes:
    """A PNG with an eXIf chunk after IHDR (PIL cannot write 16-bit RGB)."""
    tiff = exif.tobytes()
    tiff = tiff[6:] if tiff.startswith(b"Exif\0\0") else tiff
    chunk = struct.pack(">I", len(tiff)) + b"eXIf" + tiff + struct.pack(">I", zlib.crc32(b"eXIf" + tiff))
    return data[:33] + chunk + data[33:]  # signature (8) + IHDR (25)


def first_frame(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def refused_kinds():
    rng = np.random.default_rng(3)
    frames = [Image.fromarray(rng.integers(0, 256, (30, 24, 3), dtype=np.uint8)) for _ in range(2)]
    gif = pil_encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    one_bit_bmp = pil_encoded(frames[0].convert("1"), "BMP")
    webp = pil_encoded(
        frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, exif=rotate_90_exif(), lossless=True
    )
    palette_bmp = pil_encoded(frames[0].convert("P"), "BMP")  # TensorFlow alone reads its indices as grey
    return {"gif": gif, "1-bit bmp": one_bit_bmp, "8-bit bmp": palette_bmp, "animated webp": webp, "rle bmp": rle8_bmp()}


def test_refused_kinds_are_sent_as_png_of_their_first_frame(served, tmp_path):
    kinds = refused_kinds()
    for name, data in kinds.items():
        assert refused_image_reason(data) is not None, name
        sent = sendable(data)
        assert sent[:8] == b"\x89PNG\r\n\x1a\n" and refused_image_reason(sent) is None, name
        # The first frame as PIL shows it, upright (the WebP is tagged "rotate 90").
        np.testing.assert_array_equal(decode_image(sent).numpy(), first_frame(data), err_msg=name)
    assert first_frame(kinds["animated webp"]).shape == (24, 30, 3)
    path = tmp_path / "animated.gif"
    path.write_bytes(kinds["gif"])
    with ServingClient(served["target"], model_name="faces") as client:
        results = client.predict([str(path), *(kinds[k] for k in ("1-bit bmp", "8-bit bmp", "animated webp", "rle bmp"))])
    expected = direct(served["loaded"], [png(first_frame(d)) for d in kinds.values()])
    np.testing.assert_allclose(smiling(results), expected["Smiling_probabilities"], atol=1e-6)
    unreadable = r"image #0 \(bytes\): the server does not take a GIF.*could not convert it: PIL cannot read it"
    with ServingClient("127.0.0.1:1", model_name="faces") as offline, pytest.raises(ValueError, match=unreadable):
        offline._read_images([b"GIF89a" + b"\0" * 40])


@pytest.mark.parametrize("kind", ["grey", "rgb"])
def test_16_bit_photos_turned_upright_keep_the_pixels_the_server_decodes(served, kind):
    rng = np.random.default_rng(5)
    if kind == "grey":  # PIL reads it as "I;16"; convert("RGB") clipped every level over 255 to white
        levels = rng.integers(0, 65536, (20, 30), dtype=np.uint16)
        original = pil_encoded(Image.fromarray(levels), "PNG", exif=rotate_90_exif())
        assert Image.open(io.BytesIO(original)).mode.startswith("I")
    else:
        levels = rng.integers(0, 65536, (20, 30, 3), dtype=np.uint16)
        original = with_png_exif(tf.io.encode_png(levels).numpy(), rotate_90_exif())
    expected = decode_upright(original).numpy()
    assert expected.shape == (30, 20, 3)  # the server's reference reads the tag too
    sent = upright(original)
    assert sent != original
    np.testing.assert_array_equal(decode_image(sent).numpy(), expected)  # exact: both keep the high byte
    with ServingClient(served["target"], model_name="faces") as client:
        results = client.predict([original])
    np.testing.assert_allclose(
        smiling(results), direct(served["loaded"], [original])["Smiling_probabilities"], atol=1e-6
    )


class Recorder:
    """Stands in for the PredictionService stub, noting each Predict
    request's size and the encoded images it carries."""

    def __init__(self, stub):
        self.stub = stub
        self.sizes = []
        self.images = []

    def Predict(self, request, timeout=None):
        if request.model_spec.signature_name != "schema":
            self.sizes.append(request.ByteSize())
            self.images.append(list(tf.make_ndarray(request.inputs["images"]).reshape(-1)))
        return self.stub.Predict(request, timeout=timeout)

    def __getattr__(self, name):
        return getattr(self.stub, name)


def as_an_old_export(read_schema):
    """`ServingClient._read_schema` as an export before 0.2.4 answers it."""

    def read(self, version=None):
        schema, _, answered = read_schema(self, version)
        return schema, {}, answered

    return read


def test_a_call_is_split_into_requests_under_the_message_limit(served, tmp_path, monkeypatch):
    limit = 300_000
    rng = np.random.default_rng(7)
    images = [png(rng.integers(0, 256, (200, 200, 3))) for _ in range(6)]  # ~120 KB each, 720 KB in all
    with ServingClient(served["target"], model_name="faces", max_message_bytes=limit) as client:
        client._prediction = recorder = Recorder(client._prediction)
        results = client.predict(images, batch_size=32)
    assert len(recorder.sizes) == 3 and max(recorder.sizes) <= limit  # 2 images a request
    assert sum(recorder.sizes) > sum(map(len, images))
    np.testing.assert_allclose(smiling(results), direct(served["loaded"], images)["Smiling_probabilities"], atol=1e-6)

    # A phone photo turned upright as PNG is far larger than its JPEG: an
    # export that turns it upright itself gets the JPEG; for an older one
    # the PNG is too large, and the client says so before sending images.
    photo = tmp_path / "phone.jpg"
    noise = Image.fromarray(rng.integers(0, 256, (400, 400, 3), dtype=np.uint8))
    photo.write_bytes(pil_encoded(noise, "JPEG", quality=20, exif=rotate_90_exif()))
    assert photo.stat().st_size < limit // 2 and len(upright(photo.read_bytes())) > limit
    with ServingClient(served["target"], model_name="faces", max_message_bytes=limit) as client:
        client._prediction = recorder = Recorder(client._prediction)
        [result] = client.predict([str(photo)])
    assert recorder.images == [[photo.read_bytes()]]
    monkeypatch.setattr(ServingClient, "_read_schema", as_an_old_export(ServingClient._read_schema))
    with ServingClient(served["target"], model_name="faces", max_message_bytes=limit) as client:
        client._prediction = recorder = Recorder(client._prediction)
        with pytest.raises(ValueError, match=rf"^{photo}: [0-9,]+ bytes as PNG \(re-encoded from [0-9,]+ bytes to turn it upright .*0\.2\.4\) exceed"):
            client.predict([images[0], str(photo)])
    assert recorder.images == []
    nothing_listens = ServingClient(f"127.0.0.1:{free_port()}", model_name="faces", max_message_bytes=limit, retries=0)
    with pytest.raises(ValueError, match=r"^image #1 \(bytes\): [0-9,]+ bytes exceed .* max_message_bytes=300,000"):
        nothing_listens.predict([images[0], png(rng.integers(0, 256, (400, 400, 3)))])  # refused before any request
    nothing_listens.close()


def test_the_message_limit_is_set_from_the_command_line(served, tmp_path, capsys):
    """`tfface serve` and `tfface query --max-message-bytes`: the server refuses a larger
    request, and a client given the same limit splits its call to stay under it."""
    from tfface.cli import build_parser
    from tfface.cli import main as cli_main
    from tfface.serving.server import serve_main

    limit = 300_000
    rng = np.random.default_rng(8)
    files = []
    for i in range(4):  # ~120 KB each
        files.append(tmp_path / f"{i}.png")
        files[-1].write_bytes(png(rng.integers(0, 256, (200, 200, 3))))
    stop = threading.Event()
    port = free_port()
    args = build_parser().parse_args(
        ["serve", "--model-dir", str(served["root"] / "faces"), "--port", str(port), "--max-message-bytes", str(limit)]
    )
    thread = threading.Thread(target=serve_main, args=(args, stop), daemon=True)
    thread.start()
    try:
        query = ["query", *map(str, files), "--model", "faces", "--host", f"127.0.0.1:{port}", "--json"]
        assert cli_main(query) == 1  # one request of 480 KB
        assert "RESOURCE_EXHAUSTED" in capsys.readouterr().err
        assert cli_main(query + ["--max-message-bytes", str(limit)]) == 0
        assert len(json.loads(capsys.readouterr().out)) == 4
    finally:
        stop.set()
        thread.join(30)
    with pytest.raises(SystemExit):
        cli_main(["serve", "--model-dir", "m", "--max-message-bytes", str(2**31)])
    assert "must be in 4096..2147483647 bytes" in capsys.readouterr().err


def tagged_photo():
    pixels = np.random.default_rng(11).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    return pil_encoded(pixels, "JPEG", quality=90, exif=rotate_90_exif())


def test_tagged_photos_go_as_they_are_to_exports_that_turn_them_upright(served):
    """Except those whose tag the serving graph does not read: a WebP's
    (after the pixels), and one behind a 5 KB comment (past the 4 KiB the
    graph reads); PIL reads both, so the client turns them upright."""
    import tfface

    photo, plain = tagged_photo(), png(np.full((30, 30, 3), 90, np.uint8))
    pixels = np.random.default_rng(12).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    webp = pil_encoded(pixels, "WEBP", exif=rotate_90_exif(), lossless=True)
    comment = b"\xff\xfe" + struct.pack(">H", 5002) + b"c" * 5000
    late_tag = photo[:2] + comment + photo[2:]
    assert decode_upright(late_tag).shape == (40, 56, 3) and first_frame(late_tag).shape == (56, 40, 3)
    with ServingClient(served["target"], model_name="faces") as client:
        info = client.export_info()
        client._prediction = recorder = Recorder(client._prediction)
        results = client.predict([plain, photo, webp, late_tag])
    assert info["tfface_version"] == tfface.__version__ and info["applies_exif_orientation"] is True
    assert info["image_size"] == served["loaded"].signatures["serving_uint8"].structured_input_signature[1]["images_uint8"].shape[1]
    # The JPEG itself, not a PNG turned upright; the other two turned.
    assert recorder.images == [[plain, photo, upright(webp), upright(late_tag)]]
    expected = direct(served["loaded"], [plain, photo, upright(webp), upright(late_tag)])["Smiling_probabilities"]
    # The server turned the JPEG: the same as sending it upright.
    as_upright = direct(served["loaded"], [plain, png(decode_upright(photo).numpy())])["Smiling_probabilities"]
    np.testing.assert_allclose(expected[:2], as_upright, atol=1e-6)
    np.testing.assert_allclose(smiling(results), expected, atol=1e-6)


def test_tagged_photos_are_turned_upright_for_exports_that_do_not_say_they_turn_them(served, monkeypatch):
    photo, plain = tagged_photo(), png(np.full((30, 30, 3), 90, np.uint8))
    monkeypatch.setattr(ServingClient, "_read_schema", as_an_old_export(ServingClient._read_schema))
    with ServingClient(served["target"], model_name="faces") as client:
        client._prediction = recorder = Recorder(client._prediction)
        results = client.predict([plain, photo])
        assert client.export_info() == {}
    [[sent_plain, sent_photo]] = recorder.images
    assert sent_plain == plain and sent_photo == upright(photo) and sent_photo[:4] == b"\x89PNG"
    np.testing.assert_allclose(
        smiling(results), direct(served["loaded"], [plain, upright(photo)])["Smiling_probabilities"], atol=1e-6
    )


def test_a_request_answered_by_a_version_that_does_not_turn_photos_is_sent_again_upright(served, monkeypatch):
    """A rollback to an older export between reading the schema and a
    request: the version that answered is looked up, and the photos sent as
    they are go again, upright."""
    photo, plain = tagged_photo(), png(np.full((30, 30, 3), 90, np.uint8))
    export_of = ServingClient._export_of
    monkeypatch.setattr(ServingClient, "_export_of", lambda self, version, schema: (export_of(self, version, schema)[0], {}))
    with ServingClient(served["target"], model_name="faces") as client:
        assert client.export_info()["applies_exif_orientation"]
        client._prediction = recorder = Recorder(client._prediction)
        results = client.predict([photo, plain, photo], batch_size=2)
    assert recorder.images == [[photo, plain], [upright(photo), plain], [photo], [upright(photo)]]
    np.testing.assert_allclose(
        smiling(results), direct(served["loaded"], [upright(photo), plain, upright(photo)])["Smiling_probabilities"], atol=1e-6
    )


class RpcFailure(grpc.RpcError):
    def __init__(self, code, details=None):
        self._code = code
        self._details = details

    def code(self):
        return self._code

    def details(self):
        return self._details or f"stand-in {self._code.name}"


def test_failures_that_waiting_cannot_mend_are_not_retried(monkeypatch):
    client = ServingClient("127.0.0.1:1", model_name="faces", tls=True)
    monkeypatch.setattr(client_module.time, "sleep", lambda s: pytest.fail("retried a lasting failure"))
    for details, hint in (
        ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Ssl handshake failed: "
         "SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED", "--root-certificates"),
        ("failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: Ssl handshake failed: "
         "SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER", "drop --tls"),
    ):
        calls = []

        def method(request, timeout):
            calls.append(timeout)
            raise RpcFailure(grpc.StatusCode.UNAVAILABLE, details)

        with pytest.raises(ServingError, match="cannot reach") as info:
            client._call(method, None, "Predict")
        assert len(calls) == 1 and hint in str(info.value)
    # A name that does not resolve may yet (a headless Kubernetes service before a server is ready).
    slept = []
    monkeypatch.setattr(client_module.time, "sleep", slept.append)

    def unresolved(request, timeout):
        raise RpcFailure(grpc.StatusCode.UNAVAILABLE, "DNS resolution failed for serving:8500: C-ares status is not ARES_SUCCESS")

    with pytest.raises(ServingError, match="unavailable after 9 attempt"):
        client._call(unresolved, None, "Predict")
    assert len(slept) == 8
    client.close()
    # A huge retry count waits at most max_backoff_s each time instead of overflowing a float.
    many = ServingClient("127.0.0.1:1", model_name="faces", retries=2000)
    assert len(many.backoff_waits()) == 2000 and max(many.backoff_waits()) == many.max_backoff_s
    many.close()
    with pytest.raises(ValueError, match="timeout_s must be in"):  # gRPC fails a 1e10 s deadline at once
        ServingClient("127.0.0.1:1", model_name="faces", timeout_s=1e10)


def test_a_request_refused_for_its_size_is_not_sent_again_image_by_image(served, monkeypatch):
    small = LocalModelServer(served["root"] / "faces", max_batch_size=2)
    port = small.start()
    client = ServingClient(f"127.0.0.1:{port}", model_name="faces")
    monkeypatch.setattr(client, "_name_refused_image", lambda *a: pytest.fail("ran every image to name none"))
    try:
        with pytest.raises(ServingError, match="at most 2 per request.*--batch-size"):
            client.predict(random_pngs(5), batch_size=5)
        assert len(client.predict(random_pngs(5), batch_size=2)) == 5
    finally:
        client.close()
        small.stop()


def test_retries_ride_out_a_restart_only_after_unavailable(monkeypatch):
    client = ServingClient("127.0.0.1:1", model_name="faces", backoff_jitter=0)
    waits = client.backoff_waits()
    assert 0.8 * sum(waits) >= 15 and max(waits) <= 4  # a restart of ~15 s even at -20% jitter, never one long wait
    slept = []
    monkeypatch.setattr(client_module.time, "sleep", slept.append)
    for code, attempts, message in (
        (grpc.StatusCode.UNAVAILABLE, client.retries + 1, "unavailable after 9 attempt(s)"),
        (grpc.StatusCode.INVALID_ARGUMENT, 1, "failed (INVALID_ARGUMENT)"),
    ):
        calls, slept[:] = [], []

        def method(request, timeout):
            calls.append(timeout)
            raise RpcFailure(code)

        with pytest.raises(ServingError) as info:
            client._call(method, None, "Predict")
        assert info.value.code == code and message in str(info.value)
        assert len(calls) == attempts and slept == waits[: attempts - 1]
    client.close()
    with pytest.raises(ValueError, match="backoff_s"):
        ServingClient("127.0.0.1:1", model_name="faces", backoff_s=5, max_backoff_s=1)
    with pytest.raises(ValueError, match="backoff_jitter"):
        ServingClient("127.0.0.1:1", model_name="faces", backoff_jitter=1)
    with pytest.raises(ValueError, match=r"version must be in 1\.\.9223372036854775807"):
        ServingClient("127.0.0.1:1", model_name="faces", version=2**63)


def test_clients_dropped_together_do_not_retry_in_lockstep(monkeypatch):
    """By default each wait is drawn within +-20% of its nominal value, as
    gRPC's reconnect backoff: a restart no longer brings every client back at
    the same instant."""
    slept = []
    monkeypatch.setattr(client_module.time, "sleep", slept.append)

    def method(request, timeout):
        raise RpcFailure(grpc.StatusCode.UNAVAILABLE)

    runs = []
    for _ in range(2):
        client = ServingClient("127.0.0.1:1", model_name="faces")
        slept.clear()
        with pytest.raises(ServingError):
            client._call(method, None, "Predict")
        nominal = client.backoff_waits()
        assert len(slept) == len(nominal)
        assert all(0.8 * w <= s <= 1.2 * w for s, w in zip(slept, nominal))
        runs.append(list(slept))
        client.close()
    assert runs[0] != runs[1] and runs[0] != nominal


def test_default_settings_ride_out_a_server_restart(served):
    port = free_port()
    first = LocalModelServer(served["root"] / "faces", port=port)
    first.start()
    second = LocalModelServer(served["root"] / "faces", port=port)
    second.load()
    client = ServingClient(f"127.0.0.1:{port}", model_name="faces")
    try:
        assert len(client.predict(random_pngs(1))) == 1
        first.stop()
        restart = threading.Timer(3.0, second.start)  # old defaults gave up after 1.4 s
        restart.start()
        began = time.monotonic()
        assert len(client.predict(random_pngs(2))) == 2
        assert time.monotonic() - began >= 2.5
    finally:
        restart.join()
        client.close()
        first.stop()
        second.stop()


def test_query_takes_retries_and_timeout(served, tmp_path, capsys):
    from tfface.cli import build_parser

    path = tmp_path / "a.gif"
    path.write_bytes(refused_kinds()["gif"])
    parse = build_parser().parse_args
    args = parse(
        ["query", "--host", served["target"], "--model", "faces", "--retries", "0", "--timeout", "5", str(path)]
    )
    assert (args.retries, args.timeout) == (0, 5.0)
    assert parse(["query", "--model", "faces", "x.png"]).retries is None  # the client's default
    assert query_main(args) == 0
    assert str(path) in capsys.readouterr().out
    dead = parse(["query", "--host", f"127.0.0.1:{free_port()}", "--model", "faces", "--retries", "0", str(path)])
    began = time.monotonic()
    assert query_main(dead) == 1
    assert "unavailable after 1 attempt(s)" in capsys.readouterr().err and time.monotonic() - began < 5
    assert query_main(argparse.Namespace(**{**vars(dead), "retries": -1})) == 2
    assert "retries must be >= 0" in capsys.readouterr().err
    assert query_main(argparse.Namespace(**{**vars(dead), "timeout": float("inf")})) == 2  # not "no answer within inf s"
    assert "timeout_s must be in" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # and the command line says so first
        parse(["query", "--model", "faces", "--timeout", "inf", "x.png"])
    assert "must be a finite number > 0, got inf" in capsys.readouterr().err
