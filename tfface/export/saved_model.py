"""Export a tfface model as a versioned SavedModel that TF Serving loads.

Layout written by `export_saved_model(model, "saved_models", "tfface")`::

    saved_models/tfface/3/
        saved_model.pb, variables/, fingerprint.pb
        assets/schema.json          the Schema (task names, classes, thresholds)
        assets/model_info.json      image size, model type, versions
        assets.extra/tf_serving_warmup_requests

Signatures (clients must look outputs up by name, never by position):

* ``serving_default``: ``images`` tf.string (B,), encoded JPEG/PNG/... of
  any size. Decoded, centre-cropped and resized exactly as in training.
* ``serving_uint8``: ``images_uint8`` uint8 (B, S, S, 3), already
  preprocessed pixels.
* ``schema``: ``unused`` int32 (B,) -> ``schema_json`` tf.string (B,), the
  schema JSON repeated B times, and (tfface 0.2.4 and later)
  ``export_info_json``, what a client must know of the export (its tfface
  version, whether ``serving_default`` turns EXIF-tagged photos upright).
  TF Serving's Predict API needs at least one input, and with
  ``--enable_batching`` it splits every output along dim 0, so the outputs
  are batched too; send ``unused=[0]`` and read element 0.

Outputs of the two image signatures, for every task T of the schema:
``T_probabilities`` float32 (B, C) (binary tasks: C = 2, [1 - p, p]),
``T_label`` tf.string (B,) the class name (binary: positive iff
p >= task.threshold; multiclass: argmax) and ``T_class_id`` int64 (B,).
Both refuse an empty batch (B = 0) with INVALID_ARGUMENT "empty batch".
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import tensorflow as tf

import keras

from tfface.atomic_files import current_umask
from tfface.atomic_files import folder_lock
from tfface.atomic_files import naming_the_target
from tfface.atomic_files import sync_directory
from tfface.atomic_files import sync_folder
from tfface.atomic_files import working_folder
from tfface.data.image_ops import EMPTY_BATCH_MESSAGE
from tfface.data.image_ops import preprocess_encoded_images
from tfface.schema import Schema
from tfface.tf_errors import file_errors_as_os_errors

SERVING_DEFAULT = "serving_default"
SERVING_UINT8 = "serving_uint8"
SCHEMA_SIGNATURE = "schema"
BYTES_INPUT = "images"
UINT8_INPUT = "images_uint8"
SCHEMA_INPUT = "unused"
SCHEMA_OUTPUT = "schema_json"
EXPORT_INFO_OUTPUT = "export_info_json"
SIGNATURE_INPUTS = {
    SERVING_DEFAULT: BYTES_INPUT,
    SERVING_UINT8: UINT8_INPUT,
    SCHEMA_SIGNATURE: SCHEMA_INPUT,
}
PROBABILITIES_SUFFIX = "_probabilities"
LABEL_SUFFIX = "_label"
CLASS_ID_SUFFIX = "_class_id"

SCHEMA_ASSET = "schema.json"
MODEL_INFO_ASSET = "model_info.json"
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
DEFAULT_MAX_IMAGE_SIDE = 4096

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_VERSION_NAME = re.compile(r"[0-9]+")
# TF Serving reads version folder names as int64 and skips any it cannot.
MAX_VERSION = 2**63 - 1


class ExportError(RuntimeError):
    """A model or export location that cannot produce a valid export."""


# --- versions -------------------------------------------------------------------


def list_versions(model_dir) -> list[int]:
    """Integer versions under `model_dir` (all-digit folders), ascending.

    These are exactly the folders TF Serving considers; temp folders of an
    export in progress (".tmp-...") are ignored.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return []
    # ASCII digits only ("²".isdigit() is true too); TF Serving reads the names as int64.
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and _VERSION_NAME.fullmatch(p.name))


def resolve_version_dir(path, version: Optional[int] = None) -> Path:
    """A SavedModel folder from a version folder or a model folder.

    `path` may be `saved_models/NAME/3` (used as is) or `saved_models/NAME`
    (latest version, or `version` when given).
    """
    path = Path(path)
    if (path / "saved_model.pb").is_file() and version is None:
        return path
    versions = list_versions(path)
    if not versions:
        raise FileNotFoundError(
            f"no SavedModel at {path}: expected saved_model.pb or integer version folders"
        )
    if version is None:
        version = versions[-1]
    if version not in versions:
        raise FileNotFoundError(f"model folder {path} has no version {version} (versions: {versions})")
    return path / str(version)


