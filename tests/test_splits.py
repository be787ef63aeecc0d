"""Identity-disjoint and random splits: disjoint (also across sources), deterministic, near the fractions."""

import numpy as np
import pytest

from tfface.data.source import FaceSource
from tfface.data.splits import identity_draws, image_draws, partition_splits, split_indices, split_source


PINNED_DRAWS = [0.7227087322664271, 0.5016798087842222, 0.9316881799515008]
PINNED_IMAGE_DRAWS = [0.6384743988715296, 0.5561897896074672, 0.5366361349264291]


def make_source(n=300, identities=True, seed=0):
    rng = np.random.default_rng(seed)
    return FaceSource(
        name="toy",
        format="celeba",
        columns={"Male": rng.integers(0, 2, n).astype(np.int32)},
        image_paths=np.array([f"{i:06d}.jpg" for i in range(n)]),
        identities=rng.integers(0, n // 4, n).astype(np.int64) if identities else None,
        partition=np.array(["train", "val", "test"])[np.arange(n) % 3],
    )


def test_identity_disjoint_and_sizes_near_fractions():
    source = make_source()
    splits = split_source(source, val_fraction=0.2, test_fraction=0.1)
    assert set(splits) == {"train", "val", "test"}
    ids = {name: set(s.identities.tolist()) for name, s in splits.items()}
    assert not ids["train"] & ids["val"] and not ids["train"] & ids["test"] and not ids["val"] & ids["test"]
    assert sum(len(s) for s in splits.values()) == len(source)
    largest_person = np.bincount(source.identities).max()
    assert abs(len(splits["val"]) - 60) <= 2 * largest_person
    assert abs(len(splits["test"]) - 30) <= 2 * largest_person
    # Every image lands in exactly one split.
    paths = np.concatenate([s.image_paths for s in splits.values()])
    assert sorted(paths.tolist()) == sorted(source.image_paths.tolist())


def test_sources_sharing_people_put_each_person_on_one_side():
    # Two folders of one dataset (the two CelebA copies) share identity
    # numbers but are opened and split one by one.
    first, second = make_source(n=300, seed=1), make_source(n=500, seed=2)
    a, b = (split_source(s, val_fraction=0.2) for s in (first, second))
    train = set(a["train"].identities.tolist()) | set(b["train"].identities.tolist())
    val = set(a["val"].identities.tolist()) | set(b["val"].identities.tolist())
    assert val and not train & val


def test_identity_draws_are_fixed_and_uniform():
    ids = np.arange(20000)
    draws = identity_draws(ids, seed=7)
    np.testing.assert_array_equal(draws, identity_draws(ids, seed=7))
    np.testing.assert_array_equal(draws[[5, 17]], identity_draws(np.array([5, 17]), seed=7))  # per identity
    assert not np.array_equal(draws, identity_draws(ids, seed=8))
    assert draws.min() >= 0.0 and draws.max() < 1.0
    np.testing.assert_allclose(np.histogram(draws, bins=10, range=(0, 1))[0] / len(ids), 0.1, atol=0.01)
    # Pinned values: the split of a person must not move between versions.
    np.testing.assert_allclose(identity_draws(np.array([0, 1, 123456]), seed=20240601), PINNED_DRAWS, rtol=0, atol=1e-15)


def test_deterministic_and_seed_dependent():
    source = make_source()
    a = split_indices(source, seed=3)
    b = split_indices(source, seed=3)
    c = split_indices(source, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["val"], c["val"])
    assert all(np.all(np.diff(rows) > 0) for rows in a.values())  # source order kept


def test_random_split_without_identities():
    source = make_source(n=200, identities=False)
    splits = split_source(source, val_fraction=0.15)
    assert set(splits) == {"train", "val"}
    assert len(splits["val"]) == 30 and len(splits["train"]) == 170
    assert not set(splits["val"].image_paths) & set(splits["train"].image_paths)


def synthetic_source(n):
    rng = np.random.default_rng(1)
    return FaceSource(
        name="in_memory",
        format="synthetic",
        columns={"Male": rng.integers(0, 2, n).astype(np.int32)},
        images=rng.integers(0, 256, (n, 8, 8, 3)).astype(np.uint8),
    )


def test_image_draws_are_fixed_by_seed_and_file_name():
    source = make_source(n=3, identities=False)
    draws = image_draws(source, np.arange(3), seed=7)
    assert np.allclose(draws, image_draws(source.subset([0, 1, 2]), np.arange(3), seed=7))
    assert np.allclose(image_draws(source.subset([2]), [0], seed=7), draws[2:])  # other rows do not matter
    assert not np.allclose(draws, image_draws(source, np.arange(3), seed=8))
    assert np.allclose(draws, PINNED_IMAGE_DRAWS), draws.tolist()  # the same on every machine


def test_an_image_split_does_not_move_other_images_when_one_is_removed():
    # A folder cleaned of one bad file must not validate on images it trained on.
    for source in (make_source(n=400, identities=False), synthetic_source(120)):
        before = split_source(source, val_fraction=0.25)
        after = split_source(source.subset(range(1, len(source))), val_fraction=0.25)
        key = (lambda s: set(s.image_paths)) if source.image_paths is not None else (lambda s: {x.tobytes() for x in s.images})
        moved = key(after["val"]) & key(before["train"])
        assert len(moved) <= 1, len(moved)  # the size target may take one more or fewer
        assert len(key(after["val"]) & key(before["val"])) >= len(before["val"]) - 2


def test_unknown_identities_are_separate_people():
    source = make_source(n=100)
    source.identities[:] = -1
    splits = split_source(source, val_fraction=0.25)
    assert len(splits["val"]) == 25  # each image its own group: exact sizes


def test_bad_fractions_raise():
    source = make_source(n=20)
    with pytest.raises(ValueError, match="val_fraction"):
        split_source(source, val_fraction=1.5)
    with pytest.raises(ValueError, match="below 1"):
        split_source(source, val_fraction=0.6, test_fraction=0.5)
    with pytest.raises(ValueError, match="has no images to split"):
        split_source(source.subset([]))


def test_split_keeps_labels_aligned():
    source = make_source()
    val = split_source(source)["val"]
    index = {p: i for i, p in enumerate(source.image_paths)}
    rows = [index[p] for p in val.image_paths]
    np.testing.assert_array_equal(val.columns["Male"], source.columns["Male"][rows])
    np.testing.assert_array_equal(val.identities, source.identities[rows])


def test_partition_splits():
    splits = partition_splits(make_source(n=9))
    assert {k: len(v) for k, v in splits.items()} == {"train": 3, "val": 3, "test": 3}
    assert set(splits["val"].partition) == {"val"}
