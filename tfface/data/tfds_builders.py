"""TensorFlow Datasets builders for local face sources, fully offline.

`CelebaFolder`, `UtkfaceFolder` and `SyntheticFaces` turn a folder (or the
synthetic generator) into a prepared TFDS dataset, so anything that speaks
`tfds.builder(...)` / `as_dataset(split=...)` can use it. They never call
the download manager: `download_and_prepare` reads only the local folder.
Each example holds the image, its id, the source's raw label columns (-1
for missing), five landmarks (NaN when unknown) and the identity (-1 when
unknown).

The official `celeb_a` TFDS dataset downloads from rate-limited Google
Drive links, so `load_official_celeb_a` only reads a copy that is already
prepared and otherwise says how to get one; it never starts a download.

Importing this module registers the three builders with TFDS.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import re
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from tfface.data.image_ops import encode_png
from tfface.data.image_ops import file_exif_orientation
from tfface.data.image_ops import read_upright_rgb
from tfface.data.source import LANDMARK_COLUMNS, DataError, FaceSource
from tfface.data.splits import DEFAULT_SEED, partition_indices, split_indices

OFFICIAL_CELEB_A = "celeb_a"
# Refuse to decode more than this into memory without an explicit limit.
MAX_IN_MEMORY_BYTES = 4 * 1024**3
_OFFICIAL_SPLITS = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}


def offline_download_config(**overrides) -> tfds.download.DownloadConfig:
    """A `DownloadConfig` that fetches nothing (no GCS, no statistics pass)."""
    options = dict(
        try_download_gcs=False,
        compute_stats=tfds.download.ComputeStatsMode.SKIP,
        download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
    )
    options.update(overrides)
    return tfds.download.DownloadConfig(**options)


# --- configs ------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class FolderConfig(tfds.core.BuilderConfig):
    """A local folder and how to split it.

    The official partition is used when the folder has more than one
    partition; otherwise a `split_source` split with the fractions below
    (identity-disjoint when identities are known).
    """

    root: str = ""
    val_fraction: float = 0.15
    test_fraction: float = 0.0
    seed: int = DEFAULT_SEED
    skip_bad_rows: bool = False


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    """Generator arguments and split fractions of a synthetic dataset."""

    num_images: int = 2000
    image_size: int = 64
    generator_seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.0
    seed: int = DEFAULT_SEED


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "folder"


def folder_config(root, val_fraction=0.15, test_fraction=0.0, seed=DEFAULT_SEED, skip_bad_rows=False) -> FolderConfig:
    """A `FolderConfig` named after the folder and a fingerprint of its
    path, every file under it (relative path, size, time: label files and
    images alike), the landmark cache of `tfface data annotate` when it lives
    outside the folder, and the split settings, so a changed label file,
    image, landmark or split gives a new, separately prepared config."""
    from tfface.landmarks.cache import default_landmark_cache

    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    digest = hashlib.sha1(str(root).encode())
    seen = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):  # images/ may link elsewhere
        real = os.path.realpath(folder)
        if real in seen:  # a link loop
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders.sort()
        for name in sorted(files):
            try:
                stat = os.stat(os.path.join(folder, name))
            except OSError:  # a dangling link: no data behind it
                continue
            relative = os.path.relpath(os.path.join(folder, name), root)
            digest.update(f"{relative}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    cache = default_landmark_cache(root)  # may live outside the folder
    if cache.is_file() and root not in cache.resolve().parents:
        stat = cache.stat()
        digest.update(f"{cache}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    digest.update(f"{val_fraction}:{test_fraction}:{seed}:{skip_bad_rows}".encode())
    return FolderConfig(
        name=f"{_slug(root.name)}_{digest.hexdigest()[:10]}",
        description=f"faces in {root}",
        root=str(root),
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
        skip_bad_rows=skip_bad_rows,
    )


def synthetic_config(num_images=2000, image_size=64, generator_seed=0, val_fraction=0.15, test_fraction=0.0, seed=DEFAULT_SEED):
    splits = hashlib.sha1(f"{val_fraction}:{test_fraction}:{seed}".encode()).hexdigest()[:6]
    return SyntheticConfig(
        name=f"n{num_images}_size{image_size}_seed{generator_seed}_{splits}",
        description=f"{num_images} synthetic {image_size}x{image_size} faces, generator seed {generator_seed}",
        num_images=num_images,
        image_size=image_size,
        generator_seed=generator_seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        seed=seed,
    )


# --- builders -------------------------------------------------------------------


class _FaceSourceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared body: features, splits and examples from a `FaceSource`."""

    VERSION = tfds.core.Version("1.3.0")
    RELEASE_NOTES = {
        "1.0.0": "First version.",
        "1.1.0": "Identity splits by a hash of (seed, identity): the same person is on one side in every source.",
        "1.2.0": "Images without an identity are split by a hash of (seed, file name): removing one moves no other.",
        "1.3.0": "Images with an EXIF rotation are stored upright, as the pipeline and predict decode them.",
    }

    def _read_source(self) -> FaceSource:
        raise NotImplementedError

    @functools.cached_property
    def source(self) -> FaceSource:
        return self._read_source()

    def download_and_prepare(self, *, download_dir=None, download_config=None, **kwargs):
        """Prepares from local files only; see `offline_download_config`."""
        if download_config is None:
            download_config = offline_download_config()
        return super().download_and_prepare(download_dir=download_dir, download_config=download_config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        source = self.source
        image_shape = (None, None, 3) if source.images is None else tuple(np.asarray(source.images).shape[1:])
        return self.dataset_info_from_configs(
            description=f"{source.format} faces read by tfface from {source.root or source.name}",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=image_shape, encoding_format=None if source.images is None else "png"),
                    "image_id": tfds.features.Text(),
                    "labels": tfds.features.FeaturesDict(
                        {name: tfds.features.Scalar(np.int32) for name in source.columns}
                    ),
                    "landmarks": tfds.features.Tensor(shape=(5, 2), dtype=np.float32),
                    "identity": tfds.features.Scalar(np.int64),
                }
            ),
            metadata=tfds.core.MetadataDict(format=source.format, columns=list(source.columns)),
        )

    def _split_indices(self) -> dict:
        config = self.builder_config
        source = self.source
        if source.partition is not None:
            partitions = partition_indices(source)
            if len(partitions) > 1:
                return partitions
        return split_indices(source, config.val_fraction, config.test_fraction, config.seed)

    def _split_generators(self, dl_manager):
        del dl_manager  # Everything is local.
        return {name: self._generate_examples(rows) for name, rows in self._split_indices().items()}

    def _image_ids(self) -> list:
        source = self.source
        if source.image_paths is not None:
            return [os.path.basename(str(p)) for p in source.image_paths]
        return [f"{i + 1:06d}" for i in range(len(source))]

    def _generate_examples(self, rows):
        source = self.source
        image_ids = self._image_ids()
        nan = np.full((5, 2), np.nan, np.float32)
        for i in rows:
            i = int(i)
            # In-memory images go in as PNG bytes encoded with PIL: TFDS would
            # otherwise start a TensorFlow session per builder to encode them.
            image = encode_png(source.images[i]) if source.images is not None else _upright_file(source.image_paths[i])
            yield image_ids[i], {
                "image": image,
                "image_id": image_ids[i],
                "labels": {name: int(values[i]) for name, values in source.columns.items()},
                "landmarks": nan if source.landmarks is None else np.asarray(source.landmarks[i], np.float32),
                "identity": -1 if source.identities is None else int(source.identities[i]),
            }


