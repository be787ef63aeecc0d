"""Opening a face source from a name or a folder, and checking its files.

`open_source` is the one entry point the CLI and the training code use: it
accepts a folder (format detected from what is inside) or a named source
(`synthetic:N`, `celeba_sample`, `celeba_lowres`, `utkface`, `tfds:celeb_a`).
The helpers below it are shared by the folder readers: they turn bad rows
into `DataError`s that name the file and line, or count them when the user
asked to skip them, so nothing is ever dropped silently.
"""

from __future__ import annotations

import concurrent.futures
import csv
import itertools
import logging
import operator
import os
import re
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from tfface.data.source import LANDMARK_COLUMNS, DataError, FaceSource

logger = logging.getLogger(__name__)

NAMED_FOLDERS = ("celeba_sample", "celeba_lowres", "utkface")
DEFAULT_SYNTHETIC_IMAGES = 2000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")  # what the pipeline decodes

# What format detection looks for, for the error message.
CELEBA_LABEL_FILES = ("attributes.csv", "list_attr_celeba.txt")
UTKFACE_LABEL_FILE = "labels.csv"
UTKFACE_NAME = re.compile(
    r"^(\d+)_(\d+)_(\d+)_(\d+)\.(jpg|jpeg|png|bmp|gif|webp)(\.chip\.jpg)?$", re.IGNORECASE
)

MTCNN_CACHE_FILE = "landmarks_mtcnn.csv"
LANDMARK_FILES = ("landmarks.csv", "list_landmarks_align_celeba.txt", MTCNN_CACHE_FILE)


# --- locating data ---------------------------------------------------------------


def user_cache_dir(kind: str) -> Path:
    """Where tfface keeps what it can rebuild (landmark caches, image cache
    files): `$TFFACE_CACHE_DIR/kind`, else `~/.cache/tfface/kind`
    ($XDG_CACHE_HOME replaces ~/.cache)."""
    forced = os.environ.get("TFFACE_CACHE_DIR")
    if forced:
        return Path(forced).expanduser() / kind
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tfface" / kind


def shared_data_dir() -> Optional[Path]:
    """The shared real-data folder: `$TFFACE_DATA_DIR`, else the first
    `shared/data` found walking up from the working directory or from this
    package (the repository sits next to `shared/`)."""
    env = os.environ.get("TFFACE_DATA_DIR")
    if env:
        return Path(env).expanduser()
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "data"
            if candidate.is_dir():
                return candidate
    return None


def images_dir(root: Path) -> Path:
    """`root/images` (or the official `img_align_celeba`), else `root`."""
    for name in ("images", "img_align_celeba"):
        if (root / name).is_dir():
            return root / name
    return root


def _utkface_names(root: Path, sample: int = 50) -> tuple[int, int]:
    """(UTKFace-style names, image names) among the first `sample` images."""
    names = [n for n in sorted(os.listdir(images_dir(root))) if is_image_name(n)][:sample]
    return sum(bool(UTKFACE_NAME.match(n)) for n in names), len(names)


