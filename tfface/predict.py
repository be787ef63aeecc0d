"""Face analysis for end users: photos in, per-face attributes out.

`FaceAnalyzer` finds every face in every photo (MTCNN), warps each onto the
five-point layout the models were trained on (`TEMPLATE_5PT`, measured on
CelebA's square crops) and runs all faces of all photos through the model
in batches: one model call per `batch_size` faces, never one per face.

One result per image, JSON-ready:

    {"image": "photos/a.jpg", "error": None, "faces": [
        {"box": [x, y, w, h], "landmarks": [[x, y], ...5],
         "detector_confidence": 0.99,
         "attributes": {"Smiling": {"label": "yes", "confidence": 0.91,
                                    "probability": 0.91}, ...},
         "age_group": {"label": "20-29", "confidence": 0.6,
                       "probabilities": {"0-2": 0.01, ...}},
         ...}]}

Binary tasks sit under "attributes" (label from the task's calibrated
threshold; confidence is the probability of the chosen label, probability
that of the positive class); multiclass tasks (age_group, race) sit beside
it, each with its class probabilities. An image without a face has
`faces: []` and `"note": "no face detected"`; an image that cannot be read
has `"error"` saying what and which, and the run goes on.

Faces are aligned with an antialiased downscale first: the models saw
faces resized with an antialiased filter (178 px or 200 px -> model size),
and a plain bilinear warp of a large face would alias.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
from collections import deque
from itertools import count, islice
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from tfface.atomic_files import naming_the_target
from tfface.data.image_ops import pil_rgb_array
from tfface.data.sources import IMAGE_EXTENSIONS as DATASET_IMAGE_EXTENSIONS
from tfface.landmarks.alignment import TEMPLATE_5PT, align_face, similarity_transform, transform_points
from tfface.landmarks.detector import LandmarkError, check_rgb_image

# Photos are read with PIL, which also reads TIFF (TensorFlow's decoder, and
# so a dataset, does not).
IMAGE_EXTENSIONS = DATASET_IMAGE_EXTENSIONS + (".tif", ".tiff")
NO_FACE_NOTE = "no face detected"
# Face-level keys; a multiclass task may not take one of these names.
FACE_KEYS = ("box", "landmarks", "detector_confidence", "attributes")


# --- reading images ------------------------------------------------------------------


def _to_rgb_array(array, name: str) -> np.ndarray:
    """uint8 grey / RGB / RGBA arrays -> (H, W, 3); anything else is refused."""
    array = np.asarray(array)
    if array.dtype == np.uint8:
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=-1)
        elif array.ndim == 3 and array.shape[-1] == 1:
            array = np.repeat(array, 3, axis=-1)
        elif array.ndim == 3 and array.shape[-1] == 4:
            array = array[..., :3]
    return np.ascontiguousarray(check_rgb_image(array, name))


def _decode(data, name: str) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(data) as image:
            # Phone photos: honour the EXIF rotation. 16-bit grey as TensorFlow reads it, not clipped to white.
            return pil_rgb_array(ImageOps.exif_transpose(image))
    except Image.DecompressionBombError as e:
        raise LandmarkError(f"{name}: image too large to decode safely ({e})") from None
    except UnidentifiedImageError:
        raise LandmarkError(f"{name}: not a readable image (unknown format or corrupt data)") from None
    except (OSError, ValueError, SyntaxError) as e:  # SyntaxError: some broken PNG headers
        raise LandmarkError(f"{name}: not a readable image ({e})") from None


def load_image(item, name: str) -> np.ndarray:
    """A path, encoded bytes or an array -> uint8 (H, W, 3); raises LandmarkError."""
    if isinstance(item, (str, Path)):
        path = Path(item)
        if not path.exists():
            raise LandmarkError(f"{name}: file not found")
        if path.is_dir():
            raise LandmarkError(f"{name}: is a folder, not an image")
        image = _decode(path, name)
    elif isinstance(item, (bytes, bytearray, memoryview)):
        if len(item) == 0:
            raise LandmarkError(f"{name}: empty bytes, not an image")
        image = _decode(io.BytesIO(bytes(item)), name)
    elif isinstance(item, np.ndarray):
        image = item
    else:
        raise LandmarkError(
            f"{name}: expected a file path, encoded image bytes or a uint8 array, got {type(item).__name__}"
        )
    return _to_rgb_array(image, name)


def _default_name(item, index: int) -> str:
    if isinstance(item, (str, Path)):
        return str(item)
    if isinstance(item, (bytes, bytearray, memoryview)):
        return f"bytes #{index}"
    return f"image #{index}"


# --- alignment -------------------------------------------------------------------------


def align_for_model(image: np.ndarray, landmarks: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The model's input crop of one face: (uint8 (size, size, 3), aligned landmarks (5, 2)).

    When the face must shrink, the region it comes from is first resized
    with Pillow's antialiased bilinear filter (the same triangle filter as
    the training pipeline's `tf.image.resize(antialias=True)`), so the warp
    that follows is near 1:1 and does not alias.
    """
    from PIL import Image

    landmarks = np.asarray(landmarks, np.float64)
    matrix = similarity_transform(landmarks, TEMPLATE_5PT.astype(np.float64) * size)
    scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2].astype(np.float64)))))
    if scale < 0.9:
        # Source region the output square comes from (its four corners).
        linear = matrix[:, :2].astype(np.float64)
        inverse = np.linalg.inv(linear)
        corners = np.array([[0, 0], [size, 0], [0, size], [size, size]], np.float64)
        source = (corners - matrix[:, 2]) @ inverse.T
        height, width = image.shape[:2]
        x0 = int(np.clip(np.floor(source[:, 0].min()) - 2, 0, width - 1))
        y0 = int(np.clip(np.floor(source[:, 1].min()) - 2, 0, height - 1))
        x1 = int(np.clip(np.ceil(source[:, 0].max()) + 2, x0 + 1, width))
        y1 = int(np.clip(np.ceil(source[:, 1].max()) + 2, y0 + 1, height))
        crop = image[y0:y1, x0:x1]
        new_w = max(12, int(round(crop.shape[1] * scale)))
        new_h = max(12, int(round(crop.shape[0] * scale)))
        resized = Image.fromarray(crop).resize((new_w, new_h), Image.Resampling.BILINEAR)
        factors = np.array([new_w / crop.shape[1], new_h / crop.shape[0]])
        image = np.asarray(resized)
        landmarks = (landmarks - [x0, y0]) * factors
    aligned, local_matrix = align_face(image, landmarks, output_size=size)
    return aligned, transform_points(landmarks, local_matrix)


