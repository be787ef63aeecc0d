"""Writes a config's training and validation split as one .npz file of images
and labels, for training where TensorFlow (so tf.data) is not installed:
the GPU machine, which has JAX but no TensorFlow (benchmarks/capacity_jax.py).

The split and the preprocessing are the training run's own (`load_sources`,
`make_dataset` without augmentation): the same identity-disjoint CelebA
validation images, cropped and resized as in training. Images are stored
JPEG-encoded (quality --quality) to stay small enough to carry; the encoding
error is measured and printed.

The file holds labelled face images: keep it out of the repository (it is
written under runs/ by default, which git ignores) and delete it after use.

Run: python benchmarks/export_split_arrays.py --config configs/gated_real.yaml
"""

import argparse
import io
from pathlib import Path

import numpy as np
from common import parse_args
from common import positive_int
from common import run


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality, subsampling=0)
    return buffer.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def split_arrays(config):
    """(part name -> {"images": uint8 (N, S, S, 3), task name -> labels,
    "_source": source index}) for "train" and "val"."""
    from tfface.data.pipeline import make_dataset
    from tfface.schema import get_schema
    from tfface.training.trainer import load_sources

    schema = get_schema(config.data.schema)
    train_sources, val_sources = load_sources(config.data)
    parts = {}
    for name, sources in (("train", train_sources), ("val", val_sources)):
        dataset = make_dataset(sources, schema, config.data.image_size, batch_size=256, cache=False)
        images, labels = [], {}
        for x, y in dataset.as_numpy_iterator():
            images.append(x["image"].astype(np.uint8))
            for key in [task.name for task in schema] + ["_source"]:
                labels.setdefault(key, []).append(y[key])
        parts[name] = {"images": np.concatenate(images), **{k: np.concatenate(v) for k, v in labels.items()}}
    return schema, [s.name for s in train_sources], parts


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--out", type=Path, help="the .npz to write (default runs/<config name>_split.npz)")
    parser.add_argument("--quality", type=positive_int, default=95)
    args = parse_args(parser)
    from tfface.config import ExperimentConfig

    config = ExperimentConfig.load(args.config)
    out = args.out or Path("runs") / f"{config.name}_split.npz"
    schema, source_names, parts = split_arrays(config)
    payload = {"tasks": np.array([t.name for t in schema]), "sources": np.array(source_names)}
    for part, arrays in parts.items():
        encoded = [encode_jpeg(image, args.quality) for image in arrays["images"]]
        error = np.mean([np.abs(decode_jpeg(e).astype(float) - i).mean() for e, i in zip(encoded[:500], arrays["images"])])
        # One byte string and its offsets: loading needs no pickle.
        payload[f"{part}/jpeg"] = np.frombuffer(b"".join(encoded), np.uint8)
        payload[f"{part}/jpeg_offsets"] = np.cumsum([0] + [len(e) for e in encoded])
        for key, value in arrays.items():
            if key != "images":
                payload[f"{part}/{key}"] = value
        print(f"{part}: {len(encoded)} images, {sum(map(len, encoded)) / 2**20:.1f} MiB as JPEG q{args.quality}, "
              f"mean absolute error {error:.2f}/255 against the pipeline's pixels")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **payload)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    run(main)
