"""Training start-up: how long the first epoch of `model.fit` takes (tracing
the train and validation steps) against a later one, per schema.

Before its first step Keras traces the train step into a TensorFlow graph;
with one chain of loss and metric ops per task that trace grew with the
number of attributes (42 tasks: ~20 s on 2 cores). Each round runs every
variant in a fresh process (the trace is per process), in alternating
order: 128 random images at --image-size, batch 16, one epoch with
validation, then three more (the fastest is the later epoch's time).

`--baseline-tree DIR` adds the same run on the tfface checkout in DIR (e.g.
a `git worktree` of an earlier commit), so a change is measured against it.

Run: python benchmarks/train_startup.py [--schemas synthetic,fused] [--rounds 3] [--baseline-tree DIR]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from common import parse_args
from common import positive_int
from common import print_table
from common import run
from common import write_results

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, os, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np, tensorflow as tf, keras
from tfface.config import ModelConfig
from tfface.models import build_model
from tfface.schema import get_schema
schema_name, size = sys.argv[1], int(sys.argv[2])
keras.utils.set_random_seed(0)
schema = get_schema(schema_name)
model = build_model(schema, ModelConfig(type="gated", image_size=size))
model.compile()
rng = np.random.default_rng(0)
n = 128
x = rng.uniform(0, 255, (n, size, size, 3)).astype("float32")
y = {t.name: rng.integers(-1, 2 if t.is_binary else t.num_classes, n).astype("float32" if t.is_binary else "int32") for t in schema}
data = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
start = time.perf_counter()
model.fit(data, validation_data=data, epochs=1, verbose=0)
first = time.perf_counter() - start
later = []
for _ in range(3):
    start = time.perf_counter()
    model.fit(data, validation_data=data, epochs=1, verbose=0)
    later.append(time.perf_counter() - start)
second = min(later)
print("RESULT " + json.dumps({"tasks": len(schema), "first_epoch_s": first, "later_epoch_s": second}))
"""


def run_child(tree, schema, size):
    env = dict(os.environ, PYTHONPATH=str(tree), TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, schema, str(size)], cwd=tree, env=env, capture_output=True, text=True
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"the run in {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--schemas", default="synthetic,fused", help="comma list of schema names")
    parser.add_argument("--image-size", type=positive_int, default=64)
    parser.add_argument("--rounds", type=positive_int, default=3)
    parser.add_argument("--baseline-tree", help="a tfface checkout to time the same way")
    args = parse_args(parser)
    from tfface.schema import get_schema

    schemas = [s.strip() for s in args.schemas.split(",") if s.strip()]
    for name in schemas:
        get_schema(name)  # a bad name is one line, before any run
    trees = {"this tree": REPO}
    if args.baseline_tree:
        baseline = Path(args.baseline_tree).resolve()
        if not (baseline / "tfface" / "__init__.py").is_file():
            raise FileNotFoundError(f"--baseline-tree {baseline} is not a tfface checkout")
        trees["baseline"] = baseline
    samples = {(s, t): [] for s in schemas for t in trees}
    for r in range(args.rounds):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for schema in schemas:
            for tree in order:
                result = run_child(trees[tree], schema, args.image_size)
                samples[(schema, tree)].append(result)
                print(f"round {r + 1}: {schema} on {tree}: first epoch {result['first_epoch_s']:.1f} s", flush=True)
    rows = []
    for (schema, tree), results in samples.items():
        first = statistics.median(r["first_epoch_s"] for r in results)
        later = statistics.median(r["later_epoch_s"] for r in results)
        rows.append({
            "schema": schema, "tasks": results[0]["tasks"], "code": tree,
            "first_epoch_s": round(first, 2), "later_epoch_s": round(later, 2),
            "start_up_s": round(first - later, 2),
        })
    print_table(rows, ["schema", "tasks", "code", "first_epoch_s", "later_epoch_s", "start_up_s"])
    write_results("train_startup", {
        "image_size": args.image_size, "rounds": args.rounds, "baseline_tree": args.baseline_tree,
        "rows": rows, "samples": {f"{s} / {t}": v for (s, t), v in samples.items()},
    })


if __name__ == "__main__":
    run(main)