# --- the analyzer ------------------------------------------------------------------------


class _Pending:
    """One image on its way through: its result and the faces still unscored."""

    __slots__ = ("result", "image", "remaining")

    def __init__(self, result, image, remaining):
        self.result, self.image, self.remaining = result, image, remaining


class FaceAnalyzer:
    """Detects, aligns and analyses every face in a stream of photos.

    Args:
        model: a tfface model (`MultiTaskFaceModel`, or a reloaded `.keras`
            one): it has `schema` and `image_size` and takes
            {"image": float32 (B, S, S, 3) in 0..255}.
        detector: anything with `detect_batch(images) -> list[list[Detection]]`
            (default: a new `FaceDetector()`; MTCNN loads on first use).
        batch_size: faces per model call.
        detection_batch_size: images read and detected together (the
            detector batches images of one shape in one MTCNN call).
        max_detection_side: photos larger than this are detected on a
            downscaled copy (MTCNN's cost grows with the pixel count; a
            12 MP photo would take seconds). Faces are still aligned from
            the full-resolution photo. None detects at full size.

    `timings` accumulates seconds per stage ("load", "detect", "align",
    "model") and counts ("images", "faces", "model_calls") over all runs;
    `reset_timings()` clears it.
    """

    def __init__(
        self,
        model,
        detector=None,
        batch_size: int = 32,
        detection_batch_size: int = 16,
        max_detection_side: Optional[int] = 1280,
    ):
        schema = getattr(model, "schema", None)
        if schema is None:
            raise TypeError(
                f"expected a tfface model with a `schema` (load one with tfface.models.saving.load_model), "
                f"got {type(model).__name__}"
            )
        for name, value in (("batch_size", batch_size), ("detection_batch_size", detection_batch_size)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if max_detection_side is not None and int(max_detection_side) < 64:
            raise ValueError(f"max_detection_side must be >= 64 or None, got {max_detection_side!r}")
        for task in schema.multiclass_tasks:
            if task.name in FACE_KEYS:
                raise ValueError(f"multiclass task name {task.name!r} clashes with a face field {FACE_KEYS}")
        self.model = model
        self.schema = schema
        self.image_size = int(getattr(model, "image_size", 0) or model.inputs[0].shape[1])
        if detector is None:
            from tfface.landmarks.detector import FaceDetector

            detector = FaceDetector()
        self.detector = detector
        self.batch_size = int(batch_size)
        self.detection_batch_size = int(detection_batch_size)
        self.max_detection_side = None if max_detection_side is None else int(max_detection_side)
        input_names = [t.name.split(":")[0] for t in getattr(model, "inputs", [])]
        # Mask-guided models with `use_landmark_masks` take masks drawn from landmarks.
        self._mask_size = None
        if "group_masks" in input_names:
            self._mask_size = int(model.inputs[input_names.index("group_masks")].shape[1])
        self._predict_fn = None
        self.reset_timings()

    def reset_timings(self):
        self.timings = {"load": 0.0, "detect": 0.0, "align": 0.0, "model": 0.0, "images": 0, "faces": 0, "model_calls": 0}

    # --- public ----------------------------------------------------------------------
    def analyze(self, images: Iterable, names: Optional[Sequence[str]] = None) -> list[dict]:
        """One result dict per image (see the module docstring), in input order.

        Args:
            images: file paths, encoded image bytes and/or uint8 arrays.
            names: what to call each image in the results (default: the
                path, or "bytes #i" / "image #i").
        """
        return [result for result, _ in self._run(images, names, keep_images=False)]

    def analyze_iter(self, images: Iterable, names: Optional[Sequence[str]] = None) -> Iterator[dict]:
        """Like `analyze`, but yields each result as soon as its faces are scored."""
        for result, _ in self._run(images, names, keep_images=False):
            yield result

    # --- the stream ------------------------------------------------------------------
    def _run(self, images, names, keep_images: bool):
        """Yields (result, decoded image or None) per input, in order."""
        if isinstance(images, (str, Path, bytes, bytearray)):
            images = [images]  # one image, not a sequence of characters
        elif isinstance(images, np.ndarray) and images.ndim in (2, 3):
            images = [images]  # one (H, W[, C]) image, not a sequence of rows
        names = list(names) if names is not None else None
        if names is not None and hasattr(images, "__len__") and len(names) != len(images):
            raise ValueError(f"names has {len(names)} entries for {len(images)} images; give one name per image")
        items = iter(enumerate(images))
        pending: deque[_Pending] = deque()
        queue: list = []  # (pending, face index, aligned uint8, aligned landmarks)
        while True:
            chunk = list(islice(items, self.detection_batch_size))
            if not chunk:
                break
            for record, faces in self._detect_chunk(chunk, names, keep_images):
                pending.append(record)
                queue.extend(faces)
            while len(queue) >= self.batch_size:
                self._score(queue[: self.batch_size])
                del queue[: self.batch_size]
            yield from self._finished(pending)
        if queue:
            self._score(queue)
        yield from self._finished(pending)

    @staticmethod
    def _finished(pending):
        while pending and pending[0].remaining == 0:
            record = pending.popleft()
            yield record.result, record.image

    def _detect_chunk(self, chunk, names, keep_images):
        """Reads, detects and aligns one chunk of images."""
        started = time.perf_counter()
        records, decoded = [], []
        for index, item in chunk:
            if names is not None:
                if index >= len(names):  # images from a generator: known only now
                    raise ValueError(f"names has {len(names)} entries for more images than that")
                name = str(names[index])
            else:
                name = _default_name(item, index)
            result = {"image": name, "faces": [], "error": None}
            try:
                image = load_image(item, name)
            except LandmarkError as e:
                result["error"] = str(e)
                image = None
            records.append(_Pending(result, image, 0))
            decoded.append(image)
        self.timings["images"] += len(chunk)
        now = time.perf_counter()
        self.timings["load"] += now - started

        readable = [i for i, image in enumerate(decoded) if image is not None]
        inputs, scales = [], []
        for i in readable:
            small, factor = self._detection_copy(decoded[i])
            inputs.append(small)
            scales.append(factor)
        detections = self.detector.detect_batch(inputs) if inputs else []
        self.timings["detect"] += time.perf_counter() - now
        now = time.perf_counter()

        out = []
        by_record = {i: [] for i in range(len(records))}
        for i, faces, factor in zip(readable, detections, scales):
            record, image = records[i], decoded[i]
            for face in faces:
                box = np.asarray(face.box, np.float64) / factor
                landmarks = np.asarray(face.landmarks, np.float64) / factor
                try:
                    aligned, aligned_landmarks = align_for_model(image, landmarks, self.image_size)
                except LandmarkError:  # degenerate landmarks (all one point): not a usable face
                    continue
                face_result = {
                    "box": [round(float(v), 1) for v in box],
                    "landmarks": [[round(float(x), 1), round(float(y), 1)] for x, y in landmarks],
                    "detector_confidence": round(float(face.confidence), 4),
                }
                record.result["faces"].append(face_result)
                by_record[i].append((record, face_result, aligned, aligned_landmarks))
            if not record.result["faces"]:
                record.result["note"] = NO_FACE_NOTE
            record.remaining = len(by_record[i])
        for i, record in enumerate(records):
            if not keep_images:
                record.image = None
            out.append((record, by_record[i]))
        self.timings["align"] += time.perf_counter() - now
        return out

    def _detection_copy(self, image):
        """The image MTCNN sees, and the factor from original to it."""
        side = max(image.shape[:2])
        if self.max_detection_side is None or side <= self.max_detection_side:
            return image, 1.0
        from PIL import Image

        factor = self.max_detection_side / side
        size = (max(12, round(image.shape[1] * factor)), max(12, round(image.shape[0] * factor)))
        small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))
        return small, size[0] / image.shape[1]

    # --- the model -------------------------------------------------------------------
    def _model_inputs(self, faces):
        inputs = {"image": np.stack([f[2] for f in faces]).astype(np.float32)}
        if self._mask_size is not None:
            from tfface.landmarks.group_masks import group_masks_tf

            fractions = np.stack([f[3] for f in faces]).astype(np.float32) / self.image_size
            inputs["group_masks"] = np.asarray(group_masks_tf(fractions, self._mask_size))
        return inputs

    def _predict(self, inputs) -> dict:
        if self._predict_fn is None:
            self._predict_fn = _make_predict_fn(self.model, self.schema.task_names)
        return self._predict_fn(inputs)

    def _score(self, faces):
        """One model call for up to `batch_size` faces; fills in their results."""
        started = time.perf_counter()
        outputs = self._predict(self._model_inputs(faces))
        self.timings["model"] += time.perf_counter() - started
        self.timings["model_calls"] += 1
        self.timings["faces"] += len(faces)
        for row, (record, face_result, _, _) in enumerate(faces):
            face_result.update(task_predictions(self.schema, outputs, row))
            record.remaining -= 1


