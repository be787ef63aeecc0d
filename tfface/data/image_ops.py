"""Image decoding and preprocessing: the single source of truth.

Training (the tf.data pipeline), the exported SavedModel signatures and the
local server all call these functions, so a face is turned into model input
the same way everywhere. `decode_image` and `preprocess_image` are pure
TensorFlow ops (they run inside `tf.data` and inside SavedModel graphs);
`image_format` and `image_size_from_header` are plain Python so clients and
servers can reject bad files cheaply, before decoding or sending anything.
"""

from __future__ import annotations

import struct
from typing import Optional

import tensorflow as tf

# Formats `tf.io.decode_image` accepts, as sniffed by `image_format`.
DECODABLE_FORMATS = ("jpeg", "png", "gif", "bmp", "webp", "jxl")

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JXL_CONTAINER = b"\x00\x00\x00\x0cJXL \r\n\x87\n"


def decode_image(data) -> tf.Tensor:
    """Encoded image bytes (scalar string) -> uint8 (H, W, 3).

    Grayscale and RGBA images become RGB; animated GIFs give their first
    frame. Bytes that are no image raise `tf.errors.InvalidArgumentError`.
    """
    image = tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def decode_upright(data, kind=None) -> tf.Tensor:
    """`decode_image`, then an 8-bit BMP's palette and the EXIF orientation
    (JPEG and PNG) applied, so a phone photo tagged "rotate 90" is upright
    as every viewer, PIL's `ImageOps.exif_transpose` and `tfface predict`
    show it. `kind`: the bytes' `refused_image_kind`, when the caller has
    read it already."""
    data = tf.convert_to_tensor(data, tf.string)
    image = decode_image(data)
    if kind is None:
        kind = refused_image_kind(data)
    palette = tf.equal(kind, PALETTE_BMP)
    image = tf.cond(palette, lambda: with_bmp_palette(data, image), lambda: image)
    return orient_image(image, exif_orientation(data))


EMPTY_BATCH_MESSAGE = "empty batch: send at least one image"


# EXIF orientation: only the first bytes of a file are searched, as the
# segment/chunk that holds it comes before the pixels in files from cameras
# and PIL.
_EXIF_HEAD = 4096
_MAX_IFD_ENTRIES = 64
_ORIENTATION_TAG = 0x0112


def exif_orientation(data) -> tf.Tensor:
    """In-graph: the EXIF orientation (int32, 1..8) of encoded JPEG or PNG
    bytes, a scalar or a batch (same shape out); 1 (as stored) when there is
    none, it cannot be read, or the format is another.

    Finds the TIFF block of a JPEG APP1 "Exif" segment or a PNG "eXIf" chunk
    in the first 4 KiB and reads tag 0x0112 of its first directory, as a few
    ops over the whole batch: called per image inside the serving graph's
    `tf.map_fn` the same ops cost about 0.3 ms an image; on a batch of 32,
    outside the loop, a fraction of that in all.
    """
    data = tf.convert_to_tensor(data, tf.string)
    shape = tf.shape(data)
    heads = tf.strings.substr(tf.reshape(data, [-1]), 0, _EXIF_HEAD)
    # Most files have no EXIF, so one scan decides whether to parse at all
    # (a search-and-replace, as RE2's full match does not step over bytes
    # that are not UTF-8).
    tagged = tf.not_equal(tf.strings.regex_replace(heads, r"Exif\x00\x00|eXIf", "", replace_global=False), heads)
    orientation = tf.cond(
        tf.reduce_any(tagged),
        lambda: _orientation_from_heads(heads),
        lambda: tf.ones(tf.shape(heads), tf.int32),
    )
    return tf.reshape(orientation, shape)


