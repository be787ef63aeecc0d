"""The landmark cache: one CSV of detections per dataset folder.

Detecting landmarks is too slow to do every time a dataset is opened, so
`tfface data annotate` (`tfface.landmarks.annotate`) keeps its results in
this file and the dataset readers load them from it. The file's columns,
location, file stamps, reading and rewriting live together here so that
its writer and its readers agree on it.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import csv
import dataclasses
import hashlib
import io
import itertools
import logging
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from tfface.atomic_files import atomic_path
from tfface.data.image_ops import file_exif_orientation
from tfface.landmarks.detector import LANDMARK_NAMES
from tfface.landmarks.detector import Detection
from tfface.landmarks.detector import LandmarkError
from tfface.landmarks.detector import primary_face

# Caches written before the file stamp columns lack the last three; they
# are still read (their rows cannot be checked against the files).
LEGACY_CACHE_COLUMNS = (
    ("image_id", "status", "num_faces", "height", "width")
    + ("box_x", "box_y", "box_w", "box_h", "confidence")
    + tuple(f"{name}_{axis}" for name in LANDMARK_NAMES for axis in ("x", "y"))
)
# Which file a row was detected on: an image replaced, resized or rotated
# under the same name gets new landmarks instead of its old ones.
STAMP_COLUMNS = ("file_size", "file_mtime_ns", "file_blake2b")
# The EXIF orientation applied before detection: landmarks are in the
# upright image (as the pipeline and `predict` show it). Caches of tfface
# 0.2.0 lack it and detected on the stored pixels; their rows stand only for
# images without a rotation.
ORIENTATION_COLUMN = "exif_orientation"
STAMPED_CACHE_COLUMNS = LEGACY_CACHE_COLUMNS + STAMP_COLUMNS
CACHE_COLUMNS = STAMPED_CACHE_COLUMNS + (ORIENTATION_COLUMN,)
_CACHE_HEADERS = (CACHE_COLUMNS, STAMPED_CACHE_COLUMNS, LEGACY_CACHE_COLUMNS)
STATUS_OK = "ok"
STATUS_NO_FACE = "no_face"
STATUS_UNREADABLE = "unreadable"

logger = logging.getLogger(__name__)


def default_landmark_cache(root) -> Path:
    """Where the landmark cache of the dataset folder `root` lives.

    `root/landmarks_mtcnn.csv` when it exists (the readers take it first),
    or when `root` is writable and is not one of the shared third-party data
    folders (those are never written to), else
    `~/.cache/tfface/landmarks/<folder-name>-<hash of the absolute path>.csv`
    ($XDG_CACHE_HOME replaces ~/.cache when set). Setting $TFFACE_CACHE_DIR
    uses `$TFFACE_CACHE_DIR/landmarks/...` unless the folder has its own.
    """
    from tfface.data.sources import MTCNN_CACHE_FILE
    from tfface.data.sources import shared_data_dir
    from tfface.data.sources import user_cache_dir

    root = Path(root).expanduser().resolve()
    if (root / MTCNN_CACHE_FILE).is_file():
        return root / MTCNN_CACHE_FILE
    forced = os.environ.get("TFFACE_CACHE_DIR")
    shared = shared_data_dir()
    is_shared = shared is not None and Path(shared).resolve() in (root, *root.parents)
    if not forced and not is_shared and root.is_dir() and os.access(root, os.W_OK):
        return root / MTCNN_CACHE_FILE
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:10]
    return user_cache_dir("landmarks") / f"{root.name}-{digest}.csv"


def _format(value: float) -> str:
    return f"{value:.2f}"


def cache_row(image_id: str, status: str, size, faces: Sequence[Detection], stamp=("", "", ""), orientation="") -> list[str]:
    face = primary_face(faces)
    height, width = size if size is not None else ("", "")
    row = [image_id, status, str(len(faces)), str(height), str(width)]
    if face is None:
        row += [""] * (len(LEGACY_CACHE_COLUMNS) - len(row))
    else:
        row += [_format(v) for v in face.box] + [f"{face.confidence:.4f}"]
        row += [_format(v) for v in face.landmarks.reshape(-1)]
    return row + list(stamp) + [str(orientation)]


def _file_digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_stamp(path, data: Optional[bytes] = None) -> tuple[str, str, str]:
    """(size, mtime in ns, BLAKE2b of the bytes) of an image file, as the
    cache's stamp columns hold them."""
    stat = os.stat(path)
    if data is None:
        data = Path(path).read_bytes()
    return str(stat.st_size), str(stat.st_mtime_ns), _file_digest(data)


