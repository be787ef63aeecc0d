"""Exported model versions as the server holds them (servables).

Finding an export's versions on disk, loading each with its signatures and
replaying its warm-up requests is what TF Serving does when a version
appears; kept apart from the gRPC server, it can be read and changed
without the request handling around it.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
from pathlib import Path

import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from tfface.export.saved_model import SERVING_DEFAULT, WARMUP_FILE, list_versions, read_warmup_requests
from tfface.serving.errors import clean_tf_message, invalid

logger = logging.getLogger("tfface.serving")


@dataclasses.dataclass
class Signature:
    name: str
    function: object
    inputs: dict  # input name -> tf.TensorSpec
    outputs: list

    def __call__(self, arrays: dict) -> dict:
        tensors = {k: tf.constant(v, dtype=self.inputs[k].dtype) for k, v in arrays.items()}
        return {k: v.numpy() for k, v in self.function(**tensors).items()}


@dataclasses.dataclass
class Servable:
    name: str
    version: int
    path: Path
    loaded: object
    signatures: dict  # name -> Signature
    signature_defs: dict  # name -> SignatureDef proto


def call_naming_bad_images(signature: "Signature", arrays: dict) -> dict:
    """Runs `signature`; when a batch of encoded images fails to decode,
    finds which image(s) by running each alone (only on that failure path),
    so a client learns which of its photos is broken, not just that one is."""
    try:
        return signature(arrays)
    except tf.errors.InvalidArgumentError:
        images = [key for key, spec in signature.inputs.items() if spec.dtype == tf.string]
        size = len(next(iter(arrays.values())))
        if not images or size < 2:
            raise
        bad = []
        for i in range(size):
            try:
                signature({key: value[i : i + 1] for key, value in arrays.items()})
            except tf.errors.InvalidArgumentError as alone:
                bad.append((i, clean_tf_message(alone.message)))
        if not bad:
            raise
        named = "; ".join(f"{images[0]}[{i}]: {message}" for i, message in bad[:3])
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise invalid(f"the model refused the input: {named}{more}") from None


def load_servable(name: str, version: int, path: Path) -> Servable:
    try:
        loaded = tf.saved_model.load(str(path))
    except Exception as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RuntimeError(f"cannot load SavedModel {path}: {first_line}") from e
    signatures = {}
    for sig_name, function in loaded.signatures.items():
        _, kwargs = function.structured_input_signature
        signatures[sig_name] = Signature(
            name=sig_name,
            function=function,
            inputs=dict(kwargs),
            outputs=sorted(function.structured_outputs),
        )
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((path / "saved_model.pb").read_bytes())
    signature_defs = {}
    for meta_graph in saved_model.meta_graphs:
        if "serve" in meta_graph.meta_info_def.tags:
            signature_defs = {
                k: v for k, v in meta_graph.signature_def.items() if not k.startswith("__")
            }
    servable = Servable(name, version, path, loaded, signatures, signature_defs)
    _run_warmup(servable)
    return servable


def _run_warmup(servable: Servable) -> None:
    """Replays assets.extra warm-up requests, as TF Serving does on load."""
    warmup = servable.path / WARMUP_FILE
    if not warmup.is_file():
        return
    for i, log in enumerate(read_warmup_requests(warmup)):
        request = log.predict_log.request
        signature = servable.signatures.get(request.model_spec.signature_name or SERVING_DEFAULT)
        if signature is None:
            raise RuntimeError(f"{warmup}: record {i} names unknown signature {request.model_spec.signature_name!r}")
        try:
            signature({k: tf.make_ndarray(v) for k, v in request.inputs.items()})
        except Exception as e:
            raise RuntimeError(f"{warmup}: warm-up record {i} failed: {e}") from e


def discover_models(model_dir) -> dict:
    """{model name: {version: folder}} for a model folder or a base folder.

    Accepts `saved_models/NAME/VERSION` (one version), `saved_models/NAME`
    (its versions) or `saved_models` (every NAME inside).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model folder not found: {model_dir}")

    def versions_of(folder: Path) -> dict:
        found = {}
        for v in list_versions(folder):
            if (folder / str(v) / "saved_model.pb").is_file():
                found[v] = folder / str(v)
            else:
                logger.warning("skipping %s: no saved_model.pb", folder / str(v))
        return found

    if (model_dir / "saved_model.pb").is_file():
        version = int(model_dir.name) if model_dir.name.isdigit() else 1
        name = model_dir.parent.name if model_dir.name.isdigit() else model_dir.name
        return {name: {version: model_dir}}
    own = versions_of(model_dir)
    if own:
        return {model_dir.name: own}
    models = {}
    for child in sorted(model_dir.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            found = versions_of(child)
            if found:
                models[child.name] = found
    if not models:
        raise FileNotFoundError(
            f"no exported models under {model_dir}: expected {model_dir}/VERSION/saved_model.pb "
            f"or {model_dir}/NAME/VERSION/saved_model.pb (export one with `tfface export`)"
        )
    return models


def checked_version_labels(version_labels) -> dict:
    """`version_labels` with every version a positive int, or ValueError."""

    def version(where, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"version label {where}: the version must be a positive integer, got {value!r}")
        return int(value)

    checked = {}
    for key, value in (version_labels or {}).items():
        if isinstance(value, dict):
            checked[str(key)] = {str(label): version(f"{key}:{label}", v) for label, v in value.items()}
        else:
            checked[str(key)] = version(str(key), value)
    return checked
