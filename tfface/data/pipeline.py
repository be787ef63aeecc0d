"""The fused tf.data input pipeline.

Several `FaceSource`s (CelebA, UTKFace, synthetic, ...) are mixed with set
sampling weights into one stream of `(x, y)`:

- `x = {"image": float32 (S, S, 3), 0..255}`
- `y = {task: label}` for every task of the schema, -1 where the example's
  source does not label that task (losses and metrics mask it), plus
  `_source` (index of the source), `_landmarks` (5, 2) as fractions of the
  model input (-1 when unknown), `_has_landmarks`, and with `with_masks`
  `_group_masks` (S/4, S/4, 8) drawn from the landmarks.

Images are decoded in parallel, cropped and resized with the same function
the SavedModel uses (`tfface.data.image_ops`), cached, then augmented with
transforms that keep labels, landmarks and masks consistent (a horizontal
flip mirrors the landmarks and swaps left and right points; masks are drawn
from the landmarks after augmentation).

The cache of decoded images (`cache=`, `data.cache`) is in memory when it
fits and in files of a fresh folder of the process otherwise, see
`choose_cache`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Optional

import numpy as np
import tensorflow as tf

from tfface.config import cache_mode as config_cache_mode
from tfface.data.image_ops import GIF
from tfface.data.image_ops import PALETTE_BMP
from tfface.data.image_ops import decode_upright
from tfface.data.image_ops import has_other_decodable_header
from tfface.data.image_ops import header_bytes
from tfface.data.image_ops import preprocess_image
from tfface.data.image_ops import refused_image_kind
from tfface.data.image_ops import starts_with
from tfface.data.source import FaceSource
from tfface.data.sources import open_source
from tfface.data.sources import user_cache_dir
from tfface.landmarks.detector import FLIP_PERMUTATION
from tfface.schema import MISSING
from tfface.schema import Schema
from tfface.schema import get_schema
from tfface.tf_errors import tensorflow_error_text

AUTOTUNE = tf.data.AUTOTUNE
_SHUFFLE_BUFFER = 4096  # rows per source

_JPEG_START = b"\xff\xd8"
_PNG_START = b"\x89PNG"


log = logging.getLogger(__name__)


def mask_size_for(image_size: int) -> int:
    return image_size // 4


# --- where the decoded images are cached ------------------------------------------------

# "auto" caches in memory up to this share of the machine's memory.
CACHE_MEMORY_FRACTION = 0.25
# Overrides that limit, in GB (e.g. TFFACE_CACHE_MEMORY_GB=48).
CACHE_MEMORY_ENV = "TFFACE_CACHE_MEMORY_GB"
_GB = 1e9


def cache_mode(cache) -> str:
    """`tfface.config.cache_mode`, with None taken as False (as before)."""
    return "none" if cache is None else config_cache_mode(cache)


def cache_bytes(sources, image_size: int) -> int:
    """What caching the decoded images of `sources` takes: images x S x S x 3
    bytes (uint8; labels and TensorFlow's overhead come on top, about half
    as much again at 64 px)."""
    return sum(len(s) for s in sources) * int(image_size) ** 2 * 3


def physical_memory_bytes() -> int | None:
    """The machine's memory, or the container's limit (cgroup) when lower;
    None when unknown."""
    sizes = []
    try:
        sizes.append(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        pass
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit_file).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and 0 < int(text) < 2**60:  # "max" or a huge number: no limit
            sizes.append(int(text))
    sizes = [size for size in sizes if size > 0]
    return min(sizes) if sizes else None


def cache_memory_limit() -> int:
    """Bytes "auto" may cache in memory: $TFFACE_CACHE_MEMORY_GB when set,
    else a quarter of `physical_memory_bytes()` (2 GB when unknown)."""
    forced = os.environ.get(CACHE_MEMORY_ENV)
    if forced:
        try:
            value = float(forced)
        except ValueError:
            value = -1.0
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"${CACHE_MEMORY_ENV} must be a number of GB >= 0, got {forced!r}")
        return int(value * _GB)
    memory = physical_memory_bytes()
    return int(memory * CACHE_MEMORY_FRACTION) if memory else int(2 * _GB)


def cache_root() -> Path:
    """Where file caches go: `user_cache_dir("images")`, not the system
    temporary folder (often a RAM disk)."""
    return user_cache_dir("images")


def _free_bytes(folder: Path) -> int | None:
    for path in (folder, *folder.parents):
        if path.exists():
            try:
                return shutil.disk_usage(path).free
            except OSError:
                return None
    return None


def choose_cache(cache, sources, image_size: int, cache_dir=None) -> str:
    """Where to cache the decoded images of `sources`: "memory", "disk" or "none".

    `cache` "memory", "disk" and False are taken as they are. "auto" (and
    True) is "memory" while `cache_bytes` stays within `cache_memory_limit()`
    (a quarter of the memory, or $TFFACE_CACHE_MEMORY_GB), else "disk" when
    the cache folder's file system has room for it, else "none"; those two
    are logged in one line, with the sizes.
    """
    mode = cache_mode(cache)
    if mode != "auto":
        return mode
    needed = cache_bytes(sources, image_size)
    limit = cache_memory_limit()
    if needed <= limit:
        return "memory"
    folder = Path(cache_dir) if cache_dir is not None else cache_root()
    free = _free_bytes(folder)
    # TensorFlow's files hold the labels too: room for half as much again.
    if free is not None and free >= needed * 1.5:
        mode, where = "disk", f"caching them in files under {folder} (removed when the data is no longer used)"
    else:
        room = f"{free / _GB:.1f} GB free" if free is not None else "no room known"
        mode, where = "none", f"not caching them (decoded again every epoch): {folder} has {room}"
    log.warning(
        "data.cache auto: the decoded images of %d examples at %d px take about %.1f GB, more than the "
        "%.1f GB memory limit (a quarter of the memory, or $%s); %s",
        sum(len(s) for s in sources), image_size, needed / _GB, limit / _GB, CACHE_MEMORY_ENV, where,
    )
    return mode


# A cache folder's name: run-HOST-PID-RANDOM (tfface 0.2.1 wrote run-PID-RANDOM).
_CACHE_FOLDER = re.compile(r"run-(?:(?P<host>.+)-)?(?P<pid>\d+)-[a-z0-9_]+")


def _host() -> str:
    import socket

    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _process_is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def remove_abandoned_cache_folders(root: Path) -> list:
    """Removes the cache folders under `root` whose process (on this host)
    has ended: a killed run cannot remove its own. Folders of live
    processes, of other hosts sharing the folder, and anything else are
    left alone. Returns the removed folders."""
    if os.name != "posix" or not root.is_dir():
        return []  # (os.kill(pid, 0) would end the process on Windows)
    host, removed = _host(), []
    for folder in root.iterdir():
        match = _CACHE_FOLDER.fullmatch(folder.name)
        if not match or not folder.is_dir() or match["host"] not in (None, host):
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and _process_is_gone(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        log.info("removed %d image cache folder(s) of ended runs under %s", len(removed), root)
    return removed


def new_cache_folder(cache_dir=None) -> Path:
    """A fresh folder for the file caches of one dataset: nothing in it was
    written before, so no image is ever served from an older run. Folders
    that killed runs left behind are removed first."""
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    root.mkdir(parents=True, exist_ok=True)
    remove_abandoned_cache_folders(root)
    return Path(tempfile.mkdtemp(prefix=f"run-{_host()}-{os.getpid()}-", dir=root))


def _fills_in_one_epoch(size: int, draws_per_epoch: float, buffer: int) -> bool:
    """Whether an epoch of a training stream reads a source's first pass
    whole. Every epoch restarts the stream (Keras iterates the dataset
    afresh), and a cache left unfilled is discarded: with fewer reads than
    the source holds it never fills and only costs memory. The shuffle
    buffer reads `buffer` rows ahead; 4 standard deviations of the draws'
    spread are kept in hand."""
    return size <= buffer or draws_per_epoch + buffer - 4 * math.sqrt(draws_per_epoch) >= size


# --- per-source datasets --------------------------------------------------------


# What _checked_decode's asserts say, each followed by the file's path.
_FILE_PROBLEMS = (
    "empty image file: ",
    "not an image file (JPEG, PNG, GIF, BMP, WebP or JPEG XL): ",
    "corrupt or truncated image file: ",
    "image file TensorFlow cannot decode (a compressed BMP or one of other than 8, 24 or 32 bits per pixel, "
    "or an animated WebP; save it as PNG): ",
)
_FILE_PROBLEM = re.compile(r"\[((?:%s)[^\]]*)\]" % "|".join(re.escape(p) for p in _FILE_PROBLEMS))
# The same, as an eager error quotes it ("Summarized data: b'...'").
_EAGER_FILE_PROBLEM = re.compile(r"(?:%s)[^'\]]*" % "|".join(re.escape(p) for p in _FILE_PROBLEMS))


def _holds_bytes(body, marker: bytes):
    """Whether the uint8 vector `body` contains `marker` anywhere."""
    starts = tf.maximum(tf.size(body) - len(marker) + 1, 0)
    found = tf.ones((starts,), tf.bool)
    for i, byte in enumerate(marker):
        found &= tf.equal(body[i : i + starts], byte)
    return tf.reduce_any(found)


def _checked_decode(path):
    """Reads and decodes one file, upright (EXIF orientation applied, as
    `tfface predict` and the serving graph do); a corrupt or truncated file
    fails naming it."""
    data = tf.io.read_file(path)
    # Zero-padded: substr past the end of a file of a few bytes would fail
    # without naming it.
    head = header_bytes(data, 4)
    is_jpeg = starts_with(head, 0, _JPEG_START)
    is_png = starts_with(head, 0, _PNG_START)
    length = tf.strings.length(data)
    # The other formats tf.io.decode_image reads; anything else would fail
    # inside the decoder without naming the file.
    is_other = has_other_decodable_header(data)
    kind = refused_image_kind(data)
    # A GIF only costs time on one's own data; an 8-bit BMP gets its palette.
    decodable = tf.equal(kind, 0) | tf.equal(kind, GIF) | tf.equal(kind, PALETTE_BMP)
    # A JPEG cut short loses its end-of-image marker FF D9, a PNG its IEND
    # chunk (the decoder's own error did not name the file). Looked for
    # anywhere: phones append data after FF D9 (Samsung's SEFT trailer, often
    # hundreds of bytes), which the last 64 bytes missed, refusing good photos.
    # One scan, of the file's own kind: each costs about a tenth of a decode.
    body = tf.io.decode_raw(data, tf.uint8)
    ends_ok = tf.cond(
        is_png, lambda: _holds_bytes(body, b"IEND"), lambda: is_other | _holds_bytes(body, b"\xff\xd9")
    )
    checks = []
    oks = (length > 0, is_jpeg | is_png | is_other, ends_ok, decodable)
    for ok, problem in zip(oks, _FILE_PROBLEMS):
        # Chained, so the first check that fails is the one reported.
        with tf.control_dependencies(checks):
            checks = [tf.debugging.Assert(ok, [tf.strings.join([problem, path])], summarize=1)]
    with tf.control_dependencies(checks):
        return decode_upright(data, kind)


# What TensorFlow's image decoders say when the bytes pass the header checks
# above but the pixels do not decode (a garbled body, a PNG cut short).
_DECODE_FAILURES = ("DecodeImage", "DecodeJpeg", "DecodePng", "Invalid PNG data", "jpeg::Uncompress", "Invalid JPEG data")


_UNDECODABLE_LIMIT = 10  # files named in one error
_SKIP_HINT = " (or leave out every such image: `skip_bad_images: true` on a training source, evaluate's --skip-bad-images)"


def undecodable_images(sources, limit: Optional[int] = _UNDECODABLE_LIMIT) -> list:
    """Paths of the first `limit` images (all when None) of `sources` that the training
    pipeline's decoding refuses (`_checked_decode`: corrupt, cut short, or
    of a kind TensorFlow cannot read), for error reports.

    Decodes every file once, in a parallel `tf.data` map that drops the files
    that fail: one eager decode per file took minutes on a large folder.
    """
    paths = [str(path) for source in sources for path in (source.image_paths if source.image_paths is not None else ())]
    if not paths:
        return []

    def decodes(path):
        return path, tf.shape(_checked_decode(path))[0]

    decoded = (
        tf.data.Dataset.from_tensor_slices(paths)
        .map(decodes, num_parallel_calls=tf.data.AUTOTUNE)
        .ignore_errors()
        .map(lambda path, height: path)
    )
    good = {path.decode() for path in decoded.as_numpy_iterator()}
    return [path for path in paths if path not in good][:limit]


def image_decode_problem(path) -> Optional[str]:
    """Why the training pipeline refuses the image file `path`, in the file
    checks' words (naming it), or None when it decodes."""
    try:
        _checked_decode(tf.constant(str(path)))
    except tf.errors.OpError as error:
        found = _EAGER_FILE_PROBLEM.search(str(error))
        return found.group(0) if found else f"{path}: cannot decode image ({tensorflow_error_text(error)})"
    return None