# --- export ---------------------------------------------------------------------


def export_saved_model(
    model,
    export_root,
    name: str,
    version: Optional[int] = None,
    warmup_images: Optional[Sequence] = None,
    schema: Optional[Schema] = None,
    max_image_side: int = DEFAULT_MAX_IMAGE_SIDE,
    verbose: bool = False,
) -> Path:
    """Writes `export_root/name/version/` atomically and returns that path.

    Args:
        model: a Keras model (or the path of a `.keras` file or run folder)
            following the tfface contract (one input
            "image" float32 (B, S, S, 3) in 0..255, dict outputs keyed by task
            name, attributes `schema` and `image_size`).
        export_root: folder holding one folder per model name (TF Serving's
            base folder, e.g. "saved_models").
        name: model name; TF Serving serves it under this name.
        version: integer version; default: one more than the highest
            existing. An existing version is never overwritten.
        warmup_images: encoded images (bytes) or image file paths to record
            as TF Serving warm-up requests of `serving_default` (one request
            of each other signature follows); default: two small generated
            JPEGs; an empty list writes no warm-up file.
        schema: overrides `model.schema` (e.g. with calibrated thresholds).
        max_image_side: `serving_default` refuses images whose longer side
            is larger (checked from the header before decoding when it can).
        verbose: let Keras print the exported endpoints.
    """
    if keras.backend.backend() != "tensorflow":
        raise ExportError(
            f"a SavedModel is a TensorFlow graph: export under KERAS_BACKEND=tensorflow, not {keras.backend.backend()!r} "
            "(save the model as .keras here; the file loads under TensorFlow with the same outputs)"
        )
    if isinstance(model, (str, os.PathLike)):  # a .keras file or a run folder
        from tfface.models.saving import load_model

        model = load_model(model)
    schema = schema if schema is not None else getattr(model, "schema", None)
    if not isinstance(schema, Schema):
        raise ExportError("the model has no `schema` (a tfface.schema.Schema); pass schema=...")
    image_size = getattr(model, "image_size", None)
    if not isinstance(image_size, (int, np.integer)) or image_size <= 0:
        raise ExportError(f"the model needs an integer `image_size` attribute, got {image_size!r}")
    image_size = int(image_size)
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ExportError(
            f"model name {name!r} must start with a letter or digit and contain only "
            "letters, digits, '_', '-' and '.'"
        )
    if name.isdigit():
        raise ExportError(f"model name {name!r} must not be all digits (TF Serving would read it as a version)")
    if version is not None and (not isinstance(version, (int, np.integer)) or not 1 <= version <= MAX_VERSION):
        raise ExportError(
            f"version must be an integer in 1..{MAX_VERSION} (TF Serving skips folders beyond int64), got {version!r}"
        )
    if int(max_image_side) < 1:
        raise ExportError(f"max_image_side must be positive, got {max_image_side}")

    _check_outputs(model, schema, image_size)
    warmup = _warmup_payloads(warmup_images)

    model_dir = Path(export_root) / name
    created_model_dir = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    # By number: a folder "007" is version 7 to TF Serving, which serves one of two such folders.
    if version is not None and ((model_dir / str(version)).exists() or int(version) in list_versions(model_dir)):
        raise FileExistsError(
            f"{model_dir / str(version)} already exists: versions are never overwritten; "
            f"pick another version (existing: {list_versions(model_dir)})"
        )

    with working_folder(model_dir, ".tmp-export-") as tmp:
        try:
            # TensorFlow writes most of the files; their errors name a temporary file.
            with naming_the_target(f"a new version in {model_dir}", tmp, note="nothing was added"):
                with file_errors_as_os_errors():
                    target = _write_version(
                        model, schema, image_size, name, version, int(max_image_side), warmup, model_dir, tmp, verbose
                    )
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            if created_model_dir:
                try:
                    model_dir.rmdir()  # only if still empty
                except OSError:
                    pass
            raise
    return target


