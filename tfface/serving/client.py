"""gRPC client for tfface models on TF Serving (or `tfface serve`).

`ServingClient` speaks TF Serving's official gRPC API (`PredictionService`,
`ModelService`), so it works against the `tensorflow/serving` container and
against `LocalModelServer` alike. Outputs are read by name (see
`tfface.export.saved_model`), never by position, and class names come from
the schema the model ships with, so results read as
`{"Smiling": {"label": "yes", "confidence": 0.93, "probabilities": {...}}}`.
"""

from __future__ import annotations

import io
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import grpc
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import (
    get_model_metadata_pb2,
    get_model_status_pb2,
    model_pb2,
    model_service_pb2_grpc,
    predict_pb2,
    prediction_service_pb2_grpc,
)

from tfface.data.image_ops import (
    DECODABLE_FORMATS,
    exif_orientation,
    file_exif_orientation,
    image_format,
    pil_rgb_array,
    refused_image_reason,
)
from tfface.export.saved_model import (
    CLASS_ID_SUFFIX,
    EXPORT_INFO_OUTPUT,
    MAX_VERSION,
    PROBABILITIES_SUFFIX,
    SCHEMA_INPUT,
    SCHEMA_OUTPUT,
    SCHEMA_SIGNATURE,
    SERVING_DEFAULT,
    SIGNATURE_INPUTS,
)
from tfface.schema import Schema

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Waits between attempts after UNAVAILABLE double from DEFAULT_BACKOFF_S up
# to DEFAULT_MAX_BACKOFF_S: 0.25 + 0.5 + 1 + 2 + 4 * 4 = 19.75 s in all, so
# a client rides out a server restart of 15 s (a reload of the models).
DEFAULT_RETRIES = 8
DEFAULT_BACKOFF_S = 0.25
DEFAULT_MAX_BACKOFF_S = 4.0
# Each wait is drawn within +-20% of its nominal value (gRPC's own reconnect
# backoff does the same), so clients a restart dropped at once do not all
# come back in the same instant.
DEFAULT_BACKOFF_JITTER = 0.2
# Longest deadline a call takes: gRPC fails a call of a far larger one
# (1e10 s) at once, as "no answer within" it.
MAX_TIMEOUT_S = 1e6
# What a request holds besides the image bytes: the model spec, the input's
# name, dtype and shape (REQUEST_MARGIN), and each image's tag and length
# (PER_IMAGE_OVERHEAD). gRPC refuses to send a request over its limit.
REQUEST_MARGIN = 4096
PER_IMAGE_OVERHEAD = 16

ImageInput = Union[str, os.PathLike, bytes, np.ndarray]


class ServingError(RuntimeError):
    """A request TF Serving refused or could not answer; `code` is the gRPC code."""

    def __init__(self, message: str, code: Optional[grpc.StatusCode] = None):
        super().__init__(message)
        self.code = code