# A row's file size and time as integers: an empty size is a row without a
# stamp (an older cache, or an unreadable image); a value that is not a
# number as written (str(int)) matches no file.
_NO_STAMP = -1
_BAD_STAMP = int(np.iinfo(np.int64).min)
# Files checked by their bytes because their time changed: more than this
# many in one read gets a warning (every read hashes them again until
# `tfface data annotate` records the new times).
REHASH_WARNING_THRESHOLD = 8


def _stamp_int(text: str, empty: int) -> int:
    if not text:
        return empty
    try:
        value = int(text)
    except ValueError:
        return _BAD_STAMP
    return value if str(value) == text else _BAD_STAMP


def _check_file(size: int, mtime: int, digest: str, oriented: bool, path) -> tuple[bool, Optional[int]]:
    """Whether the row stamped so was detected on the file at `path`,
    upright: same size, and same modification time or, after a copy that
    changed the time, the same bytes (a row without a stamp, of an older
    cache, cannot be checked and counts as matching; one of a cache before
    the orientation column matches only an image without an EXIF rotation);
    and the file's time when only its bytes could tell (the time changed,
    the bytes did not): None otherwise."""
    refreshed = None
    if size != _NO_STAMP:
        try:
            stat = os.stat(path)
        except OSError:
            return False, None
        if stat.st_size != size:
            return False, None
        if stat.st_mtime_ns != mtime:
            try:
                with open(path, "rb") as f:
                    data = f.read()
            except OSError:
                return False, None
            if _file_digest(data) != digest:
                return False, None
            refreshed = stat.st_mtime_ns
    if not oriented and file_exif_orientation(path) != 1:
        return False, None
    return True, refreshed


def check_files(stamps, paths: Sequence) -> tuple[np.ndarray, dict]:
    """`_check_file` for each file in `paths` and its row's stamp, in threads
    (stat, read and hash release the GIL, and on network or cold storage
    each file is a round trip), in batches: one future per file would cost
    more than its stat. `stamps(start, stop)` gives the (size, mtime,
    digest, oriented) stamps of those paths. Returns whether each matches,
    and {position: file time} for those that matched by their bytes only."""
    batch = 1024

    def check(start):
        stop = min(start + batch, len(paths))
        return [_check_file(*stamp, path) for stamp, path in zip(stamps(start, stop), paths[start:stop])]

    starts = range(0, len(paths), batch)
    if len(starts) <= 1:
        results = [check(start) for start in starts]
    else:
        with concurrent.futures.ThreadPoolExecutor(min(16, (os.cpu_count() or 1) + 4)) as pool:
            results = list(pool.map(check, starts))
    matches = np.zeros(len(paths), bool)
    refreshed = {}
    for start, batch_results in zip(starts, results):
        for k, (current, new_time) in enumerate(batch_results, start):
            matches[k] = current
            if new_time is not None:
                refreshed[k] = new_time
    return matches, refreshed


def legacy_row_matches_file(height: int, width: int, path) -> bool:
    """For an unstamped row: the image still has the size (as `_stamp_int`
    reads the row's) it was detected at (a resized or rotated image does not)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            size = image.size
    except (OSError, ValueError):
        return False
    return size == (width, height) and file_exif_orientation(path) == 1


def _ends_with_newline(path: Path) -> bool:
    """Whether the file's last line is complete (as universal newlines read it)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        if f.tell() == 0:
            return False
        f.seek(-1, os.SEEK_END)
        return f.read(1) in (b"\n", b"\r")


