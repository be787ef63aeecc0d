"""What turning images upright costs the serving graph's preprocessing.

Since 0.2.1 `preprocess_encoded_images` (the bytes signature's decode,
checks, crop and resize) reads every image's EXIF orientation for the whole
request at once and turns tagged images upright; since 0.2.2 it also checks
the whole request for refused kinds (GIF, unreadable BMP, animated WebP) and
8-bit BMPs, whose palette it applies. This times it, as a
`tf.function`, on real `celeba_sample` JPEG crops: without EXIF (the
common case: one scan of each file's first 4 KiB, then the loop with one
`tf.cond` more per image),
and the same crops re-encoded with an EXIF "rotate 90" tag (each is parsed
and turned), against the loop without any orientation step (what 0.2.0
ran). Calls alternate between the variants, and the table gives medians.

`--baseline-tree DIR` adds a third variant: `preprocess_encoded_images` of
the tfface checkout in DIR (e.g. a `git worktree` of an earlier release),
timed in the same alternation, so a change is measured against it directly.

Run: python benchmarks/exif_preprocess.py [--image-size 64] [--repeats 200] [--baseline-tree DIR]
"""

import argparse
import io
import statistics
import sys
import time

from common import parse_args
from common import positive_int
from common import positive_ints
from common import print_table
from common import run
from common import write_results


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image-size", type=positive_int, default=64)
    parser.add_argument("--batch-sizes", type=positive_ints, default=[1, 32])
    parser.add_argument("--repeats", type=positive_int, default=200)
    parser.add_argument("--baseline-tree", help="a tfface checkout whose preprocess_encoded_images to time too")
    args = parse_args(parser)

    import numpy as np
    import tensorflow as tf
    from PIL import Image

    from tfface.data import image_ops
    from tfface.data.sources import shared_data_dir

    data = shared_data_dir()
    if data is None or not (data / "celeba_sample").is_dir():
        sys.exit("exif_preprocess.py needs the real data (celeba_sample): see ../shared/data")
    files = sorted((data / "celeba_sample" / "images").iterdir())[: max(args.batch_sizes)]
    plain = [f.read_bytes() for f in files]

    def tagged_copy(encoded):
        exif = Image.Exif()
        exif[0x0112] = 6
        buffer = io.BytesIO()
        Image.open(io.BytesIO(encoded)).save(buffer, format="JPEG", quality=95, exif=exif.tobytes())
        return buffer.getvalue()

    tagged = [tagged_copy(encoded) for encoded in plain]
    size, max_side = args.image_size, 4096

    def as_stored(images):  # 0.2.0's preprocess_encoded_images, as it was: checks, decode, crop, resize
        limit = tf.constant(max_side, tf.int64)

        def one(data):
            check_header = tf.debugging.assert_less_equal(image_ops.encoded_image_side(data), limit)
            with tf.control_dependencies([check_header]):
                image = image_ops.decode_image(data)
            check_pixels = tf.debugging.assert_less_equal(tf.cast(tf.reduce_max(tf.shape(image)[:2]), tf.int64), limit)
            with tf.control_dependencies([check_pixels]):
                return image_ops.preprocess_image(image, size)

        return tf.map_fn(one, images, fn_output_signature=tf.TensorSpec((size, size, 3), tf.float32))

    variants = {
        "0.2.0 loop (no orientation)": tf.function(as_stored),
        "preprocess_encoded_images (this tfface)": tf.function(lambda images: image_ops.preprocess_encoded_images(images, size, max_side)),
    }
    if args.baseline_tree:
        baseline_ops = baseline_image_ops(args.baseline_tree)
        variants["baseline preprocess_encoded_images"] = tf.function(
            lambda images: baseline_ops.preprocess_encoded_images(images, size, max_side)
        )
    rows = []
    for batch_size in args.batch_sizes:
        for name, encoded in (("no EXIF", plain), ("EXIF rotate 90", tagged)):
            batch = tf.constant(encoded[:batch_size])
            times = {variant: [] for variant in variants}
            for fn in variants.values():
                fn(batch)  # trace
            order = list(variants)
            for r in range(args.repeats):
                for variant in order if r % 2 else order[::-1]:
                    start = time.perf_counter()
                    variants[variant](batch)
                    times[variant].append(time.perf_counter() - start)
            before, after, *baseline = (statistics.median(times[v]) * 1e3 for v in order)
            rows.append({
                "batch": batch_size, "images": name, "no_orientation_ms": before, "upright_ms": after,
                "added_ms": after - before, "ratio": after / before,
                **({"baseline_ms": baseline[0], "vs_baseline_ms": after - baseline[0]} if baseline else {}),
            })
    check = np.asarray(variants["preprocess_encoded_images (this tfface)"](tf.constant(plain[:1])))
    assert np.array_equal(check, np.asarray(variants["0.2.0 loop (no orientation)"](tf.constant(plain[:1]))))
    print(f"{size} px, median of {args.repeats} alternated calls; 'no orientation' skips the EXIF step entirely")
    columns = ["batch", "images", "no_orientation_ms", "upright_ms", "added_ms", "ratio"]
    print_table(rows, columns + (["baseline_ms", "vs_baseline_ms"] if args.baseline_tree else []))
    write_results("exif_preprocess", {
        "image_size": size, "repeats": args.repeats, "baseline_tree": args.baseline_tree, "rows": rows,
    })


def baseline_image_ops(tree):
    """`tfface.data.image_ops` of another checkout, loaded under its own name
    (it imports nothing of tfface)."""
    import importlib.util
    from pathlib import Path

    path = Path(tree) / "tfface" / "data" / "image_ops.py"
    if not path.is_file():
        sys.exit(f"--baseline-tree {tree}: no tfface/data/image_ops.py there")
    spec = importlib.util.spec_from_file_location("baseline_image_ops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    run(main)
