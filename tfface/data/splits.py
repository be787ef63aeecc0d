"""Deterministic train/val/test splits of a `FaceSource`.

When identities are known the split is by person: the same face in train
and validation would make validation scores look better than they are on
new people (the shared CelebA copies hold many images per person). Without
identities it is a fixed-seed random split by image.
"""

from __future__ import annotations

import numpy as np

from tfface.data.source import FaceSource

DEFAULT_SEED = 20240601
SPLIT_NAMES = ("train", "val", "test")


def _target(fraction: float, total: int) -> int:
    if fraction <= 0:
        return 0
    return max(1, int(round(fraction * total))) if total > 1 else 0


def split_indices(source: FaceSource, val_fraction=0.15, test_fraction=0.0, seed=DEFAULT_SEED) -> dict:
    """Like `split_source`, but returns sorted row indices per split."""
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= float(value) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction must be below 1 (train needs images), got {val_fraction + test_fraction}"
        )
    n = len(source)
    rng = np.random.default_rng(seed)
    n_test, n_val = _target(test_fraction, n), _target(val_fraction, n)
    assignment = np.zeros((n,), np.int8)  # 0 train, 1 val, 2 test
    if source.identities is not None:
        identities = np.asarray(source.identities, np.int64).copy()
        # Unknown identities (-1) become their own groups, numbered below -1.
        unknown = identities < 0
        identities[unknown] = -2 - np.flatnonzero(unknown)
        groups, group_of, sizes = np.unique(identities, return_inverse=True, return_counts=True)
        order = rng.permutation(len(groups))
        before = np.cumsum(sizes[order]) - sizes[order]  # images placed before each group
        split_of_group = np.empty((len(groups),), np.int8)
        split_of_group[order] = np.where(before < n_test, 2, np.where(before < n_test + n_val, 1, 0))
        assignment = split_of_group[group_of.reshape(-1)]
    else:
        order = rng.permutation(n)
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

    Identity-disjoint when `source.identities` is set (images with unknown
    identity, -1, count as one person each); sizes then match the fractions
    up to the size of one person's image set. Rows keep their source order
    within each split. The same source, fractions and seed always give the
    same split.
    """
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