@contextlib.contextmanager
def _open_cache(cache_file: Path):
    """The cache's header (None when it has none yet: an empty file, or a
    header torn mid-write), whether its last line is torn (a run killed
    mid-write: readers leave that line out), and the file (universal
    newlines), at its second line. The file is streamed, never held whole."""
    torn = not _ends_with_newline(cache_file)
    with open(cache_file) as f:
        first = f.readline()
        if torn and not first.endswith("\n"):  # a single torn line
            if not any(",".join(columns).startswith(first) for columns in _CACHE_HEADERS):
                # Not even a partial header: some other file, never rewritten.
                raise LandmarkError(f"{cache_file}:1: not a tfface landmark cache (no header line)")
            yield None, True, f
            return
        header = next(csv.reader([first]), [])
        if tuple(header) not in _CACHE_HEADERS:
            raise LandmarkError(
                f"{cache_file}:1: not a tfface landmark cache (header {header[:6]}...; expected {list(CACHE_COLUMNS[:6])}...)"
            )
        yield header, torn, f


def _check_fields(cache_file: Path, rows: Iterable[list], width: int, first_line: int) -> None:
    for line_number, values in enumerate(rows, start=first_line):
        if len(values) != width:
            raise LandmarkError(f"{cache_file}:{line_number}: expected {width} fields, got {len(values)}")


@dataclasses.dataclass
class _CacheEnd:
    """Whether the cache's last line is torn (a run killed mid-write:
    readers leave that line out). Final only once its blocks are read: a
    kill just after a newline inside a quoted id leaves a file that ends
    with a newline, which only the open quote at the end gives away."""

    torn: bool


def _whole_records(lines, end: _CacheEnd):
    """The csv module's records of `lines` (from a line's start, outside
    quotes), without a last one torn by a kill: `end.torn` already, or
    ended inside a quote (an odd number of quote characters: the writer
    doubles the ones inside a field)."""
    quotes = 0

    def counted():
        nonlocal quotes
        for line in lines:
            quotes += line.count('"')
            yield line

    records = csv.reader(counted())
    previous = next(records, None)
    for record in records:
        yield previous
        previous = record
    if previous is None:
        return
    if quotes % 2:
        end.torn = True
    if not end.torn:
        yield previous


# Rows the csv module parses at a time (after a quoted field): a list per row.
_CSV_BLOCK_ROWS = 4096


@contextlib.contextmanager
def _cache_blocks(cache_file: Path, block_chars: int = 1 << 20):
    """The one parser of the cache: its columns (the current ones while it
    has no header yet), a `_CacheEnd` that says whether its last line is
    torn (once the blocks are read), and its rows a block
    at a time, as the fields of the block's rows one after another (a flat
    list: row k is fields[k * width:(k + 1) * width]). The file is streamed.
    Blocks of whole lines without quotes (all of a cache, unless an image
    id needs quoting) are split in C; other text goes through the csv
    module. A torn last line is left out; a row with another number of
    fields than the header raises an error naming the file and line."""
    with _open_cache(cache_file) as (header, torn, f):
        columns = tuple(header) if header is not None else CACHE_COLUMNS
        end = _CacheEnd(torn)
        blocks = _blocks(cache_file, f, len(columns), end, block_chars) if header is not None else iter(())
        yield columns, end, blocks


def _blocks(cache_file: Path, f, width: int, end: _CacheEnd, block_chars: int):
    """`_cache_blocks`'s blocks, from `f` at the second line."""
    line = 2
    rest = ""
    while True:
        text = f.read(block_chars)
        if '"' in text:  # quoted fields (may hold newlines): the csv module, to the end
            # From a line's start, and the block's last line whole: the csv
            # module takes each string as a line, so a cut one became two rows.
            records = _whole_records(itertools.chain(io.StringIO(rest + text + f.readline()), f), end)
            while rows := list(itertools.islice(records, _CSV_BLOCK_ROWS)):
                _check_fields(cache_file, rows, width, line)
                yield list(itertools.chain.from_iterable(rows))
                line += len(rows)
            return
        if not text:
            return  # what is left in `rest` is a torn last line, left out
        text = rest + text
        cut = text.rfind("\n") + 1
        text, rest = text[:cut], text[cut:]
        count = text.count("\n")
        if not count:
            continue
        # Each line's last field keeps its newline: a line with a field too
        # many and the next with one too few cannot pass for two good rows.
        fields = text.replace("\n", "\n,").split(",")
        fields.pop()  # after the last newline
        ends = "".join(fields[width - 1 :: width]).split("\n")  # one more than lines when each ends a row
        if len(fields) == count * width and len(ends) == count + 1:
            ends.pop()
            fields[width - 1 :: width] = ends
        else:
            rows = list(csv.reader(io.StringIO(text)))
            _check_fields(cache_file, rows, width, line)  # names the bad line
            fields = list(itertools.chain.from_iterable(rows))
        yield fields
        line += count