def drop_undecodable_images(source: FaceSource, splits: Optional[dict] = None):
    """`source` without the images the pipeline cannot decode, so that a
    few corrupt files in a large folder do not stop a run at the first of
    them (`skip_bad_images`).

    Given `splits` (`split_source`'s dict of parts of `source`), returns
    that dict with the images left out of each part instead, so the split
    stays the one of the whole source. Decodes every image once; what it
    leaves out is logged and listed in `problems` (of every part), and so in
    `train_summary.json` or `metrics.json`.
    """
    from tfface.data.source import DataError

    parts = {"all": source} if splits is None else dict(splits)
    bad = set(undecodable_images([source], limit=None)) if source.image_paths is not None else set()
    if not bad:
        return source if splits is None else parts
    if len(bad) == len(source):
        raise DataError(f"{source.root or source.name}: none of its {len(source)} images decodes")
    named = sorted(bad)
    more = f" and {len(named) - _UNDECODABLE_LIMIT} more" if len(named) > _UNDECODABLE_LIMIT else ""
    message = (
        f"left out {len(named)} of {len(source)} image(s) that do not decode (skip_bad_images): "
        f"{', '.join(named[:_UNDECODABLE_LIMIT])}{more}"
    )
    log.warning("%s: %s", source.root or source.name, message)
    for name, part in parts.items():
        parts[name] = part.subset([i for i, path in enumerate(part.image_paths) if str(path) not in bad])
        parts[name].problems.append(message)
    return parts["all"] if splits is None else parts