def _orientation_from_heads(heads) -> tf.Tensor:
    """(N,) first bytes of files -> (N,) EXIF orientation (see `exif_orientation`)."""
    head = tf.io.decode_raw(heads, tf.uint8, fixed_length=_EXIF_HEAD)  # zero-padded

    def first_match(signature: bytes):
        width = _EXIF_HEAD - len(signature) + 1
        hits = tf.equal(head[:, :width], signature[0])
        for k in range(1, len(signature)):
            hits = hits & tf.equal(head[:, k : k + width], signature[k])
        return tf.reduce_any(hits, axis=1), tf.argmax(tf.cast(hits, tf.int32), axis=1, output_type=tf.int64)

    def window(index, offsets):  # (N,) start, offsets -> (N, len(offsets)) bytes as int64
        index = index[:, None] + tf.constant(offsets, tf.int64)
        return tf.cast(tf.gather(head, tf.clip_by_value(index, 0, _EXIF_HEAD - 1), batch_dims=1), tf.int64)

    # JPEG: ... FF E1 <length> "Exif\0\0" <TIFF>; PNG: ... <length> "eXIf" <TIFF> <crc>.
    exif_found, exif_at = first_match(b"Exif\0\0")
    chunk_found, chunk_at = first_match(b"eXIf")
    in_app1 = tf.reduce_all(tf.equal(window(exif_at - 4, [0, 1]), [0xFF, 0xE1]), axis=1)
    jpeg_exif = starts_with(head, 0, b"\xff\xd8") & exif_found & in_app1
    png_exif = starts_with(head, 0, _PNG_SIGNATURE) & chunk_found
    tiff = tf.where(jpeg_exif, exif_at + 6, chunk_at + 4)

    order = window(tiff, [0, 1, 2, 3])
    little = starts_with(order, 0, b"II*\0")
    big = starts_with(order, 0, b"MM\0*")

    def unsigned(values):  # (N, ..., n) bytes in the file's byte order -> int64
        n = values.shape[-1]
        weights = tf.where(
            little[:, None],
            tf.constant([[1 << (8 * i) for i in range(n)]], tf.int64),
            tf.constant([[1 << (8 * (n - 1 - i)) for i in range(n)]], tf.int64),
        )
        if values.shape.rank == 3:
            weights = weights[:, None, :]
        return tf.reduce_sum(values * weights, axis=-1)

    directory = tiff + tf.minimum(unsigned(window(tiff + 4, [0, 1, 2, 3])), _EXIF_HEAD)  # past the head: not read
    count = unsigned(window(directory, [0, 1]))
    starts = directory[:, None] + 2 + 12 * tf.range(_MAX_IFD_ENTRIES, dtype=tf.int64)  # (N, entries)
    entries = tf.cast(
        tf.gather(
            head, tf.clip_by_value(starts[:, :, None] + tf.constant([0, 1, 8, 9], tf.int64), 0, _EXIF_HEAD - 1), batch_dims=1
        ),
        tf.int64,
    )  # (N, entries, 4): tag and value, two bytes each
    match = (
        (tf.range(_MAX_IFD_ENTRIES, dtype=tf.int64) < count[:, None])
        & tf.equal(unsigned(entries[:, :, :2]), _ORIENTATION_TAG)
        & (starts + 12 <= _EXIF_HEAD)
    )
    value = tf.reduce_max(tf.where(match, unsigned(entries[:, :, 2:]), 0), axis=1)
    valid = (jpeg_exif | png_exif) & (little | big) & (value >= 1) & (value <= 8)
    return tf.cast(tf.where(valid, value, 1), tf.int32)


def orient_image(image, orientation) -> tf.Tensor:
    """uint8 (H, W, C) as stored -> as shown, for an EXIF orientation 1..8
    (the transposes of PIL's `ImageOps.exif_transpose`)."""
    orientation = tf.convert_to_tensor(orientation, tf.int32)
    image = tf.cond(orientation >= 5, lambda: tf.transpose(image, [1, 0, 2]), lambda: image)

    def one_of(values):
        return tf.reduce_any(tf.equal(orientation, values))

    image = tf.cond(one_of([2, 3, 6, 7]), lambda: tf.reverse(image, [1]), lambda: image)
    image = tf.cond(one_of([3, 4, 7, 8]), lambda: tf.reverse(image, [0]), lambda: image)
    image.set_shape([None, None, image.shape[-1]])
    return image