def _make_predict_fn(model, task_names):
    """model inputs -> {task: numpy probabilities}; one compiled graph on TensorFlow.

    A `tf.function` around the model call is ~3x cheaper per call than
    `predict_on_batch` on a CPU; its input signature leaves the batch size
    open, so the graph is traced once, whatever size the last batch has.
    """
    import keras

    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        signature = {
            t.name.split(":")[0]: tf.TensorSpec((None, *t.shape[1:]), tf.float32) for t in model.inputs
        }

        @tf.function(input_signature=[signature], autograph=False)
        def call(inputs):
            outputs = model(inputs, training=False)
            return {name: outputs[name] for name in task_names}

        return lambda inputs: {k: np.asarray(v) for k, v in call(inputs).items()}

    def predict(inputs):
        outputs = model.predict_on_batch(inputs)
        return {name: np.asarray(outputs[name]) for name in task_names}

    return predict


def task_predictions(schema, outputs: dict, row: int) -> dict:
    """The JSON fields of one face from the model's outputs (row `row`).

    Binary tasks go under "attributes": the label is the positive class when
    its probability reaches the task's threshold. Multiclass tasks become
    face-level fields with their class probabilities.
    """
    attributes, fields = {}, {}
    for task in schema:
        probs = np.asarray(outputs[task.name])[row]
        if task.is_binary:
            p = float(np.reshape(probs, (-1,))[0])
            positive = p >= task.threshold
            attributes[task.name] = {
                "label": task.classes[1] if positive else task.classes[0],
                "confidence": round(p if positive else 1.0 - p, 4),
                "probability": round(p, 4),
            }
        else:
            probs = np.reshape(probs, (-1,))
            best = int(np.argmax(probs))
            fields[task.name] = {
                "label": task.classes[best],
                "confidence": round(float(probs[best]), 4),
                "probabilities": {c: round(float(v), 4) for c, v in zip(task.classes, probs)},
            }
    return {"attributes": attributes, **fields}


