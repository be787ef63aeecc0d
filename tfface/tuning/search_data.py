"""The data every trial of a search trains and validates on, and its record.

A search reads its data once and reuses it for every trial. Its record
(per source: image counts and digests of the image ids and labels) is
what lets a resumed search, or a worker, tell that the data under it has
not changed: trials trained on other images must never be ranked together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Optional

from tfface.config import ExperimentConfig


@dataclasses.dataclass
class SearchData:
    """The datasets every trial reuses (read once per search)."""

    train: Any
    val: Any
    steps_per_epoch: int
    # Task name -> training labels, for models that start from label
    # statistics (model.correlation_init: label_correlation).
    train_labels: Optional[dict] = None
    # Which images each source gave to training and validation
    # (`data_record`); search.json keeps it so a resume can tell.
    data_record: Optional[dict] = None


def load_search_data(config: ExperimentConfig) -> SearchData:
    """Reads and splits the sources and builds the fused train/val datasets."""
    from tfface.schema import get_schema
    from tfface.training.trainer import check_mask_supervision
    from tfface.training.trainer import load_sources
    from tfface.training.trainer import make_datasets
    from tfface.training.trainer import training_labels

    schema = get_schema(config.data.schema)
    train_sources, val_sources = load_sources(config.data)
    check_mask_supervision(config, train_sources)
    train_ds, val_ds = make_datasets(config, schema, train_sources, val_sources)
    steps = int(train_ds.cardinality().numpy())
    if steps < 1:
        steps = config.train.steps_per_epoch or 1
    return SearchData(
        train_ds, val_ds, steps, training_labels(schema, train_sources),
        data_record=data_record(config, train_sources, val_sources),
    )


# What image ids `data_record` digests, recorded beside the digests.
IMAGE_IDS = (
    "blake2b-16 of the sorted image ids, one per line: a file's path under its source's images folder, "
    "or the blake2b-16 of the pixels of an image held in memory"
)


def image_ids(source) -> list[str]:
    """An id per image of a `FaceSource` (split or not), without decoding
    any: a file's path under the source's images folder (as its label
    files name it), or a digest of the pixels of an image held in memory."""
    import numpy as np

    if source.image_paths is None:
        return [hashlib.blake2b(np.ascontiguousarray(image).tobytes(), digest_size=16).hexdigest()
                for image in source.images]
    if source.root:
        from tfface.data.sources import source_image_ids

        return source_image_ids(source)
    return [os.path.basename(str(p)) for p in source.image_paths]


def _ids_digest(ids) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for image_id in sorted(ids):
        digest.update(image_id.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


# What `data_record` digests as a side's labels, recorded beside the digests.
LABELS = (
    "blake2b-16 of each label column (sorted by name) as float64 values, rows in the order of the "
    "sorted image ids, then the identities the same way"
)


def _labels_digest(source, ids) -> str:
    """A digest of a side's label values, row order fixed by its image `ids`,
    so a label file rewritten with other values (same rows) is noticed."""
    import numpy as np

    digest = hashlib.blake2b(digest_size=16)
    if source is None or len(source) == 0:
        return digest.hexdigest()
    order = np.argsort(np.asarray(ids, dtype=object), kind="stable")
    named = sorted(source.columns.items())
    if source.identities is not None:
        named.append(("\0identities", source.identities))
    for name, values in named:
        digest.update(name.encode("utf-8") + b"\n")
        digest.update(np.asarray(values, dtype="<f8")[order].tobytes())
    return digest.hexdigest()


def data_record(config: ExperimentConfig, train_sources, val_sources) -> dict:
    """What a search trains and validates on, per source in the config's
    order: its path as the config gives it, its training and validation
    image counts, and digests of each side's sorted image ids and labels."""
    sources = []
    for i, source_config in enumerate(config.data.sources):
        val = val_sources[i] if i < len(val_sources) else None
        # Ids once per side: for images held in memory each is a hash of its pixels.
        train_ids, val_ids = image_ids(train_sources[i]), [] if val is None else image_ids(val)
        sources.append({
            "source": str(source_config.path),
            "train_images": len(train_sources[i]),
            "val_images": 0 if val is None else len(val),
            "train_ids": _ids_digest(train_ids),
            "val_ids": _ids_digest(val_ids),
            "train_labels": _labels_digest(train_sources[i], train_ids),
            "val_labels": _labels_digest(val, val_ids),
        })
    return {"image_ids": IMAGE_IDS, "labels": LABELS, "sources": sources}


def read_data_record(config: ExperimentConfig) -> dict:
    """`data_record` of the base experiment's sources, opened and split as
    a trial's data is, but without building any dataset (the chief trains
    nothing)."""
    from tfface.training.trainer import load_sources

    train_sources, val_sources = load_sources(config.data)
    return data_record(config, train_sources, val_sources)


def data_changes(before: dict, now: dict, then_word: str = "before", now_word: str = "now") -> list[str]:
    """What differs between two `data_record`s, in words."""
    old = before.get("sources") if isinstance(before, dict) else None
    if not isinstance(old, list) or not all(isinstance(s, dict) for s in old):
        return ["the recorded data cannot be read"]
    new = now["sources"]
    names_before, names_now = [s.get("source") for s in old], [s["source"] for s in new]
    if names_before != names_now:
        return [f"sources {names_before} {then_word}, {names_now} {now_word}"]
    changes = []
    for was, is_ in zip(old, new):
        for side, what in (("val", "validation"), ("train", "training")):
            count_before, count_now = was.get(f"{side}_images"), is_[f"{side}_images"]
            if count_before != count_now:
                changes.append(
                    f"{what} images of source {is_['source']}: {count_before} {then_word}, {count_now} {now_word}"
                )
            elif was.get(f"{side}_ids") != is_[f"{side}_ids"]:
                changes.append(
                    f"{what} images of source {is_['source']}: {count_now} {then_word} and {now_word}, "
                    "but not the same images"
                )
            elif was.get(f"{side}_labels") not in (None, is_.get(f"{side}_labels")):
                # (A record of tfface 0.2.1 or older has no label digest.)
                changes.append(
                    f"{what} labels of source {is_['source']}: the same {count_now} images, but other label values"
                )
    return changes