@contextlib.contextmanager
def naming_undecodable_images(sources):
    """Turns an image-decoding failure inside a `tf.data` pipeline (whose
    error names no file) into a `DataError` naming the files, and a failure
    of the decoded-image cache (a full disk, a cache folder removed or
    changed during the run) into one line that says what to do; other
    errors pass unchanged."""
    from tfface.data.source import DataError

    try:
        yield
    except tf.errors.OpError as error:
        named = _FILE_PROBLEM.search(str(error)) if isinstance(error, tf.errors.InvalidArgumentError) else None
        if named:  # the file checks named it already, inside TensorFlow's error
            raise DataError(f"{named.group(1)}; fix or remove it{_SKIP_HINT}") from None
        if _is_cache_failure(error):
            raise DataError(
                f"the decoded-image cache failed ({tensorflow_error_text(error)}); run the same command again "
                f"(it writes a new cache), after freeing space if the disk is full, or set data.cache: none "
                f"(cache folder: {cache_root()}, TFFACE_CACHE_DIR)"
            ) from None
        if not isinstance(error, tf.errors.InvalidArgumentError):
            raise
        if not any(marker in str(error) for marker in _DECODE_FAILURES):
            raise
        logging.getLogger(__name__).warning("an image does not decode: looking for it (decodes every image once)")
        bad = undecodable_images(sources)
        if not bad:
            raise
        more = " (and maybe more)" if len(bad) >= _UNDECODABLE_LIMIT else ""
        raise DataError(
            f"corrupt image file(s) that cannot be decoded{more}: {', '.join(bad)}; fix or remove them{_SKIP_HINT}"
        ) from None


