"""A local gRPC server that speaks TF Serving's API, for development and tests.

`LocalModelServer` serves tfface exports (`saved_models/NAME/VERSION/`) over
the same `PredictionService` / `ModelService` gRPC API as TF Serving, so
`ServingClient` and `tfface query` work against either. It exists so a
laptop without Docker or a GPU can serve a model, and so tests can run the
whole export -> serve -> query path in-process. For production use TF
Serving (`serving/compose.yaml`).

Like TF Serving it batches: concurrent Predict requests for the same
model, version and signature are merged into one model call (up to
`max_batch_size` rows or `batch_timeout_ms` after the first request; by
default no wait, so the requests that queue while a batch runs form the
next one), then split back. A bad request is rejected before it can join
a batch, and if a merged call still fails the requests are rerun one by
one, so one client's garbage never fails another client's request.

The parts it is built from live beside it: `servables` (finding and
loading exports), `batcher` (merging requests), `tensors` (checking a
request's tensors) and `errors` (refusing a request with a gRPC status).
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Optional, Union

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    classification_pb2,
    get_model_metadata_pb2,
    get_model_status_pb2,
    inference_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
    regression_pb2,
)

from tfface.data.image_ops import DECODABLE_FORMATS, image_format, image_size_from_header, refused_image_reason
from tfface.export.saved_model import DEFAULT_MAX_IMAGE_SIDE, SERVING_DEFAULT
from tfface.serving.batcher import MAX_BATCH_SIZES_KEPT, Batcher
from tfface.serving.errors import RequestError, invalid, not_found, tf_error_to_request_error
from tfface.serving.servables import (
    Servable,
    Signature,
    call_naming_bad_images,
    checked_version_labels,
    discover_models,
    load_servable,
)
from tfface.serving.tensors import check_values_match_shape, dtype_name
from tfface.serving.wire import ResponseEncoder

# The public API of this module, as before the split: RequestError,
# discover_models and MAX_BATCH_SIZES_KEPT now live in errors, servables and
# batcher and are imported here so `tfface.serving.server` still offers them.
__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_BATCH_SIZES_KEPT",
    "MAX_BATCH_TIMEOUT_MS",
    "LocalModelServer",
    "RequestError",
    "discover_models",
    "logger",
    "serve_main",
]

logger = logging.getLogger("tfface.serving")

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Waiting longer for company than a client's deadline helps no one.
MAX_BATCH_TIMEOUT_MS = 60_000.0
_SERVER_IDS = itertools.count(1)


class LocalModelServer:
    """Serves tfface exports over TF Serving's gRPC API (see module docstring).

    Args:
        model_dir: `saved_models/NAME` (one model, named after the folder),
            `saved_models/NAME/VERSION`, or a base folder holding several.
        host, port: where to listen; port 0 picks a free port.
        max_batch_size: most rows in one model call; a request with more
            is refused (INVALID_ARGUMENT), as TF Serving's batching refuses
            one larger than its `max_batch_size`.
        batch_timeout_ms: how long the first queued request waits for
            company before its batch runs. 0 (the default) runs whatever
            is queued as soon as the model is free, so batches still form
            under load from requests that arrive during a model call; TF
            Serving's batching guide also starts CPU serving at 0. On the
            2-core benchmark machine 0 beat 10 ms at 1, 8 and 32 clients
            (docs/results.md).
        enable_batching: False runs every request on its own.
        max_message_bytes: gRPC send/receive message size limit.
        max_image_side: encoded images whose header says a side is larger
            are refused before decoding.
        versions: "latest" (like TF Serving's default policy; a newest
            version that fails to load is skipped for the one before), "all",
            or a list of version numbers to load. Versions are read at start:
            restart the server to serve a new export (TF Serving polls).
        version_labels: label -> version for every model served, e.g.
            {"stable": 1, "canary": 2}, and/or model name -> its own
            {label: version}, e.g. {"faces": {"stable": 3}}, as TF
            Serving's `version_labels` per model; a model's own mapping
            wins over the shared one for the same label.
        max_workers: gRPC handler threads (each waiting request holds one,
            so keep it above the concurrency you expect).
    """

    def __init__(
        self,
        model_dir,
        host: str = "127.0.0.1",
        port: int = 0,
        max_batch_size: int = 32,
        batch_timeout_ms: float = 0.0,
        enable_batching: bool = True,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_image_side: int = DEFAULT_MAX_IMAGE_SIDE,
        versions: Union[str, list] = "latest",
        version_labels: Optional[dict] = None,
        max_workers: Optional[int] = None,
    ):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not 0 <= batch_timeout_ms <= MAX_BATCH_TIMEOUT_MS:  # also refuses NaN
            raise ValueError(f"batch_timeout_ms must be in 0..{MAX_BATCH_TIMEOUT_MS}, got {batch_timeout_ms}")
        if max_image_side < 1:
            raise ValueError(f"max_image_side must be >= 1, got {max_image_side}")
        if not (versions in ("latest", "all") or isinstance(versions, (list, tuple))):
            raise ValueError(f"versions must be 'latest', 'all' or a list of ints, got {versions!r}")
        if not 0 <= int(port) <= 65535:
            raise ValueError(f"port must be in 0..65535 (0: any free port), got {port}")
        self.model_dir = Path(model_dir)
        self.host = host
        self.port = int(port)
        self.max_batch_size = int(max_batch_size)
        self.batch_timeout_ms = float(batch_timeout_ms)
        self.enable_batching = bool(enable_batching)
        self.max_message_bytes = int(max_message_bytes)
        self.max_image_side = int(max_image_side)
        self.versions = versions
        self.version_labels = checked_version_labels(version_labels)
        self.max_workers = max_workers or max(16, 2 * self.max_batch_size + 4)
        self.models = {}  # name -> {version: Servable}
        self._batchers = {}
        self._batchers_lock = threading.Lock()
        self._encoder = ResponseEncoder()
        self._server = None
        self._executor = None
        # Every thread this server starts has a name starting with this.
        self.thread_prefix = f"tfface-server{next(_SERVER_IDS)}"

    # --- lifecycle ----------------------------------------------------------
    def load(self) -> None:
        """Loads the selected versions of every model (idempotent)."""
        if self.models:
            return
        models = {}
        found = discover_models(self.model_dir)
        unknown = sorted(name for name, value in self.version_labels.items() if isinstance(value, dict) and name not in found)
        if unknown:
            raise ValueError(
                f"version labels name model(s) {unknown}, which {self.model_dir} does not hold (models: {sorted(found)})"
            )
        for name, on_disk in found.items():
            available = sorted(on_disk)
            if self.versions == "latest":
                wanted = {available[-1]}
            elif self.versions == "all":
                wanted = set(available)
            else:
                wanted = {int(v) for v in self.versions}
            labels = self.labels_of(name)
            wanted |= set(labels.values())
            missing = sorted(wanted - set(available))
            if missing:
                raise FileNotFoundError(
                    f"model {name!r} in {self.model_dir} has no version(s) {missing} "
                    f"(versions on disk: {available})"
                )
            if self.versions == "latest":
                # As TF Serving: a newer version that does not load (a copy
                # cut short) leaves the last good one served. Labelled
                # versions are asked for by number, so they must load.
                loaded = {}
                for version in reversed(available):
                    try:
                        loaded = {version: load_servable(name, version, on_disk[version])}
                        break
                    except RuntimeError as e:
                        logger.warning("model %r: skipping version %d: %s", name, version, e)
                if not loaded:
                    raise RuntimeError(f"model {name!r} in {self.model_dir}: no version loads (versions on disk: {available})")
                for version in sorted(set(labels.values()) - set(loaded)):
                    loaded[version] = load_servable(name, version, on_disk[version])
                models[name] = dict(sorted(loaded.items()))
            else:
                models[name] = {v: load_servable(name, v, on_disk[v]) for v in sorted(wanted)}
            logger.info("loaded model %r versions %s", name, sorted(models[name]))
        self.models = models

    def start(self) -> int:
        """Loads the models, starts listening and returns the bound port."""
        if self._server is not None:
            raise RuntimeError("server already started")
        self.load()
        options = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.so_reuseport", 0),
        ]
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.max_workers, thread_name_prefix=f"{self.thread_prefix}-grpc"
        )
        server = grpc.server(self._executor, options=options)
        _add_prediction_service(_PredictionServicer(self), server)
        model_service_pb2_grpc.add_ModelServiceServicer_to_server(_ModelServicer(self), server)
        address = self.target
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as e:
            bound = 0
            reason = str(e)
        else:
            reason = "port in use or address not available"
        if not bound:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise OSError(f"cannot listen on {address}: {reason}")
        server.start()
        self._server = server
        self.port = bound
        return bound

    def stop(self, grace: Optional[float] = 1.0) -> None:
        """Stops accepting requests, lets in-flight ones finish, joins threads."""
        if self._server is not None:
            self._server.stop(grace).wait()
            self._server = None
        with self._batchers_lock:
            batchers, self._batchers = list(self._batchers.values()), {}
        for batcher in batchers:
            batcher.stop(timeout_s=1.0)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    @property
    def target(self) -> str:
        """HOST:PORT as gRPC wants it (an IPv6 host in brackets)."""
        host = self.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"{host}:{self.port}"

    def labels_of(self, name: str) -> dict:
        """{label: version} of model `name`: the shared labels, then its own."""
        labels = {k: v for k, v in self.version_labels.items() if not isinstance(v, dict)}
        own = self.version_labels.get(name)
        if isinstance(own, dict):
            labels.update(own)
        return labels

    # --- request handling ---------------------------------------------------
    def resolve(self, model_spec) -> Servable:
        """The loaded version a ModelSpec asks for, or NOT_FOUND."""
        name = model_spec.name
        if not name:
            raise invalid(f"model_spec.name is empty (models served: {sorted(self.models)})")
        versions = self.models.get(name)
        if versions is None:
            raise not_found(f"model {name!r} is not served (models: {sorted(self.models)})")
        has_version = model_spec.HasField("version")
        if has_version and model_spec.version_label:
            raise invalid("model_spec sets both version and version_label; set one")
        if model_spec.version_label:
            label = model_spec.version_label
            labels = self.labels_of(name)
            if label not in labels:
                raise not_found(f"model {name!r} has no version label {label!r} (labels: {sorted(labels)})")
            version = labels[label]
        elif has_version:
            version = model_spec.version.value
        else:
            version = max(versions)
        if version not in versions:
            raise not_found(f"model {name!r} has no loaded version {version} (versions: {sorted(versions)})")
        return versions[version]

    def _signature(self, servable: Servable, name: str) -> Signature:
        signature = servable.signatures.get(name or SERVING_DEFAULT)
        if signature is None:
            raise not_found(
                f"model {servable.name!r} version {servable.version} has no signature {name!r} "
                f"(signatures: {sorted(servable.signatures)})"
            )
        return signature

    def _parse_inputs(self, signature: Signature, inputs) -> tuple[dict, int]:
        expected = sorted(signature.inputs)
        unknown = sorted(set(inputs) - set(expected))
        if unknown:
            raise invalid(f"unknown input(s) {unknown} for signature {signature.name!r}; expected {expected}")
        missing = sorted(set(expected) - set(inputs))
        if missing:
            raise invalid(f"missing input(s) {missing} for signature {signature.name!r}")
        arrays, batch = {}, None
        for key, spec in signature.inputs.items():
            proto = inputs[key]
            if proto.dtype != spec.dtype.as_datatype_enum:
                got = dtype_name(proto.dtype)
                raise invalid(f"input {key!r} must be {spec.dtype.name}, got {got}")
            check_values_match_shape(key, proto)
            try:
                array = tf.make_ndarray(proto)
            except Exception as e:
                raise invalid(f"input {key!r} is not a valid tensor: {e}") from None
            if not spec.shape.is_compatible_with(array.shape):
                raise invalid(
                    f"input {key!r} has shape {list(array.shape)}, signature {signature.name!r} "
                    f"expects {spec.shape.as_list()} (None = any size)"
                )
            if array.ndim == 0:
                raise invalid(f"input {key!r} must be a batch, got a scalar")
            if array.shape[0] == 0:
                raise invalid(f"input {key!r} is an empty batch")
            if batch is not None and array.shape[0] != batch:
                raise invalid(f"inputs disagree on batch size ({batch} vs {array.shape[0]} for {key!r})")
            batch = array.shape[0]
            if batch > self.max_batch_size:
                # As TF Serving's batching: one call's memory grows with its
                # images (a 3 MB request of tiny PNGs took 1.4 GB).
                raise invalid(
                    f"input {key!r} holds {batch} images; this server takes at most {self.max_batch_size} "
                    "per request (max_batch_size): split it, e.g. ServingClient.predict(..., batch_size=N) "
                    "or tfface query --batch-size N"
                )
            if spec.dtype == tf.string and array.ndim == 1:
                self._check_images(key, array)
            arrays[key] = array
        return arrays, batch

    def _check_images(self, key: str, array: np.ndarray) -> None:
        """Rejects non-images, the kinds the signature refuses and oversized
        images without decoding them."""
        for i, data in enumerate(array):
            if not data:
                raise invalid(f"{key}[{i}] is empty")
            fmt = image_format(data)
            if fmt is None:
                raise invalid(
                    f"{key}[{i}] is not an encoded image (expected one of {', '.join(DECODABLE_FORMATS)}; "
                    f"starts with {bytes(data[:8])!r})"
                )
            # The signature refuses these too, but only after the batch is
            # merged, and without naming the image.
            reason = refused_image_reason(data)
            if reason is not None:
                raise invalid(f"{key}[{i}] is {reason}")
            size = image_size_from_header(data)
            if size is not None and max(size) > self.max_image_side:
                raise invalid(
                    f"{key}[{i}] is {size[1]}x{size[0]} pixels; the largest side allowed is {self.max_image_side} "
                    "(tfface serve --max-image-side; the export's own limit: tfface export --max-image-side)"
                )

    def run(self, servable: Servable, signature: Signature, arrays: dict, size: int, timeout_s=None) -> dict:
        if not self.enable_batching:
            try:
                return call_naming_bad_images(signature, arrays)
            except Exception as e:
                raise tf_error_to_request_error(e) from None
        key = (servable.name, servable.version, signature.name)
        with self._batchers_lock:
            batcher = self._batchers.get(key)
            if batcher is None:
                batcher = Batcher(
                    signature,
                    self.max_batch_size,
                    self.batch_timeout_ms / 1000.0,
                    label=f"{self.thread_prefix}-batcher-{servable.name}-{servable.version}-{signature.name}",
                )
                self._batchers[key] = batcher
        return batcher.submit(arrays, size, timeout_s)

    def batch_sizes(self, name: str, version: int, signature: str = SERVING_DEFAULT) -> list:
        """Rows per model call for one signature, the last
        `MAX_BATCH_SIZES_KEPT` calls (empty if none)."""
        batcher = self._batchers.get((name, version, signature))
        return list(batcher.batch_sizes) if batcher else []

    def predict(self, request, timeout_s=None) -> predict_pb2.PredictResponse:
        return predict_pb2.PredictResponse.FromString(self.predict_serialized(request, timeout_s))

    def predict_serialized(self, request, timeout_s=None) -> bytes:
        """`predict`'s answer as serialized `PredictResponse` bytes (what the
        gRPC handler sends; see `tfface.serving.wire`)."""
        servable = self.resolve(request.model_spec)
        signature = self._signature(servable, request.model_spec.signature_name)
        arrays, size = self._parse_inputs(signature, request.inputs)
        wanted = list(request.output_filter) or signature.outputs
        unknown = sorted(set(wanted) - set(signature.outputs))
        if unknown:
            raise invalid(f"output_filter names unknown output(s) {unknown}; outputs: {signature.outputs}")
        if len(set(wanted)) < len(wanted):  # as TF Serving, rather than answering one output twice
            twice = sorted(name for name, n in collections.Counter(wanted).items() if n > 1)
            raise invalid(f"duplicate output tensor alias {twice[0]!r} in output_filter")
        outputs = self.run(servable, signature, arrays, size, timeout_s)
        spec = model_pb2.ModelSpec()
        _fill_spec(spec, servable, signature.name)
        return self._encoder.encode(outputs, wanted, spec.SerializeToString())

    def metadata(self, request) -> get_model_metadata_pb2.GetModelMetadataResponse:
        servable = self.resolve(request.model_spec)
        fields = list(request.metadata_field)
        if not fields:
            raise invalid("GetModelMetadataRequest must name at least one metadata_field ('signature_def')")
        unsupported = sorted(set(fields) - {"signature_def"})
        if unsupported:
            raise invalid(f"metadata field(s) {unsupported} not supported; supported: ['signature_def']")
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        _fill_spec(response.model_spec, servable, None)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, value in servable.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(value)
        response.metadata["signature_def"].Pack(signature_map)
        return response

    def status(self, request) -> get_model_status_pb2.GetModelStatusResponse:
        spec = request.model_spec
        if spec.HasField("version") or spec.version_label:
            servables = [self.resolve(spec)]
        else:
            if not spec.name:
                raise invalid(f"model_spec.name is empty (models served: {sorted(self.models)})")
            if spec.name not in self.models:
                raise not_found(f"model {spec.name!r} is not served (models: {sorted(self.models)})")
            servables = [self.models[spec.name][v] for v in sorted(self.models[spec.name])]
        response = get_model_status_pb2.GetModelStatusResponse()
        for servable in servables:
            status = response.model_version_status.add()
            status.version = servable.version
            status.state = get_model_status_pb2.ModelVersionStatus.AVAILABLE
            status.status.error_code = 0
        return response


def _fill_spec(spec, servable: Servable, signature_name: Optional[str]) -> None:
    spec.name = servable.name
    spec.version.value = servable.version
    if signature_name:
        spec.signature_name = signature_name


def _handle(context, work):
    """Runs `work()`; refusals become gRPC errors, never exceptions in the server."""
    try:
        return work()
    except RequestError as e:
        error = e
    except Exception as e:  # a bug or an unexpected TF failure
        logger.exception("request failed")
        error = tf_error_to_request_error(e)
    context.abort(error.code, error.message)


def _add_prediction_service(servicer, server) -> None:
    """`add_PredictionServiceServicer_to_server`, except that Predict answers
    with bytes already serialized by `tfface.serving.wire`."""
    handlers = {
        "Predict": grpc.unary_unary_rpc_method_handler(
            servicer.Predict,
            request_deserializer=predict_pb2.PredictRequest.FromString,
            response_serializer=None,  # the handler returns bytes
        ),
        "GetModelMetadata": grpc.unary_unary_rpc_method_handler(
            servicer.GetModelMetadata,
            request_deserializer=get_model_metadata_pb2.GetModelMetadataRequest.FromString,
            response_serializer=get_model_metadata_pb2.GetModelMetadataResponse.SerializeToString,
        ),
    }
    # The rest answer UNIMPLEMENTED (see `_PredictionServicer`).
    for name, request, response in (
        ("Classify", classification_pb2.ClassificationRequest, classification_pb2.ClassificationResponse),
        ("Regress", regression_pb2.RegressionRequest, regression_pb2.RegressionResponse),
        ("MultiInference", inference_pb2.MultiInferenceRequest, inference_pb2.MultiInferenceResponse),
    ):
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=request.FromString,
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("tensorflow.serving.PredictionService", handlers),)
    )


class _PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, server: LocalModelServer):
        self._server = server

    def Predict(self, request, context):
        remaining = context.time_remaining()  # huge when the client set no deadline
        timeout_s = remaining if remaining is not None and remaining < 86400 else None
        return _handle(context, lambda: self._server.predict_serialized(request, timeout_s))

    def GetModelMetadata(self, request, context):
        return _handle(context, lambda: self._server.metadata(request))

    # The base servicer raises NotImplementedError, which gRPC logs with a
    # full traceback on every call; these answer UNIMPLEMENTED quietly.
    def Classify(self, request, context):
        _unimplemented(context, "Classify")

    def Regress(self, request, context):
        _unimplemented(context, "Regress")

    def MultiInference(self, request, context):
        _unimplemented(context, "MultiInference")


def _unimplemented(context, method: str) -> None:
    logger.info("answered %s with UNIMPLEMENTED", method)
    context.abort(
        grpc.StatusCode.UNIMPLEMENTED,
        f"{method} is not implemented by this server; use Predict (tfface exports have no "
        "classification or regression signatures)",
    )


class _ModelServicer(model_service_pb2_grpc.ModelServiceServicer):
    def __init__(self, server: LocalModelServer):
        self._server = server

    def GetModelStatus(self, request, context):
        return _handle(context, lambda: self._server.status(request))


# --- CLI ---------------------------------------------------------------------------------


def serve_main(args, stop_event: Optional[threading.Event] = None) -> int:
    """`tfface serve`: serves `args.model_dir` until SIGINT or SIGTERM.

    Reads `model_dir`, and optionally `host`, `port`, `max_batch_size`,
    `batch_timeout_ms`, `no_batching`, `versions` ("latest"/"all"),
    `version_labels` (a dict, or (model or None, label, version) triples),
    `max_image_side`, `max_message_bytes` from `args`. `stop_event` stops it too (embedding,
    tests). Returns the exit code: 0; 2 after printing why it could not
    start for a bad folder, argument or taken port; 1 for other failures.
    """

    def arg(name, default):
        value = getattr(args, name, None)
        return default if value is None else value

    stop = stop_event or threading.Event()
    labels = arg("version_labels", None)
    if labels is not None and not isinstance(labels, dict):  # (model or None, label, version) from the CLI
        labels, given = {}, list(labels)
        for model, label, version in given:
            into = labels.setdefault(model, {}) if model else labels
            if label in into:
                scope = f" for model {model!r}" if model else ""
                print(f"error: --version-label: label {label!r} is given twice{scope}", file=sys.stderr)
                return 2
            into[label] = version
    try:
        server = LocalModelServer(
            model_dir=args.model_dir,
            host=arg("host", "127.0.0.1"),
            port=arg("port", 8500),
            max_batch_size=arg("max_batch_size", 32),
            batch_timeout_ms=arg("batch_timeout_ms", 0.0),
            enable_batching=not arg("no_batching", False),
            versions=arg("versions", "latest"),
            version_labels=labels,
            max_image_side=arg("max_image_side", DEFAULT_MAX_IMAGE_SIDE),
            max_message_bytes=arg("max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES),
        )
        server.start()
    except (OSError, ValueError) as e:  # a missing or bad model folder, a taken port
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        for name, versions in server.models.items():
            print(f"serving model {name!r} versions {sorted(versions)} on {server.target} (gRPC)", flush=True)
        batching = (
            f"up to {server.max_batch_size} images / {server.batch_timeout_ms:g} ms"
            if server.enable_batching
            else "off"
        )
        print(f"batching: {batching}; press Ctrl+C to stop", flush=True)
        while not stop.wait(0.5):
            pass
        print("stopping...", flush=True)
    finally:
        server.stop(grace=5.0)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