def _cache_rows(cache_file: Path):
    """(row number from 0, fields in the current columns) of each row in
    file order; older rows get empty fields for the columns they lack."""
    with _cache_blocks(cache_file) as (columns, _, blocks):
        width = len(columns)
        padding = [""] * (len(CACHE_COLUMNS) - width)
        row = 0
        for fields in blocks:
            for start in range(0, len(fields), width):
                yield row, fields[start : start + width] + padding
                row += 1


_LANDMARK_VALUE_COLUMNS = tuple(f"{name}_{axis}" for name in LANDMARK_NAMES for axis in ("x", "y"))
# A row's status as the table holds it; an image not cached (or to detect
# again) is NOT_CACHED in `annotate_folder`.
STATUS_CODES = {STATUS_OK: 0, STATUS_NO_FACE: 1, STATUS_UNREADABLE: 2}
OTHER_STATUS = 3
NOT_CACHED = -1


@dataclasses.dataclass
class _CacheTable:
    """What reading and annotating need of a cache, a column per field (a
    dict of strings per row took ~550 MB for CelebA's 200,000 images when
    read for training, and ~600 MB in `annotate_folder`).

    `index` maps an image id to its (last) row, in the order of each id's
    first row (where a rewrite puts it); `status` holds `STATUS_CODES`;
    `landmarks` is (rows, 10), NaN where the status is not ok; `bad` marks
    ok rows with a value that is not a number; `stamps(rows)` are
    `_check_file`'s (size, mtime, digest, oriented); `stamped` marks rows
    with a file size; `shape` maps each row without one to its (height,
    width) as `_stamp_int` reads them. `torn` and `legacy` (columns other
    than the current ones) say the file needs rewriting."""

    index: dict
    status: np.ndarray
    landmarks: np.ndarray
    bad: np.ndarray
    size: np.ndarray
    mtime: np.ndarray
    digest: np.ndarray
    oriented: np.ndarray
    stamped: np.ndarray
    shape: dict
    torn: bool
    legacy: bool

    @property
    def ok(self) -> np.ndarray:
        return self.status == STATUS_CODES[STATUS_OK]

    def stamps(self, rows: np.ndarray):
        """The stamps of `rows`, in order."""
        digests = map(bytes.decode, self.digest[rows].tolist())
        return zip(self.size[rows].tolist(), self.mtime[rows].tolist(), digests, self.oriented[rows].tolist())


def _stamp_array(texts: Sequence[str], empty: int) -> np.ndarray:
    """`_stamp_int` of each text, in C when they are all plain integers."""
    try:
        values = np.array(texts, np.int64).reshape(-1)
        if list(map(str, values.tolist())) == list(texts):
            return values
    except (ValueError, OverflowError):
        pass
    return np.array([_stamp_int(text, empty) for text in texts], np.int64).reshape(-1)


def _digest_array(texts: Sequence[str]) -> np.ndarray:
    """The digests as ASCII bytes (a third of the memory of str); one that
    is not ASCII matches no file, as "?" does not."""
    try:
        return np.array(texts, "S").reshape(-1)
    except UnicodeEncodeError:
        return np.array([text if text.isascii() else "?" for text in texts], "S").reshape(-1)