def _is_cache_failure(error) -> bool:
    """A cache file's path in the error, or the cache as the iterator that
    failed (an error further down the pipeline names the cache in its chain
    of iterators too, followed by its own)."""
    text = str(error)
    return str(cache_root()) in text or re.search(r'Iterator "[^"]*CacheImpl"', text) is not None


def _normalised_landmarks(landmarks, height, width):
    """Pixel landmarks of the original image -> fractions of the square crop."""
    height = tf.cast(height, tf.float32)
    width = tf.cast(width, tf.float32)
    side = tf.minimum(height, width)
    # Same integer offsets as image_ops.preprocess_image.
    top = tf.floor((height - side) / 2.0)
    left = tf.floor((width - side) / 2.0)
    offset = tf.stack([left, top])
    # Pixel index -> continuous coordinate (+0.5), then fraction of the side.
    return (landmarks - offset + 0.5) / side


# How a per-source dataset orders its rows (`source_dataset(order=...)`).
ROW_ORDERS = ("file", "permuted", "shuffled")


def _source_seed(seed, source_id: int):
    """Each source its own stream from one seed (two sources of one size
    would otherwise be shuffled alike)."""
    return None if seed is None else int(seed) * 7919 + int(source_id)


def _row_indices(n: int, order: str, seed) -> tf.data.Dataset:
    """The row indices a per-source dataset reads, in `order`.

    "file" keeps the rows' order (evaluation). "permuted" is one seeded
    permutation, the same every pass: what a training cache records. Label
    files are sorted by name (UTKFace names start with the age), so a
    training stream over them in file order, shuffled only within a buffer,
    ordered every epoch by age, and a stream restarted each epoch with
    fewer draws than rows never reached the rows past the buffer.
    "shuffled" is a fresh permutation on every pass (uncached training):
    each epoch may draw any row.
    """
    if order == "shuffled":
        return tf.data.Dataset.range(n).shuffle(n, seed=seed, reshuffle_each_iteration=True)
    rows = np.arange(n) if order == "file" else np.random.default_rng(seed).permutation(n)
    return tf.data.Dataset.from_tensor_slices(rows.astype(np.int64))


