"""How much did the old per-folder CelebA split inflate validation scores?

Until the split became a hash of (seed, identity), each CelebA folder was
split on its own with a seeded permutation of its people, so a person with
images in both folders could be in training in one and in validation in the
other. This script rebuilds that old split for a run trained on it, marks the
validation images whose person was in the old training set ("leaked"), and
scores the run's model on the leaked and the clean images separately.

Run: python benchmarks/split_leak_check.py --run runs/gated_real_reg
Writes benchmarks/results/split_leak_check.json.
"""

import argparse

import numpy as np
from common import load_run
from common import parse_args
from common import print_table
from common import run
from common import write_results


def old_split(identities, val_fraction, seed):
    """Row indices (train, val) of the split tfface used before: a seeded
    permutation of the source's people, filled up to the val image count."""
    n = len(identities)
    rng = np.random.default_rng(seed)
    n_val = max(1, int(round(val_fraction * n))) if n > 1 else 0
    ids = np.asarray(identities, np.int64).copy()
    unknown = ids < 0
    ids[unknown] = -2 - np.flatnonzero(unknown)
    groups, group_of, sizes = np.unique(ids, return_inverse=True, return_counts=True)
    order = rng.permutation(len(groups))
    before = np.cumsum(sizes[order]) - sizes[order]
    is_val = np.empty((len(groups),), bool)
    is_val[order] = before < n_val
    val = is_val[group_of.reshape(-1)]
    return np.flatnonzero(~val), np.flatnonzero(val)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run trained before the split change (config.yaml, model.keras)")
    args = parse_args(parser)

    from tfface.data.sources import open_source
    from tfface.evaluation.evaluate import collect_predictions
    from tfface.evaluation.evaluate import compute_metrics

    config, model = load_run(args.run, check_split=False)  # it rebuilds the old split itself
    train_people, vals = set(), []
    for source_config in config.data.sources:
        source = open_source(source_config.path, image_size=config.data.image_size)
        if source.format != "celeba":
            continue
        if source.identities is None:
            raise ValueError(f"{source_config.path} has no identities.csv: no person can be checked for a leak")
        train_rows, val_rows = old_split(source.identities, config.data.val_fraction, config.data.split_seed)
        people = source.identities[train_rows]
        train_people |= set(people[people >= 0].tolist())  # an unknown identity (-1) is no person
        vals.append(source.subset(val_rows))
    labels, probs, _ = collect_predictions(model, vals)
    identities = np.concatenate([v.identities for v in vals])
    leaked = (identities >= 0) & np.isin(identities, list(train_people))
    rows = []
    for name, mask in (("all old validation images", np.ones_like(leaked)), ("leaked", leaked), ("clean", ~leaked)):
        metrics = compute_metrics(
            model.schema, {k: v[mask] for k, v in labels.items()}, {k: v[mask] for k, v in probs.items()}
        )
        rows.append({"images": name, "n": int(mask.sum()), "mean_accuracy": metrics["mean_accuracy"],
                     "mean_balanced_accuracy": metrics["mean_balanced_accuracy"]})
    print_table(rows, ["images", "n", "mean_accuracy", "mean_balanced_accuracy"])
    write_results("split_leak_check", {"run": str(args.run), "people_in_old_training": len(train_people), "rows": rows})


if __name__ == "__main__":
    run(main)