def predict_faces(model_or_path, images: Iterable, batch_size: int = 32, detector=None) -> list[dict]:
    """Analyses `images` with a model or a `.keras` path; see `FaceAnalyzer.analyze`."""
    model = model_or_path
    if isinstance(model_or_path, (str, Path)):
        from tfface.models.saving import load_model

        model = load_model(model_or_path)
    return FaceAnalyzer(model, detector=detector, batch_size=batch_size).analyze(images)


# --- drawing -----------------------------------------------------------------------------


def summary_lines(face: dict, schema, max_attributes: int = 3) -> list[str]:
    """A few short lines describing one face: multiclass labels, binary
    tasks with their own class names (gender), then the most confident
    positive yes/no attributes."""
    lines = []
    for task in schema.multiclass_tasks:
        if task.name in face:
            lines.append(f"{task.name}: {face[task.name]['label']} ({face[task.name]['confidence']:.2f})")
    positives = []
    for task in schema.binary_tasks:
        value = face.get("attributes", {}).get(task.name)
        if value is None:
            continue
        if tuple(task.classes) != ("no", "yes"):
            lines.append(f"{value['label']} ({value['confidence']:.2f})")
        elif value["label"] == "yes":
            positives.append((value["confidence"], task.name))
    for confidence, name in sorted(positives, reverse=True)[:max_attributes]:
        lines.append(f"{name} ({confidence:.2f})")
    return lines


