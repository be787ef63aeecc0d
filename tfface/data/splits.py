"""Deterministic train/val/test splits of a `FaceSource`.

When identities are known the split is by person: the same face in train
and validation would make validation scores look better than they are on
new people (the shared CelebA copies hold many images per person). A
person's split is a hash of (seed, identity) alone, so it is the same in
every source that shares the identity numbers: the two CelebA folders are
split separately yet hold the same people (splitting each folder on its
own once put 27% of the CelebA validation images' people in training).
Without identities it is a split by image, each image ranked by a hash of
(seed, file name), or of its pixels for images held in memory: removing or
adding an image moves no other image to the other side (a random
permutation of the rows reshuffled nearly every image, so a folder cleaned
of one bad file was validated partly on the images it had trained on).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from tfface.data.source import FaceSource

DEFAULT_SEED = 20240601
SPLIT_NAMES = ("train", "val", "test")
# Raised whenever the same data, fractions and seed would split otherwise, so
# runs, searches and evaluations can tell a split of another method apart:
# 1: a seeded permutation of the rows;
# 2 (2026-11-23): people by a hash of (seed, identity), others by permutation;
# 3 (2026-11-23): images without an identity by a hash of (seed, file name).
# Runs record it in split.json, searches in search.json (`split_record`).
SPLIT_METHOD = 3


def split_record(val_fraction, split_seed) -> dict:
    """What a run or search records of its split, beside its config."""
    from tfface import __version__

    return {"split_method": SPLIT_METHOD, "val_fraction": val_fraction, "split_seed": split_seed, "tfface_version": __version__}


def split_method_problem(recorded: dict | None, what: str) -> str | None:
    """Why `what` (a run, a search) may not have the split this tfface
    makes, or None when it does."""
    if recorded is None:
        return (
            f"{what} records no split method: it was started by a tfface before 0.2.0, whose split of the same "
            f"data may differ (split method {SPLIT_METHOD} dates from 2026-11-23)"
        )
    if recorded.get("split_method") != SPLIT_METHOD:
        return (
            f"{what} was split by method {recorded.get('split_method')} (tfface {recorded.get('tfface_version')}), "
            f"this tfface splits by method {SPLIT_METHOD}: the same data and seed give other validation images"
        )
    return None


def _target(fraction: float, total: int) -> int:
    if fraction <= 0:
        return 0
    return max(1, int(round(fraction * total))) if total > 1 else 0


def identity_draws(identities, seed) -> np.ndarray:
    """A uniform number in [0, 1) per identity, fixed by (seed, identity)
    alone (a SplitMix64 hash: the same on every machine and numpy)."""
    mask = np.uint64(0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        salt = np.uint64(int(seed) & 0xFFFFFFFF) * np.uint64(0x9E3779B97F4A7C15)
        x = np.asarray(identities, np.int64).astype(np.uint64) ^ salt
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & mask
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & mask
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & mask
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def image_draws(source: FaceSource, rows, seed) -> np.ndarray:
    """A number in [0, 1) per row, fixed by (seed, the image's file name) or,
    for images in memory, (seed, its pixels); not by the other rows."""
    salt = int(seed).to_bytes(8, "little", signed=True)

    def draw(key: bytes) -> float:
        digest = hashlib.blake2b(key, digest_size=8, key=salt).digest()
        return (int.from_bytes(digest, "little") >> 11) / float(1 << 53)

    if source.image_paths is not None:
        keys = (os.path.basename(str(source.image_paths[i])).encode("utf-8", "surrogateescape") for i in rows)
    else:
        keys = (np.ascontiguousarray(source.images[i]).tobytes() for i in rows)
    return np.fromiter((draw(key) for key in keys), np.float64, count=len(rows))


def split_indices(source: FaceSource, val_fraction=0.15, test_fraction=0.0, seed=DEFAULT_SEED) -> dict:
    """Like `split_source`, but returns sorted row indices per split."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be below 1 (train needs images), got {val_fraction + test_fraction}"
        )
    assignment = np.zeros((len(source),), np.int8)  # 0 train, 1 val, 2 test
    by_image = np.arange(len(source))
    if source.identities is not None:
        identities = np.asarray(source.identities, np.int64)
        known = identities >= 0
        draw = identity_draws(identities[known], seed)
        assignment[known] = np.where(draw < test_fraction, 2, np.where(draw < test_fraction + val_fraction, 1, 0))
        by_image = np.flatnonzero(~known)  # unknown identity (-1): one person per image
    order = by_image[np.argsort(image_draws(source, by_image, seed), kind="stable")]
    n_test, n_val = _target(test_fraction, len(order)), _target(val_fraction, len(order))
    assignment[order[:n_test]] = 2
    assignment[order[n_test : n_test + n_val]] = 1
    splits = {"train": np.flatnonzero(assignment == 0)}
    if val_fraction > 0:
        splits["val"] = np.flatnonzero(assignment == 1)
    if test_fraction > 0:
        splits["test"] = np.flatnonzero(assignment == 2)
    return splits


def split_source(source: FaceSource, val_fraction=0.15, test_fraction=0.0, seed=DEFAULT_SEED) -> dict:
    """Splits `source` into {"train", "val" (if val_fraction > 0), "test"
    (if test_fraction > 0)} -> `FaceSource`.

    Identity-disjoint when `source.identities` is set, also across sources
    that share identity numbers (images with unknown identity, -1, count as
    one person each); each person lands in val with probability
    `val_fraction`, so split sizes are near the fractions, not exact. Rows
    keep their source order within each split. The same source, fractions
    and seed always give the same split.
    """
    if len(source) == 0:
        raise ValueError(f"source {source.name!r} has no images to split")
    indices = split_indices(source, val_fraction, test_fraction, seed)
    return {name: source.subset(rows) for name, rows in indices.items()}


def partition_indices(source: FaceSource) -> dict:
    """Sorted row indices of each partition that has images."""
    if source.partition is None:
        raise ValueError(f"source {source.name!r} has no partition; use split_source")
    partition = np.asarray(source.partition).astype(str)
    return {name: np.flatnonzero(partition == name) for name in SPLIT_NAMES if (partition == name).any()}


def partition_splits(source: FaceSource) -> dict:
    """The source's own partition (e.g. CelebA's official one) as splits."""
    return {name: source.subset(rows) for name, rows in partition_indices(source).items()}