def _write_version(model, schema, image_size, name, version, max_image_side, warmup, model_dir, tmp, verbose) -> Path:
    """Writes the export in `tmp` and renames it to the model's next version
    (or `version`); the version folder's path."""
    archive = build_export_archive(model, schema, image_size, max_image_side=max_image_side)
    archive.write_out(str(tmp), verbose=verbose)
    if warmup:
        write_warmup_requests(tmp / WARMUP_FILE, name, warmup, image_size=image_size)
    # The version is picked when the export is complete, under a lock, so
    # two exports of one name at once take consecutive versions.
    with folder_lock(model_dir):
        chosen = int(version) if version is not None else (list_versions(model_dir) or [0])[-1] + 1
        if chosen > MAX_VERSION:
            raise ExportError(
                f"the next version after {chosen - 1} is beyond int64, which TF Serving cannot read; "
                "pass a version that is free (version=N, --version N)"
            )
        target = model_dir / str(chosen)
        if target.exists() or chosen in list_versions(model_dir):
            raise FileExistsError(f"{target} appeared while exporting; not overwriting it")
        _write_assets(tmp, model, schema, image_size, name, chosen, max_image_side)
        # mkdtemp makes the folder owner-only; a server running as another
        # user (docker --user, runAsNonRoot) must be able to read the version.
        os.chmod(tmp, 0o777 & ~current_umask())
        sync_folder(tmp)
        os.rename(tmp, target)
        sync_directory(model_dir)
    return target


def build_export_archive(model, schema: Schema, image_size: int, max_image_side: int = DEFAULT_MAX_IMAGE_SIDE):
    """A `keras.export.ExportArchive` with the three tfface signatures."""
    schema_json = schema.to_json()

    def run_model(images_float):
        outputs = model(_model_input(model, images_float), training=False)
        return postprocess_outputs(outputs, schema)

    def serve_bytes(images):  # refuses an empty batch in its header checks
        return run_model(preprocess_encoded_images(images, image_size, max_image_side))

    def serve_uint8(images_uint8):
        # Run through the model, oneDNN's CPU batch norm fails an empty batch with
        # "Incompatible shapes: [C] vs. [0,S,S,3]"; this names the problem.
        with tf.control_dependencies([tf.Assert(tf.shape(images_uint8)[0] > 0, [EMPTY_BATCH_MESSAGE])]):
            return run_model(tf.cast(images_uint8, tf.float32))

    info_json = json.dumps(export_info(image_size, max_image_side), sort_keys=True)

    def serve_schema(unused):
        return {
            SCHEMA_OUTPUT: tf.fill(tf.shape(unused), tf.constant(schema_json)),
            EXPORT_INFO_OUTPUT: tf.fill(tf.shape(unused), tf.constant(info_json)),
        }

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        name=SERVING_DEFAULT,
        fn=serve_bytes,
        input_signature=[tf.TensorSpec([None], tf.string, name=BYTES_INPUT)],
    )
    archive.add_endpoint(
        name=SERVING_UINT8,
        fn=serve_uint8,
        input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8, name=UINT8_INPUT)],
    )
    archive.add_endpoint(
        name=SCHEMA_SIGNATURE,
        fn=serve_schema,
        input_signature=[tf.TensorSpec([None], tf.int32, name=SCHEMA_INPUT)],
    )
    return archive