_ROWS_PER_READ = 64  # in-memory rows read per Python call: 8 MB of 218x178 faces


def _rows_with_images(rows: tf.data.Dataset, images) -> tf.data.Dataset:
    """(row, image) pairs of an in-memory image array, read from the array
    itself. Captured as a tensor, a 555 MB array cost 1.2 GB more memory
    held and 1.7 GB at peak (a copy, and tf.data's serialized graph of it):
    the 4 GiB `tfds:celeb_a` may load would not fit a 12 GB notebook. Rows
    are read in groups, one Python call each (one call per row read half
    as fast); decoded rows are cached as usual, so only a first pass reads."""
    images = np.asarray(images)
    shape, dtype = images.shape[1:], tf.as_dtype(images.dtype)

    def read(group):
        pixels = tf.numpy_function(lambda i: images[i], [group], dtype, stateful=False)
        return group, tf.ensure_shape(pixels, (None, *shape))

    pairs = rows.batch(_ROWS_PER_READ).map(read, num_parallel_calls=AUTOTUNE, deterministic=True).unbatch()
    # unbatch() forgets the length, which Keras uses for its step counts.
    return pairs.apply(tf.data.experimental.assert_cardinality(len(images)))


def source_dataset(
    source: FaceSource,
    schema: Schema,
    image_size: int,
    source_id: int = 0,
    cache: bool = True,
    cache_file=None,
    order: str = "file",
    seed=None,
) -> tf.data.Dataset:
    """One source as a dataset of (image uint8, labels dict), unbatched, its
    rows in `order` (`ROW_ORDERS`; `seed` for the two random ones), cached
    in memory (`cache`), in files starting with `cache_file` (which must be
    new to this dataset), or not at all."""
    if order not in ROW_ORDERS:
        raise ValueError(f"order must be one of {list(ROW_ORDERS)}, got {order!r}")
    if order == "shuffled" and (cache or cache_file is not None):
        raise ValueError('order "shuffled" draws a new order every pass: a cache would keep the first')
    n = len(source)
    labels = schema.encode_labels(source.format, source.columns, n)
    if source.landmarks is not None:
        landmarks = np.asarray(source.landmarks, np.float32).reshape(n, 5, 2)
    else:
        landmarks = np.full((n, 5, 2), np.nan, np.float32)
    has_landmarks = np.isfinite(landmarks).all(axis=(1, 2)).astype(np.float32)
    landmarks = np.where(np.isfinite(landmarks), landmarks, 0.0).astype(np.float32)
    labels = {name: tf.constant(values) for name, values in labels.items()}
    landmarks, has_landmarks = tf.constant(landmarks), tf.constant(has_landmarks)

    def example(row, image):
        # Image and labels come from one row in one element: their pairing
        # does not depend on the order a parallel map delivers rows in.
        shape = tf.shape(image)
        image = tf.cast(tf.round(preprocess_image(image, image_size)), tf.uint8)
        has = tf.gather(has_landmarks, row)
        norm = _normalised_landmarks(tf.gather(landmarks, row), shape[0], shape[1])
        y = {name: tf.gather(values, row) for name, values in labels.items()}
        y["_landmarks"] = tf.where(has > 0, norm, -tf.ones_like(norm))
        y["_has_landmarks"] = has
        y["_source"] = tf.constant(source_id, tf.int32)
        return image, y

    rows = _row_indices(n, order, _source_seed(seed, source_id))
    if source.images is not None:
        dataset = _rows_with_images(rows, source.images).map(example, num_parallel_calls=AUTOTUNE, deterministic=True)
    else:
        paths = tf.constant([str(p) for p in source.image_paths])
        dataset = rows.map(
            lambda row: example(row, _checked_decode(tf.gather(paths, row))),
            num_parallel_calls=AUTOTUNE, deterministic=True,
        )
    if cache_file is not None:
        dataset = dataset.cache(str(cache_file))
    elif cache:
        dataset = dataset.cache()
    return dataset