def file_exif_orientation(image) -> int:
    """The EXIF orientation (1..8) PIL reads from an image file, encoded bytes
    or an open PIL image; 1 when it has none or cannot be read. (Python side,
    for caches and sizes; the pipeline uses the in-graph `exif_orientation`.)"""
    import io

    from PIL import Image

    try:
        if isinstance(image, Image.Image):
            value = image.getexif().get(_ORIENTATION_TAG, 1)
        else:
            with Image.open(io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image) as opened:
                value = opened.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # PIL raises OSError, SyntaxError, ValueError...: the decoders name bad files
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def read_upright_rgb(path) -> tuple:
    """(uint8 (H, W, 3) array, EXIF orientation) of an image file as shown:
    its EXIF rotation applied, as the pipeline decodes it, so landmarks and
    drawings made from it line up with training. (Python side, PIL.)"""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        orientation = file_exif_orientation(image)
        return pil_rgb_array(ImageOps.exif_transpose(image)), orientation


# PIL's modes for 16-bit (and 32-bit integer) greyscale.
_WIDE_GREY_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def pil_rgb_array(image):
    """uint8 (H, W, 3) pixels of an opened PIL image, as `decode_image`
    gives them, for the Python-side readers (landmarks, `tfface predict`,
    the gRPC client's conversions).

    PIL's own `convert("RGB")` clips every 16-bit grey level above 255 to
    white; TensorFlow keeps each level's high byte, and so does this (PIL
    reads 16-bit RGB to 8 bits that way already). Float greyscale (TIFF,
    which TensorFlow does not read) is scaled from 0..1, or from 0..65535
    when it holds larger values. Raises ValueError on non-finite floats.
    """
    import numpy as np

    if image.mode in _WIDE_GREY_MODES:
        grey = (np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8).astype(np.uint8)
    elif image.mode == "F":
        values = np.asarray(image, np.float64)
        if not np.all(np.isfinite(values)):
            raise ValueError("greyscale image with non-finite values")
        top = 1.0 if values.max() <= 1.0 else 65535.0 if values.max() > 255 else 255.0
        grey = np.clip(np.round(values * (255.0 / top)), 0, 255).astype(np.uint8)
    else:
        return np.asarray(image.convert("RGB"))
    return np.repeat(grey[..., None], 3, axis=-1)


def encode_png(image) -> bytes:
    """uint8 (H, W, 3) array -> PNG bytes (lossless, so decoding gives it back)."""
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def preprocess_image(image, size: int) -> tf.Tensor:
    """uint8 (H, W, 3) -> float32 (size, size, 3) with values in 0..255.

    A batch (B, H, W, 3) of images of one size works too, as one resize.

    Centre square crop of side min(H, W), then antialiased bilinear resize,
    rounded to whole pixel values: the training pipeline caches this as
    uint8, so rounding here makes that cache lossless and the serving path
    identical to training. Normalisation is *not* done here: it lives
    inside the model.
    """
    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)
    height, width = shape[-3], shape[-2]
    side = tf.minimum(height, width)
    top = (height - side) // 2
    left = (width - side) // 2
    square = image[..., top : top + side, left : left + side, :]
    resized = tf.image.resize(
        tf.cast(square, tf.float32),
        [size, size],
        method="bilinear",
        antialias=True,
    )
    resized = tf.clip_by_value(tf.round(resized), 0.0, 255.0)
    resized.set_shape([*image.shape[:-3], size, size, 3])
    return resized