def draw_faces(image: np.ndarray, result: dict, schema, max_attributes: int = 3):
    """A PIL image with each face's box, landmarks and a few attributes."""
    from PIL import Image, ImageDraw, ImageFont

    canvas = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    side = max(canvas.size)
    width = max(1, side // 300)
    font = ImageFont.load_default(size=max(10, side // 50))
    colours = ((255, 64, 64), (64, 200, 255), (255, 200, 0), (120, 255, 120), (255, 120, 255))
    for n, face in enumerate(result["faces"]):
        colour = colours[n % len(colours)]
        x, y, w, h = face["box"]
        draw.rectangle([x, y, x + w, y + h], outline=colour, width=width)
        r = max(2, width + 1)
        for px, py in face["landmarks"]:
            draw.ellipse([px - r, py - r, px + r, py + r], fill=colour)
        text = "\n".join(summary_lines(face, schema, max_attributes))
        if text:
            left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font)
            tx = min(max(0, x), max(0, canvas.size[0] - (right - left) - 2))
            ty = y + h + 2 if y + h + (bottom - top) + 4 < canvas.size[1] else max(0, y - (bottom - top) - 4)
            draw.rectangle([tx, ty, tx + right - left + 4, ty + bottom - top + 4], fill=(0, 0, 0))
            draw.multiline_text((tx + 2, ty + 2 - top), text, fill=colour, font=font)
    if not result["faces"]:
        draw.text((4, 4), result.get("note") or "", fill=(255, 64, 64), font=font)
    return canvas


# --- the command line ----------------------------------------------------------------------


def expand_inputs(inputs: Sequence) -> list[Path]:
    """Files as given (even missing ones: they are reported per image) and
    the image files under each folder, sorted. Raises FileNotFoundError when
    nothing given exists, or no image is found at all."""
    paths, exists = [], False
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            exists = True
            paths.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
                )
            )
        else:
            exists = exists or path.exists()
            paths.append(path)
    if not exists:
        raise FileNotFoundError(f"no input found: none of {[str(i) for i in inputs]} exists")
    if not any(p.exists() for p in paths):
        raise FileNotFoundError(f"no image files found in {[str(i) for i in inputs]} (extensions {IMAGE_EXTENSIONS})")
    return paths


@contextlib.contextmanager
def _results_file(out_path):
    """The --out stream: results go to OUT.partial and replace an earlier OUT
    only when the run completes; a run that stops keeps what it wrote in
    OUT.partial (and says so); the next run moves such a file to
    OUT.partial.N first. A pipe or device is written directly."""
    out = Path(os.path.realpath(out_path))
    if out.exists() and not out.is_file():
        with open(out, "w") as stream:
            yield stream
        return
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        kept = next(
            candidate
            for candidate in (partial.with_name(f"{partial.name}.{n}") for n in count(1))
            if not candidate.exists()
        )
        os.rename(partial, kept)
        print(f"predict: an earlier stopped run's results were moved from {partial} to {kept}", file=sys.stderr)
    stream = open(partial, "w")
    try:
        with naming_the_target(partial, note=f"{out} is unchanged"):
            yield stream
            stream.close()  # flushes: a full disk fails here too
    except BaseException:
        with contextlib.suppress(OSError):
            stream.close()  # a full disk fails the flush again
        _trim_to_whole_lines(partial)
        print(f"predict: stopped; the results so far are in {partial} ({out} is unchanged)", file=sys.stderr)
        raise
    os.replace(partial, out)