def _upright_file(path):
    """The file's path, or, for an image with an EXIF rotation, its upright
    pixels as PNG bytes: TFDS decodes images as stored, the pipeline and
    `predict` upright."""
    if file_exif_orientation(path) == 1:
        return str(path)
    return encode_png(read_upright_rgb(path)[0])


class _FolderBuilder(_FaceSourceBuilder, skip_registration=True):
    def __init__(self, *, root=None, config=None, val_fraction=0.15, test_fraction=0.0, seed=DEFAULT_SEED, skip_bad_rows=False, **kwargs):
        if config is None:
            if root is None:
                raise ValueError(f"{type(self).__name__} needs root= (the folder) or config=folder_config(root)")
            config = folder_config(root, val_fraction, test_fraction, seed, skip_bad_rows)
        elif root is not None:
            raise ValueError("pass either root= or config=, not both")
        super().__init__(config=config, **kwargs)


class CelebaFolder(_FolderBuilder):
    """A CelebA-format folder (see `tfface.data.celeba`) as a TFDS dataset."""

    def _read_source(self):
        from tfface.data.celeba import read_celeba_folder
        from tfface.data.sources import attach_cached_landmarks

        # As `read_folder`: landmarks of `tfface data annotate` when the folder has none.
        return attach_cached_landmarks(read_celeba_folder(self.builder_config.root, skip_bad_rows=self.builder_config.skip_bad_rows))


class UtkfaceFolder(_FolderBuilder):
    """A UTKFace-format folder (see `tfface.data.utkface`) as a TFDS dataset."""

    def _read_source(self):
        from tfface.data.utkface import read_utkface_folder
        from tfface.data.sources import attach_cached_landmarks

        # As `read_folder`: landmarks of `tfface data annotate` when the folder has none.
        return attach_cached_landmarks(read_utkface_folder(self.builder_config.root, skip_bad_rows=self.builder_config.skip_bad_rows))


class SyntheticFaces(_FaceSourceBuilder):
    """`generate_synthetic_faces` output as a TFDS dataset."""

    def __init__(self, *, config=None, num_images=2000, image_size=64, generator_seed=0, val_fraction=0.15, test_fraction=0.0, seed=DEFAULT_SEED, **kwargs):
        if config is None:
            config = synthetic_config(num_images, image_size, generator_seed, val_fraction, test_fraction, seed)
        super().__init__(config=config, **kwargs)

    def _read_source(self):
        from tfface.data.synthetic import generate_synthetic_faces

        config = self.builder_config
        return generate_synthetic_faces(config.num_images, image_size=config.image_size, seed=config.generator_seed)