# --- augmentation ---------------------------------------------------------------------


def flip_example(image, y):
    """Horizontal flip of an image and its landmarks (left/right swapped)."""
    image = tf.image.flip_left_right(image)
    landmarks = y["_landmarks"]
    flipped = tf.stack([1.0 - landmarks[:, 0], landmarks[:, 1]], axis=-1)
    flipped = tf.gather(flipped, FLIP_PERMUTATION)
    y = dict(y)
    y["_landmarks"] = tf.where(y["_has_landmarks"] > 0, flipped, landmarks)
    return image, y


def affine_example(image, y, scale, angle, shift):
    """Scales and rotates about the centre, then shifts (fractions of the side).

    The same map moves the landmarks, so they stay on the face.
    """
    size = tf.cast(tf.shape(image)[0], tf.float32)
    centre = (size - 1.0) / 2.0
    cos, sin = tf.cos(angle), tf.sin(angle)
    tx, ty = shift[0] * size, shift[1] * size
    # Output pixel -> input pixel (what ImageProjectiveTransformV3 wants):
    # p_in = R^T (p_out - c - t) / s + c.
    a0, a1 = cos / scale, sin / scale
    b0, b1 = -sin / scale, cos / scale
    ox, oy = centre + tx, centre + ty
    a2 = centre - (a0 * ox + a1 * oy)
    b2 = centre - (b0 * ox + b1 * oy)
    transform = tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0])
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(image[None], tf.float32),
        transforms=transform[None],
        output_shape=tf.shape(image)[:2],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )[0]
    # Landmarks: input -> output, p_out = s R (p_in - c) + c + t, in pixels.
    points = y["_landmarks"] * size - 0.5 - centre
    rx = cos * points[:, 0] - sin * points[:, 1]
    ry = sin * points[:, 0] + cos * points[:, 1]
    moved = tf.stack([scale * rx + centre + tx, scale * ry + centre + ty], axis=-1)
    moved = (moved + 0.5) / size
    y = dict(y)
    y["_landmarks"] = tf.where(y["_has_landmarks"] > 0, moved, y["_landmarks"])
    return tf.cast(warped, image.dtype), y