def postprocess_outputs(outputs, schema: Schema) -> dict:
    """Model output dict -> {T_probabilities, T_label, T_class_id} per task.

    Keys starting with "_" (training-only auxiliaries) are dropped. The
    binary tasks are thresholded and labelled together as one (B, N) tensor
    and split once at the end: per task, that was ~6 small ops each, which
    cost more than the model's heads at batch 1.
    """
    result = {}
    binary = [task for task in schema if task.is_binary]
    if binary:
        positive = tf.concat([tf.reshape(tf.cast(outputs[t.name], tf.float32), [-1, 1]) for t in binary], axis=1)
        thresholds = tf.constant([t.threshold for t in binary], tf.float32)
        class_id = tf.cast(positive >= thresholds, tf.int64)
        # Row k of the flat table holds task k's (negative, positive) names.
        names = tf.constant([name for t in binary for name in t.classes])
        labels = tf.gather(names, class_id + 2 * tf.range(len(binary), dtype=tf.int64))
        probabilities = tf.stack([1.0 - positive, positive], axis=-1)
        for task, p, label, cid in zip(
            binary,
            tf.unstack(probabilities, num=len(binary), axis=1),
            tf.unstack(labels, num=len(binary), axis=1),
            tf.unstack(class_id, num=len(binary), axis=1),
        ):
            result[task.name + PROBABILITIES_SUFFIX] = p
            result[task.name + LABEL_SUFFIX] = label
            result[task.name + CLASS_ID_SUFFIX] = cid
    for task in schema:
        if task.is_binary:
            continue
        probabilities = tf.cast(outputs[task.name], tf.float32)
        class_id = tf.argmax(probabilities, axis=-1, output_type=tf.int64)
        result[task.name + PROBABILITIES_SUFFIX] = probabilities
        result[task.name + LABEL_SUFFIX] = tf.gather(tf.constant(list(task.classes)), class_id)
        result[task.name + CLASS_ID_SUFFIX] = class_id
    suffixes = (PROBABILITIES_SUFFIX, LABEL_SUFFIX, CLASS_ID_SUFFIX)
    return {t.name + suffix: result[t.name + suffix] for t in schema for suffix in suffixes}  # schema order


def _model_input(model, images):
    """tfface models take {"image": ...}; a plain one-input model the tensor."""
    return {"image": images} if isinstance(getattr(model, "input", None), dict) else images


def _check_outputs(model, schema: Schema, image_size: int) -> None:
    """Runs the model once on zeros so contract violations fail before writing."""
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) > 1:
        raise ExportError(
            f"the model must have exactly one input ('image'), it has {len(inputs)}; a mask-guided model that "
            "takes landmark masks exports as tfface.models.mask_guided_model.landmark_mask_variant(model, False), "
            "which predicts its masks"
        )
    zeros = np.zeros((2, image_size, image_size, 3), np.float32)
    outputs = model(_model_input(model, zeros), training=False)
    if not isinstance(outputs, dict):
        raise ExportError(f"the model must return a dict of outputs keyed by task name, got {type(outputs).__name__}")
    public = {k for k in outputs if not k.startswith("_")}
    missing = [t.name for t in schema if t.name not in outputs]
    if missing:
        raise ExportError(f"the model has no outputs for schema tasks {missing} (outputs: {sorted(public)})")
    extra = sorted(public - set(schema.task_names))
    if extra:
        raise ExportError(f"the model has outputs {extra} that are not tasks of schema {schema.name!r}")
    for task in schema:
        shape = tuple(keras.ops.shape(outputs[task.name]))
        expected = [(2,), (2, 1)] if task.is_binary else [(2, task.num_classes)]
        if shape not in expected:
            raise ExportError(
                f"output {task.name!r} has shape {shape} for a batch of 2; a {task.kind} task "
                f"with {task.num_classes} classes needs {expected[0]}"
            )


def _tfface_version() -> str:
    try:
        import tfface

        version = getattr(tfface, "__version__", None)
        if version:
            return str(version)
    except ImportError:  # pragma: no cover
        pass
    try:
        from importlib.metadata import version as dist_version

        return dist_version("tfface")
    except Exception:
        return "unknown"


def export_info(image_size: int, max_image_side: int) -> dict:
    """What the `schema` signature tells clients of this export, beyond the
    schema. The client turns tagged photos upright itself for exports that
    do not say they do (before 0.2.4; those before 0.2.1 need it): this is
    how it tells them apart."""
    return {
        "tfface_version": _tfface_version(),
        "image_size": int(image_size),
        "max_image_side": int(max_image_side),
        "applies_exif_orientation": True,
    }