def image_file_names(image_root: Path) -> set:
    """Names of the plain files in `image_root` (a folder named like an
    image is no image: reading it would fail deep inside tf.data)."""
    try:
        with os.scandir(image_root) as entries:
            return {entry.name for entry in entries if entry.is_file()}
    except OSError as e:
        raise DataError(f"cannot list images in {image_root}: {e}") from None


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def detect_format(root) -> str:
    """"celeba" or "utkface", from the label files (or file names) in `root`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    if any((root / name).is_file() for name in CELEBA_LABEL_FILES):
        return "celeba"
    labels = root / UTKFACE_LABEL_FILE
    if labels.is_file():
        with open(labels, newline="", encoding="utf-8-sig") as f:
            header = [c.strip() for c in next(csv.reader(f), [])]
        if "age" in header:
            return "utkface"
    utkface_names, images = _utkface_names(root)
    if images and utkface_names * 2 >= images:
        return "utkface"
    found = f"{utkface_names} of the first {images} images have such names" if utkface_names else "found none"
    raise DataError(
        f"cannot tell the format of {root}: looked for CelebA labels "
        f"({' or '.join(CELEBA_LABEL_FILES)}), UTKFace labels ({UTKFACE_LABEL_FILE} "
        "with an 'age' column) and UTKFace-style image names "
        f"(age_gender_race_datetime.jpg, for at least half the images) in images/ or the folder itself; {found}"
    )


def open_source(spec, **kwargs) -> FaceSource:
    """A `FaceSource` from a folder path or a source name.

    Args:
        spec: a folder (CelebA or UTKFace format, detected), "synthetic" or
            "synthetic:N" (N generated images, default 2000; kwargs
            `image_size`, `seed`), "celeba_sample", "celeba_lowres",
            "utkface" (folders under `shared_data_dir()`), or "tfds:celeb_a"
            (the official TFDS build, only if already prepared; kwargs
            `data_dir`, `split`, `max_examples`). Bare names win over a
            same-named folder in the working directory: write "./utkface"
            for the folder.
        **kwargs: passed to the reader (`skip_bad_rows`, `check_images`,
            `landmarks_file` for folders; `image_size`, `seed` for synthetic
            data). Options for another kind of source are dropped, so
            callers can pass one set for every source.
    """
    if isinstance(spec, FaceSource):
        return spec
    text = os.fspath(spec) if isinstance(spec, os.PathLike) else str(spec)
    if text == "synthetic" or text.startswith("synthetic:"):
        return _open_synthetic(text, **_without(kwargs, FOLDER_OPTIONS))
    if text.startswith("tfds:"):
        name = text[len("tfds:"):]
        if name != "celeb_a":
            raise ValueError(f"unsupported TFDS source {text!r}: only 'tfds:celeb_a' is known")
        from tfface.data.tfds_builders import load_official_celeb_a

        return load_official_celeb_a(**_without(kwargs, FOLDER_OPTIONS + GENERATION_OPTIONS))
    if text in NAMED_FOLDERS and not isinstance(spec, os.PathLike):
        root = named_folder(text)
    else:
        root = Path(text).expanduser()
        if root.is_file():
            raise NotADirectoryError(
                f"data source {root} is a file; give the folder that holds it (and the images), "
                f"e.g. {root.parent}"
            )
        if not root.is_dir():
            # Config paths are taken from the working directory, not from the config file's folder.
            where = "" if root.is_absolute() else f", looked for in the working directory {Path.cwd()}"
            raise FileNotFoundError(
                f"data folder not found: {root}{where} (named sources: synthetic[:N], "
                f"{', '.join(NAMED_FOLDERS)}, tfds:celeb_a)"
            )
    return read_folder(root, **_without(kwargs, GENERATION_OPTIONS))


def named_folder(name: str) -> Path:
    """The folder of a named source ("celeba_sample", ...) under `shared_data_dir()`."""
    if name not in NAMED_FOLDERS:
        raise ValueError(f"unknown named source {name!r}; known: {', '.join(NAMED_FOLDERS)}")
    base = shared_data_dir()
    if base is None:
        raise FileNotFoundError(
            f"named source {name!r} lives in the shared data folder, which was not found: "
            "set TFFACE_DATA_DIR to the folder holding celeba_sample/, celeba_lowres/, utkface/"
        )
    root = base / name
    if not root.is_dir():
        raise FileNotFoundError(
            f"named source {name!r}: folder {root} not found (set TFFACE_DATA_DIR to change "
            "where named sources are looked up)"
        )
    return root


def read_folder(root, **kwargs) -> FaceSource:
    """Reads a folder with the reader for its detected format; landmarks come
    from the folder, else from an earlier `tfface data annotate` cache."""
    fmt = detect_format(root)
    if fmt == "celeba":
        from tfface.data.celeba import read_celeba_folder

        source = read_celeba_folder(root, **kwargs)
    else:
        from tfface.data.utkface import read_utkface_folder

        source = read_utkface_folder(root, **kwargs)
    return attach_cached_landmarks(source)


def source_image_ids(source: FaceSource) -> list:
    """The image ids of a folder source, as its label files name them: the
    path under the images folder (`a/1.jpg`), which landmark caches key on."""
    image_root = str(images_dir(Path(source.root)))
    prefix = os.path.join(image_root, "")
    # A prefix cut, not os.path.relpath per file: that took 12 s for 200,000 images.
    return [
        path[len(prefix) :].replace(os.sep, "/") if path.startswith(prefix) else Path(os.path.relpath(path, image_root)).as_posix()
        for path in map(str, source.image_paths)
    ]


def attach_cached_landmarks(source: FaceSource) -> FaceSource:
    """`source`, with the landmarks of an earlier `tfface data annotate` run
    (the cache may live outside the folder) when it has none of its own."""
    from tfface.landmarks.cache import default_landmark_cache

    if source.landmarks is not None:
        return source
    cache = default_landmark_cache(source.root)
    if cache.is_file():
        source.landmarks = read_annotate_cache(cache, source.root, source_image_ids(source), source.problems)
        found = int(np.isfinite(source.landmarks).all(axis=(1, 2)).sum())
        logger.info("%s: landmarks for %d of %d images from %s", source.name, found, len(source), cache)
    return source


def read_annotate_cache(cache: Path, root, image_ids, problems: list) -> np.ndarray:
    """Landmarks from a `tfface data annotate` cache, leaving out (with a
    problem naming them) images changed since their row was detected.

    Images whose file time changed but not their bytes (a copy that did not
    keep times) are hashed on every read until annotate records their new
    times (`load_landmark_cache` warns). Nothing is written here: the data
    folder may be read-only or shared."""
    from tfface.landmarks.cache import load_landmark_cache

    # Strings, not Path objects: making and stat-ing 200,000 Paths doubled the time of the checks.
    prefix = os.path.join(str(images_dir(Path(root))), "")
    changed: list = []
    landmarks = load_landmark_cache(cache, image_ids, [prefix + str(i) for i in image_ids], changed, folder=root)
    if changed:
        note(
            problems,
            f"{cache}: {len(changed)} image(s) changed since their landmarks were detected (first: {changed[0]}); "
            f"they have no landmarks (no mask supervision) until `tfface data annotate {root}` runs again",
        )
    return landmarks


# Options that only mean something for one kind of source; callers (the CLI,
# training, evaluation) may pass them for any source, and the others drop them.
FOLDER_OPTIONS = ("skip_bad_rows", "check_images", "landmarks_file")
GENERATION_OPTIONS = ("image_size", "seed")


def _without(kwargs: dict, options) -> dict:
    return {k: v for k, v in kwargs.items() if k not in options}


def _open_synthetic(text: str, **kwargs) -> FaceSource:
    num_images = DEFAULT_SYNTHETIC_IMAGES
    if ":" in text:
        count = text.split(":", 1)[1]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"bad synthetic source {text!r}: expected 'synthetic:N' with N >= 1")
        num_images = int(count)
    unknown = sorted(set(kwargs) - {"image_size", "seed"})
    if unknown:
        raise TypeError(f"synthetic sources take image_size and seed, not {unknown}")
    from tfface.data.synthetic import generate_synthetic_faces

    return generate_synthetic_faces(num_images, **kwargs)


# --- reading label files ----------------------------------------------------


def csv_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, stripped fields) of every non-blank csv row."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            for fields in reader:
                if fields and any(field.strip() for field in fields):
                    yield reader.line_num, [field.strip() for field in fields]
        except csv.Error as e:
            raise DataError(f"{path}, line {reader.line_num}: not valid CSV ({e})") from None
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason}); save the labels as UTF-8") from None


def text_rows(path: Path) -> Iterator[tuple[int, list[str]]]:
    """(line number, whitespace-separated fields) of every non-blank line."""
    with open(path, encoding="utf-8-sig") as f:
        try:
            for number, line in enumerate(f, start=1):
                fields = line.split()
                if fields:
                    yield number, fields
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text ({e.reason}); save the labels as UTF-8") from None


def csv_table(path: Path) -> Optional[tuple[list[str], list[list[str]]]]:
    """The fast path of `csv_rows` for a well-formed csv file: (the stripped
    header, one list of *unstripped* cells per column), the header being
    line 1 and data row k (from 0) line k + 2.

    None when the file is anything else (a blank row, a row of another width,
    a quoted field over several lines, not valid CSV or UTF-8): the caller
    then reads it row by row with `csv_rows`, which reports the problem at
    its line exactly as before.
    """
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError:
        return None
    if "\r" in text:
        text = text.replace("\r\n", "\n")
    if '"' in text or "\r" in text or "\0" in text:
        # Quoted fields (or odd line ends): the csv module splits the rows.
        try:
            with open(path, newline="", encoding="utf-8-sig") as f:
                reader = csv.reader(f)
                rows = list(reader)
                lines = reader.line_num
        except (csv.Error, UnicodeDecodeError):
            return None
        if not rows or lines != len(rows):  # every row on its own line: row k is line k + 1
            return None
        width = len(rows[0])
        if set(map(len, rows)) != {width}:
            return None
        cells = list(itertools.chain.from_iterable(rows))
    else:
        # No quotes: a row is its line split at the commas, as csv.reader does.
        rows = text.split("\n")
        if rows[-1] == "":
            rows.pop()  # the last line end
        if not rows:
            return None
        width = rows[0].count(",") + 1
        if width < 2 or set(map(operator.methodcaller("count", ","), rows)) != {width - 1}:
            return None  # a blank line, or a row of another width
        if max(map(len, rows)) > csv.field_size_limit():
            return None  # csv.reader would stop at a field that long
        cells = ",".join(rows).split(",")
    header = [field.strip() for field in cells[:width]]
    if not any(header):
        return None
    return header, [cells[width + j :: width] for j in range(width)]


def text_table(path: Path, skip: int = 0):
    """The fast path of `text_rows`: (the first `skip` rows, the line numbers
    of the others, one tuple of cells per column of the others) when those
    others all have the same number of fields; None otherwise, or when the
    file does not read (the caller then reads it row by row)."""
    try:
        rows = list(text_rows(path))
    except DataError:
        return None
    rest = rows[skip:]
    if not rest or len({len(fields) for _, fields in rest}) != 1:
        return None
    return rows[:skip], [line for line, _ in rest], list(zip(*(fields for _, fields in rest)))


def parse_column(cells, parse, dtype=None):
    """`parse(cell.strip())` for every cell, parsing each distinct cell once:
    an array of `dtype` (a list when `dtype` is None), or None when `parse`
    returns None for any cell (the caller then reads the rows one by one to
    report it)."""
    table = {cell: parse(cell.strip()) for cell in set(cells)}
    if any(value is None for value in table.values()):
        return None
    if dtype is None:
        return list(map(table.__getitem__, cells))
    if all(len(cell) == 1 and cell < "\x80" for cell in table):  # 0/1 columns: by character code
        lookup = np.zeros(128, dtype)
        for cell, value in table.items():
            lookup[ord(cell)] = value
        return lookup[np.frombuffer("".join(cells).encode("ascii"), np.uint8)]
    return np.fromiter(map(table.__getitem__, cells), dtype, count=len(cells))


def unique_image_ids(cells) -> Optional[list]:
    """The stripped image ids of a label column for the fast paths, or None
    when one is empty or repeated (the row-by-row reader names it)."""
    image_ids = list(map(str.strip, cells))
    if not all(image_ids) or len(set(image_file_keys(image_ids))) != len(image_ids):
        return None
    return image_ids


def image_file_keys(image_ids) -> list:
    """One key per image file: `./a.jpg` and `a.jpg` name the same file, so
    a label file that lists both lists it twice."""
    image_ids = list(image_ids)
    joined = "\n".join(image_ids)
    if not any(s in joined for s in ({"/", os.sep, os.altsep} - {None})):
        return image_ids  # plain file names are their own keys
    return [os.path.normpath(i) for i in image_ids]


def image_paths_under(image_root: Path, image_ids) -> np.ndarray:
    """`np.array([str(image_root / i) for i in image_ids])`, with plain file
    names joined as strings: pathlib per row took seconds at 200,000 rows."""
    prefix = str(image_root / "x")[:-1]  # what pathlib puts before a plain name
    separators = {"/", os.sep, os.altsep} - {None}
    joined = "\n".join(image_ids)
    if {"", ".", ".."}.isdisjoint(image_ids) and not any(s in joined for s in separators):
        return np.array([prefix + i for i in image_ids])

    def path(image_id: str) -> str:
        if image_id in ("", ".", "..") or any(s in image_id for s in separators):
            return str(image_root / image_id)
        return prefix + image_id

    return np.array([path(i) for i in image_ids])


class BadRows:
    """Raises `DataError` at the first bad row, or counts skipped rows.

    `report()` adds one line per label file to `problems` and logs it, so a
    skipped row is never silent.
    """

    def __init__(self, skip: bool):
        self.skip = skip
        self.skipped: dict[str, list[str]] = {}

    def bad(self, path, line: Optional[int], message: str) -> None:
        where = f"{path}, line {line}" if line is not None else f"{path}"
        if not self.skip:
            raise DataError(
                f"{where}: {message} (to skip such rows and list them: `--skip-bad-rows`, "
                "`skip_bad_rows: true` on a config's source, or `open_source(..., skip_bad_rows=True)`)"
            )
        self.skipped.setdefault(str(path), []).append(
            f"line {line}: {message}" if line is not None else message
        )

    def report(self, problems: list) -> None:
        for path, messages in self.skipped.items():
            examples = "; ".join(messages[:3])
            note = f"{path}: skipped {len(messages)} bad row(s), e.g. {examples}"
            problems.append(note)
            logger.warning(note)


def parse_int(text: str, low: int, high: int) -> Optional[int]:
    """`int(text)` if it is an integer in [low, high], else None."""
    try:
        value = int(text)
    except ValueError:
        return None
    return value if low <= value <= high else None


def note(problems: list, message: str) -> None:
    problems.append(message)
    logger.warning(message)


def folder_landmark_file(root: Path) -> Optional[Path]:
    """The landmark file in `root` the readers take: the first of
    `LANDMARK_FILES` there, or None."""
    return next((root / n for n in LANDMARK_FILES if (root / n).is_file()), None)


def read_landmarks(root: Path, image_ids, landmarks_file=None, skip_bad_rows=False, problems=None):
    """(N, 5, 2) float32 landmarks for `image_ids` (NaN where unknown), or None.

    Reads `landmarks_file` if given, else the first of `landmarks.csv`,
    `list_landmarks_align_celeba.txt` (official) and `landmarks_mtcnn.csv`
    (the MTCNN cache: box and confidence columns, then the 10 landmark
    columns, empty when no face was found) found in `root`.
    """
    problems = [] if problems is None else problems
    if landmarks_file is not None:
        path = Path(landmarks_file)
        if not path.is_file():
            raise FileNotFoundError(f"landmarks file not found: {path}")
    else:
        path = folder_landmark_file(root)
        if path is None:
            return None
    index = {image_id: i for i, image_id in enumerate(image_ids)}
    landmarks = np.full((len(index), 5, 2), np.nan, np.float32)
    bad = BadRows(skip_bad_rows)
    if path.suffix == ".txt":
        rows = text_rows(path)
        next(rows, None)  # count line
        _, header = next(rows, (None, []))
        columns = ["image_id", *header]
    else:
        rows = csv_rows(path)
        _, columns = next(rows, (None, []))
        from tfface.landmarks.cache import is_landmark_cache_header

        if is_landmark_cache_header(columns):  # written by `tfface data annotate`
            return read_annotate_cache(path, root, image_ids, problems)
    missing = [c for c in ("image_id", *LANDMARK_COLUMNS) if c not in columns]
    if missing:
        raise DataError(f"{path}: landmark file lacks columns {missing}")
    positions = [columns.index(c) for c in LANDMARK_COLUMNS]
    id_position = columns.index("image_id")
    for line, fields in rows:
        if len(fields) != len(columns):
            bad.bad(path, line, wrong_column_count(len(columns), len(fields)))
            continue
        i = index.get(fields[id_position])
        if i is None:
            continue
        cells = [fields[p] for p in positions]
        if all(c == "" for c in cells):
            continue  # no face found
        try:
            values = np.array([float(c) for c in cells], np.float32)
        except ValueError:
            bad.bad(path, line, f"landmark values must be numbers, got {cells}")
            continue
        landmarks[i] = values.reshape(5, 2)
    bad.report(problems)
    return landmarks


def wrong_column_count(expected: int, found: int, header: bool = True) -> str:
    """A bad row's message: the header sets the count, so a header that
    lacks a column shows in every row."""
    where = " (as many as the header on line 1 names)" if header else ""
    return f"expected {expected} columns{where}, found {found}"


def _identities_from_columns(ids, cells, index: dict, identities: np.ndarray) -> bool:
    """The fast path of `read_identities`: fills `identities` from whole
    columns; False (`identities` untouched) when a value is bad or an image
    is listed twice, for the row-by-row loop to handle."""
    ids = list(map(str.strip, ids))

    def parse(cell):
        return parse_int(cell, 0, 2**62)

    if ids == list(index):  # the same images in the same order (the usual case)
        values = parse_column(cells, parse, np.int64)
        if values is None:
            return False
        identities[:] = values
        return True
    wanted = [(row, cell) for row, cell in zip(map(index.get, ids), cells) if row is not None]
    if len({row for row, _ in wanted}) != len(wanted):
        return False
    values = parse_column([cell for _, cell in wanted], parse, np.int64)
    if values is None:
        return False
    identities[np.array([row for row, _ in wanted], np.intp)] = values
    return True


def read_identities(path: Path, image_ids, skip_bad_rows=False, problems=None):
    """(N,) int64 identities from `identities.csv` or `identity_CelebA.txt`;
    -1 for images the file does not list."""
    problems = [] if problems is None else problems
    index = {image_id: i for i, image_id in enumerate(image_ids)}
    identities = np.full((len(index),), -1, np.int64)
    bad = BadRows(skip_bad_rows)
    if path.suffix == ".txt":
        table = text_table(path)
        columns = table[2] if table is not None and len(table[2]) == 2 else None
        rows = text_rows(path) if columns is None else iter(())
        id_col, identity_col, width = 0, 1, 2
    else:
        table = csv_table(path)
        rows = csv_rows(path) if table is None else iter(())
        _, header = (1, table[0]) if table is not None else next(rows, (None, []))
        if "image_id" not in header or "identity" not in header:
            raise DataError(f"{path}: needs columns image_id and identity, found {header}")
        id_col, identity_col, width = header.index("image_id"), header.index("identity"), len(header)
        columns = table[1] if table is not None else None
    if columns is not None and not _identities_from_columns(columns[id_col], columns[identity_col], index, identities):
        # A bad value somewhere: read row by row to report it at its line.
        rows = text_rows(path) if path.suffix == ".txt" else csv_rows(path)
        if path.suffix != ".txt":
            next(rows, None)
    first_line = {}
    for line, fields in rows:
        if len(fields) != width:
            bad.bad(path, line, wrong_column_count(width, len(fields), header=path.suffix != ".txt"))
            continue
        i = index.get(fields[id_col])
        if i is None:
            continue
        value = parse_int(fields[identity_col], 0, 2**62)
        if value is None:
            bad.bad(path, line, f"identity must be a non-negative integer, got {fields[identity_col]!r}")
            continue
        if i in first_line:
            # The split groups images by person: a second row would merge or split people.
            bad.bad(path, line, f"image {fields[id_col]!r} is listed twice (first on line {first_line[i]})")
            continue
        first_line[i] = line
        identities[i] = value
    bad.report(problems)
    unknown = int((identities < 0).sum())
    if unknown:
        note(problems, f"{path}: {unknown} image(s) have no identity (each treated as its own person)")
    return identities


# --- checking images -----------------------------------------------------------


def _image_size(path) -> tuple[int, int]:
    from PIL import Image

    from tfface.data.image_ops import file_exif_orientation
    from tfface.data.image_ops import image_format

    with open(path, "rb") as file:
        head = file.read(16)
        if not head:
            raise DataError(f"{path}: empty image file")
        if image_format(head) is None:
            raise DataError(f"{path}: not an image format the pipeline decodes (JPEG, PNG, GIF, BMP, WebP)")
    with Image.open(str(path)) as image:
        width, height = image.size
        if file_exif_orientation(image) >= 5:  # turned a quarter: shown (and trained) the other way round
            width, height = height, width
    return height, width


def _map(fn, items, max_workers=None):
    # PIL releases the GIL while decoding, so threads use every core.
    max_workers = max_workers or min(8, (os.cpu_count() or 1) + 2)
    with concurrent.futures.ThreadPoolExecutor(max_workers) as pool:
        return list(pool.map(fn, items, chunksize=64))


def read_image_sizes(source: FaceSource, max_workers=None, problems=None) -> np.ndarray:
    """(N, 2) int (height, width) of the upright images, from the image
    headers only (fast).

    A file whose header does not read, or is of a format the pipeline does
    not decode, raises `DataError`; or, given a `problems` list, is
    listed there (one line for all of them) and gets (-1, -1).
    """
    if source.image_sizes is not None:
        return np.asarray(source.image_sizes)
    if source.images is not None:
        shape = np.asarray(source.images).shape
        return np.tile(np.array(shape[1:3], np.int64), (len(source), 1))

    failures = []

    def size(path):
        try:
            return _image_size(path)
        except DataError as e:
            failure = str(e)
        except Exception as e:
            failure = f"{path}: cannot read image header ({type(e).__name__}: {e})"
        if problems is None:
            raise DataError(failure)
        failures.append(failure)
        return (-1, -1)

    sizes = np.array(_map(size, [str(p) for p in source.image_paths], max_workers), np.int64).reshape(-1, 2)
    if failures:
        note(problems, f"{len(failures)} image file(s) cannot be read, e.g. {'; '.join(sorted(failures)[:3])}")
    return sizes


def validate_images(source: FaceSource, drop_bad=False, max_workers=None) -> FaceSource:
    """Decodes every image file as the training pipeline does, so a file
    that would stop training (truncated, corrupt, or a kind TensorFlow
    cannot read, such as a compressed BMP) raises a `DataError` naming it
    here (or, with `drop_bad=True`, is dropped and reported in `problems`).
    In-memory sources pass unchanged. `max_workers` is unused (tf.data
    picks its own parallelism); kept so existing calls work."""
    if source.image_paths is None:
        return source
    from tfface.data.pipeline import image_decode_problem
    from tfface.data.pipeline import undecodable_images

    refused = set(undecodable_images([source], limit=None))
    bad = [i for i, path in enumerate(source.image_paths) if str(path) in refused]
    if not bad:
        return source
    examples = "; ".join(image_decode_problem(source.image_paths[i]) or str(source.image_paths[i]) for i in bad[:3])
    if not drop_bad:
        raise DataError(f"{len(bad)} unreadable image(s): {examples}")
    keep = np.setdiff1d(np.arange(len(source)), bad)
    result = source.subset(keep)
    note(result.problems, f"dropped {len(bad)} unreadable image(s): {examples}")
    return result