class ServingClient:
    """Talks to one model on a TF Serving gRPC endpoint.

    Args:
        target: "host:port" of the gRPC endpoint (TF Serving: 8500).
        model_name: the model's name on the server (its folder name).
        signature: "serving_default" (encoded image bytes / file paths) or
            "serving_uint8" (preprocessed uint8 arrays).
        timeout_s: deadline of each attempt of an RPC.
        retries, backoff_s, max_backoff_s: extra attempts after UNAVAILABLE
            (server down, starting or restarting), the waits between them
            doubling from `backoff_s` up to `max_backoff_s`; other errors
            are never retried. The defaults wait 19.75 s in all, riding out
            a server restart of about 15 s; a call gives up after at most
            (retries + 1) * timeout_s plus those waits.
        backoff_jitter: each wait is drawn uniformly within this fraction of
            its nominal value (default 0.2: 15.8 to 23.7 s in all), so many
            clients dropped by one restart do not retry in lockstep.
        tls, root_certificates: use TLS; root certificates as PEM bytes or
            a file path (None: the system's).
        version, version_label: pin a version ("stable"/"canary" labels
            from `models.config`); default: the server's latest.
        max_message_bytes: gRPC's message limit both ways; `predict` splits
            a call into requests that stay under it.
    """

    def __init__(
        self,
        target: str = "localhost:8500",
        model_name: str = "tfface",
        signature: str = SERVING_DEFAULT,
        timeout_s: float = 10.0,
        retries: int = DEFAULT_RETRIES,
        tls: bool = False,
        root_certificates=None,
        version: Optional[int] = None,
        version_label: Optional[str] = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        backoff_s: float = DEFAULT_BACKOFF_S,
        max_backoff_s: float = DEFAULT_MAX_BACKOFF_S,
        backoff_jitter: float = DEFAULT_BACKOFF_JITTER,
    ):
        if not model_name:
            raise ValueError("model_name is required (the model's folder name on the server)")
        if version is not None and version_label:
            raise ValueError("pass either version or version_label, not both")
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        if not 0 < timeout_s <= MAX_TIMEOUT_S:  # gRPC ends a call of infinite (or 1e10 s) deadline at once
            raise ValueError(f"timeout_s must be in (0, {MAX_TIMEOUT_S:g}] seconds, got {timeout_s}")
        if not 0 <= backoff_s <= max_backoff_s:
            raise ValueError(f"need 0 <= backoff_s <= max_backoff_s, got {backoff_s} and {max_backoff_s}")
        if not 0 <= backoff_jitter < 1:
            raise ValueError(f"backoff_jitter must be in [0, 1), got {backoff_jitter}")
        if version is not None and not 1 <= version <= MAX_VERSION:  # protobuf's "Value out of range" names nothing
            raise ValueError(f"version must be in 1..{MAX_VERSION} (TF Serving reads versions as int64), got {version}")
        target = with_default_port(target)
        self.target = target
        self.model_name = model_name
        self.signature = signature
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self.version = None if version is None else int(version)
        self.version_label = version_label or None
        self.backoff_s = float(backoff_s)
        self.max_backoff_s = float(max_backoff_s)
        self.backoff_jitter = float(backoff_jitter)
        self._jitter = random.Random()
        self.max_message_bytes = int(max_message_bytes)
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            # Reconnect quickly so retries can reach a server that just started.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        self.tls = bool(tls or root_certificates is not None)
        if self.tls:
            if root_certificates is not None and not isinstance(root_certificates, bytes):
                path = Path(root_certificates)
                if not path.is_file():
                    raise FileNotFoundError(f"root certificates file not found: {path}")
                root_certificates = path.read_bytes()
                if b"-----BEGIN CERTIFICATE-----" not in root_certificates:
                    raise ValueError(f"{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._prediction = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self._models = model_service_pb2_grpc.ModelServiceStub(self._channel)
        self._schema = None
        self._export_info = None
        # version -> (schema, export info), filled once the server names the versions that answer
        self._exports_by_version = {}

    # --- lifecycle ----------------------------------------------------------
    def close(self) -> None:
        self._channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- RPCs ---------------------------------------------------------------
    def _model_spec(self, signature: Optional[str] = None) -> model_pb2.ModelSpec:
        spec = model_pb2.ModelSpec(name=self.model_name)
        if signature:
            spec.signature_name = signature
        if self.version is not None:
            spec.version.value = self.version
        elif self.version_label:
            spec.version_label = self.version_label
        return spec

    def backoff_waits(self) -> list[float]:
        """Nominal seconds waited before each retry after UNAVAILABLE (each
        wait is drawn within `backoff_jitter` of its value)."""
        # 2**attempt is capped: a float overflows past 2**1023, the wait long before.
        return [min(self.backoff_s * 2 ** min(attempt, 64), self.max_backoff_s) for attempt in range(self.retries)]

    def _call(self, method, request, what: str):
        waits = self.backoff_waits()
        started = time.monotonic()
        for attempt in range(len(waits) + 1):
            try:
                return method(request, timeout=self.timeout_s)
            except grpc.RpcError as e:
                code = e.code() if hasattr(e, "code") else None
                details = e.details() if hasattr(e, "details") else str(e)
                if code == grpc.StatusCode.UNAVAILABLE and attempt < len(waits) and not _is_lasting(details):
                    time.sleep(waits[attempt] * self._jitter.uniform(1 - self.backoff_jitter, 1 + self.backoff_jitter))
                    continue
                message = self._explain(what, code, details, attempt + 1, time.monotonic() - started)
                raise ServingError(message, code) from None
        raise AssertionError("unreachable")

    def _explain(self, what, code, details, attempts, seconds) -> str:
        model = f"model {self.model_name!r}"
        if self.version is not None:
            model += f" version {self.version}"
        elif self.version_label:
            model += f" (label {self.version_label!r})"
        if code == grpc.StatusCode.UNAVAILABLE and _is_lasting(details):
            return f"{what}: cannot reach {self.target}: {details}. {_lasting_hint(details, self.tls)}"
        if code == grpc.StatusCode.UNAVAILABLE:
            return (
                f"{what}: TF Serving at {self.target} is unavailable after {attempts} attempt(s) "
                f"over {seconds:.1f} s: {details}. "
                "Is the server running (`tfface serve` or `docker compose up`) and is the address right?"
                + ("" if self.tls or "socket closed" not in details.lower() else
                   " A server that speaks TLS closes plain connections: if it does, pass --tls.")
            )
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"{what}: {self.target} gave no answer within {self.timeout_s:g} s (raise the timeout for large batches)"
        name = code.name if code is not None else "UNKNOWN"
        return f"{what} for {model} at {self.target} failed ({name}): {details}"

    def predict(self, images: Sequence[ImageInput], batch_size: int = 32) -> list[dict]:
        """One dict per face, in input order: task -> label/confidence/probabilities.

        `images` are file paths or encoded bytes (signature
        "serving_default"), or uint8 (S, S, 3) arrays / one (N, S, S, 3)
        array (signature "serving_uint8"). Unreadable files, and images
        too large for one request, fail here, naming the file, before any
        request is sent. Encoded images go as `sendable` makes them, in
        requests of at most `batch_size` images and `max_message_bytes`.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif isinstance(images, np.ndarray):
            images = [images]  # one (S, S, 3) image, not a sequence of rows
        if isinstance(images, (str, bytes, os.PathLike)):
            images = [images]
        payloads, tagged = self._read_images(images)
        if not payloads:
            return []
        schema = self.schema()
        if tagged and not self.export_info().get("applies_exif_orientation"):
            payloads = self._turned_upright(payloads, tagged, images)
            tagged = set()
        input_name = self._input_name()
        results = []
        for start, chunk in self._chunks(payloads, batch_size):
            results.extend(self._predict_chunk(start, chunk, tagged, images, input_name, schema, batch_size))
        return results

    def _predict_chunk(self, start, chunk, tagged, images, input_name, schema, batch_size) -> list[dict]:
        """Results of one request. Photos in `tagged` went as they are, to a
        server whose export turns them upright; when a version that does not
        (an older export, after a rollback) answered, they go again upright."""
        # The server's "images[i]" counts from the start of this chunk.
        what = f"Predict of images #{start}..#{start + len(chunk) - 1}"
        try:
            response = self._call(self._prediction.Predict, self._predict_request(chunk, input_name), what)
        except ServingError as e:
            if e.code != grpc.StatusCode.INVALID_ARGUMENT or len(chunk) == 1 or _refuses_request_size(str(e)):
                raise
            self._name_refused_image(chunk, start, images, input_name)
            raise
        answered_with, info = self._export_of(_answering_version(response), schema)
        own = {i - start for i in tagged if start <= i < start + len(chunk)}
        if own and not info.get("applies_exif_orientation"):
            upright_chunk = self._turned_upright(chunk, own, images, offset=start)
            return [
                result
                for sub_start, sub in self._chunks(upright_chunk, batch_size)
                for result in self._predict_chunk(start + sub_start, sub, set(), images, input_name, schema, batch_size)
            ]
        return parse_predict_response(response, answered_with, len(chunk))

    def _turned_upright(self, payloads, tagged, images, offset=0) -> list:
        """`payloads` with the photos at the indices in `tagged` turned
        upright (as PNG), for an export that would decode them as stored;
        one too large for a request that way is named (`images[offset + i]`)."""
        budget = self._request_budget()
        turned = list(payloads)
        for i in sorted(tagged):
            turned[i] = upright(payloads[i])
            if _payload_bytes(turned[i]) > budget:
                raise ValueError(
                    f"{_where(images[offset + i], offset + i)}: {len(turned[i]):,} bytes as PNG (re-encoded from "
                    f"{len(payloads[i]):,} bytes to turn it upright for an export that does not say it does: before tfface 0.2.4) "
                    f"exceed {self._over_budget(budget)}"
                )
        return turned

    def _request_budget(self) -> int:
        """Bytes of images one request can carry under `max_message_bytes`."""
        return self.max_message_bytes - REQUEST_MARGIN - self._model_spec(self.signature).ByteSize()

    def _chunks(self, payloads, batch_size) -> list[tuple[int, list]]:
        """(index of the first, payloads) per request: at most `batch_size`
        images and `_request_budget` bytes, as gRPC refuses to send more (a
        photo turned upright as PNG can be five times its JPEG).
        `_read_images` refused any image that alone is over the budget."""
        budget = self._request_budget()
        chunks, size = [], 0
        for index, payload in enumerate(payloads):
            cost = _payload_bytes(payload)
            if chunks and len(chunks[-1][1]) < batch_size and size + cost <= budget:
                chunks[-1][1].append(payload)
                size += cost
            else:
                chunks.append((index, [payload]))
                size = cost
        return chunks

    def _predict_request(self, chunk, input_name):
        request = predict_pb2.PredictRequest(model_spec=self._model_spec(self.signature))
        if isinstance(chunk[0], np.ndarray):
            tensor = tf.make_tensor_proto(np.stack(chunk), dtype=tf.uint8)
        else:
            tensor = tf.make_tensor_proto(chunk, dtype=tf.string, shape=[len(chunk)])
        request.inputs[input_name].CopyFrom(tensor)
        return request

    def _name_refused_image(self, chunk, start, images, input_name) -> None:
        """A refused request of several images does not say which one the
        model refused: sent one by one, the first refused one is named."""
        for offset, payload in enumerate(chunk):
            index = start + offset
            try:
                self._call(self._prediction.Predict, self._predict_request([payload], input_name), f"image #{index}")
            except ServingError as e:
                if e.code != grpc.StatusCode.INVALID_ARGUMENT:
                    return
                # The message names "image #i"; a file is named by its path too.
                named = f"{images[index]}: {e}" if isinstance(images[index], (str, os.PathLike)) else str(e)
                raise ServingError(named, e.code) from None

    def _export_of(self, version: Optional[int], schema: Schema) -> tuple[Schema, dict]:
        """The schema and export info of the version that answered: a server
        that loaded another version since the schema was read may name
        classes otherwise, or decode photos otherwise."""
        if version is None or not self._exports_by_version:
            return schema, self.export_info()  # the server does not say which version answers
        if version not in self._exports_by_version:
            self._exports_by_version[version] = self._read_schema(version)[:2]
        return self._exports_by_version[version]

    def _read_images(self, images) -> tuple[list, set]:
        """What to send per image, as `sendable` makes it except for photos
        whose EXIF orientation the serving graph reads as PIL does: those
        are left as they are, their indices returned, and turned upright
        later for an export that does not say it turns them (before 0.2.4).
        Files that cannot be read or sent are named here, before any request."""
        payloads, tagged = [], set()
        budget = self._request_budget()
        for i, item in enumerate(images):
            if isinstance(item, np.ndarray):
                if item.dtype != np.uint8 or item.ndim != 3 or item.shape[-1] != 3:
                    raise ValueError(
                        f"image #{i}: arrays must be uint8 (S, S, 3), got {item.dtype} {item.shape}"
                    )
                if _payload_bytes(item) > budget:
                    raise ValueError(f"image #{i}: {item.nbytes:,} bytes exceed {self._over_budget(budget)}")
                payloads.append(item)
                continue
            if isinstance(item, (bytes, bytearray)):
                data, where = bytes(item), f"image #{i} (bytes)"
            elif isinstance(item, (str, os.PathLike)):
                path = Path(item)
                where = str(path)
                if path.is_dir():
                    raise IsADirectoryError(f"{path} is a folder, not an image file (give the image files in it)")
                if not path.is_file():
                    raise FileNotFoundError(f"image file not found: {path}")
                try:
                    data = path.read_bytes()
                except OSError as e:
                    raise OSError(f"cannot read image file {path}: {e.strerror or e}") from None
            else:
                raise TypeError(f"image #{i}: expected a file path, bytes or a uint8 array, got {type(item).__name__}")
            if not data:
                raise ValueError(f"{where} is empty")
            if image_format(data) is None:
                raise ValueError(f"{where} is not an image file (expected one of {', '.join(DECODABLE_FORMATS)})")
            try:
                payload = sendable(data, turn_upright=False)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
            orientation = exif_orientation_of(data) if payload is data else 1
            if orientation != 1:
                # The serving graph of 0.2.1+ reads JPEG and PNG tags in the
                # first 4 KiB, not a WebP's: only a tag it reads as PIL does
                # lets the photo go as it is.
                if int(exif_orientation(tf.constant(data)).numpy()) == orientation:
                    tagged.add(i)
                else:
                    payload = upright(data)
            if _payload_bytes(payload) > budget:
                how = "" if payload is data else (
                    f" as PNG (re-encoded from {len(data):,} bytes to turn it upright or take its first frame)"
                )
                raise ValueError(f"{where}: {len(payload):,} bytes{how} exceed {self._over_budget(budget)}")
            payloads.append(payload)
        kinds = {isinstance(p, np.ndarray) for p in payloads}
        if len(kinds) > 1:
            raise ValueError("mix of arrays and encoded images: send one kind per call")
        if kinds == {True} and self.signature == SERVING_DEFAULT:
            raise ValueError("uint8 arrays need signature='serving_uint8'; serving_default takes encoded images")
        if kinds == {False} and self.signature == "serving_uint8":
            raise ValueError("signature 'serving_uint8' takes uint8 arrays, not files or bytes")
        return payloads, tagged

    def _over_budget(self, budget) -> str:
        return (
            f"the {budget:,} bytes of images a request can carry under "
            f"max_message_bytes={self.max_message_bytes:,}: send it smaller, or raise max_message_bytes "
            "(and the server's limit)"
        )

    def _input_name(self) -> str:
        if self.signature in SIGNATURE_INPUTS:
            return SIGNATURE_INPUTS[self.signature]
        signatures = self.metadata()["signatures"]
        if self.signature not in signatures:
            raise ServingError(
                f"model {self.model_name!r} has no signature {self.signature!r} (signatures: {sorted(signatures)})"
            )
        inputs = signatures[self.signature].get("inputs", {})
        if len(inputs) != 1:
            raise ServingError(f"signature {self.signature!r} of model {self.model_name!r} does not take exactly one input")
        return next(iter(inputs))

    def schema(self) -> Schema:
        """The model's Schema, read once through the `schema` signature."""
        if self._schema is None:
            self._schema, self._export_info, version = self._read_schema()
            if version is not None:
                self._exports_by_version[version] = (self._schema, self._export_info)
        return self._schema

    def export_info(self) -> dict:
        """What the export says of itself through the `schema` signature
        (`tfface.export.saved_model.export_info`: tfface version, whether
        it turns EXIF-tagged photos upright); {} for exports before 0.2.4."""
        self.schema()
        return self._export_info

    def _read_schema(self, version: Optional[int] = None) -> tuple[Schema, dict, Optional[int]]:
        """The schema and export info of `version` (default: the spec's),
        and the version that answered."""
        spec = self._model_spec(SCHEMA_SIGNATURE)
        if version is not None:
            spec.ClearField("version_label")
            spec.version.value = version
        request = predict_pb2.PredictRequest(model_spec=spec)
        request.inputs[SCHEMA_INPUT].CopyFrom(tf.make_tensor_proto([0], dtype=tf.int32))
        response = self._call(self._prediction.Predict, request, "Predict(schema)")
        if SCHEMA_OUTPUT not in response.outputs:
            raise ServingError(f"model {self.model_name!r} returned no {SCHEMA_OUTPUT!r}: is it a tfface export?")
        value = tf.make_ndarray(response.outputs[SCHEMA_OUTPUT]).reshape(-1)[0]
        info = {}
        if EXPORT_INFO_OUTPUT in response.outputs:
            info = json.loads(tf.make_ndarray(response.outputs[EXPORT_INFO_OUTPUT]).reshape(-1)[0].decode("utf-8"))
        return Schema.from_json(value.decode("utf-8")), info, _answering_version(response)

    def metadata(self) -> dict:
        """{"model", "version", "signatures": {name: {inputs, outputs}}, "schema", "export_info"}."""
        request = get_model_metadata_pb2.GetModelMetadataRequest(
            model_spec=self._model_spec(), metadata_field=["signature_def"]
        )
        response = self._call(self._prediction.GetModelMetadata, request, "GetModelMetadata")
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        signatures = {
            name: {
                "inputs": {k: _tensor_info(v) for k, v in sig.inputs.items()},
                "outputs": {k: _tensor_info(v) for k, v in sig.outputs.items()},
            }
            for name, sig in sorted(signature_map.signature_def.items())
        }
        schema = info = None
        if SCHEMA_SIGNATURE in signatures:
            # Those of the version that answered: the server may have loaded
            # another since the client first read them.
            schema, info = self._export_of(_answering_version(response), self.schema())
        return {
            "model": response.model_spec.name,
            "version": response.model_spec.version.value,
            "signatures": signatures,
            "schema": schema.to_dict() if schema is not None else None,
            "export_info": info,
        }

    def status(self) -> list[dict]:
        """Version states from ModelService.GetModelStatus."""
        request = get_model_status_pb2.GetModelStatusRequest(model_spec=self._model_spec())
        response = self._call(self._models.GetModelStatus, request, "GetModelStatus")
        state_names = get_model_status_pb2.ModelVersionStatus.State
        code_enum = response.DESCRIPTOR.fields_by_name["model_version_status"].message_type
        code_enum = code_enum.fields_by_name["status"].message_type.fields_by_name["error_code"].enum_type
        return [
            {
                "version": s.version,
                "state": state_names.Name(s.state),
                "error_code": code_enum.values_by_number[s.status.error_code].name
                if s.status.error_code in code_enum.values_by_number
                else str(s.status.error_code),
                "error_message": s.status.error_message,
            }
            for s in response.model_version_status
        ]


# UNAVAILABLE that waiting does not mend: a failed TLS handshake, an
# address gRPC cannot parse. A name that does not resolve is retried: a
# headless Kubernetes service has no address until a server is ready.
_LASTING_FAILURES = ("handshake failed", "ssl_error", "failed to parse")


def _is_lasting(details) -> bool:
    return any(text in (details or "").lower() for text in _LASTING_FAILURES)


def _lasting_hint(details, tls: bool) -> str:
    text = (details or "").lower()
    if "handshake" in text or "ssl" in text:
        if "certificate" in text:
            return "The server's certificate is not signed by the given root certificates (--root-certificates)."
        if tls:
            return "The server may not speak TLS: drop --tls, or check the port."
        return "The TLS handshake failed."
    return "Check the address: HOST:PORT."


def _refuses_request_size(message: str) -> bool:
    """Whether a refusal is of the request's size (tfface serve's
    max_batch_size, TF Serving's batching limit): sending its images one by
    one would only run them all to name none."""
    text = message.lower()
    return "per request (max_batch_size)" in text or "larger than maximum" in text


def _answering_version(response) -> Optional[int]:
    """The version a response says answered (None when the server does not say)."""
    return response.model_spec.version.value if response.model_spec.HasField("version") else None


_GRPC_SCHEMES = ("dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock")


def with_default_port(target: str, port: int = 8500) -> str:
    """HOST -> HOST:8500 (TF Serving's gRPC port); gRPC alone would try 443.

    A HOST:PORT whose port is not a number in 1..65535 is refused: gRPC
    would wrap 84036 to 18500 (another server) or retry a non-number as
    unreachable."""
    if "://" in target or target.split(":", 1)[0] in _GRPC_SCHEMES:
        return target  # gRPC's own forms: dns:///host:port, unix:/path, ipv4:1.2.3.4:5 ...
    if not target.strip():
        raise ValueError("the server address is empty; expected HOST or HOST:PORT, e.g. localhost:8500")
    if target.startswith("["):  # [IPv6] or [IPv6]:PORT
        if "]:" not in target:
            return f"{target}:{port}"
        host, given = target.rsplit("]:", 1)
        host += "]"
    elif target.count(":") > 1:  # a bare IPv6 address
        return f"[{target}]:{port}"
    elif ":" not in target:
        return f"{target}:{port}"
    else:
        host, given = target.rsplit(":", 1)
    if not given.isdigit() or not 1 <= int(given) <= 65535 or not host:
        raise ValueError(f"server address {target!r}: expected HOST:PORT with PORT a number in 1..65535")
    return target


def _where(item, index: int) -> str:
    """How messages name an image: its path, else its place in the call."""
    return str(item) if isinstance(item, (str, os.PathLike)) else f"image #{index}"


def _payload_bytes(payload) -> int:
    """Bytes one image (encoded, or a uint8 array) takes in a request."""
    return (payload.nbytes if isinstance(payload, np.ndarray) else len(payload)) + PER_IMAGE_OVERHEAD


def sendable(data: bytes, turn_upright: bool = True) -> bytes:
    """Encoded image bytes as the serving signature takes them: the kinds
    it refuses (`refused_image_reason`: GIFs, BMPs TensorFlow cannot read,
    animated WebPs) as PNG of their first frame as PIL shows it, photos
    with an EXIF orientation upright (`upright`; `turn_upright=False`
    leaves them as they are), the rest unchanged (the same object). Raises
    ValueError for a refused kind PIL cannot read.
    """
    reason = refused_image_reason(data)
    if reason is None:
        return upright(data) if turn_upright else data
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return _rgb_png(ImageOps.exif_transpose(image))
    except Exception as e:
        detail = "PIL cannot read it" if isinstance(e, UnidentifiedImageError) else f"{type(e).__name__}: {e}"
        raise ValueError(f"the server does not take {reason} (the client could not convert it: {detail})") from None


def upright(data: bytes) -> bytes:
    """Encoded image bytes with their EXIF orientation applied (as PNG), or
    unchanged when there is none.

    SavedModels exported before tfface 0.2.1 decode pixels as stored, like
    TF Serving image models: a phone photo tagged "rotate 90" would reach
    the model on its side, where `tfface predict` turns it upright. Later
    exports turn it upright themselves (the PNG carries no tag, so nothing
    is turned twice), and from 0.2.4 say so through the `schema`
    signature: `ServingClient` then sends the photo as it is.
    """
    if exif_orientation_of(data) == 1:
        return data
    try:
        from PIL import Image, ImageOps

        with Image.open(io.BytesIO(data)) as image:
            return _rgb_png(ImageOps.exif_transpose(image))
    except Exception:  # unreadable: the server's checks name the problem
        return data


def exif_orientation_of(data: bytes) -> int:
    """The EXIF orientation (1..8) of encoded JPEG, PNG or WebP bytes as
    PIL reads it; 1 (as stored) for other kinds and unreadable bytes, whose
    problems the server's checks name."""
    if image_format(data) not in ("jpeg", "png", "webp"):
        return 1
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            return file_exif_orientation(image)
    except Exception:
        return 1


def _rgb_png(image) -> bytes:
    """A PIL image as 8-bit RGB PNG, with the pixels TensorFlow's decoder
    gives for the original (`pil_rgb_array`: 16-bit grey levels keep their
    high byte, where `convert("RGB")` would clip them to white)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pil_rgb_array(image)).save(buffer, format="PNG")
    return buffer.getvalue()


def _tensor_info(info) -> dict:
    shape = None if info.tensor_shape.unknown_rank else [d.size if d.size >= 0 else None for d in info.tensor_shape.dim]
    return {"dtype": tf.dtypes.as_dtype(info.dtype).name, "shape": shape}


def parse_predict_response(response, schema: Schema, count: int) -> list[dict]:
    """PredictResponse of an image signature -> one result dict per image."""
    per_task = []
    for task in schema:
        keys = [task.name + PROBABILITIES_SUFFIX, task.name + CLASS_ID_SUFFIX]
        missing = [k for k in keys if k not in response.outputs]
        if missing:
            raise ServingError(f"response lacks output(s) {missing}: the model does not match its schema")
        probabilities = tf.make_ndarray(response.outputs[keys[0]]).astype(np.float64)
        class_ids = tf.make_ndarray(response.outputs[keys[1]]).astype(np.int64)
        if probabilities.shape != (count, task.num_classes) or class_ids.shape != (count,):
            raise ServingError(
                f"output {keys[0]!r} has shape {probabilities.shape}, expected {(count, task.num_classes)}"
            )
        per_task.append((task, probabilities, class_ids))
    results = []
    for i in range(count):
        result = {}
        for task, probabilities, class_ids in per_task:
            class_id = int(class_ids[i])
            result[task.name] = {
                "label": task.classes[class_id],
                "confidence": float(probabilities[i, class_id]),
                "probabilities": {c: float(p) for c, p in zip(task.classes, probabilities[i])},
            }
        results.append(result)
    return results


def format_results(results: list[dict], names: Optional[Sequence] = None, top_k: int = 3) -> str:
    """Human-readable text for `predict` results, one block per image.

    Binary tasks print their label and confidence; multiclass tasks also the
    `top_k` most likely classes.
    """
    lines = []
    for i, result in enumerate(results):
        name = names[i] if names is not None and i < len(names) else None
        title = f"image #{i}" if name is None or isinstance(name, (bytes, bytearray)) else str(name)
        lines.append(f"{title}:")
        width = max((len(t) for t in result), default=0)
        for task, prediction in result.items():
            line = f"  {task:<{width}}  {prediction['label']} ({prediction['confidence']:.3f})"
            probabilities = prediction["probabilities"]
            if len(probabilities) > 2:
                best = sorted(probabilities.items(), key=lambda kv: -kv[1])[:top_k]
                line += "   top: " + ", ".join(f"{c} {p:.3f}" for c, p in best)
            lines.append(line)
    return "\n".join(lines)


def _arg(args, name, default):
    """An optional argument; only a missing one takes the default (a 0
    reaches the client's own checks instead of turning into the default)."""
    value = getattr(args, name, None)
    return default if value is None else value


def query_main(args) -> int:
    """`tfface query --host HOST:PORT --model NAME IMAGE... [--json]`.

    Reads `host`, `model`, `images`, `json` and optionally `signature`,
    `timeout`, `retries`, `version`, `version_label`, `tls`,
    `root_certificates`, `batch_size` from `args`. Prints results; returns
    the exit code as the rest of the CLI: 2 for a bad argument or input
    file, 1 when the server fails or refuses the call (message on stderr
    either way).
    """
    try:
        client = ServingClient(
            target=getattr(args, "host", None) or "localhost:8500",
            model_name=getattr(args, "model", None) or "tfface",
            signature=getattr(args, "signature", None) or SERVING_DEFAULT,
            timeout_s=_arg(args, "timeout", 10.0),
            retries=_arg(args, "retries", DEFAULT_RETRIES),
            version=getattr(args, "version", None),
            version_label=getattr(args, "version_label", None),
            tls=bool(getattr(args, "tls", False)),
            root_certificates=getattr(args, "root_certificates", None),
            max_message_bytes=_arg(args, "max_message_bytes", DEFAULT_MAX_MESSAGE_BYTES),
        )
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    images = list(args.images)
    try:
        with client:
            results = client.predict(images, batch_size=_arg(args, "batch_size", 32))
    except ServingError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (ValueError, OSError, TypeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps([{"image": str(p), "predictions": r} for p, r in zip(images, results)], indent=2))
    else:
        print(format_results(results, names=images))
    return 0