def preprocess_encoded_images(images, size: int, max_side: int) -> tf.Tensor:
    """Batch of encoded images (string (B,)) -> float32 (B, size, size, 3).

    The serving graph's preprocessing, image by image (a request may mix
    sizes and formats), upright as in training (`decode_upright`),
    refusing an image whose header or pixels exceed `max_side` and the
    kinds of `REFUSED_KINDS`. The header checks that need no decoding (the
    EXIF orientation, the refused kinds) run for the whole batch at once,
    before the loop; an image without a rotation skips it behind a single
    `tf.cond` (a second, rotation-free loop for such batches measured no
    faster and doubled the graph). An 8-bit BMP is refused rather than
    given its palette, as training gives it: the lookup, even untaken,
    cost the loop 0.3 ms a request of 32. Resizing a same-size batch in
    one op instead measured no faster: TF already runs the loop's
    iterations on every core. (Tried in three landings, the last with the
    header checks hoisted out of the loop: 11.8-12.2 ms against 10.5-11.2
    ms for 32 face crops; every op added to the loop body costs its
    overhead once per image.)
    """
    limit = tf.constant(max_side, tf.int64)
    images = tf.convert_to_tensor(images, tf.string)
    refuse = _refuse_kinds(images)
    # The header checks and the EXIF scan run side by side; the loop waits
    # for both.
    orientations = exif_orientation(images)
    with tf.control_dependencies([refuse]):
        orientations = tf.identity(orientations)

    def one(item):
        data, orientation = item
        check_header = tf.debugging.assert_less_equal(
            encoded_image_side(data),
            limit,
            message=f"image is larger than the maximum side of {max_side} pixels (header)",
        )
        with tf.control_dependencies([check_header]):
            image = decode_image(data)
        check_pixels = tf.debugging.assert_less_equal(
            tf.cast(tf.reduce_max(tf.shape(image)[:2]), tf.int64),
            limit,
            message=f"image is larger than the maximum side of {max_side} pixels",
        )
        with tf.control_dependencies([check_pixels]):
            image = tf.cond(tf.equal(orientation, 1), lambda: image, lambda: orient_image(image, orientation))
            return preprocess_image(image, size)

    return tf.map_fn(
        one,
        (images, orientations),
        fn_output_signature=tf.TensorSpec((size, size, 3), tf.float32),
    )


def _refuse_kinds(images) -> tf.Tensor:
    """In-graph: True, or an error listing the `REFUSED_KINDS` code of each
    image, or one for an empty batch (which oneDNN's CPU batch norm would
    fail with "Incompatible shapes"). A request of JPEGs and PNGs only (the
    first byte tells) skips the header checks behind one `tf.cond`: they cost
    a request of one image about 0.1 ms, the test 0.05 ms."""
    first = header_bytes(images, 1)[..., 0]

    def check():
        empty = tf.debugging.Assert(tf.size(images) > 0, [EMPTY_BATCH_MESSAGE])
        kinds = refused_image_kind(images)
        message = (
            "the serving signature does not take these images; per image, 0: taken, "
            + "; ".join(f"{code}: {reason}" for code, reason in REFUSED_KINDS.items())
            + ":"
        )
        refuse = tf.debugging.Assert(tf.reduce_all(tf.equal(kinds, 0)), [message, kinds], summarize=64)
        with tf.control_dependencies([empty, refuse]):
            return tf.constant(True)

    jpegs_and_pngs = tf.logical_and(tf.size(images) > 0, tf.reduce_all((first == 0xFF) | (first == 0x89)))
    return tf.cond(jpegs_and_pngs, lambda: tf.constant(True), check)