def augment_example(image, y):
    """Random flip, small affine, colour jitter; labels are unchanged."""
    image = tf.cast(image, tf.float32)
    image, y = tf.cond(
        tf.random.uniform(()) < 0.5,
        lambda: flip_example(image, y),
        lambda: (image, y),
    )
    scale = tf.random.uniform((), 0.92, 1.08)
    angle = tf.random.uniform((), -10.0, 10.0) * (math.pi / 180.0)
    shift = tf.random.uniform((2,), -0.04, 0.04)
    image, y = affine_example(image, y, scale, angle, shift)
    image = image + tf.random.uniform((), -20.0, 20.0)
    mean = tf.reduce_mean(image, axis=(0, 1), keepdims=True)
    image = (image - mean) * tf.random.uniform((), 0.8, 1.2) + mean
    grey = tf.reduce_mean(image, axis=-1, keepdims=True)
    image = (image - grey) * tf.random.uniform((), 0.8, 1.2) + grey
    return tf.clip_by_value(image, 0.0, 255.0), y


# --- the fused stream -----------------------------------------------------------------


def _blank_examples(element_spec, count: int) -> tf.data.Dataset:
    """`count` black images whose labels are all missing: no loss, no
    metric and no mask loss counts them (`_has_landmarks` 0)."""
    image_spec, label_spec = element_spec
    labels = {key: tf.fill(spec.shape, tf.constant(MISSING, spec.dtype)) for key, spec in label_spec.items()}
    labels["_has_landmarks"] = tf.zeros_like(labels["_has_landmarks"])
    example = (tf.zeros(image_spec.shape, image_spec.dtype), labels)
    return tf.data.Dataset.from_tensors(example).repeat(count)


def _to_model_inputs(image, y, with_masks: bool, image_size: int):
    image = tf.cast(image, tf.float32)
    if with_masks:
        from tfface.landmarks.group_masks import group_masks_tf

        masks = group_masks_tf(y["_landmarks"], mask_size_for(image_size))
        valid = tf.reshape(y["_has_landmarks"], (-1, 1, 1, 1))
        y = dict(y)
        y["_group_masks"] = masks * valid
    return {"image": image}, y


