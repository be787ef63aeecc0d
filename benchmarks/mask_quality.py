"""Mask quality: IoU of predicted group masks against landmark-drawn masks, per group.

Runs a trained mask-guided model over the validation faces that have
landmarks (CelebA and UTKFace, split as in training) and compares its
predicted masks with the masks drawn from the MTCNN landmarks, both
binarised at 0.5, at the model's mask resolution (image size / 4). A blank
prediction is the reference: its IoU is 0 for every non-empty group.

Run: python benchmarks/mask_quality.py --run runs/ablation_mask_guided/variant2
Writes benchmarks/results/mask_quality.json and prints a table.
"""

import argparse

import numpy as np
from common import load_run
from common import parse_args
from common import print_table
from common import run
from common import write_results


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="training output dir of a mask-guided model")
    args = parse_args(parser)

    from tfface.data.pipeline import make_dataset
    from tfface.schema import GROUPS
    from tfface.training.trainer import load_sources

    config, model = load_run(args.run)
    if config.model.type != "mask_guided":
        raise ValueError(f"{args.run} holds a {config.model.type} model: mask quality needs a mask-guided run")
    _, val_sources = load_sources(config.data)
    dataset = make_dataset(val_sources, model.schema, model.image_size, batch_size=64, with_masks=True, cache=False)
    intersection = np.zeros(len(GROUPS))
    union = np.zeros(len(GROUPS))
    faces = 0
    for x, y in dataset:
        valid = y["_has_landmarks"].numpy() > 0
        if not valid.any():
            continue
        predicted = model.predict_on_batch(x)["_group_masks"][valid] >= 0.5
        truth = y["_group_masks"].numpy()[valid] >= 0.5
        intersection += (predicted & truth).sum(axis=(0, 1, 2))
        union += (predicted | truth).sum(axis=(0, 1, 2))
        faces += int(valid.sum())
    if not faces:
        raise ValueError(
            f"no validation face of {args.run} has landmarks: run `tfface data annotate` on its sources first"
        )
    rows = [{"group": g, "iou": float(i / u) if u else None} for g, i, u in zip(GROUPS, intersection, union)]
    mean = float(np.mean([r["iou"] for r in rows if r["iou"] is not None]))
    rows.append({"group": "mean", "iou": mean})
    print(f"{faces} validation faces with landmarks; masks {model.image_size // 4}x{model.image_size // 4}")
    print_table(rows, ["group", "iou"])
    write_results("mask_quality", {"run": str(args.run), "faces": faces, "rows": rows, "blank_mask_iou": 0.0})


if __name__ == "__main__":
    run(main)