def _trim_to_whole_lines(path) -> None:
    """Cuts a results file back to its last complete line: a write that
    failed half-way (a full disk) left a record cut off mid-JSON."""
    with contextlib.suppress(OSError), open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        keep, position = 0, end
        while position > 0:
            start = max(0, position - 65536)
            f.seek(start)
            block = f.read(position - start)
            newline = block.rfind(b"\n")
            if newline >= 0:
                keep = start + newline + 1
                break
            position = start
        if keep < end:
            f.truncate(keep)


# Marks a --draw folder as tfface's own, so a later run may replace its
# drawings; in any other folder an existing file is never overwritten.
DRAWINGS_MARKER = ".tfface-drawings"


def _drawing_paths(folder: Path, paths: Sequence[Path]) -> list[Path]:
    """One PNG per input, named after it; refused up front when a drawing
    would land on an input image (e.g. --draw pointing at the photo folder)
    or on a file of a folder tfface did not draw into."""
    used: set = set()
    drawings = [_drawing_path(folder, str(path), used) for path in paths]
    inputs = {path.resolve() for path in paths}
    clash = next((d for d in drawings if d.resolve() in inputs), None)
    if clash is not None:
        raise FileExistsError(f"--draw {folder} would overwrite the input image {clash}; choose another folder")
    if not (folder / DRAWINGS_MARKER).exists():
        taken = next((d for d in drawings if d.exists()), None)
        if taken is not None:
            raise FileExistsError(
                f"--draw {folder} already holds {taken.name}, which tfface predict did not draw; "
                "choose a new or empty folder"
            )
    return drawings


def _drawing_path(folder: Path, name: str, used: set) -> Path:
    stem = Path(name).name
    for suffix in IMAGE_EXTENSIONS:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    candidate, n = stem, 1
    while candidate in used:
        candidate, n = f"{stem}_{n}", n + 1
    used.add(candidate)
    return folder / f"{candidate}.png"


def predict_main(args) -> int:
    """`tfface predict`: JSON lines per image to stdout or `--out`, and
    annotated PNGs with `--draw DIR`. Unreadable images are reported and
    skipped (exit 0); no existing input at all raises FileNotFoundError
    (the CLI exits 2)."""
    paths = expand_inputs(args.inputs)
    draw_dir = Path(args.draw) if getattr(args, "draw", None) else None
    drawings = _drawing_paths(draw_dir, paths) if draw_dir is not None else None
    out_path = getattr(args, "out", None)
    if out_path and Path(out_path).resolve() in {p.resolve() for p in paths}:
        raise FileExistsError(f"--out {out_path} is one of the input images")
    from tfface.models.saving import load_model

    model = load_model(args.model)
    batch_size = getattr(args, "batch_size", None)
    batch_size = 32 if batch_size is None else batch_size
    analyzer = FaceAnalyzer(model, batch_size=batch_size)
    if draw_dir is not None:
        draw_dir.mkdir(parents=True, exist_ok=True)
        (draw_dir / DRAWINGS_MARKER).touch()
    counts = {"images": 0, "faces": 0, "no_face": 0, "unreadable": 0}
    with contextlib.ExitStack() as stack:
        if out_path:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            stream = stack.enter_context(_results_file(out_path))
        else:
            stream = sys.stdout
        for index, (result, image) in enumerate(analyzer._run(paths, None, keep_images=draw_dir is not None)):
            stream.write(json.dumps(result) + "\n")
            stream.flush()
            counts["images"] += 1
            counts["faces"] += len(result["faces"])
            if result["error"]:
                counts["unreadable"] += 1
                print(f"predict: {result['error']}", file=sys.stderr)
            elif not result["faces"]:
                counts["no_face"] += 1
            if drawings is not None and image is not None:
                with naming_the_target(drawings[index], note="the drawings before it are kept"):
                    draw_faces(image, result, analyzer.schema).save(drawings[index])
    where = f" -> {out_path}" if out_path else ""
    drawn = f", drawings in {draw_dir}" if draw_dir is not None else ""
    print(
        f"predict: {counts['images']} images, {counts['faces']} faces, {counts['no_face']} without a face, "
        f"{counts['unreadable']} unreadable{where}{drawn}",
        file=sys.stderr,
    )
    return 0