def make_dataset(
    sources: list[FaceSource],
    schema: Schema,
    image_size: int,
    batch_size: int = 32,
    training: bool = False,
    weights=None,
    augment: bool = True,
    with_masks: bool = False,
    cache: bool | str = True,
    steps_per_epoch: int | None = None,
    seed: int | None = None,
    cache_dir=None,
    pad_last_batch: bool = False,
) -> tf.data.Dataset:
    """A batched `(x, y)` dataset over the fused sources.

    Training streams shuffle, repeat and mix the sources with `weights`
    (default: proportional to their sizes); an epoch is `steps_per_epoch`
    batches (default: one pass over all examples), so plain
    `model.fit(dataset)` works. A cached source is read in one seeded
    permutation, varied by a shuffle buffer; an uncached one in a fresh
    permutation every pass, so epochs shorter than a source may draw any
    of its rows. Evaluation streams visit every example once, in order.

    `cache`: the decoded, resized images are kept after the first pass,
    "memory", in files ("disk": a fresh folder under `cache_dir`, default
    `cache_root()`, removed when the dataset is no longer used or the
    process ends), or "auto" / True (memory when they fit, see
    `choose_cache`); False decodes every epoch. A training stream does not
    cache a source an epoch reads less than once (logged): every epoch
    restarts the stream, so that cache would be discarded unfilled each time.

    `pad_last_batch`: an evaluation stream's partial last batch is filled
    with blank examples whose labels are all missing (-1, `_source` -1),
    so metrics are unchanged (Keras's `loss` weighs that batch as a full
    one); training batches are always full. Needed under a distribution
    strategy of several replicas: a replica handed no example of the last
    batch fails in TensorFlow's CPU batch norm ("Incompatible shapes").
    """
    if isinstance(sources, (FaceSource, str)):
        sources = [sources]
    if not sources:
        raise ValueError("make_dataset needs at least one source")
    sources = list(sources)
    for i, source in enumerate(sources):
        if isinstance(source, str):  # a folder or a name, as `open_source` takes
            sources[i] = open_source(source)
        elif not isinstance(source, FaceSource):
            raise TypeError(
                f"make_dataset takes FaceSources (tfface.data.sources.open_source) or source names, "
                f"got {type(source).__name__}"
            )
    schema = get_schema(schema)  # also a preset name, a file or a mapping
    for key, value, low in (("image_size", image_size, 1), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"make_dataset: {key} must be a positive integer, got {value!r}")
    if steps_per_epoch is not None and (not isinstance(steps_per_epoch, (int, np.integer)) or steps_per_epoch < 1):
        raise ValueError(f"make_dataset: steps_per_epoch must be a positive integer or None, got {steps_per_epoch!r}")
    mode = cache_mode(cache)
    empty = [s.name for s in sources if len(s) == 0]
    if empty:
        raise ValueError(f"sources with no examples: {empty}")
    total = sum(len(s) for s in sources)
    cached = [mode != "none"] * len(sources)
    if training:
        if weights is None:
            weights = [len(s) for s in sources]
        if len(weights) != len(sources):
            raise ValueError(f"{len(weights)} weights for {len(sources)} sources")
        weights = np.asarray(weights, np.float64)
        if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
            raise ValueError(f"source weights must be finite, >= 0 and not all 0, got {weights.tolist()}")
        weights = (weights / weights.sum()).tolist()
        steps = steps_per_epoch or max(1, total // batch_size)
        draws = [steps * batch_size * w for w in weights]
        short = [
            i for i, s in enumerate(sources)
            if cached[i] and not _fills_in_one_epoch(len(s), draws[i], min(len(s), _SHUFFLE_BUFFER))
        ]
        if short:
            log.warning(
                "not caching the images of %s: an epoch of %d batches reads less than one pass of %s, and every "
                "epoch starts the stream again, so the cache would be discarded unfilled each time",
                ", ".join(f"{sources[i].name} ({len(sources[i])} examples, about {draws[i]:.0f} drawn per epoch)" for i in short),
                steps, "it" if len(short) == 1 else "each",
            )
            for i in short:
                cached[i] = False
    if any(cached):
        mode = choose_cache(mode, [s for s, c in zip(sources, cached) if c], image_size, cache_dir)
    cached = [c and mode != "none" for c in cached]
    folder = new_cache_folder(cache_dir) if mode == "disk" and any(cached) else None
    per_source = [
        source_dataset(
            s, schema, image_size, source_id=i,
            cache=cached[i] and mode == "memory",
            # One file prefix per source, in a folder of this dataset only.
            cache_file=folder / f"source{i}" if folder is not None and cached[i] else None,
            # A cache records one order; an uncached training source draws
            # a new permutation every pass.
            order="file" if not training else "permuted" if cached[i] else "shuffled",
            seed=seed,
        )
        for i, s in enumerate(sources)
    ]
    if training:
        streams = [
            # Cached: every epoch reads it whole; the buffer varies the order.
            ds.shuffle(min(len(s), _SHUFFLE_BUFFER), seed=seed, reshuffle_each_iteration=True).repeat()
            if cached[i] else ds.repeat()
            for i, (ds, s) in enumerate(zip(per_source, sources))
        ]
        dataset = (
            streams[0]
            if len(streams) == 1
            else tf.data.Dataset.sample_from_datasets(
                streams, weights=weights, seed=seed, rerandomize_each_iteration=True
            )
        )
        if augment:
            dataset = dataset.map(augment_example, num_parallel_calls=AUTOTUNE)
        dataset = dataset.batch(batch_size, drop_remainder=True).take(steps)
    else:
        dataset = per_source[0]
        for extra in per_source[1:]:
            dataset = dataset.concatenate(extra)
        if pad_last_batch and total % batch_size:
            dataset = dataset.concatenate(_blank_examples(dataset.element_spec, -total % batch_size))
        dataset = dataset.batch(batch_size)
    dataset = dataset.map(
        lambda image, y: _to_model_inputs(image, y, with_masks, image_size),
        num_parallel_calls=AUTOTUNE,
    )
    dataset = dataset.prefetch(AUTOTUNE)
    if folder is not None:
        # Every dataset made from this one, and every iterator, keeps it
        # alive; the folder goes with the last of them, or at exit.
        weakref.finalize(dataset, shutil.rmtree, str(folder), True)
    return dataset