def prepare_builder(spec, data_dir, **kwargs) -> tfds.core.DatasetBuilder:
    """The prepared builder for a source spec ("synthetic[:N]", a named
    folder or a folder path), built into `data_dir` if not there yet."""
    from tfface.data.sources import NAMED_FOLDERS, detect_format, named_folder

    text = str(spec)
    if text == "synthetic" or text.startswith("synthetic:"):
        if ":" in text:
            kwargs.setdefault("num_images", int(text.split(":", 1)[1]))
        builder = SyntheticFaces(data_dir=data_dir, **kwargs)
    else:
        root = named_folder(text) if text in NAMED_FOLDERS else Path(text)
        cls = CelebaFolder if detect_format(root) == "celeba" else UtkfaceFolder
        builder = cls(root=root, data_dir=data_dir, **kwargs)
    builder.download_and_prepare()
    return builder


# --- the official TFDS celeb_a ------------------------------------------------------


def _default_tfds_dir() -> Path:
    return Path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()


def official_celeb_a_builder(data_dir=None) -> tfds.core.DatasetBuilder:
    """The official `celeb_a` builder, only if already prepared in `data_dir`
    (default `$TFDS_DATA_DIR` or ~/tensorflow_datasets). Never downloads."""
    data_dir = Path(data_dir).expanduser() if data_dir else _default_tfds_dir()
    prepared = sorted((data_dir / OFFICIAL_CELEB_A).glob("*/dataset_info.json"))
    builder = None
    if prepared:
        builder = tfds.builder(OFFICIAL_CELEB_A, data_dir=str(data_dir))
    if builder is None or not builder.is_prepared():
        raise FileNotFoundError(
            f"the official TFDS dataset 'celeb_a' is not prepared in {data_dir} (looked for "
            f"{data_dir / OFFICIAL_CELEB_A}/<version>/dataset_info.json). tfface never downloads it: "
            "TFDS fetches it from rate-limited Google Drive links. Either prepare it on a machine "
            f"with internet (`tfds build celeb_a --data_dir {data_dir}`) and copy its "
            f"'{OFFICIAL_CELEB_A}' folder into {data_dir}, or put the official CelebA files "
            "(img_align_celeba/, list_attr_celeba.txt and optionally list_eval_partition.txt, "
            "identity_CelebA.txt, list_landmarks_align_celeba.txt) in one folder and open that folder."
        )
    return builder


def load_official_celeb_a(data_dir=None, split="train", max_examples=None) -> FaceSource:
    """A split of the prepared official `celeb_a` as an in-memory `FaceSource`.

    Args:
        data_dir: TFDS data folder holding a prepared `celeb_a`.
        split: "train", "val" ("validation") or "test".
        max_examples: read only the first this many examples. Required
            when the split would take more than `MAX_IN_MEMORY_BYTES`; for
            the whole dataset use `official_celeb_a_builder(...).as_dataset()`.
    """
    if split not in _OFFICIAL_SPLITS:
        raise ValueError(f"split must be one of {sorted(_OFFICIAL_SPLITS)}, got {split!r}")
    builder = official_celeb_a_builder(data_dir)
    tfds_split = _OFFICIAL_SPLITS[split]
    total = builder.info.splits[tfds_split].num_examples
    count = total if max_examples is None else min(int(max_examples), total)
    shape = builder.info.features["image"].shape
    if max_examples is None and count * int(np.prod(shape)) > MAX_IN_MEMORY_BYTES:
        raise DataError(
            f"celeb_a {tfds_split} has {total} images, {count * np.prod(shape) / 1024**3:.1f} GiB decoded: "
            "pass max_examples=..., or use official_celeb_a_builder(data_dir).as_dataset() to stream it"
        )
    dataset = builder.as_dataset(split=f"{tfds_split}[:{count}]", shuffle_files=False)
    images, landmarks, identities = [], [], []
    columns: dict = {}
    for example in tfds.as_numpy(dataset):
        images.append(example["image"])
        landmarks.append([example["landmarks"][name] for name in LANDMARK_COLUMNS])
        identities.append(int(example["identity"]["Identity_No"]))
        for name, value in example["attributes"].items():
            columns.setdefault(name, []).append(int(value))
    n = len(images)
    return FaceSource(
        name=OFFICIAL_CELEB_A,
        format="celeba",
        columns={name: np.asarray(values, np.int32) for name, values in columns.items()},
        images=np.stack(images) if n else np.zeros((0, *shape), np.uint8),
        identities=np.asarray(identities, np.int64),
        landmarks=np.asarray(landmarks, np.float32).reshape(n, 5, 2),
        partition=np.full((n,), "val" if tfds_split == "validation" else tfds_split),
        image_sizes=np.tile(np.array(shape[:2], np.int64), (n, 1)),
        root=str(builder.data_dir),
    )
