"""Input pipeline speed against the training step rate (issue: foundation).

Measures images/s of the fused CelebA + UTKFace training stream (decode,
crop, resize, cache, mix, augment, batch) at 128 px, and the training step
rate of the default gated model on the same batches, in one run. The target
is pipeline >= 3x the training rate, so input is never the bottleneck.

Run: python benchmarks/pipeline_benchmark.py [--image-size 128] [--batches 60]
Without the real data it falls back to synthetic faces (and says so).
"""

import argparse
import time

from common import parse_args
from common import positive_int
from common import print_table
from common import run
from common import write_results


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--image-size", type=positive_int, default=128)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--batches", type=positive_int, default=60)
    parser.add_argument("--train-steps", type=positive_int, default=15)
    args = parse_args(parser)

    import keras

    from tfface.config import ModelConfig
    from tfface.data.pipeline import make_dataset
    from tfface.data.sources import open_source
    from tfface.data.sources import shared_data_dir
    from tfface.schema import get_schema
    from tfface.models.build import build_model

    schema = get_schema("fused")
    if shared_data_dir() is not None:
        sources = [open_source("celeba_sample"), open_source("celeba_lowres"), open_source("utkface")]
        data = "celeba_sample + celeba_lowres + utkface"
    else:
        sources = [open_source("synthetic:3000", image_size=args.image_size)]
        data = "synthetic (real data not found)"
    dataset = make_dataset(
        sources, schema, args.image_size, batch_size=args.batch_size, training=True, steps_per_epoch=10**6
    )
    # First pass fills the cache (decode dominates); the steady state reads
    # from the cache, as every epoch after the first does.
    iterator = iter(dataset)
    total_images = sum(len(s) for s in sources)
    start = time.perf_counter()
    for _ in range(total_images // args.batch_size + 1):
        next(iterator)
    first_pass = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.batches):
        next(iterator)
    cached = time.perf_counter() - start
    pipeline_rate = args.batches * args.batch_size / cached
    first_rate = (total_images // args.batch_size + 1) * args.batch_size / first_pass

    model = build_model(schema, ModelConfig(image_size=args.image_size))
    model.compile()
    batch = next(iterator)
    model.train_on_batch(*batch)
    start = time.perf_counter()
    for _ in range(args.train_steps):
        model.train_on_batch(*batch)
    step = (time.perf_counter() - start) / args.train_steps
    train_rate = args.batch_size / step
    keras.backend.clear_session()

    rows = [
        {"stage": "pipeline, first pass (decode + cache fill)", "images_per_s": first_rate},
        {"stage": "pipeline, cached epochs (augment + batch)", "images_per_s": pipeline_rate},
        {"stage": "training step, default gated model", "images_per_s": train_rate},
    ]
    ratio = pipeline_rate / train_rate
    print(f"data: {data}; image size {args.image_size}; batch {args.batch_size}")
    print_table(rows, ["stage", "images_per_s"])
    print(f"pipeline / training = {ratio:.2f}x (target >= 3x)")
    write_results(
        "pipeline",
        {"data": data, "image_size": args.image_size, "batch_size": args.batch_size, "rows": rows, "ratio": ratio, "target": 3.0},
    )


if __name__ == "__main__":
    run(main)