def read_cache_table(cache_file: Path, block_chars: int = 1 << 20) -> _CacheTable:
    """The cache as a `_CacheTable`, a block at a time (`_cache_blocks`)."""
    ids, status, landmarks, bad, size, mtime, digest, oriented, stamped = [], [], [], [], [], [], [], [], []
    shape = {}
    with _cache_blocks(cache_file, block_chars) as (header, end, blocks):
        width = len(header)
        where = {column: i for i, column in enumerate(header)}
        value_positions = [where[c] for c in _LANDMARK_VALUE_COLUMNS]

        def add(column, count):
            """Appends `count` rows; `column(i)` is the list of field i's values."""
            statuses = column(1)
            status_ok = np.fromiter((s == STATUS_OK for s in statuses), bool, count)
            codes = np.full(count, STATUS_CODES[STATUS_OK], np.int8)
            if not status_ok.all():
                codes[~status_ok] = [STATUS_CODES.get(statuses[n], OTHER_STATUS) for n in np.flatnonzero(~status_ok).tolist()]
            block = np.full((count, len(value_positions)), np.nan, np.float32)
            wrong = np.zeros(count, bool)
            found = np.flatnonzero(status_ok).tolist()
            values = [column(i) for i in value_positions]
            if len(found) < count:
                values = [[texts[n] for n in found] for texts in values]
            try:
                parsed = np.fromiter(map(float, itertools.chain.from_iterable(values)), np.float64, len(found) * len(values))
                block[found] = parsed.reshape(len(values), len(found)).T
            except ValueError:  # a value that is not a number: find its rows
                for k, n in enumerate(found):
                    try:
                        block[n] = [float(texts[k]) for texts in values]
                    except ValueError:
                        wrong[n] = True
            ids.extend(column(0))
            status.append(codes)
            landmarks.append(block)
            bad.append(wrong)

            def optional(name):
                return column(where[name]) if name in where else [""] * count

            sizes = optional("file_size")
            size.append(_stamp_array(sizes, _NO_STAMP))
            mtime.append(_stamp_array(optional("file_mtime_ns"), _BAD_STAMP))
            digest.append(_digest_array(optional("file_blake2b")))  # hex: ASCII
            oriented.append(np.fromiter(map(bool, optional(ORIENTATION_COLUMN)), bool, count))
            # Rows without a size (older ones) are checked by the image's size ("-1" is a size).
            unstamped = [n for n in np.flatnonzero(size[-1] == _NO_STAMP).tolist() if not sizes[n]]
            stamped.append(np.ones(count, bool))
            stamped[-1][unstamped] = False
            if unstamped:
                heights, widths = column(where["height"]), column(where["width"])
                first = len(ids) - count
                shape.update((first + n, (_stamp_int(heights[n], _NO_STAMP), _stamp_int(widths[n], _NO_STAMP))) for n in unstamped)

        for fields in blocks:
            add(lambda i: fields[i::width], len(fields) // width)
        if not ids:
            add(lambda i: [], 0)
    return _CacheTable(
        index={image_id: row for row, image_id in enumerate(ids)},  # a later row for an image replaces an earlier one
        status=np.concatenate(status),
        landmarks=np.concatenate(landmarks),
        bad=np.concatenate(bad),
        size=np.concatenate(size),
        mtime=np.concatenate(mtime),
        digest=np.concatenate(digest),
        oriented=np.concatenate(oriented),
        stamped=np.concatenate(stamped),
        shape=shape,
        torn=end.torn,
        legacy=header != CACHE_COLUMNS,
    )


def is_landmark_cache_header(columns) -> bool:
    """Whether a CSV header is that of a `tfface data annotate` cache."""
    return tuple(columns) in _CACHE_HEADERS


def read_landmark_cache(cache_file) -> dict:
    """The cache as image_id -> {column: string value} (a dict per row: for
    looking at a few; readers and `annotate_folder` use `read_cache_table`)."""
    cache_file = Path(cache_file)
    if not cache_file.is_file():
        raise FileNotFoundError(f"landmark cache not found: {cache_file}")
    # A later row for an image replaces an earlier one.
    return {fields[0]: dict(zip(CACHE_COLUMNS, fields)) for _, fields in _cache_rows(cache_file)}


def write_cache_rows(path: Path, rows: Iterable[list[str]]) -> None:
    """The cache file as `rows` under the header, whole or not at all."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(CACHE_COLUMNS)
        writer.writerows(rows)
        f.flush()
        os.fsync(f.fileno())


def rewrite_cache(cache_file: Path, order: np.ndarray, edit) -> None:
    """Rewrites the cache in the current columns with its rows `order`
    (numbered from 0 after the header) in that order, each as `edit(row,
    fields)` returns it. The file is read again rather than held; an id's
    last row takes its first row's place (the order of `_CacheTable.index`),
    so the few rows wanted before their place in the file are read first."""
    order = np.asarray(order, np.int64).reshape(-1)
    smallest_after = np.minimum.accumulate(order[::-1])[::-1][1:]
    early = set(order[:-1][order[:-1] > smallest_after].tolist())
    early_rows = {row: edit(row, fields) for row, fields in _cache_rows(cache_file) if row in early} if early else {}
    wanted = np.zeros(int(order.max()) + 1 if order.size else 0, bool)
    wanted[order] = True
    order = order.tolist()

    def rows():
        position = 0
        for row, fields in _cache_rows(cache_file):
            if row >= len(wanted) or not wanted[row] or row in early:
                continue
            while order[position] in early:
                yield early_rows.pop(order[position])
                position += 1
            yield edit(row, fields)
            position += 1
        while position < len(order) and order[position] in early:
            yield early_rows.pop(order[position])
            position += 1
        if position != len(order):  # the rename is not made: the file is kept as it is
            raise LandmarkError(f"{cache_file}: changed while being rewritten (another `tfface data annotate` on it?)")

    write_cache_rows(cache_file, rows())


def load_landmark_cache(cache_file, image_ids: Sequence[str], image_paths=None, changed=None, folder=None) -> np.ndarray:
    """(N, 5, 2) float32 landmarks for `image_ids`; NaN rows where missing.

    Missing means: no face found, unreadable image, not in the cache, or,
    when `image_paths` (one per id) are given, a file that changed since its
    row was detected; the ids of those are appended to `changed`.

    A file whose time differs from its row's is checked by its bytes (after
    a copy that did not keep times), again on every read until `tfface data
    annotate` records the new time; more than a few get one warning, which
    names the annotate command for `folder` when given. Nothing is written
    (the data folder may be read-only or shared).
    """
    cache_file = Path(cache_file)
    if not cache_file.is_file():
        raise FileNotFoundError(f"landmark cache not found: {cache_file}")
    table = read_cache_table(cache_file)
    if image_paths is not None and len(image_paths) != len(image_ids):
        raise ValueError(f"got {len(image_paths)} image_paths for {len(image_ids)} image_ids")
    image_ids = [str(i) for i in image_ids]
    rows = np.array([table.index.get(i, -1) for i in image_ids], np.int64).reshape(-1)
    wanted = np.flatnonzero(rows >= 0)
    wanted = wanted[table.ok[rows[wanted]]]
    if image_paths is not None:
        selected = rows[wanted]

        matches, refreshed = check_files(
            lambda start, stop: table.stamps(selected[start:stop]), [image_paths[n] for n in wanted.tolist()]
        )
        same_bytes = [image_ids[wanted[k]] for k in sorted(refreshed)]
        if changed is not None:
            changed.extend(image_ids[n] for n in wanted[~matches].tolist())
        wanted = wanted[matches]
        if len(same_bytes) > REHASH_WARNING_THRESHOLD:
            logger.warning(
                "%s: %d image(s) have other file times than their landmark rows record (copied without keeping "
                "times?), so every open reads and hashes them to check their landmarks; %s records the new times "
                "(first: %s)",
                cache_file,
                len(same_bytes),
                f"`tfface data annotate {folder}`" if folder is not None else "`tfface data annotate` on their folder",
                same_bytes[0],
            )
    bad = wanted[table.bad[rows[wanted]]]
    if bad.size:
        raise LandmarkError(f"{cache_file}: bad landmark value in the row of {image_ids[bad[0]]!r}")
    landmarks = np.full((len(image_ids), 10), np.nan, np.float32)
    landmarks[wanted] = table.landmarks[rows[wanted]]
    return landmarks.reshape(-1, 5, 2)