def encoded_image_side(data) -> tf.Tensor:
    """Longest side of an encoded JPEG, PNG, GIF, BMP or WebP image, read
    from its header (int64; the in-graph twin of `image_size_from_header`).

    Returns 0 for other formats and headers it cannot read. Lets a graph
    refuse a huge image *before* decoding it (a small file can decode to
    gigabytes).
    """
    data = tf.convert_to_tensor(data, tf.string)

    def jpeg_side():
        shape = tf.image.extract_jpeg_shape(data, output_type=tf.int64)
        return tf.reduce_max(shape[:2])

    def png_side():
        raw = tf.cast(tf.io.decode_raw(tf.strings.substr(data, 16, 8), tf.uint8), tf.int64)
        powers = tf.constant([1 << 24, 1 << 16, 1 << 8, 1], tf.int64)
        width = tf.reduce_sum(raw[:4] * powers)
        height = tf.reduce_sum(raw[4:8] * powers)
        return tf.maximum(width, height)

    def gif_bmp_webp_side():
        padded = data + b"\0" * 32  # every offset below stays inside

        def little_endian(offset, size):
            raw = tf.cast(tf.io.decode_raw(tf.strings.substr(padded, offset, size), tf.uint8), tf.int64)
            return tf.reduce_sum(raw * tf.constant([1 << (8 * i) for i in range(size)], tf.int64))

        def signed32(value):
            return tf.abs(tf.where(value >= 1 << 31, value - (1 << 32), value))

        def starts(offset, text):
            return tf.equal(tf.strings.substr(padded, offset, len(text)), text)

        gif = tf.maximum(little_endian(6, 2), little_endian(8, 2))
        bmp_core = tf.maximum(little_endian(18, 2), little_endian(20, 2))  # 12-byte OS/2 header
        bmp = tf.where(
            tf.equal(little_endian(14, 4), 12),
            bmp_core,
            tf.maximum(signed32(little_endian(18, 4)), signed32(little_endian(22, 4))),
        )
        lossless_bits = little_endian(21, 4)
        webp = tf.where(
            starts(12, b"VP8 "),
            tf.maximum(little_endian(26, 2), little_endian(28, 2)) & 0x3FFF,
            tf.where(
                starts(12, b"VP8L"),
                tf.maximum(lossless_bits & 0x3FFF, (lossless_bits // (1 << 14)) & 0x3FFF) + 1,
                tf.where(
                    starts(12, b"VP8X"), tf.maximum(little_endian(24, 3), little_endian(27, 3)) + 1, tf.constant(0, tf.int64)
                ),
            ),
        )
        is_webp = starts(0, b"RIFF") & starts(8, b"WEBP")
        return tf.where(
            starts(0, b"GIF"), gif, tf.where(starts(0, b"BM"), bmp, tf.where(is_webp, webp, tf.constant(0, tf.int64)))
        )

    def other_side():
        is_png = tf.logical_and(
            tf.equal(tf.strings.substr(data, 0, 8), _PNG_SIGNATURE),
            tf.strings.length(data) >= 24,
        )
        return tf.cond(is_png, png_side, gif_bmp_webp_side)

    return tf.cond(tf.io.is_jpeg(data), jpeg_side, other_side)


def header_bytes(data, length: int) -> tf.Tensor:
    """In-graph: the first `length` bytes of encoded images (a scalar or a
    batch) as int32 `(..., length)`, zero past the end of a short file. No
    string is copied (padding files with a string concatenation cost 0.25
    ms a request of 32)."""
    return tf.cast(tf.io.decode_raw(tf.convert_to_tensor(data, tf.string), tf.uint8, fixed_length=length), tf.int32)


def starts_with(head, offset: int, text: bytes) -> tf.Tensor:
    """Whether bytes `head` (..., n), as `header_bytes` reads them, hold
    `text` at `offset` (bool, one per image)."""
    expected = tf.cast(list(text), head.dtype)
    return tf.reduce_all(tf.equal(head[..., offset : offset + len(text)], expected), axis=-1)


def has_other_decodable_header(data) -> tf.Tensor:
    """In-graph: whether encoded bytes start like a GIF, BMP, WebP or JPEG XL
    file, the formats `decode_image` reads besides JPEG and PNG (the
    signatures `image_format` checks in Python). Safe on files shorter than
    any header."""
    head = header_bytes(data, len(_JXL_CONTAINER))
    return (
        starts_with(head, 0, b"GIF")
        | starts_with(head, 0, b"BM")
        | (starts_with(head, 0, b"RIFF") & starts_with(head, 8, b"WEBP"))
        | starts_with(head, 0, b"\xff\x0a")
        | starts_with(head, 0, _JXL_CONTAINER)
    )


# Encoded images TensorFlow's decoders cannot read, read wrongly, or read at
# a cost out of proportion to the face, by code (0: none of these). The
# serving signature refuses them all (the Python client sends them as PNG);
# the training pipeline refuses the ones it cannot read, looks an 8-bit
# BMP's colours up in its palette, and decodes GIFs (a cost on one's own data).
GIF, UNREAD_BMP, ANIMATED_WEBP, PALETTE_BMP = 1, 2, 3, 4
REFUSED_KINDS = {
    GIF: "a GIF: TensorFlow decodes every frame of an animated GIF (and a frame larger than its header "
    "says) before taking the first; send it as PNG",
    UNREAD_BMP: "a BMP TensorFlow cannot decode (compressed, or of other than 8, 24 or 32 bits per pixel); "
    "send it as PNG",
    ANIMATED_WEBP: "an animated WebP, which TensorFlow cannot decode to RGB; send its first frame as PNG",
    PALETTE_BMP: "an 8-bit (palette) BMP, whose colours TensorFlow's decoder reads as grey; send it as PNG",
}
_BMP_MIN_HEADER = 30  # file header (14) + the bits per pixel of either info header
# TensorFlow reads uncompressed rows only: BI_RGB (0) and BI_BITFIELDS (3).
# An RLE-compressed BMP fails to decode, or decodes to noise where its
# size happens to match.
_BMP_READ_COMPRESSIONS = (0, 3)
_HEAD = 34  # header bytes `refused_image_kind` reads: up to a BMP's compression


def refused_image_kind(data) -> tf.Tensor:
    """In-graph: the `REFUSED_KINDS` code (int32) of encoded bytes, a scalar
    or a batch (same shape out), from their first 34 bytes; 0 for any other
    image and for headers cut short (the decoder then has the last word).
    The twin of `refused_image_reason`."""
    data = tf.convert_to_tensor(data, tf.string)
    raw = header_bytes(data, _HEAD)

    # Bits per pixel: at byte 24 after the 12-byte OS/2 header, else at 28.
    core_header = starts_with(raw, 14, b"\x0c\0\0\0")
    bits = tf.where(core_header, raw[..., 24] + 256 * raw[..., 25], raw[..., 28] + 256 * raw[..., 29])
    # The compression (after bits per pixel; none in the OS/2 header) reads
    # 0 past the end of a short file: the decoder has the last word there.
    compression = tf.where(core_header, 0, raw[..., 30] + 256 * raw[..., 31] + 65536 * raw[..., 32] + 16777216 * raw[..., 33])
    compressed = tf.reduce_all(tf.not_equal(compression[..., None], list(_BMP_READ_COMPRESSIONS)), axis=-1)
    bmp = starts_with(raw, 0, b"BM") & (tf.strings.length(data) >= _BMP_MIN_HEADER)
    unread_bmp = bmp & (((bits != 8) & (bits != 24) & (bits != 32)) | compressed)
    animated_webp = starts_with(raw, 0, b"RIFF") & starts_with(raw, 8, b"WEBPVP8X") & (tf.bitwise.bitwise_and(raw[..., 20], 2) > 0)
    kind = tf.where(animated_webp, ANIMATED_WEBP, 0)
    kind = tf.where(bmp & (bits == 8), PALETTE_BMP, kind)
    kind = tf.where(unread_bmp, UNREAD_BMP, kind)
    return tf.where(starts_with(raw, 0, b"GIF"), GIF, kind)


def refused_image_reason(data: bytes) -> Optional[str]:
    """What `REFUSED_KINDS` says of encoded bytes, or None (plain Python, for
    servers and clients)."""
    head = bytes(data[:_HEAD])
    if head[:3] == b"GIF":
        return REFUSED_KINDS[GIF]
    if head[:2] == b"BM" and len(head) >= _BMP_MIN_HEADER:
        core_header = head[14:18] == b"\x0c\0\0\0"
        bits = int.from_bytes(head[24:26] if core_header else head[28:30], "little")
        compression = 0 if core_header else int.from_bytes(head[30:34].ljust(4, b"\0"), "little")
        if bits not in (8, 24, 32) or compression not in _BMP_READ_COMPRESSIONS:
            return REFUSED_KINDS[UNREAD_BMP]
        if bits == 8:
            return REFUSED_KINDS[PALETTE_BMP]
    if head[:4] == b"RIFF" and head[8:16] == b"WEBPVP8X" and len(head) > 20 and head[20] & 2:
        return REFUSED_KINDS[ANIMATED_WEBP]
    return None


def with_bmp_palette(data, image) -> tf.Tensor:
    """The colours of an 8-bit BMP (scalar bytes) decoded by `decode_image`:
    TensorFlow's BMP decoder returns the palette indices as grey levels;
    this looks them up in the file's palette (BGR0 entries after the info
    header, BGR after the 12-byte OS/2 one), as PIL shows the image."""
    data = tf.convert_to_tensor(data, tf.string)
    header_size = tf.reduce_sum(header_bytes(data, 18)[14:18] * tf.constant([1, 1 << 8, 1 << 16, 1 << 24]))
    start = tf.clip_by_value(14 + header_size, 0, tf.strings.length(data))
    table = tf.io.decode_raw(tf.strings.substr(data, start, 1024), tf.uint8, fixed_length=1024)  # zero-padded
    entry = tf.where(tf.equal(header_size, 12), 3, 4)
    offsets = tf.range(256)[:, None] * entry + tf.constant([2, 1, 0])  # BGR -> RGB
    palette = tf.gather(table, tf.minimum(offsets, 1023))
    return tf.gather(palette, tf.cast(image[..., 0], tf.int32))


def image_format(data: bytes) -> Optional[str]:
    """The format of encoded image bytes ("jpeg", "png", ...) or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == _PNG_SIGNATURE:
        return "png"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:2] == b"BM":
        return "bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data[:2] == b"\xff\x0a" or data[:12] == _JXL_CONTAINER:
        return "jxl"
    return None


def image_size_from_header(data: bytes) -> Optional[tuple[int, int]]:
    """(height, width) read from the header of encoded image bytes.

    None when the format is unknown or the header cannot be read (the decoder
    then has the last word). Never decodes pixels.
    """
    try:
        fmt = image_format(data)
        if fmt == "png" and len(data) >= 24:
            width, height = struct.unpack(">II", data[16:24])
            return height, width
        if fmt == "gif" and len(data) >= 10:
            width, height = struct.unpack("<HH", data[6:10])
            return height, width
        if fmt == "bmp" and len(data) >= 26:
            (header_size,) = struct.unpack("<I", data[14:18])
            if header_size == 12:
                width, height = struct.unpack("<HH", data[18:22])
            else:
                width, height = struct.unpack("<ii", data[18:26])
            return abs(height), abs(width)
        if fmt == "webp":
            return _webp_size(data)
        if fmt == "jpeg":
            return _jpeg_size(data)
    except struct.error:
        return None
    return None


def _jpeg_size(data: bytes) -> Optional[tuple[int, int]]:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return height, width
        i += 2 + length
    return None


def _webp_size(data: bytes) -> Optional[tuple[int, int]]:
    chunk = data[12:16]
    if chunk == b"VP8 " and len(data) >= 30:
        width, height = struct.unpack("<HH", data[26:30])
        return height & 0x3FFF, width & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25:
        (bits,) = struct.unpack("<I", data[21:25])
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if chunk == b"VP8X" and len(data) >= 30:
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return height, width
    return None