def _write_assets(root: Path, model, schema, image_size, name, version, max_image_side) -> None:
    assets = root / "assets"
    assets.mkdir(exist_ok=True)
    (assets / SCHEMA_ASSET).write_text(schema.to_json())
    info = {
        "name": name,
        "version": version,
        "model_type": getattr(model, "model_type", None) or type(model).__name__,
        "model_name": getattr(model, "name", None),
        "schema_name": schema.name,
        "tasks": schema.task_names,
        "signatures": {
            SERVING_DEFAULT: BYTES_INPUT,
            SERVING_UINT8: UINT8_INPUT,
            SCHEMA_SIGNATURE: SCHEMA_INPUT,
        },
        **export_info(image_size, max_image_side),
        "tensorflow_version": tf.__version__,
        "keras_version": keras.__version__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (assets / MODEL_INFO_ASSET).write_text(json.dumps(info, indent=2))


# --- warm-up ----------------------------------------------------------------------


def _warmup_payloads(warmup_images) -> list[bytes]:
    if warmup_images is None:
        rng = np.random.default_rng(0)
        return [
            tf.io.encode_jpeg(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).numpy()
            for h, w in ((48, 64), (32, 32))
        ]
    payloads = []
    for item in warmup_images:
        if isinstance(item, (bytes, bytearray)):
            payloads.append(bytes(item))
            continue
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"warm-up image not found: {path}")
        payloads.append(path.read_bytes())
    return payloads


def write_warmup_requests(
    path, model_name: str, images: Iterable[bytes], batch_size: int = 2, image_size: Optional[int] = None
) -> int:
    """Writes TF Serving warm-up PredictionLogs: `serving_default` on
    `images`, and with `image_size` one `serving_uint8` and one `schema` request.

    TF Serving replays these records when it loads the version, so the
    first real request of each signature does not pay for its graph's
    initialisation (measured on a 64 px export: 440 ms for the first bytes
    request, 150 ms for the first uint8 one, 7 ms for the schema). Returns
    the number of records written.
    """
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    images = list(images)
    requests = [
        (SERVING_DEFAULT, BYTES_INPUT, tf.make_tensor_proto(images[start : start + batch_size], dtype=tf.string))
        for start in range(0, len(images), batch_size)
    ]
    if image_size is not None:
        zeros = np.zeros((batch_size, image_size, image_size, 3), np.uint8)
        requests.append((SERVING_UINT8, UINT8_INPUT, tf.make_tensor_proto(zeros)))
        requests.append((SCHEMA_SIGNATURE, SCHEMA_INPUT, tf.make_tensor_proto(np.zeros([1], np.int32))))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tf.io.TFRecordWriter(str(path)) as writer:
        for signature, input_name, tensor in requests:
            request = predict_pb2.PredictRequest(
                model_spec=model_pb2.ModelSpec(name=model_name, signature_name=signature)
            )
            request.inputs[input_name].CopyFrom(tensor)
            log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return len(requests)


def read_warmup_requests(path) -> list:
    """The PredictionLog records of a warm-up file (for checks and tests)."""
    from tensorflow_serving.apis import prediction_log_pb2

    records = []
    for raw in tf.data.TFRecordDataset(str(path)):
        log = prediction_log_pb2.PredictionLog()
        log.ParseFromString(raw.numpy())
        records.append(log)
    return records


# --- loading -----------------------------------------------------------------------


def load_exported(path, version: Optional[int] = None):
    """Loads an export: returns `(loaded, schema)`.

    `path` is a version folder or a model folder (latest version unless
    `version`). `loaded.signatures[...]` are the serving signatures.
    """
    version_dir = resolve_version_dir(path, version)
    schema_file = version_dir / "assets" / SCHEMA_ASSET
    loaded = tf.saved_model.load(str(version_dir))
    if schema_file.is_file():
        schema = Schema.load(schema_file)
    elif SCHEMA_SIGNATURE in loaded.signatures:
        out = loaded.signatures[SCHEMA_SIGNATURE](**{SCHEMA_INPUT: tf.constant([0], tf.int32)})
        schema = Schema.from_json(out[SCHEMA_OUTPUT].numpy()[0].decode("utf-8"))
    else:
        raise ExportError(f"{version_dir} is not a tfface export: no assets/{SCHEMA_ASSET} and no schema signature")
    return loaded, schema


def load_model_info(path, version: Optional[int] = None) -> dict:
    """`assets/model_info.json` of an export as a dict."""
    version_dir = resolve_version_dir(path, version)
    info_file = version_dir / "assets" / MODEL_INFO_ASSET
    if not info_file.is_file():
        raise ExportError(f"{version_dir} has no assets/{MODEL_INFO_ASSET}")
    return json.loads(info_file.read_text())
