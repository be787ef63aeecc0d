"""Annotating a dataset folder with landmarks, resumably.

Running the detector over a dataset is slow (~0.05-0.15 s per image on a
CPU), so `annotate_folder` caches the result per image in a CSV that grows
as it goes: a killed run keeps what it did and resumes where it stopped.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from tfface.data.image_ops import read_upright_rgb
from tfface.landmarks.cache import CACHE_COLUMNS
from tfface.landmarks.cache import ORIENTATION_COLUMN
from tfface.landmarks.cache import STAMP_COLUMNS
from tfface.landmarks.cache import STATUS_NO_FACE
from tfface.landmarks.cache import STATUS_OK
from tfface.landmarks.cache import STATUS_UNREADABLE
from tfface.landmarks.cache import NOT_CACHED
from tfface.landmarks.cache import OTHER_STATUS
from tfface.landmarks.cache import STATUS_CODES
from tfface.landmarks.cache import cache_row
from tfface.landmarks.cache import check_files
from tfface.landmarks.cache import legacy_row_matches_file
from tfface.landmarks.cache import read_cache_table
from tfface.landmarks.cache import rewrite_cache
from tfface.landmarks.cache import write_cache_rows
from tfface.landmarks.cache import file_stamp
from tfface.landmarks.detector import FaceDetector
from tfface.landmarks.detector import LandmarkError
from tfface.landmarks.detector import check_rgb_image


@dataclasses.dataclass
class AnnotationReport:
    """What `annotate_folder` did.

    Attributes:
        cache_file: the CSV written.
        num_images: images asked for.
        num_new: images detected in this run (the rest came from the cache).
        no_face: image ids where no face was found (cached with empty fields).
        unreadable: image ids whose file could not be decoded.
        seconds_per_image: mean detection time per newly processed image.
    """

    cache_file: Path
    num_images: int
    num_new: int
    no_face: list
    unreadable: list
    seconds_per_image: float = float("nan")

    @property
    def num_found(self) -> int:
        return self.num_images - len(self.no_face) - len(self.unreadable)


def annotate_folder(
    image_paths: Sequence,
    cache_file,
    image_ids: Optional[Sequence[str]] = None,
    detector=None,
    batch_size: int = 16,
    verbose: bool = True,
    limit: Optional[int] = None,
) -> AnnotationReport:
    """Detects landmarks for every image once and caches them in a CSV.

    Images already in `cache_file` are skipped, so re-running after a crash
    resumes. Rows are appended one batch at a time (each batch in a single
    flushed and fsynced write); a line torn by a kill is dropped on resume.
    Images with no face, or that cannot be decoded, are written with empty
    landmark fields and a status, and listed in the report: never dropped.
    Each row records the file's size, time and hash: an image changed since
    (replaced, resized, rotated) is detected again, and so is an image that
    could not be read before. An image whose time changed but not its bytes
    (copied without keeping times) keeps its row, with the new time
    recorded: readers then check it by its time again, not by hashing it.

    Args:
        image_paths: image files.
        cache_file: CSV to create or extend (see `default_landmark_cache`).
        image_ids: one id per path (default: the file names, as the dataset
            readers use them).
        detector: anything with `detect_batch(images) -> list[list[Detection]]`
            (default: a new `FaceDetector()`).
        batch_size: images per detector call.
        verbose: print progress and the final counts.
        limit: only the first `limit` images (to try it out on a few).
    """
    # Paths stay as given (a Path each took ~0.5 KB: 100 MB for CelebA).
    image_paths = [os.fspath(p) for p in image_paths]
    if image_ids is None:
        image_ids = [Path(p).name for p in image_paths]
    image_ids = [str(i) for i in image_ids]
    if len(image_ids) != len(image_paths):
        raise ValueError(f"got {len(image_ids)} image_ids for {len(image_paths)} image_paths")
    if limit is not None:
        image_paths, image_ids = image_paths[: int(limit)], image_ids[: int(limit)]
    if len(set(image_ids)) != len(image_ids):
        raise LandmarkError("image_ids must be unique (the cache is keyed by image_id)")
    carriage_return = next((i for i in image_ids if "\r" in i), None)
    if carriage_return is not None:
        # Written unquoted, and read back with universal newlines as a line break: the cache would not read.
        raise LandmarkError(f"image id {carriage_return!r} contains a carriage return, which the landmark cache cannot keep: rename the file")
    cache_file = Path(cache_file)
    cache_file.parent.mkdir(parents=True, exist_ok=True)

    statuses, changed, refreshed = _current_statuses(cache_file, image_ids, image_paths)
    todo = np.flatnonzero(statuses == NOT_CACHED).tolist()
    if verbose and changed:
        print(f"landmarks: {len(changed)} image(s) changed or unreadable since they were cached (first: {changed[0]}): detecting again")
    if verbose and refreshed:
        print(f"landmarks: recorded the new file times of {len(refreshed)} image(s) whose bytes are unchanged (first: {refreshed[0]})")
    if verbose and len(todo) < len(image_ids):
        print(f"landmarks: {len(image_ids) - len(todo)} of {len(image_ids)} images already in {cache_file}")

    detector = detector if detector is not None else FaceDetector()
    started = time.perf_counter()
    for start in range(0, len(todo), batch_size):
        chunk = todo[start : start + batch_size]
        images, rows, readable = [], {}, []
        stamps, orientations = {}, {}
        for i in chunk:
            path = Path(image_paths[i])
            try:
                data = path.read_bytes()
                stamps[i] = file_stamp(path, data)
                image, orientations[i] = read_upright_rgb(io.BytesIO(data))
                check_rgb_image(image, str(path))
            except (OSError, ValueError) as e:
                rows[i] = cache_row(image_ids[i], STATUS_UNREADABLE, None, [])
                if verbose:
                    print(f"landmarks: cannot read {path}: {e}", file=sys.stderr)
                continue
            images.append(image)
            readable.append(i)
        if images:
            for i, image, faces in zip(readable, images, detector.detect_batch(images)):
                status = STATUS_OK if faces else STATUS_NO_FACE
                rows[i] = cache_row(image_ids[i], status, image.shape[:2], faces, stamps[i], orientations[i])
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows[i] for i in chunk)
        with open(cache_file, "a", newline="") as f:
            f.write(buffer.getvalue())
            f.flush()
            os.fsync(f.fileno())
        for i in chunk:
            statuses[i] = STATUS_CODES.get(rows[i][1], OTHER_STATUS)
        if verbose and (start // batch_size) % 50 == 49:
            print(f"landmarks: {start + len(chunk)}/{len(todo)} new images done")
    elapsed = time.perf_counter() - started

    no_face = [image_ids[n] for n in np.flatnonzero(statuses == STATUS_CODES[STATUS_NO_FACE]).tolist()]
    unreadable = [image_ids[n] for n in np.flatnonzero(statuses == STATUS_CODES[STATUS_UNREADABLE]).tolist()]
    report = AnnotationReport(
        cache_file=cache_file,
        num_images=len(image_ids),
        num_new=len(todo),
        no_face=no_face,
        unreadable=unreadable,
        seconds_per_image=elapsed / len(todo) if todo else float("nan"),
    )
    if verbose:
        print(
            f"landmarks: {report.num_found}/{report.num_images} images with a face, "
            f"{len(no_face)} without a face, {len(unreadable)} unreadable -> {cache_file}"
        )
    return report


_SIZE_COLUMN = CACHE_COLUMNS.index("file_size")
_MTIME_COLUMN = CACHE_COLUMNS.index("file_mtime_ns")
_ORIENTATION_POSITION = CACHE_COLUMNS.index(ORIENTATION_COLUMN)


def _current_statuses(cache_file: Path, image_ids: Sequence[str], image_paths: Sequence) -> tuple[np.ndarray, list, list]:
    """Each image's cached status (`STATUS_CODES`; `NOT_CACHED` for one
    to detect: not in the cache, changed since, or unreadable), the ids of
    those to detect again, and the ids of rows kept whose file time changed
    but not its bytes (their time is updated, so readers check them by time
    again instead of by hash); both lists in the cache's order. The file is
    rewritten without the changed rows, with the new times (and in the
    current format, with older rows stamped when their image still has its
    size) before anything is appended, so a kill leaves no stale row."""
    statuses = np.full(len(image_ids), NOT_CACHED, np.int8)
    if not cache_file.exists():
        write_cache_rows(cache_file, [])
        return statuses, [], []
    table = read_cache_table(cache_file)
    rows = np.array([table.index.get(i, -1) for i in image_ids], np.int64).reshape(-1)
    order = np.fromiter(table.index.values(), np.int64, len(table.index))  # what a rewrite writes, in order
    place = np.zeros(len(table.status), np.int64)
    place[order] = np.arange(len(order))
    asked = np.flatnonzero(rows >= 0)
    asked = asked[np.argsort(place[rows[asked]], kind="stable")]  # in the cache's order
    readable = asked[table.status[rows[asked]] != STATUS_CODES[STATUS_UNREADABLE]]  # unreadable: detected again
    stamped = readable[table.stamped[rows[readable]]]
    matches, new_times = check_files(
        lambda start, stop: table.stamps(rows[stamped[start:stop]]), [image_paths[n] for n in stamped.tolist()]
    )
    current = np.zeros(len(image_ids), bool)
    current[stamped] = matches
    retimed = np.zeros(len(table.status), bool)
    for k, new_time in new_times.items():
        retimed[rows[stamped[k]]] = True
        table.mtime[rows[stamped[k]]] = new_time
    refreshed = [image_ids[stamped[k]] for k in sorted(new_times)]
    new_stamps = {}  # older rows kept: stamped now
    for n in readable[~table.stamped[rows[readable]]].tolist():
        height, width = table.shape[int(rows[n])]
        if legacy_row_matches_file(height, width, image_paths[n]):
            try:
                new_stamps[int(rows[n])] = file_stamp(image_paths[n])
                current[n] = True
            except OSError:
                pass
    kept = asked[current[asked]]
    upright = np.zeros(len(table.status), bool)
    upright[rows[kept]] = ~table.oriented[rows[kept]]  # an older row kept: its image has no rotation
    statuses[kept] = table.status[rows[kept]]
    gone = asked[~current[asked]]
    changed = [image_ids[n] for n in gone.tolist()]

    def edit(row, fields):
        if retimed[row]:
            fields[_MTIME_COLUMN] = str(table.mtime[row])
        if row in new_stamps:
            fields[_SIZE_COLUMN : _SIZE_COLUMN + len(STAMP_COLUMNS)] = new_stamps[row]
        if upright[row]:
            fields[_ORIENTATION_POSITION] = "1"
        return fields

    if table.torn or table.legacy or changed or refreshed:
        keep = np.ones(len(order), bool)
        keep[place[rows[gone]]] = False
        rewrite_cache(cache_file, order[keep], edit)
    return statuses, changed, refreshed
